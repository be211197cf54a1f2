// The Python entry point of xdit_ops._C. Importing it runs the static TORCH_LIBRARY_IMPL
// registrations of the other translation units; the module itself exposes nothing.
#include <Python.h>

static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
