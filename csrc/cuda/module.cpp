// The Python entry point of xdit_ops._C. Importing it runs the static TORCH_LIBRARY_IMPL
// registrations of the other translation units; the module itself exposes only the eager fast
// path's plain functions (graph_call.cpp: graph_call_register / _release / _run).
#include <Python.h>

namespace xdit_ops {
PyMethodDef* graph_call_methods();
}

static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                     xdit_ops::graph_call_methods()};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
