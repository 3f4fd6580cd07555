// Python entry points of the native copy loop (loop_binding.cpp), listed in module.cpp.
#pragma once
#define PY_SSIZE_T_CLEAN
#include <Python.h>

namespace warmstart::binding {
PyObject* py_loop_new(PyObject*, PyObject* args);
PyObject* py_loop_submit(PyObject*, PyObject* args);
PyObject* py_loop_wait(PyObject*, PyObject* args);
PyObject* py_loop_cancel(PyObject*, PyObject* args);
PyObject* py_loop_close(PyObject*, PyObject* args);
PyObject* py_loop_stats(PyObject*, PyObject* args);
PyObject* py_crc32(PyObject*, PyObject* args);
}  // namespace warmstart::binding
