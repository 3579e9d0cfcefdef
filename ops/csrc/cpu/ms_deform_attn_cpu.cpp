// CPU forward and backward of multi-scale deformable attention.
//
// Layout: value [N, S, M, D] keeps the D channels of one head contiguous, so every bilinear
// corner is a contiguous D-vector and all inner loops run over D (vectorised by the compiler).
//
// Parallelism and determinism:
//  * forward: at::parallel_for over the N * Lq queries; each query (all heads) writes its own
//    output row, so there is no sharing. A query's corners of all heads are located (and their
//    rows prefetched) before any is summed, and with D = 32 the sum stays in registers
//    (encoder forward 1.6x the previous loop in alternating runs, same bits). bfloat16 values
//    (bf16 inference) are read as is and widened on load.
//  * backward: at::parallel_for over the N * M (batch, head) pairs. A task walks all queries of
//    its pair in order and is the only writer of grad_value[n, :, m, :] (corners of head m in
//    batch n live only there) and of grad_sampling_locations / grad_attention_weights of its
//    own sample points. No atomics or locks are needed, and every grad_value element is
//    accumulated by one thread in a fixed (query, level, point, corner) order, so results are
//    bit-identical across runs and for any number of threads. Parallelism is bounded by N * M
//    (8 per image with 8 heads), which covers the CPU core counts this op targets.
//    For many queries (the encoder) the backward works on head-major copies [N, M, S, D]: a task's
//    corners are then 128-byte rows of one contiguous block (neighbouring pixels adjacent in
//    memory) instead of rows M * D apart, which halves its time on cache misses (measured 2.2x
//    on the encoder shape); the two transposes cost a few ms.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/cpu_isa.h"
#include "ms_deform_attn.h"
#include "ms_deform_attn_sampling.h"

namespace isda {
namespace {

// out[d] += w * v[d]
template <typename scalar_t>
inline void axpy(scalar_t* __restrict__ out, scalar_t w, const scalar_t* __restrict__ v,
                 int64_t D) {
  for (int64_t d = 0; d < D; ++d) out[d] += w * v[d];
}

// sum_d a[d] * b[d] with 8 independent partial sums (vectorisable without -ffast-math) reduced in
// a fixed order, so the result does not depend on anything but the inputs.
template <typename scalar_t>
inline scalar_t dot(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t D) {
  constexpr int K = 8;
  scalar_t part[K] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + K <= D; d += K) {
    for (int k = 0; k < K; ++k) part[k] += a[d + k] * b[d + k];
  }
  scalar_t tail = 0;
  for (; d < D; ++d) tail += a[d] * b[d];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7])) +
         tail;
}

struct Dims {
  int64_t N, S, M, D, Lq, L, P;
};

// o[0:D] = sum_i weight[i] * v[offset[i] : offset[i] + D], accumulated in the order of i (the
// same order, hence the same bits, for every DC). DC > 0: D == DC known at compile time, the
// partial sums stay in registers instead of a store and reload of o per corner.
template <typename scalar_t, int DC, typename value_t>
inline void weighted_rows(scalar_t* __restrict__ o, const value_t* __restrict__ v,
                          const int64_t* __restrict__ offset, const scalar_t* __restrict__ weight,
                          int64_t count, int64_t D) {
  if constexpr (DC > 0) {
    scalar_t acc[DC];
    for (int d = 0; d < DC; ++d) acc[d] = scalar_t(0);
    for (int64_t i = 0; i < count; ++i) {
      const value_t* __restrict__ row = v + offset[i];
      const scalar_t w = weight[i];
      // fully unrolled: no d loop for -O3 to interchange with the corner loop (which would turn
      // it into a strided scalar gather); the SLP vectoriser packs the channels instead
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 64
#endif
      for (int d = 0; d < DC; ++d) acc[d] += w * static_cast<scalar_t>(row[d]);
    }
    for (int d = 0; d < DC; ++d) o[d] = acc[d];
  } else {
    std::fill(o, o + D, scalar_t(0));
    for (int64_t i = 0; i < count; ++i) {
      const value_t* __restrict__ row = v + offset[i];
      const scalar_t w = weight[i];
      for (int64_t d = 0; d < D; ++d) o[d] += w * static_cast<scalar_t>(row[d]);
    }
  }
}

