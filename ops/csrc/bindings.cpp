// ISDA's multi-scale deformable attention as torch operators (namespace `isda`), and the Python
// module isda._C that loading them needs:
//
//   torch.ops.isda.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
//                                 attention_weights) -> output [N, Lq, M*D]
//   torch.ops.isda.ms_deform_attn_backward(..., grad_output) -> (grad_value,
//       grad_sampling_locations, grad_attention_weights)
//
// CPU and CUDA kernels are registered here; the fake (meta) kernels and the autograd formula
// are registered from Python (isda/layers/ms_deform_attn.py). torch/python.h (pybind11) and
// ATen, not torch/extension.h: the C++ frontend that the latter adds is unused here and doubles
// the compile time.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <torch/python.h>

#include <tuple>

#include "ms_deform_attn.h"

namespace {

bool isda_has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  std::vector<at::Tensor> g = isda::ms_deform_attn_backward(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output);
  return {g[0], g[1], g[2]};
}

}  // namespace

TORCH_LIBRARY(isda, m) {
  m.def("ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
        "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def("ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
        "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(isda, CPU, m) {
  m.impl("ms_deform_attn", &isda::ms_deform_attn_forward);
  m.impl("ms_deform_attn_backward", &backward_op);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(isda, CUDA, m) {
  m.impl("ms_deform_attn", &isda::ms_deform_attn_forward);
  m.impl("ms_deform_attn_backward", &backward_op);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("has_cuda", &isda_has_cuda, "whether the CUDA kernels were compiled in");
}
