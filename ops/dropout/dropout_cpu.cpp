// CPU dropout / fused ReLU-dropout with a counter-based stream (see dropout.h).
#include "dropout.h"

#include "cpu/cpu_isa.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace isda {

namespace {

// Keep threshold on the 32-bit word: keep when word >= threshold.
uint32_t keep_threshold(double p) {
  const double t = std::round(p * 4294967296.0);
  if (t <= 0.0) return 0u;
  if (t >= 4294967295.0) return std::numeric_limits<uint32_t>::max();
  return static_cast<uint32_t>(t);
}

constexpr int64_t kGrain = 1 << 14;  // elements per task, at least
constexpr int64_t kBlock = 1024;     // elements per inner block (even)

// The 32-bit words of the elements [b0, b0 + len) (len <= kBlock) of the stream `seed`, written
// into `words` (kBlock + 2 entries); returns a pointer to the word of element b0. A block may
// start at an odd element: its first word is then the high half of a pair.
inline const uint32_t* block_words(uint32_t* words, int64_t len, int64_t b0, uint64_t seed) {
  const int64_t first_pair = b0 >> 1;
  const int64_t pairs = ((b0 + len - 1) >> 1) - first_pair + 1;
  for (int64_t k = 0; k < pairs; ++k) {
    const uint64_t h = detail::dropout_pair_bits(seed, first_pair + k);
    words[2 * k] = static_cast<uint32_t>(h);
    words[2 * k + 1] = static_cast<uint32_t>(h >> 32);
  }
  return words + (b0 & 1);
}

// One block of at most kBlock elements starting at element b0, in two branch-free passes: the
// 32-bit words of its elements (block_words), then mask and output. `out` may be `x` (in place:
// each element is read before it is written).
template <typename scalar_t, typename acc_t>
ISDA_TARGET_CLONES void dropout_block(const scalar_t* x, scalar_t* out,
                                      uint8_t* __restrict__ mask, int64_t len, int64_t b0,
                                      uint64_t seed, uint32_t threshold, acc_t scale, bool relu) {
  uint32_t words[kBlock + 2];
  const uint32_t* w = block_words(words, len, b0, seed);
  for (int64_t j = 0; j < len; ++j) {
    const acc_t v = static_cast<acc_t>(x[j]);
    const bool keep = (w[j] >= threshold) & (!relu | (v > acc_t(0)));
    mask[j] = static_cast<uint8_t>(keep);
    out[j] = static_cast<scalar_t>(keep ? v * scale : acc_t(0));
  }
}

// The mask of dropout_block alone (no output written): for a backward pass that rebuilds the
// mask of a forward pass from its seed.
template <typename scalar_t, typename acc_t>
ISDA_TARGET_CLONES void mask_block(const scalar_t* __restrict__ x, uint8_t* __restrict__ mask,
                                   int64_t len, int64_t b0, uint64_t seed, uint32_t threshold,
                                   bool relu) {
  uint32_t words[kBlock + 2];
  const uint32_t* w = block_words(words, len, b0, seed);
  for (int64_t j = 0; j < len; ++j) {
    const acc_t v = static_cast<acc_t>(x[j]);
    mask[j] = static_cast<uint8_t>((w[j] >= threshold) & (!relu | (v > acc_t(0))));
  }
}

// out = grad * mask * scale (NaN/inf in grad propagate, as with torch's dropout backward);
// `out` may be `grad` (in place).
template <typename scalar_t, typename acc_t>
ISDA_TARGET_CLONES void masked_scale(const scalar_t* grad, const uint8_t* __restrict__ mask,
                                     scalar_t* out, int64_t len, acc_t scale) {
  for (int64_t j = 0; j < len; ++j) {
    out[j] = static_cast<scalar_t>(static_cast<acc_t>(grad[j]) * (scale * static_cast<acc_t>(mask[j])));
  }
}

}  // namespace

static void check_dropout_input(const at::Tensor& input, double p) {
  TORCH_CHECK(input.device().is_cpu(), "isda dropout: input must be a CPU tensor");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "isda dropout: p must be in [0, 1), got ", p);
}

