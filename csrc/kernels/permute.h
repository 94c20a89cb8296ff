// Row-level dispatch/combine math: gathers of token rows into the expert-sorted buffer and weighted sums back.
#pragma once

#include "common.h"

namespace moe_ext {
namespace kernels {

// out[h] = in[h] (or 0 when in is null), converting nothing: same element type.
template <typename T>
MOE_INLINE void copy_row(const T* in, int64_t hidden, T* out) {
  if (in == nullptr) {
    for (int64_t h = 0; h < hidden; ++h) out[h] = T(0);
  } else {
    for (int64_t h = 0; h < hidden; ++h) out[h] = in[h];
  }
}

// acc[h] += weight * row[h]
template <typename T, typename acc>
MOE_INLINE void axpy_row(acc weight, const T* row, int64_t hidden, acc* out) {
  for (int64_t h = 0; h < hidden; ++h) out[h] += weight * static_cast<acc>(row[h]);
}

// Partial sums of dot_row: enough independent lanes to fill a 512-bit vector of floats.
constexpr int kDotLanes = 16;

// sum_h a[h] * b[h], accumulated in acc, in a fixed order that vectorizes: lane l sums the products
// at h = l, l + 16, l + 32, ... of the whole 16-element blocks, the lanes are added in order 0..15,
// then the products of the tail (hidden % 16 elements) in order. The same on every machine, thread
// count and call; not the left-to-right order of a plain loop.
template <typename T, typename acc>
MOE_INLINE acc dot_row(const T* a, const T* b, int64_t hidden) {
  acc lane[kDotLanes] = {};
  int64_t h = 0;
  for (; h + kDotLanes <= hidden; h += kDotLanes) {
    for (int l = 0; l < kDotLanes; ++l) lane[l] += static_cast<acc>(a[h + l]) * static_cast<acc>(b[h + l]);
  }
  acc total = 0;
  for (int l = 0; l < kDotLanes; ++l) total += lane[l];
  for (; h < hidden; ++h) total += static_cast<acc>(a[h]) * static_cast<acc>(b[h]);
  return total;
}

// Slot j of token t whose row is `row`, or -1 (row not referenced by t).
MOE_INLINE int64_t slot_of_row(const int64_t* row_of_token, int64_t k, int64_t row) {
  for (int64_t j = 0; j < k; ++j) {
    if (row_of_token[j] == row) return j;
  }
  return -1;
}

}  // namespace kernels
}  // namespace moe_ext
