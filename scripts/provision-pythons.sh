#!/usr/bin/env bash
# Provision the CPythons that pyenv cannot build here, into ~/.pyenv/versions (docs/compatibility.md):
#
#   * 3.14 and 3.15: Debian unstable's *binary* packages, unpacked with dpkg-deb -x into a private
#     prefix ~/.pyenv/versions/<upstream version> with unstable's own glibc and runtime libraries;
#     patchelf points the executable at that glibc's loader and every extension module at the
#     private library folder (DT_RPATH), so nothing on the system changes and nothing else sees it.
#   * 3.13 free-threaded (--disable-gil): built from the upstream tarball inside Debian's python3.13
#     source package (no PGO/LTO), installed as ~/.pyenv/versions/<version>t (pyenv's naming).
#
# apt runs with a private configuration (source list, lists, caches under $CACHE): the system's
# apt sources and state are never touched. The mirror is the one the system's own sources use.
# Idempotent: an interpreter already provisioned and healthy is left alone (--force redoes it).
# Only the free-threaded build's -dev packages come from the system's own sources (apt-get install).
#
# Usage: scripts/provision-pythons.sh [--force] [--only 3.14|3.15|3.13t]...
set -euo pipefail

PYENV_VERSIONS=${PYENV_ROOT:-$HOME/.pyenv}/versions
CACHE=${WALPATCH_PYTHONS_CACHE:-$HOME/.cache/walpatch-pythons}
MINORS=(3.14 3.15)
FORCE=0
ONLY=()
while [ $# -gt 0 ]; do
    case "$1" in
        --force) FORCE=1 ;;
        --only) ONLY+=("$2"); shift ;;
        *) echo "usage: $0 [--force] [--only 3.14|3.15|3.13t]..." >&2; exit 2 ;;
    esac
    shift