// Queries [begin, end) of the flattened N * Lq, all heads (neighbouring heads sample near each
// other, so one query's corners of all heads share cache lines and pages of value rows).
template <typename scalar_t, int DC, typename value_t>
ISDA_TARGET_CLONES void forward_rows(int64_t begin, int64_t end, const value_t* value,
                                     const int64_t* shapes, const int64_t* starts,
                                     const scalar_t* loc, const scalar_t* attn, scalar_t* out,
                                     const Dims& k) {
  const int64_t MD = k.M * k.D;
  const int64_t LP = k.L * k.P;
  // The valid corners of all heads' L * P points of one query as (value offset, attention *
  // weight), head m's in [first[m], first[m + 1]): computed (and their rows prefetched) for all
  // heads before the accumulation, so the rows are on their way while the points are computed.
  std::vector<int64_t> offset(4 * LP * k.M);
  std::vector<scalar_t> weight(4 * LP * k.M);
  std::vector<int64_t> first(k.M + 1);
  const int64_t row_bytes = k.D * static_cast<int64_t>(sizeof(value_t));
  for (int64_t nq = begin; nq < end; ++nq) {
    const int64_t n = nq / k.Lq;
    const value_t* value_n = value + n * k.S * MD;
    int64_t count = 0;
    for (int64_t m = 0; m < k.M; ++m) {
      const int64_t nqm = nq * k.M + m;
      first[m] = count;
      for (int64_t l = 0; l < k.L; ++l) {
        const int64_t H = shapes[2 * l], W = shapes[2 * l + 1], start = starts[l];
        for (int64_t p = 0; p < k.P; ++p) {
          const int64_t s = (nqm * k.L + l) * k.P + p;
          BilinearPoint<scalar_t> bp;
          if (!bilinear_point<scalar_t, false>(loc[2 * s], loc[2 * s + 1], H, W, bp)) continue;
          const scalar_t a = attn[s];
          for (int c = 0; c < 4; ++c) {
            if (bp.index[c] < 0) continue;
            const int64_t off = (start + bp.index[c]) * MD + m * k.D;
#if defined(__GNUC__)
            const char* r = reinterpret_cast<const char*>(value_n + off);
            for (int64_t byte = 0; byte < row_bytes; byte += 64) __builtin_prefetch(r + byte);
#endif
            offset[count] = off;
            weight[count] = a * bp.weight[c];
            ++count;
          }
        }
      }
    }
    first[k.M] = count;
    for (int64_t m = 0; m < k.M; ++m) {
      weighted_rows<scalar_t, DC, value_t>(out + (nq * k.M + m) * k.D, value_n,
                                           offset.data() + first[m], weight.data() + first[m],
                                           first[m + 1] - first[m], k.D);
    }
  }
}

// value_t: scalar_t, or bfloat16 values with float locations / weights / output (each value
// widened exactly on load: the same results as a float copy of the values, without the copy).
template <typename scalar_t, typename value_t = scalar_t>
void forward_kernel(const value_t* value, const int64_t* shapes, const int64_t* starts,
                    const scalar_t* loc, const scalar_t* attn, scalar_t* out, const Dims& k) {
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, k.M * k.L * k.P));
  at::parallel_for(0, k.N * k.Lq, grain, [&](int64_t begin, int64_t end) {
    if (k.D == 32) {
      forward_rows<scalar_t, 32, value_t>(begin, end, value, shapes, starts, loc, attn, out, k);
    } else {
      forward_rows<scalar_t, 0, value_t>(begin, end, value, shapes, starts, loc, attn, out, k);
    }
  });
}

// All sample points of head m in batch n (the task that owns grad_value[n, :, m, :]).
// value_nm / grad_value_nm point at position 0 of head m in batch n; consecutive positions are
// `row` elements apart (M * D in the [N, S, M, D] layout, D in the head-major one).
template <typename scalar_t>
ISDA_TARGET_CLONES void backward_head(int64_t n, int64_t m, const scalar_t* value_nm,
                                      scalar_t* grad_value_nm, int64_t row,
                                      const int64_t* shapes, const int64_t* starts,
                                      const scalar_t* loc, const scalar_t* attn,
                                      const scalar_t* grad_out, scalar_t* grad_loc,
                                      scalar_t* grad_attn, const Dims& k) {
  const int64_t LP = k.L * k.P;
  // One query's points, computed and their corner rows (value and grad_value) prefetched before
  // the first row is used: the loads of all 16 points are then in flight together (1.05-1.2x
  // on the encoder shape against computing and using each point in turn, same bits).
  std::vector<BilinearPoint<scalar_t>> points(LP);
  std::vector<char> valid(LP);
  const int64_t row_bytes = k.D * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t q = 0; q < k.Lq; ++q) {
    const int64_t nqm = (n * k.Lq + q) * k.M + m;
    const scalar_t* go = grad_out + nqm * k.D;
    for (int64_t l = 0; l < k.L; ++l) {
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1], start = starts[l];
      for (int64_t p = 0; p < k.P; ++p) {
        const int64_t lp = l * k.P + p;
        const int64_t s = nqm * LP + lp;
        BilinearPoint<scalar_t>& bp = points[lp];
        valid[lp] = bilinear_point<scalar_t, true>(loc[2 * s], loc[2 * s + 1], H, W, bp);
        if (!valid[lp]) continue;
        for (int c = 0; c < 4; ++c) {
          if (bp.index[c] < 0) continue;
          bp.index[c] = (start + bp.index[c]) * row;  // from here on: element offset of the row
#if defined(__GNUC__)
          const char* r = reinterpret_cast<const char*>(value_nm + bp.index[c]);
          const char* g = reinterpret_cast<const char*>(grad_value_nm + bp.index[c]);
          for (int64_t byte = 0; byte < row_bytes; byte += 64) {
            __builtin_prefetch(r + byte);
            __builtin_prefetch(g + byte, 1);
          }
#endif
        }
      }
    }
    for (int64_t lp = 0; lp < LP; ++lp) {
      const int64_t s = nqm * LP + lp;
      if (!valid[lp]) {
        grad_attn[s] = 0;
        grad_loc[2 * s] = 0;
        grad_loc[2 * s + 1] = 0;
        continue;
      }
      const BilinearPoint<scalar_t>& bp = points[lp];
      const scalar_t a = attn[s];
      scalar_t dots[4] = {0, 0, 0, 0};
      for (int c = 0; c < 4; ++c) {
        if (bp.index[c] < 0) continue;
        const int64_t off = bp.index[c];
        dots[c] = dot(go, value_nm + off, k.D);
        axpy(grad_value_nm + off, a * bp.weight[c], go, k.D);
      }
      bilinear_point_grads(bp, dots, a, grad_attn[s], grad_loc[2 * s], grad_loc[2 * s + 1]);
    }
  }
}

