// Bilinear sampling of one point and its gradient: the per-sample maths shared by the CPU
// (ms_deform_attn_cpu.cpp) and CUDA (ms_deform_attn_cuda.cu) kernels.
//
// Semantics are those of F.grid_sample(mode="bilinear", padding_mode="zeros",
// align_corners=False) with grid = 2 * loc - 1: a normalised location loc_x in [0, 1] maps to the
// pixel coordinate x = loc_x * W - 0.5 (pixel centres at integer + 0.5 in loc space). Corners
// outside the map contribute zero, so a point within one pixel outside the map still receives
// partial contributions and one farther out receives none.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ISDA_HOST_DEVICE __host__ __device__
#define ISDA_UNROLL _Pragma("unroll")
#else
#define ISDA_HOST_DEVICE
#define ISDA_UNROLL
#endif

namespace isda {

// The four corners of one sample point on one level, in the order
// 0 = (y0, x0), 1 = (y0, x0 + 1), 2 = (y0 + 1, x0), 3 = (y0 + 1, x0 + 1).
template <typename scalar_t>
struct BilinearPoint {
  int64_t index[4];     // h * W + w inside the level, or -1 when the corner lies outside the map
  scalar_t weight[4];   // bilinear weights (0 for corners outside)
  scalar_t dweight_dx[4];  // d weight / d loc_x (normalised coordinates, includes the factor W)
  scalar_t dweight_dy[4];  // d weight / d loc_y (includes the factor H)
};

// floor() of a finite value in [-1, 2^62): exact, no libm call, same on host and device.
template <typename scalar_t>
ISDA_HOST_DEVICE inline int64_t floor_to_int(scalar_t v) {
  int64_t i = static_cast<int64_t>(v);  // truncation towards zero
  return (static_cast<scalar_t>(i) > v) ? i - 1 : i;
}

// Corners and weights (and, with WithGrad, weight derivatives) of the point (loc_x, loc_y) on a
// H x W map. Returns false when no corner lies inside the map (the point contributes nothing and
// has zero gradient); NaN locations also return false.
template <typename scalar_t, bool WithGrad>
ISDA_HOST_DEVICE inline bool bilinear_point(scalar_t loc_x, scalar_t loc_y, int64_t H, int64_t W,
                                            BilinearPoint<scalar_t>& p) {
  const scalar_t x = loc_x * static_cast<scalar_t>(W) - static_cast<scalar_t>(0.5);
  const scalar_t y = loc_y * static_cast<scalar_t>(H) - static_cast<scalar_t>(0.5);
  // x == -1 is kept (its right corner has weight 0 but a non-zero derivative, like grid_sample).
  if (!(x >= static_cast<scalar_t>(-1) && y >= static_cast<scalar_t>(-1) &&
        x < static_cast<scalar_t>(W) && y < static_cast<scalar_t>(H))) {
    return false;
  }
  const int64_t x0 = floor_to_int(x);
  const int64_t y0 = floor_to_int(y);
  const scalar_t fx = x - static_cast<scalar_t>(x0);
  const scalar_t fy = y - static_cast<scalar_t>(y0);
  const scalar_t gx = static_cast<scalar_t>(1) - fx;
  const scalar_t gy = static_cast<scalar_t>(1) - fy;
  const bool in_x0 = x0 >= 0;
  const bool in_x1 = x0 + 1 < W;
  const bool in_y0 = y0 >= 0;
  const bool in_y1 = y0 + 1 < H;
  const bool inside[4] = {in_y0 && in_x0, in_y0 && in_x1, in_y1 && in_x0, in_y1 && in_x1};
  const int64_t index[4] = {y0 * W + x0, y0 * W + x0 + 1, (y0 + 1) * W + x0, (y0 + 1) * W + x0 + 1};
  const scalar_t weight[4] = {gy * gx, gy * fx, fy * gx, fy * fx};
  const scalar_t sw = static_cast<scalar_t>(W);
  const scalar_t sh = static_cast<scalar_t>(H);
  const scalar_t ddx[4] = {-gy * sw, gy * sw, -fy * sw, fy * sw};
  const scalar_t ddy[4] = {-gx * sh, -fx * sh, gx * sh, fx * sh};
  ISDA_UNROLL
  for (int c = 0; c < 4; ++c) {
    p.index[c] = inside[c] ? index[c] : -1;
    p.weight[c] = inside[c] ? weight[c] : static_cast<scalar_t>(0);
    if (WithGrad) {
      p.dweight_dx[c] = inside[c] ? ddx[c] : static_cast<scalar_t>(0);
      p.dweight_dy[c] = inside[c] ? ddy[c] : static_cast<scalar_t>(0);
    }
  }
  return true;
}

// One channel of the bilinear sample. `base` points at the channel of position 0 of the level,
// consecutive positions are `stride` elements apart.
template <typename scalar_t>
ISDA_HOST_DEVICE inline scalar_t bilinear_sample_channel(const scalar_t* base, int64_t stride,
                                                         const BilinearPoint<scalar_t>& p) {
  scalar_t acc = static_cast<scalar_t>(0);
  ISDA_UNROLL
  for (int c = 0; c < 4; ++c) {
    if (p.index[c] >= 0) acc += p.weight[c] * base[p.index[c] * stride];
  }
  return acc;
}

// Gradients of one sample point given, per corner, dot[c] = <grad_output, value at corner c>
// (summed over the channels of the head) and the point's attention weight:
//   grad_attention = sum_c weight[c] * dot[c]
//   grad_loc_x     = attention * sum_c dweight_dx[c] * dot[c]   (and likewise for y).
// The value gradient at corner c is attention * weight[c] * grad_output (left to the caller,
// which owns the accumulation strategy).
template <typename scalar_t>
ISDA_HOST_DEVICE inline void bilinear_point_grads(const BilinearPoint<scalar_t>& p,
                                                  const scalar_t dot[4], scalar_t attention,
                                                  scalar_t& grad_attention, scalar_t& grad_loc_x,
                                                  scalar_t& grad_loc_y) {
  scalar_t ga = static_cast<scalar_t>(0);
  scalar_t gx = static_cast<scalar_t>(0);
  scalar_t gy = static_cast<scalar_t>(0);
  ISDA_UNROLL
  for (int c = 0; c < 4; ++c) {
    ga += p.weight[c] * dot[c];
    gx += p.dweight_dx[c] * dot[c];
    gy += p.dweight_dy[c] * dot[c];
  }
  grad_attention = ga;
  grad_loc_x = attention * gx;
  grad_loc_y = attention * gy;
}

}  // namespace isda
