/* walpatch._speedups: the hot path of the guarded execute/executemany, without a Python frame.
 *
 * Why: a Python-level override costs a frame on every execute (about 1.14x on a tight loop by
 * itself), and a warning that sqlite3's C code raises inside execute (3.12+: named placeholders
 * with a sequence, the default date/datetime adapters) names the innermost Python frame, which
 * would be walpatch/connection.py instead of the caller's line.
 *
 * The contract with Python (walpatch/connection.py, _compiled) is one constructor:
 *
 *     GuardedMethod(plans, scan, base, fallback)
 *
 *   plans     sqlscan._CACHE, a dict: SQL text -> plan, or None for "nothing to guard"
 *   scan      sqlscan.scan, called with the SQL on a cache miss (it never raises)
 *   base      the method being overridden (e.g. sqlite3.Cursor.execute), called as
 *             base(self, sql, *args) when the plan is None
 *   fallback  the pure-Python override, called with the original arguments for everything
 *             else: a plan (the guard), no SQL argument, or keyword arguments (so argument
 *             errors read exactly as with pure Python)
 *
 * A call obj.execute(sql, ...) does what the Python override's fast path does: one lookup in
 * ``plans`` (an unhashable SQL's TypeError, or a KeyError, means "call scan"; any other error
 * of the lookup propagates), then base or fallback.  All four references are set once at
 * creation and never change, so the object needs no lock under free threading; the lookup
 * takes a strong reference (PyDict_GetItemRef on 3.13+) because scan() may clear the dict
 * from another thread.
 *
 * GuardedMethod behaves like a Python function in a class: Py_TPFLAGS_METHOD_DESCRIPTOR (so
 * obj.execute(...) makes no bound method), __get__ returning a bound method otherwise, and an
 * instance __dict__ for __name__/__qualname__/__doc__/__wrapped__.
 *
 * Two shortcuts, both measured with callgrind (benchmarks/callgrind_hotpath.py):
 *   - a memo of the last SQL object whose plan was None (a strong reference, exact str only),
 *     compared by identity: a loop that runs the same literal skips the dict lookup. Sound
 *     because a plan is a function of the SQL text alone (sqlscan.scan is pure) and a str is
 *     immutable; if that contract ever changes, build with -DWALPATCH_NO_SQL_MEMO. Not in
 *     free-threaded builds (Py_GIL_DISABLED), where swapping the memo would need atomics.
 *   - when ``base`` is a METH_FASTCALL method descriptor (sqlite3's execute and executemany
 *     on 3.8-3.13), its C function is called directly after the same type check the
 *     descriptor makes; anything else goes through PyObject_Vectorcall.
 *
 * The type is static (PyType_Ready'd in the module's exec slot): it holds no per-module state,
 * and a heap type with a vectorcall offset cannot be made from a spec on 3.8.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include "structmember.h"

#if PY_VERSION_HEX < 0x03090000
#define PyObject_Vectorcall _PyObject_Vectorcall
#define Py_TPFLAGS_HAVE_VECTORCALL _Py_TPFLAGS_HAVE_VECTORCALL
#endif

typedef struct {
    PyObject_HEAD
    PyObject *plans;
    PyObject *scan;
    PyObject *base;
    PyObject *fallback;
    PyObject *dict;
    vectorcallfunc vectorcall;
    PyObject *memo;            /* last exact-str SQL with plan None (GIL builds), or NULL */
    _PyCFunctionFast direct;   /* base's C function when it is a METH_FASTCALL descriptor */
    PyTypeObject *direct_type; /* ... and the type it applies to (borrowed from base) */
} GuardedMethod;

#if !defined(Py_GIL_DISABLED) && !defined(WALPATCH_NO_SQL_MEMO)
#define USE_MEMO 1
#define MEMO_MAX_LENGTH 4096  /* never keep a huge script alive (sqlscan's key limit too) */
#else
#define USE_MEMO 0
#endif

/* base(self, sql, *args): directly when base is a plain METH_FASTCALL method descriptor */
static PyObject *
call_base(GuardedMethod *m, PyObject *const *args, size_t nargsf)
{
    if (m->direct != NULL && PyObject_TypeCheck(args[0], m->direct_type)) {
        return m->direct(args[0], args + 1, PyVectorcall_NARGS(nargsf) - 1);
    }
    return PyObject_Vectorcall(m->base, args, nargsf, NULL);
}

