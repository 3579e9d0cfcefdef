// Multi-scale deformable attention: declarations of the CPU / CUDA implementations and the
// device dispatch used by the operator registrations (bindings.cpp).
//
//   value              [N, S, M, D]          float32/float64 (float16/bfloat16 computed in float32)
//   spatial_shapes     [L, 2]  int64 (H, W)
//   level_start_index  [L]     int64
//   sampling_locations [N, Lq, M, L, P, 2]   normalised (x, y)
//   attention_weights  [N, Lq, M, L, P]
//   output             [N, Lq, M * D]
// The CPU forward also takes bfloat16 values with float32 locations and weights (output float32),
// read without a float copy.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace isda {

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights);

// Returns {grad_value, grad_sampling_locations, grad_attention_weights}.
std::vector<at::Tensor> ms_deform_attn_backward_cpu(const at::Tensor& value,
                                                    const at::Tensor& spatial_shapes,
                                                    const at::Tensor& level_start_index,
                                                    const at::Tensor& sampling_locations,
                                                    const at::Tensor& attention_weights,
                                                    const at::Tensor& grad_output);

#ifdef WITH_CUDA
at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights);

std::vector<at::Tensor> ms_deform_attn_backward_cuda(const at::Tensor& value,
                                                     const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_locations,
                                                     const at::Tensor& attention_weights,
                                                     const at::Tensor& grad_output);
#endif

namespace detail {

// The CPU forward's mixed form: bfloat16 values (a bf16 model's value projection) read as is,
// float32 locations, weights and output.
inline bool is_bf16_value_forward(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return value.is_cpu() && value.scalar_type() == at::kBFloat16 &&
         sampling_locations.scalar_type() == at::kFloat;
}

inline void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                         const at::Tensor& level_start_index,
                         const at::Tensor& sampling_locations,
                         const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "value must be [N, S, M, D], got ", value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "spatial_shapes must be [L, 2], got ", spatial_shapes.sizes());
  const int64_t L = spatial_shapes.size(0);
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == L,
              "level_start_index must be [L], got ", level_start_index.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong &&
                  level_start_index.scalar_type() == at::kLong,
              "spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "sampling_locations must be [N, Lq, M, L, P, 2], got ", sampling_locations.sizes());
  TORCH_CHECK(sampling_locations.size(0) == value.size(0) &&
                  sampling_locations.size(2) == value.size(2) && sampling_locations.size(3) == L,
              "sampling_locations ", sampling_locations.sizes(), " does not match value ",
              value.sizes(), " and L=", L);
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "attention_weights must be [N, Lq, M, L, P], got ", attention_weights.sizes());
  TORCH_CHECK(sampling_locations.scalar_type() == attention_weights.scalar_type() &&
                  (value.scalar_type() == sampling_locations.scalar_type() ||
                   is_bf16_value_forward(value, sampling_locations)),
              "value, sampling_locations and attention_weights must share one dtype (or, for "
              "the CPU forward, bfloat16 value with float32 locations and weights)");
  TORCH_CHECK(at::isFloatingType(value.scalar_type()), "value must be floating point");
  for (const at::Tensor* t : {&spatial_shapes, &level_start_index, &sampling_locations,
                              &attention_weights}) {
    TORCH_CHECK(t->device() == value.device(), "all inputs must be on the device of value (",
                value.device(), "), got ", t->device());
  }
}

inline bool is_reduced(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

inline at::Tensor upcast(const at::Tensor& t) {
  return (is_reduced(t) ? t.to(at::kFloat) : t).contiguous();
}

}  // namespace detail

// Forward with device dispatch. float16/bfloat16 inputs are computed in float32 and the result
// is cast back.
inline at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                         const at::Tensor& level_start_index,
                                         const at::Tensor& sampling_locations,
                                         const at::Tensor& attention_weights) {
  detail::check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                       attention_weights);
  if (detail::is_bf16_value_forward(value, sampling_locations)) {
    return ms_deform_attn_forward_cpu(value.contiguous(), spatial_shapes.contiguous(),
                                      level_start_index.contiguous(),
                                      sampling_locations.contiguous(),
                                      attention_weights.contiguous());
  }
  const at::Tensor v = detail::upcast(value);
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const at::Tensor loc = detail::upcast(sampling_locations);
  const at::Tensor attn = detail::upcast(attention_weights);
  at::Tensor out;
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    out = ms_deform_attn_forward_cuda(v, shapes, starts, loc, attn);
#else
    TORCH_CHECK(false, "isda._C was built without CUDA support");
#endif
  } else {
    TORCH_CHECK(value.is_cpu(), "unsupported device ", value.device());
    out = ms_deform_attn_forward_cpu(v, shapes, starts, loc, attn);
  }
  return out.to(value.scalar_type());
}

// Backward with device dispatch; returns {grad_value, grad_sampling_locations,
// grad_attention_weights}, each in the dtype of its input.
inline std::vector<at::Tensor> ms_deform_attn_backward(const at::Tensor& value,
                                                       const at::Tensor& spatial_shapes,
                                                       const at::Tensor& level_start_index,
                                                       const at::Tensor& sampling_locations,
                                                       const at::Tensor& attention_weights,
                                                       const at::Tensor& grad_output) {
  detail::check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                       attention_weights);
  const int64_t N = value.size(0), M = value.size(2), D = value.size(3);
  const int64_t Lq = sampling_locations.size(1);
  TORCH_CHECK(grad_output.numel() == N * Lq * M * D, "grad_output must be [N, Lq, M*D]");
  TORCH_CHECK(grad_output.device() == value.device(), "grad_output must be on the device of value");
  const at::Tensor v = detail::upcast(value);
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const at::Tensor loc = detail::upcast(sampling_locations);
  const at::Tensor attn = detail::upcast(attention_weights);
  const at::Tensor go = grad_output.to(v.scalar_type()).contiguous();
  std::vector<at::Tensor> grads;
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    grads = ms_deform_attn_backward_cuda(v, shapes, starts, loc, attn, go);
#else
    TORCH_CHECK(false, "isda._C was built without CUDA support");
#endif
  } else {
    TORCH_CHECK(value.is_cpu(), "unsupported device ", value.device());
    grads = ms_deform_attn_backward_cpu(v, shapes, starts, loc, attn, go);
  }
  grads[0] = grads[0].to(value.scalar_type());
  grads[1] = grads[1].to(sampling_locations.scalar_type());
  grads[2] = grads[2].to(attention_weights.scalar_type());
  return grads;
}

}  // namespace isda