done
wanted() { [ ${#ONLY[@]} -eq 0 ] && return 0; local x; for x in "${ONLY[@]}"; do [ "$x" = "$1" ] && return 0; done; return 1; }
log() { printf '[provision-pythons %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
timed() { local t0=$SECONDS; "$@"; log "  ($1: $((SECONDS - t0)) s)"; }

# --- the private apt configuration ---------------------------------------------------------------
APTDIR=$CACHE/apt
APT_OPTS=(
    -o "Dir::Etc::SourceList=$APTDIR/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o Dir::Etc::PreferencesParts=/dev/null -o "Dir::Etc::Preferences=$APTDIR/preferences"
    -o "Dir::State::Lists=$APTDIR/lists" -o "Dir::Cache=$APTDIR/cache"
    -o "Dir::Cache::Archives=$APTDIR/archives" -o APT::Get::List-Cleanup=0 -o APT::Sandbox::User=root
)

system_mirror() {
    # The Debian archive URI of the system's own sources (one-line .list or deb822 .sources),
    # not the security archive.
    python3 - <<'EOF'
import glob, re, sys
uris = []
for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*")):
    try:
        text = open(path, encoding="utf-8", errors="replace").read()
    except OSError:
        continue
    if path.endswith(".sources"):
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
            if "deb" in fields.get("Types", "").split():
                uris += fields.get("URIs", "").split()
    else:
        for line in text.splitlines():
            m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)", line)
            if m:
                uris.append(m.group(1))
for uri in uris:
    if re.search(r"/debian/?$", uri):
        print(uri.rstrip("/"))
        sys.exit(0)
sys.exit("no Debian archive among the system's apt sources")
EOF
}

apt_setup() {
    mkdir -p "$APTDIR/lists/partial" "$APTDIR/cache" "$APTDIR/archives/partial"
    local mirror keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    mirror=$(system_mirror)
    printf 'deb [signed-by=%s] %s sid main\ndeb-src [signed-by=%s] %s sid main\n' \
        "$keyring" "$mirror" "$keyring" "$mirror" > "$APTDIR/sources.list.new"
    : > "$APTDIR/preferences"
    # Refresh the index at most once a day (idempotent runs stay offline-fast).
    if ! cmp -s "$APTDIR/sources.list.new" "$APTDIR/sources.list" \
            || [ -z "$(find "$APTDIR/lists" -maxdepth 1 -name '*InRelease' -mmin -1440)" ]; then
        mv "$APTDIR/sources.list.new" "$APTDIR/sources.list"
        log "apt-get update (private configuration, Debian unstable from the system's mirror)"
        apt-get "${APT_OPTS[@]}" -qq update
    else
        rm -f "$APTDIR/sources.list.new"
    fi
}
APT_READY=0
apt_ready() { [ $APT_READY -eq 1 ] || { timed apt_setup; APT_READY=1; }; }
candidate() { apt-cache "${APT_OPTS[@]}" show "$1" 2>/dev/null | sed -n 's/^Version: //p' | head -1; }

# --- 3.14 / 3.15 from Debian binary packages ------------------------------------------------------
# Runtime libraries the interpreter and its stdlib extension modules link (dpkg-deb -I Depends of
# python3.X-minimal, libpython3.X-minimal, libpython3.X-stdlib, libpython3.X), plus their own.
RUNTIME_LIBS=(libc6 libgcc-s1 libssl3t64 libsqlite3-0 libzstd1 zlib1g libexpat1 libbz2-1.0
    libffi8 liblzma5 libncursesw6 libreadline8t64 libtinfo6 libuuid1 libmpdec4 libdb5.3t64)
# Debian splits ensurepip's wheels out of the interpreter (python3.X-venv depends on these).
WHEELS=(python3-pip-whl python3-setuptools-whl)

healthy() {  # $1 = python executable
    "$1" - <<'EOF' >/dev/null 2>&1
import sqlite3, ssl, ctypes, lzma, bz2, zlib, decimal, ensurepip, venv, test.test_sqlite3
sqlite3.connect(":memory:").execute("select 1")
import sys; assert str(ensurepip._WHEEL_PKG_DIR).startswith(sys.prefix), ensurepip._WHEEL_PKG_DIR
EOF
}

patch_elf() {  # $1 = prefix, $2 = private loader, $3 = private library folder
    local f
    while IFS= read -r -d '' f; do
        # only ELF files that are not the loader itself
        [ "$(head -c4 "$f" | od -An -c | tr -d ' ')" = '177ELF' ] || continue
        [ "$f" = "$2" ] && continue
        if patchelf --print-interpreter "$f" >/dev/null 2>&1; then
            patchelf --set-interpreter "$2" "$f"
        fi
        patchelf --force-rpath --set-rpath "$3" "$f"
    done < <(find "$1/bin" "$1/lib/python3."* -type f \( -perm -u+x -o -name '*.so' -o -name '*.so.*' \) -print0)
}

provision_debian() {  # $1 = 3.14 | 3.15
    local minor=$1 debver version prefix stage debs p pkgs
    apt_ready
    debver=$(candidate "python$minor")
    [ -n "$debver" ] || { log "python$minor: not in Debian unstable's index"; return 1; }
    version=${debver%%-*}; version=${version%%+*}
    prefix=$PYENV_VERSIONS/$version
    if [ $FORCE -eq 0 ] && [ -f "$prefix/.walpatch-provisioned" ] && healthy "$prefix/bin/python"; then
        log "python$minor: $prefix already provisioned"
        return 0
    fi
    log "python$minor: Debian $debver -> $prefix"
    pkgs=("python$minor" "python$minor-minimal" "libpython$minor-minimal" "libpython$minor-stdlib"
          "libpython$minor" "python$minor-dev" "libpython$minor-dev" "python$minor-venv"
          "libpython$minor-testsuite" "${WHEELS[@]}")
    for p in "${RUNTIME_LIBS[@]}"; do
        [ -n "$(candidate "$p")" ] && pkgs+=("$p")
    done
    debs=$CACHE/debs/$minor
    mkdir -p "$debs"
    (cd "$debs" && rm -f ./*.deb && apt-get "${APT_OPTS[@]}" -qq download "${pkgs[@]}")
    stage=$prefix.stage
    rm -rf "$stage" "$prefix"
    mkdir -p "$stage"
    for p in "$debs"/*.deb; do dpkg-deb -x "$p" "$stage"; done
    # /usr/* becomes the prefix (sys.prefix is found from the executable's location); a
    # non-merged /lib is folded into it.
    mv "$stage/usr" "$prefix"
    for p in lib lib64; do
        if [ -d "$stage/$p" ] && [ ! -L "$stage/$p" ]; then cp -a "$stage/$p/." "$prefix/$p/"; fi
    done
    rm -rf "$stage"
    local libdir=$prefix/lib/x86_64-linux-gnu loader
    loader=$libdir/ld-linux-x86-64.so.2
    [ -e "$loader" ] || { log "no loader at $loader"; return 1; }
    loader=$(readlink -f "$loader")
    patch_elf "$prefix" "$loader" "$libdir"
    # Debian's pyconfig.h includes the multiarch one from the system include path.
    if [ -f "$prefix/include/x86_64-linux-gnu/python$minor/pyconfig.h" ]; then
        cp "$prefix/include/x86_64-linux-gnu/python$minor/pyconfig.h" "$prefix/include/python$minor/pyconfig.h"
    fi
    # Debian's ensurepip reads the wheels from sysconfig's WHEEL_PKG_DIR, /usr/share/python-wheels
    # (the system's, older pip): point it at ours.
    sed -i -e "s|sysconfig.get_config_var('WHEEL_PKG_DIR')|'$prefix/share/python-wheels'|" \
        "$prefix/lib/python$minor/ensurepip/__init__.py"
    grep -q "_pkg_dir = '$prefix/share/python-wheels'" "$prefix/lib/python$minor/ensurepip/__init__.py" \
        || { log "python$minor: could not point ensurepip at $prefix/share/python-wheels"; return 1; }
    ln -sf "python$minor" "$prefix/bin/python3"
    ln -sf "python$minor" "$prefix/bin/python"
    if ! healthy "$prefix/bin/python"; then
        log "python$minor: the provisioned interpreter fails its check:"
        "$prefix/bin/python" -c 'import sqlite3, ssl, ensurepip, venv, test.test_sqlite3' || true
        return 1
    fi
    echo "Debian $debver (unstable), $(date -u +%F)" > "$prefix/.walpatch-provisioned"
    log "python$minor: $("$prefix/bin/python" -c 'import sys, sqlite3; print(sys.version.split()[0], "SQLite", sqlite3.sqlite_version)')"
}

# --- free-threaded 3.13 from Debian's python3.13 source package -----------------------------------
provision_free_threaded() {
    local debver version prefix src tarball build wheels
    apt_ready
    # The newest version in the index whose files the mirror actually serves (the index can
    # list a newer upload than the pool holds yet).
    local candidates
    candidates=$(apt-cache "${APT_OPTS[@]}" showsrc python3.13 2>/dev/null | sed -n 's/^Version: //p' | sort -Vr)
    [ -n "$candidates" ] || { log "python3.13 source: not in Debian unstable's index"; return 1; }
    # Any version of the index already provisioned and healthy is kept (--force rebuilds).
    for debver in $candidates; do
        version=${debver%%-*}; version=${version%%+*}
        prefix=$PYENV_VERSIONS/${version}t
        if [ $FORCE -eq 0 ] && [ -f "$prefix/.walpatch-provisioned" ] \
                && "$prefix/bin/python" -c 'import sys, sqlite3, ensurepip; assert not sys._is_gil_enabled()' 2>/dev/null; then
            log "python3.13t: $prefix already provisioned"
            return 0
        fi
    done
    for debver in $candidates; do
        version=${debver%%-*}; version=${version%%+*}
        prefix=$PYENV_VERSIONS/${version}t
        src=$CACHE/src/python3.13_$debver
        mkdir -p "$src"
        tarball=$(ls "$src"/python3.13_*.orig.tar.* 2>/dev/null | grep -v '\.asc$' | head -1 || true)
        if [ -z "$tarball" ]; then
            (cd "$src" && apt-get "${APT_OPTS[@]}" -qq source --download-only "python3.13=$debver" 2>&1) \
                | grep -v unsandboxed >&2 || true
            tarball=$(ls "$src"/python3.13_*.orig.tar.* 2>/dev/null | grep -v '\.asc$' | head -1 || true)
        fi
        [ -n "$tarball" ] && break
        log "python3.13 source $debver: not served by the mirror, trying an older one"
        rm -rf "$src"
    done
    [ -n "$tarball" ] || { log "python3.13 source: no version could be downloaded"; return 1; }
    if ! dpkg -s libsqlite3-dev libssl-dev zlib1g-dev libffi-dev libbz2-dev liblzma-dev \
            libreadline-dev libncurses-dev uuid-dev build-essential >/dev/null 2>&1; then
        log "installing build dependencies (system apt sources)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential libsqlite3-dev \
            libssl-dev zlib1g-dev libffi-dev libbz2-dev liblzma-dev libreadline-dev \
            libncurses-dev uuid-dev >/dev/null
    fi
    # ensurepip's wheels: Debian's source drops the bundled ones; take unstable's wheel packages.
    wheels=$prefix/share/python-wheels
    build=$CACHE/build/python3.13t
    rm -rf "$build" "$prefix"
    mkdir -p "$build" "$wheels"
    (cd "$CACHE/debs" 2>/dev/null || mkdir -p "$CACHE/debs"; cd "$CACHE/debs" \
        && rm -f python3-pip-whl_*.deb && apt-get "${APT_OPTS[@]}" -qq download python3-pip-whl)
    dpkg-deb -x "$(ls "$CACHE"/debs/python3-pip-whl_*.deb | head -1)" "$build/whl"
    cp "$build"/whl/usr/share/python-wheels/pip-*.whl "$wheels/"
    # The upstream tarball inside the source package; Debian's patches target its own
    # multiarch layout and packaging, so they are not applied.
    tar -xf "$tarball" -C "$build" --strip-components=1
    log "python3.13t: building $version with --disable-gil (make -j2, no PGO/LTO)"
    (cd "$build" && ./configure -q --prefix="$prefix" --disable-gil --with-wheel-pkg-dir="$wheels" \
        --with-ensurepip=no >/dev/null \
        && nice make -s -j2 >/dev/null 2>"$build/make.log" && make -s install >/dev/null 2>>"$build/make.log") \
        || { log "build failed: tail of $build/make.log:"; tail -30 "$build/make.log" >&2; return 1; }
    [ -e "$prefix/bin/python3.13t" ] && ln -sf python3.13t "$prefix/bin/python"
    [ -e "$prefix/bin/python3" ] || ln -sf python3.13t "$prefix/bin/python3"
    "$prefix/bin/python" -c 'import sys, sqlite3, ensurepip; assert not sys._is_gil_enabled()' || return 1
    rm -rf "$build"
    echo "upstream $version from Debian source $debver, --disable-gil, $(date -u +%F)" > "$prefix/.walpatch-provisioned"
    log "python3.13t: $("$prefix/bin/python" -c 'import sys, sqlite3; print(sys.version.split()[0], "GIL", sys._is_gil_enabled(), "SQLite", sqlite3.sqlite_version)')"
}

command -v patchelf >/dev/null || { log "patchelf is required"; exit 1; }
mkdir -p "$PYENV_VERSIONS" "$CACHE"
for minor in "${MINORS[@]}"; do
    if wanted "$minor"; then timed provision_debian "$minor"; fi
done
if wanted 3.13t; then timed provision_free_threaded; fi
