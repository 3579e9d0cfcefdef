// Python bindings of ISDA's compiled ops (placeholder until the op lands).
#include <torch/extension.h>

bool isda_has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("has_cuda", &isda_has_cuda, "whether the CUDA kernels were compiled in");
}
