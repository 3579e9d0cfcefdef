// Python bindings of ISDA's compiled ops (module isda._C).
#include <torch/extension.h>

#include "dropout.h"
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
  m.def("ms_deform_attn_backward", &isda::ms_deform_attn_backward,
        "multi-scale deformable attention backward -> [grad_value, grad_sampling_locations, "
        "grad_attention_weights]",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_locations"), py::arg("attention_weights"), py::arg("grad_output"));
  m.def("dropout_forward", &isda::dropout_forward_cpu,
        "CPU dropout (optionally fused with a preceding ReLU) with a counter-based stream: "
        "(input, p, seed, relu) -> [output, uint8 mask]",
        py::arg("input"), py::arg("p"), py::arg("seed"), py::arg("relu") = false);
  m.def("dropout_backward", &isda::dropout_backward_cpu,
        "grad_output * mask * scale", py::arg("grad_output"), py::arg("mask"), py::arg("scale"));
}