/* 1: found (*plan is a new reference), 0: missing, -1: error set */
static int
lookup_plan(PyObject *plans, PyObject *sql, PyObject **plan)
{
#if PY_VERSION_HEX >= 0x030D0000
    return PyDict_GetItemRef(plans, sql, plan);
#else
    PyObject *found = PyDict_GetItemWithError(plans, sql);  /* borrowed; the GIL holds it */
    if (found != NULL) {
        Py_INCREF(found);
        *plan = found;
        return 1;
    }
    *plan = NULL;
    return PyErr_Occurred() ? -1 : 0;
#endif
}

static PyObject *
gm_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    GuardedMethod *m = (GuardedMethod *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *plan;
    int found;

    /* args[0] is self, args[1] the SQL */
    if (nargs < 2 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
        return PyObject_Vectorcall(m->fallback, args, nargsf, kwnames);
    }
#if USE_MEMO
    if (args[1] == m->memo) {
        return call_base(m, args, nargsf);
    }
#endif
    found = lookup_plan(m->plans, args[1], &plan);
    if (found < 0) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError) && !PyErr_ExceptionMatches(PyExc_KeyError)) {
            return NULL;
        }
        PyErr_Clear();
        found = 0;
    }
    if (found == 0) {
        PyObject *scan_args[1] = {args[1]};
        plan = PyObject_Vectorcall(m->scan, scan_args, 1, NULL);
        if (plan == NULL) {
            return NULL;
        }
    }
    if (plan != Py_None) {
        Py_DECREF(plan);
        return PyObject_Vectorcall(m->fallback, args, nargsf, kwnames);
    }
    Py_DECREF(plan);
#if USE_MEMO
    if (PyUnicode_CheckExact(args[1]) && PyUnicode_GET_LENGTH(args[1]) <= MEMO_MAX_LENGTH) {
        PyObject *old = m->memo;
        Py_INCREF(args[1]);
        m->memo = args[1];
        Py_XDECREF(old);  /* a str: its deallocation runs no Python code */
    }
#endif
    return call_base(m, args, nargsf);
}

static PyObject *
gm_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"plans", "scan", "base", "fallback", NULL};
    PyObject *plans, *scan, *base, *fallback;
    GuardedMethod *m;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!OOO:GuardedMethod", kwlist,
                                     &PyDict_Type, &plans, &scan, &base, &fallback)) {
        return NULL;
    }
    if (!PyCallable_Check(scan) || !PyCallable_Check(base) || !PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "GuardedMethod: scan, base and fallback must be callable");
        return NULL;
    }
    m = PyObject_GC_New(GuardedMethod, type);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(plans);
    m->plans = plans;
    Py_INCREF(scan);
    m->scan = scan;
    Py_INCREF(base);
    m->base = base;
    Py_INCREF(fallback);
    m->fallback = fallback;
    m->dict = NULL;
    m->vectorcall = gm_vectorcall;
    m->memo = NULL;
    m->direct = NULL;
    m->direct_type = NULL;
    if (Py_TYPE(base) == &PyMethodDescr_Type) {
        PyMethodDescrObject *descr = (PyMethodDescrObject *)base;
        if ((descr->d_method->ml_flags & ~METH_COEXIST) == METH_FASTCALL) {
            m->direct = (_PyCFunctionFast)(void (*)(void))descr->d_method->ml_meth;
            m->direct_type = descr->d_common.d_type;  /* base holds it; we hold base */
        }
    }
    PyObject_GC_Track(m);
    return (PyObject *)m;
}

static int
gm_traverse(GuardedMethod *m, visitproc visit, void *arg)
{
    Py_VISIT(m->plans);
    Py_VISIT(m->scan);
    Py_VISIT(m->base);
    Py_VISIT(m->fallback);
    Py_VISIT(m->dict);
    Py_VISIT(m->memo);
    return 0;
}

