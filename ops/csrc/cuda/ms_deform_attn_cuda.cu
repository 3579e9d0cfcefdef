// CUDA forward and backward of multi-scale deformable attention.
//
// The per-sample bilinear maths is the same header as the CPU path (ms_deform_attn_sampling.h).
//  * forward: one thread per output element (n, q, m, d); consecutive threads read consecutive
//    channels of the same corner (coalesced) and no thread shares an output.
//  * backward: one thread per sample point (n, q, m, l, p). It loops over the D channels, forms
//    the four corner dot products <grad_output, value> for grad_sampling_locations and
//    grad_attention_weights (written by this thread only), and adds attention * weight *
//    grad_output into grad_value with atomicAdd. Sample points of different queries may hit the
//    same corner, so the order of those float additions is scheduling dependent: grad_value on
//    the GPU is NOT bit-reproducible run to run (differences at rounding level). The CPU path is.
#include <ATen/ATen.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_sampling.h"

namespace isda {
namespace {

constexpr int kThreads = 256;

inline int64_t num_blocks(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  // grid-stride loops cover the rest
  return std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(1) << 20));
}

template <typename scalar_t>
__global__ void forward_kernel(int64_t total, const scalar_t* __restrict__ value,
                               const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts,
                               const scalar_t* __restrict__ loc,
                               const scalar_t* __restrict__ attn, scalar_t* __restrict__ out,
                               int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t L,
                               int64_t P) {
  const int64_t MD = M * D;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t d = i % D;
    const int64_t nqm = i / D;
    const int64_t m = nqm % M;
    const int64_t n = nqm / M / Lq;
    scalar_t acc = 0;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
      const scalar_t* base = value + (n * S + starts[l]) * MD + m * D + d;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t s = (nqm * L + l) * P + p;
        BilinearPoint<scalar_t> bp;
        if (bilinear_point<scalar_t, false>(loc[2 * s], loc[2 * s + 1], H, W, bp)) {
          acc += attn[s] * bilinear_sample_channel(base, MD, bp);
        }
      }
    }
    out[i] = acc;
  }
}

template <typename scalar_t>
__global__ void backward_kernel(int64_t total, const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ shapes,
                                const int64_t* __restrict__ starts,
                                const scalar_t* __restrict__ loc,
                                const scalar_t* __restrict__ attn,
                                const scalar_t* __restrict__ grad_out,
                                scalar_t* __restrict__ grad_value,
                                scalar_t* __restrict__ grad_loc,
                                scalar_t* __restrict__ grad_attn, int64_t S, int64_t M,
                                int64_t D, int64_t Lq, int64_t L, int64_t P) {
  const int64_t MD = M * D;
  for (int64_t s = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; s < total;
       s += int64_t(blockDim.x) * gridDim.x) {
    const int64_t l = (s / P) % L;
    const int64_t nqm = s / (P * L);
    const int64_t m = nqm % M;
    const int64_t n = nqm / M / Lq;
    BilinearPoint<scalar_t> bp;
    if (!bilinear_point<scalar_t, true>(loc[2 * s], loc[2 * s + 1], shapes[2 * l],
                                        shapes[2 * l + 1], bp)) {
      grad_attn[s] = 0;
      grad_loc[2 * s] = 0;
      grad_loc[2 * s + 1] = 0;
      continue;
    }
    const scalar_t a = attn[s];
    const int64_t level_offset = (n * S + starts[l]) * MD + m * D;
    const scalar_t* v = value + level_offset;
    scalar_t* gv = grad_value + level_offset;
    const scalar_t* go = grad_out + nqm * D;
    scalar_t dots[4] = {0, 0, 0, 0};
    for (int64_t d = 0; d < D; ++d) {
      const scalar_t g = go[d];
      ISDA_UNROLL
      for (int c = 0; c < 4; ++c) {
        if (bp.index[c] < 0) continue;
        const int64_t off = bp.index[c] * MD + d;
        dots[c] += g * v[off];
        gpuAtomicAdd(gv + off, a * bp.weight[c] * g);
      }
    }
    bilinear_point_grads(bp, dots, a, grad_attn[s], grad_loc[2 * s], grad_loc[2 * s + 1]);
  }
}

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  const c10::cuda::CUDAGuard guard(value.device());
  const int64_t N = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);
  const int64_t Lq = sampling_locations.size(1), L = sampling_locations.size(3),
                P = sampling_locations.size(4);
  at::Tensor out = at::empty({N, Lq, M * D}, value.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    forward_kernel<scalar_t><<<num_blocks(total), kThreads, 0, stream>>>(
        total, value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
        level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
        attention_weights.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), S, M, D, Lq, L, P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::vector<at::Tensor> ms_deform_attn_backward_cuda(const at::Tensor& value,
                                                     const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_locations,
                                                     const at::Tensor& attention_weights,
                                                     const at::Tensor& grad_output) {
  const c10::cuda::CUDAGuard guard(value.device());
  const int64_t S = value.size(1), M = value.size(2), D = value.size(3);
  const int64_t Lq = sampling_locations.size(1), L = sampling_locations.size(3),
                P = sampling_locations.size(4);
  at::Tensor grad_value = at::zeros_like(value);
  at::Tensor grad_loc = at::zeros_like(sampling_locations);
  at::Tensor grad_attn = at::zeros_like(attention_weights);
  const int64_t total = attention_weights.numel();
  if (total == 0 || value.numel() == 0) return {grad_value, grad_loc, grad_attn};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    backward_kernel<scalar_t><<<num_blocks(total), kThreads, 0, stream>>>(
        total, value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
        level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
        attention_weights.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
        grad_value.data_ptr<scalar_t>(), grad_loc.data_ptr<scalar_t>(),
        grad_attn.data_ptr<scalar_t>(), S, M, D, Lq, L, P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace isda
