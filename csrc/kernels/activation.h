// SwiGLU, the gated activation between the two expert GEMMs, fused: h = [gate | up] (each F wide),
// out = silu(gate) * up. Forward reads h once and writes out once; backward reads h and the incoming
// gradient once and writes d[gate | up] once, instead of the five element-wise passes and three
// temporaries of chunk + silu + mul and their autograd.
//
// Torch-free, host and device. float math uses fast_exp (below) on both, so the CPU and CUDA kernels
// round alike; double uses the C library's exp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"

// Always inlined, also on the host: the CPU kernels compile one loop per instruction set (target clones),
// and a call out of the loop would both block vectorization and run the baseline-ISA copy.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define MOE_ACTIVATION_INLINE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define MOE_ACTIVATION_INLINE __attribute__((always_inline)) inline
#else
#define MOE_ACTIVATION_INLINE inline
#endif

namespace moe_ext {
namespace kernels {

MOE_ACTIVATION_INLINE float float_from_bits(int32_t bits) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
#endif
}

MOE_ACTIVATION_INLINE int32_t bits_from_float(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(value);
#else
  int32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
#endif
}

// exp(x) for float, branch-free so that compilers vectorize loops calling it: exp(x) = 2^n * exp(r) with
// n = round(x / ln 2) and |r| <= ln(2) / 2, exp(r) by the degree-7 Taylor-fitted polynomial of Cephes'
// expf (relative error below 2 ulp, tested against std::exp). x is clamped to [-87, 88], so 2^n stays a
// normal float: exp(-87) = 1.6e-38 stands for every smaller value and exp(88) = 1.7e38 for every larger.
// NaN propagates. The rounding uses the 1.5 * 2^23 trick, so no float-to-int conversion can overflow.
MOE_ACTIVATION_INLINE float fast_exp(float x) {
  // Two selects (not a nested conditional), which compilers turn into vector min/max-style blends.
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float shifted = x * 1.44269504088896341f + 12582912.0f;  // round(x / ln 2) in the low mantissa bits
  const int32_t n = bits_from_float(shifted) - 0x4B400000;
  const float nf = shifted - 12582912.0f;
  float r = x - nf * 0.693359375f;  // ln 2 in two parts: exact product with the high part
  r = r - nf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float exp_r = p * r * r + r + 1.0f;
  return exp_r * float_from_bits((n + 127) << 23);
}

MOE_ACTIVATION_INLINE float exp_for_activation(float x) { return fast_exp(x); }
MOE_ACTIVATION_INLINE double exp_for_activation(double x) { return ::exp(x); }

template <typename acc>
MOE_ACTIVATION_INLINE acc sigmoid(acc x) {
  return acc(1) / (acc(1) + exp_for_activation(-x));
}

// out = silu(gate) * up = gate * sigmoid(gate) * up
template <typename acc>
MOE_ACTIVATION_INLINE acc swiglu_forward(acc gate, acc up) {
  return gate * sigmoid(gate) * up;
}

// d out / d gate = up * s * (1 + gate * (1 - s)), d out / d up = gate * s, with s = sigmoid(gate)
template <typename acc>
MOE_ACTIVATION_INLINE void swiglu_backward(acc gate, acc up, acc grad, acc& grad_gate, acc& grad_up) {
  const acc s = sigmoid(gate);
  grad_up = grad * gate * s;
  grad_gate = grad * up * s * (acc(1) + gate * (acc(1) - s));
}

}  // namespace kernels
}  // namespace moe_ext