// head_major: value / grad_value are [N, M, S, D] (else [N, S, M, D]).
template <typename scalar_t>
void backward_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                     const scalar_t* loc, const scalar_t* attn, const scalar_t* grad_out,
                     scalar_t* grad_value, scalar_t* grad_loc, scalar_t* grad_attn, const Dims& k,
                     bool head_major) {
  // One task per (batch, head): see the ownership argument at the top of the file.
  at::parallel_for(0, k.N * k.M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nm = begin; nm < end; ++nm) {
      const int64_t n = nm / k.M, m = nm % k.M;
      const int64_t base = head_major ? nm * k.S * k.D : n * k.S * k.M * k.D + m * k.D;
      const int64_t row = head_major ? k.D : k.M * k.D;
      backward_head<scalar_t>(n, m, value + base, grad_value + base, row, shapes, starts, loc,
                              attn, grad_out, grad_loc, grad_attn, k);
    }
  });
}

Dims dims_of(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return Dims{value.size(0), value.size(1), value.size(2), value.size(3),
              sampling_locations.size(1), sampling_locations.size(3), sampling_locations.size(4)};
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const Dims k = dims_of(value, sampling_locations);
  at::Tensor out = at::empty({k.N, k.Lq, k.M * k.D}, sampling_locations.options());
  if (out.numel() == 0) return out;
  if (value.scalar_type() == at::kBFloat16) {  // float locations and weights (checked)
    forward_kernel<float, at::BFloat16>(
        value.data_ptr<at::BFloat16>(), spatial_shapes.data_ptr<int64_t>(),
        level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<float>(),
        attention_weights.data_ptr<float>(), out.data_ptr<float>(), k);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    forward_kernel<scalar_t>(value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
                             level_start_index.data_ptr<int64_t>(),
                             sampling_locations.data_ptr<scalar_t>(),
                             attention_weights.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), k);
  });
  return out;
}

std::vector<at::Tensor> ms_deform_attn_backward_cpu(const at::Tensor& value,
                                                    const at::Tensor& spatial_shapes,
                                                    const at::Tensor& level_start_index,
                                                    const at::Tensor& sampling_locations,
                                                    const at::Tensor& attention_weights,
                                                    const at::Tensor& grad_output) {
  const Dims k = dims_of(value, sampling_locations);
  at::Tensor grad_loc = at::empty_like(sampling_locations);
  at::Tensor grad_attn = at::empty_like(attention_weights);
  if (grad_attn.numel() == 0 || value.numel() == 0) {
    grad_loc.zero_();
    grad_attn.zero_();
    return {at::zeros_like(value), grad_loc, grad_attn};
  }
  // Head-major working copies (see the top of the file) pay off when the sample points visit
  // many more corners than there are value rows (the encoder); for a few hundred queries (the
  // decoder) the two transposes would cost more than they save, and memory.
  const bool head_major = k.Lq * k.L * k.P > k.S;  // sample points vs value rows per head
  const at::Tensor value_w = head_major ? value.permute({0, 2, 1, 3}).contiguous() : value;
  at::Tensor grad_value_w = at::zeros_like(value_w);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    backward_kernel<scalar_t>(
        value_w.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
        level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
        attention_weights.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
        grad_value_w.data_ptr<scalar_t>(), grad_loc.data_ptr<scalar_t>(),
        grad_attn.data_ptr<scalar_t>(), k, head_major);
  });
  at::Tensor grad_value =
      head_major ? grad_value_w.permute({0, 2, 1, 3}).contiguous() : grad_value_w;
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace isda
