// fusedtech._C_cuda: importing it runs the CUDA registrations of csrc/cuda/*.cu for the schemas
// that fusedtech._C defines (csrc/ops.cpp), so _C is imported first.
#include <Python.h>

extern "C" {
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
