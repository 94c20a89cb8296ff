// Per-element steps of the sort-based CUDA make_plan / expert_choice_plan: torch-free, host and device, so
// that tests/cpp/test_kernels.cpp replays the CUDA algorithm on CPU (with std::stable_sort standing in for
// CUB's stable radix sorts) against the CPU kernel's algorithm (kernels/plan.h).
#pragma once

#include "../kernels/common.h"

namespace moe_ext {
namespace cuda {
namespace steps {

// Radix-sort key of an assignment: its expert, or num_experts for an index outside [0, E), so that the
// invalid ones (reported as errors) sort after every valid one and are never placed.
MOE_INLINE int32_t expert_key(int64_t expert, int64_t num_experts) {
  return static_cast<int32_t>(expert >= 0 && expert < num_experts ? expert : num_experts);
}

// Number of low key bits the radix sort must look at for keys in [0, num_experts].
MOE_INLINE int key_bits(int64_t num_experts) {
  int bits = 1;
  while ((int64_t{1} << bits) <= num_experts) ++bits;
  return bits;
}

// The i-th assignment in kernels::kept_before's order without priority (first choices before second
// choices, then token order): a = t * k + j enumerated j-major.
MOE_INLINE int64_t choice_major_assignment(int64_t i, int64_t num_tokens, int64_t k) {
  return (i % num_tokens) * k + i / num_tokens;
}

// Sort key of a priority (or an expert-choice score): kept_before and outranks compare values, so -0.0
// and +0.0 must be one key. CUB's radix sort already treats them as equal; the keys do not rely on it.
template <typename T>
MOE_INLINE T value_key(T value) {
  return value == T(0) ? T(0) : value;
}

// Expert boundaries from keys sorted ascending: offsets[e] = first position whose key is >= e (the end
// when none), for e in [0, E]. Called once for every r in [0, num_items]; writes each offsets[e] once.
MOE_INLINE void write_boundaries(int64_t r, const int32_t* sorted_keys, int64_t num_items, int64_t num_experts,
                                 int64_t* offsets) {
  const int64_t prev = r == 0 ? -1 : sorted_keys[r - 1];
  const int64_t cur = r == num_items ? num_experts : sorted_keys[r];
  for (int64_t e = prev + 1; e <= cur && e <= num_experts; ++e) offsets[e] = r;
}

// Whether an assignment at `rank` (0 = kept first) among its expert's assignments is kept under
// `capacity`. A priority of -inf is never kept (random routing, per-token drops), as on CPU.
MOE_INLINE bool capacity_keeps(int64_t rank, int64_t capacity, const double* priority, int64_t assignment) {
  return rank < capacity && !(priority != nullptr && priority[assignment] == kernels::neg_infinity<double>());
}

// Row of a kept assignment: its expert's block, at the number of kept assignments of the same expert
// before it in token order (kept_scan is an exclusive scan of the kept flags in the dropless order).
MOE_INLINE int64_t capacity_row(int64_t expert, int64_t capacity, int64_t kept_scan_here,
                                int64_t kept_scan_at_expert_start) {
  return expert * capacity + (kept_scan_here - kept_scan_at_expert_start);
}

}  // namespace steps
}  // namespace cuda
}  // namespace moe_ext
