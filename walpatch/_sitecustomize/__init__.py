"""The directory ``walpatch run`` puts first on ``PYTHONPATH``: it holds only the bootstrap
``sitecustomize.py`` (nothing else becomes importable through it). See ``walpatch.cli.run``."""
