// Fast CPU dropout (optionally fused with a preceding ReLU) with a counter-based random stream.
//
//   input   any shape, float32/float64/bfloat16/float16, contiguous
//   output  input * keep / (1 - p)                      (relu: max(input, 0) * keep / (1 - p))
//   mask    uint8, same shape: 1 where the element passes (kept, and > 0 for relu)
//
// Element i is kept when the 32-bit word  hash(seed, i)  is >= round(p * 2^32), where hash is
// splitmix64 of (seed + (i / 2) * golden-ratio increment) and element i uses its low (even i) or
// high (odd i) 32 bits. The stream depends only on (seed, i): results are the same for any thread
// count. torch's CPU dropout draws one Bernoulli sample per element from a sequential generator
// and costs more than the Linear layer it follows; this is one multiply-xorshift hash per two
// elements.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace isda {

namespace detail {

constexpr uint64_t kGoldenGamma = 0x9E3779B97F4A7C15ULL;

inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// The 64 random bits of element pair `pair` (elements 2 * pair: low 32 bits, 2 * pair + 1: high
// 32 bits) of the stream `seed`.
inline uint64_t dropout_pair_bits(uint64_t seed, int64_t pair) {
  return splitmix64(seed + static_cast<uint64_t>(pair) * kGoldenGamma);
}

}  // namespace detail

// Returns {output, mask}.
std::vector<at::Tensor> dropout_forward_cpu(const at::Tensor& input, double p, int64_t seed,
                                            bool relu);

// The mask of dropout_forward_cpu alone (no output).
// In place: `input` (contiguous) becomes the output of dropout_forward_cpu; returns the mask.
at::Tensor dropout_forward_inplace_cpu(const at::Tensor& input, double p, int64_t seed, bool relu);

at::Tensor dropout_mask_cpu(const at::Tensor& input, double p, int64_t seed, bool relu);

// grad_input = grad_output * mask * scale.
at::Tensor dropout_backward_cpu(const at::Tensor& grad_output, const at::Tensor& mask,
                                double scale);

// In place: `grad` (contiguous) becomes dropout_backward_cpu's result.
void dropout_backward_inplace_cpu(const at::Tensor& grad, const at::Tensor& mask, double scale);

}  // namespace isda
