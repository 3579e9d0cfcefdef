// Python bindings of ISDA's multi-scale deformable attention op (module isda._C).
// torch/python.h (pybind11 with the tensor casters) and ATen, not torch/extension.h: the C++
// frontend that the latter adds is unused here and doubles the compile time.
#include <ATen/ATen.h>
#include <torch/python.h>

#include "ms_deform_attn.h"

bool isda_has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("has_cuda", &isda_has_cuda, "whether the CUDA kernels were compiled in");
  m.def("ms_deform_attn_forward", &isda::ms_deform_attn_forward,
        "multi-scale deformable attention forward: (value [N,S,M,D], spatial_shapes [L,2], "
        "level_start_index [L], sampling_locations [N,Lq,M,L,P,2], attention_weights "
        "[N,Lq,M,L,P]) -> [N,Lq,M*D]",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_locations"), py::arg("attention_weights"));
  // (absent from extensions built before the mixed form: callers check with hasattr)
  m.attr("forward_reads_bf16_value") = true;
  m.def("ms_deform_attn_backward", &isda::ms_deform_attn_backward,
        "multi-scale deformable attention backward -> [grad_value, grad_sampling_locations, "
        "grad_attention_weights]",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_locations"), py::arg("attention_weights"), py::arg("grad_output"));
}
