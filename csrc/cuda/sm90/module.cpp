// The Python entry point of xdit_ops._C_sm90 (Hopper-only kernels, built for sm_90a alone).
// Importing it runs the TORCH_LIBRARY_IMPL registrations of the other translation units.
#include <Python.h>

static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C_sm90", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C_sm90(void) { return PyModule_Create(&kModule); }