static int
gm_clear(GuardedMethod *m)
{
    Py_CLEAR(m->plans);
    Py_CLEAR(m->scan);
    Py_CLEAR(m->base);
    Py_CLEAR(m->fallback);
    Py_CLEAR(m->dict);
    Py_CLEAR(m->memo);
    m->direct = NULL;
    return 0;
}

static void
gm_dealloc(GuardedMethod *m)
{
    PyObject_GC_UnTrack(m);
    gm_clear(m);
    PyObject_GC_Del(m);
}

/* Like a function: on the class, the descriptor itself; on an instance, a bound method. */
static PyObject *
gm_descr_get(PyObject *self, PyObject *obj, PyObject *type)
{
    (void)type;
    if (obj == NULL || obj == Py_None) {
        Py_INCREF(self);
        return self;
    }
    return PyMethod_New(self, obj);
}

static PyObject *
gm_repr(GuardedMethod *m)
{
    PyObject *name = PyObject_GetAttrString((PyObject *)m, "__qualname__");
    PyObject *result;

    if (name == NULL) {
        PyErr_Clear();
        return PyUnicode_FromFormat("<walpatch guarded method of %R>", m->base);
    }
    result = PyUnicode_FromFormat("<walpatch guarded method %S>", name);
    Py_DECREF(name);
    return result;
}

static PyGetSetDef gm_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef gm_members[] = {
    {"__walpatch_base__", T_OBJECT, offsetof(GuardedMethod, base), READONLY,
     "the method this one overrides"},
    {"__walpatch_fallback__", T_OBJECT, offsetof(GuardedMethod, fallback), READONLY,
     "the pure-Python override it hands over to"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject GuardedMethod_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    "walpatch._speedups.GuardedMethod",       /* tp_name */
    sizeof(GuardedMethod),                    /* tp_basicsize */
    0,                                        /* tp_itemsize */
    (destructor)gm_dealloc,                   /* tp_dealloc */
    offsetof(GuardedMethod, vectorcall),      /* tp_vectorcall_offset */
    0,                                        /* tp_getattr */
    0,                                        /* tp_setattr */
    0,                                        /* tp_as_async */
    (reprfunc)gm_repr,                        /* tp_repr */
    0,                                        /* tp_as_number */
    0,                                        /* tp_as_sequence */
    0,                                        /* tp_as_mapping */
    0,                                        /* tp_hash */
    PyVectorcall_Call,                        /* tp_call */
    0,                                        /* tp_str */
    PyObject_GenericGetAttr,                  /* tp_getattro */
    PyObject_GenericSetAttr,                  /* tp_setattro */
    0,                                        /* tp_as_buffer */
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_METHOD_DESCRIPTOR
        | Py_TPFLAGS_HAVE_VECTORCALL,          /* tp_flags */
    "A guarded execute method: plan lookup in C, then the base method or the Python guard.",
    (traverseproc)gm_traverse,                /* tp_traverse */
    (inquiry)gm_clear,                        /* tp_clear */
    0,                                        /* tp_richcompare */
    0,                                        /* tp_weaklistoffset */
    0,                                        /* tp_iter */
    0,                                        /* tp_iternext */
    0,                                        /* tp_methods */
    gm_members,                               /* tp_members */
    gm_getset,                                /* tp_getset */
    0,                                        /* tp_base */
    0,                                        /* tp_dict */
    gm_descr_get,                             /* tp_descr_get */
    0,                                        /* tp_descr_set */
    offsetof(GuardedMethod, dict),            /* tp_dictoffset */
    0,                                        /* tp_init */
    0,                                        /* tp_alloc */
    gm_new,                                   /* tp_new */
};

static int
speedups_exec(PyObject *module)
{
    if (PyType_Ready(&GuardedMethod_Type) < 0) {
        return -1;
    }
    Py_INCREF(&GuardedMethod_Type);
    if (PyModule_AddObject(module, "GuardedMethod", (PyObject *)&GuardedMethod_Type) < 0) {
        Py_DECREF(&GuardedMethod_Type);
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot speedups_slots[] = {
    {Py_mod_exec, (void *)speedups_exec},
#ifdef Py_mod_gil
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    "walpatch._speedups",
    "The execute/executemany hot path of walpatch's guarded classes, in C (see _speedups.c).",
    0,
    NULL,
    speedups_slots,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&speedups_module);
}