// Dropout of the contiguous `x` into `out` (which may be `x`) and `mask`.
static void run_dropout(const at::Tensor& x, const at::Tensor& out, const at::Tensor& mask, double p,
                        int64_t seed, bool relu) {
  const int64_t n = x.numel();
  const uint32_t threshold = keep_threshold(p);
  const uint64_t useed = static_cast<uint64_t>(seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "isda_dropout_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - p));
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    uint8_t* mp = mask.data_ptr<uint8_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
        dropout_block<scalar_t, acc_t>(xp + b0, op + b0, mp + b0, std::min<int64_t>(kBlock, end - b0),
                                       b0, useed, threshold, scale, relu);
      }
    });
  });
}

std::vector<at::Tensor> dropout_forward_cpu(const at::Tensor& input, double p, int64_t seed,
                                            bool relu) {
  check_dropout_input(input, p);
  const at::Tensor x = input.contiguous();
  at::Tensor out = at::empty_like(x);
  at::Tensor mask = at::empty(x.sizes(), x.options().dtype(at::kByte));
  run_dropout(x, out, mask, p, seed, relu);
  return {out, mask};
}

at::Tensor dropout_forward_inplace_cpu(const at::Tensor& input, double p, int64_t seed, bool relu) {
  check_dropout_input(input, p);
  TORCH_CHECK(input.is_contiguous(), "isda dropout (in place): input must be contiguous");
  at::Tensor mask = at::empty(input.sizes(), input.options().dtype(at::kByte));
  run_dropout(input, input, mask, p, seed, relu);
  return mask;
}

at::Tensor dropout_mask_cpu(const at::Tensor& input, double p, int64_t seed, bool relu) {
  check_dropout_input(input, p);
  const at::Tensor x = input.contiguous();
  at::Tensor mask = at::empty(x.sizes(), x.options().dtype(at::kByte));
  const int64_t n = x.numel();
  const uint32_t threshold = keep_threshold(p);
  const uint64_t useed = static_cast<uint64_t>(seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "isda_dropout_mask", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    uint8_t* mp = mask.data_ptr<uint8_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
        mask_block<scalar_t, acc_t>(xp + b0, mp + b0, std::min<int64_t>(kBlock, end - b0), b0,
                                    useed, threshold, relu);
      }
    });
  });
  return mask;
}

static void check_backward_inputs(const at::Tensor& grad_output, const at::Tensor& mask) {
  TORCH_CHECK(grad_output.device().is_cpu() && mask.device().is_cpu(),
              "isda dropout backward: CPU tensors expected");
  TORCH_CHECK(mask.scalar_type() == at::kByte, "isda dropout backward: mask must be uint8");
  TORCH_CHECK(grad_output.sizes() == mask.sizes(), "isda dropout backward: grad ",
              grad_output.sizes(), " and mask ", mask.sizes(), " differ in shape");
}

// out = g * mask * scale for the contiguous `g` and `m`; `out` may be `g`.
static void run_masked_scale(const at::Tensor& g, const at::Tensor& m, const at::Tensor& out,
                             double scale) {
  const int64_t n = g.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "isda_dropout_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t s = static_cast<acc_t>(scale);
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const uint8_t* mp = m.data_ptr<uint8_t>();
    scalar_t* ip = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      masked_scale<scalar_t, acc_t>(gp + begin, mp + begin, ip + begin, end - begin, s);
    });
  });
}

at::Tensor dropout_backward_cpu(const at::Tensor& grad_output, const at::Tensor& mask,
                                double scale) {
  check_backward_inputs(grad_output, mask);
  const at::Tensor g = grad_output.contiguous();
  at::Tensor grad_input = at::empty_like(g);
  run_masked_scale(g, mask.contiguous(), grad_input, scale);
  return grad_input;
}

void dropout_backward_inplace_cpu(const at::Tensor& grad, const at::Tensor& mask, double scale) {
  check_backward_inputs(grad, mask);
  TORCH_CHECK(grad.is_contiguous(), "isda dropout backward (in place): grad must be contiguous");
  run_masked_scale(grad, mask.contiguous(), grad, scale);
}

}  // namespace isda
