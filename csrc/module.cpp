// The Python module repkernels._C. Importing it registers the repkernels:: operators (each op's
// folder registers its own schema with TORCH_LIBRARY_FRAGMENT); the module itself only carries
// build information.
#include <Python.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#define RK_STR2(x) #x
#define RK_STR(x) RK_STR2(x)

TORCH_LIBRARY(repkernels, m) {}

namespace {

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, RK_STR(TORCH_EXTENSION_NAME),
                          "Compiled CUDA kernels of repkernels (operators live under torch.ops.repkernels).",
                          -1, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  const int cuda = CUDART_VERSION;
  PyModule_AddStringConstant(m, "cuda_archs", REPKERNELS_CUDA_ARCHS);
  PyModule_AddStringConstant(m, "torch_version", REPKERNELS_TORCH_VERSION);
  PyModule_AddObject(m, "cuda_version", PyUnicode_FromFormat("%d.%d", cuda / 1000, (cuda % 1000) / 10));
  return m;
}
