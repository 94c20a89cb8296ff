// Routing-plan math: expert histograms, stable placement, and capacity ranking of assignments.
#pragma once

#include "common.h"

namespace moe_ext {
namespace kernels {

// Adds the experts of assignments [begin, end) of a flat [T*k] index array to
// counts[E]. Returns the first assignment whose expert is outside [0, E), or
// -1 when all are valid (invalid ones are not counted).
MOE_INLINE int64_t count_experts(const int64_t* indices, int64_t begin, int64_t end, int64_t num_experts,
                                 int64_t* counts) {
  int64_t first_bad = -1;
  for (int64_t a = begin; a < end; ++a) {
    const int64_t e = indices[a];
    if (e < 0 || e >= num_experts) {
      if (first_bad < 0) first_bad = a;
      continue;
    }
    ++counts[e];
  }
  return first_bad;
}

// Stable (token-order) placement of assignments [begin, end): cursor[e] is the
// next free row of expert e for this range and is advanced. Writes the sorted
// position of every assignment; assignments are flat indices a = t * k + j.
MOE_INLINE void place_stable(const int64_t* indices, int64_t begin, int64_t end, int64_t* cursor,
                             int64_t* position_of) {
  for (int64_t a = begin; a < end; ++a) position_of[a] = cursor[indices[a]]++;
}

// Order in which a full expert keeps assignments under capacity. With no
// priority: first choices before second choices, then token order
// (Switch/GShard). With a priority: higher priority first, then that order.
template <typename prio_t>
MOE_INLINE bool kept_before(int64_t a, int64_t b, int64_t k, const prio_t* priority) {
  if (priority != nullptr) {
    const prio_t pa = priority[a], pb = priority[b];
    if (pa != pb) return pa > pb;
  }
  const int64_t ja = a % k, jb = b % k;
  if (ja != jb) return ja < jb;
  return a < b;
}

// Consistency of a routing plan, checked before any row is touched so that a
// hand-made plan can never index out of bounds or give a wrong gradient.
enum class PlanError : int {
  kOk = 0,
  kRowOutOfRange = 1,    // row_of[t, j] outside [-1, N)
  kRowNotOwned = 2,      // row_of[t, j] = r but token_of[r] != t
  kDuplicateRow = 3,     // row_of[t, j1] == row_of[t, j2] >= 0
  kTokenOutOfRange = 4,  // token_of[r] outside [-1, T)
  kRowNotListed = 5      // token_of[r] = t but r is not in row_of[t, :]
};

MOE_INLINE PlanError check_token_rows(const int64_t* row_of_token, int64_t k, int64_t t, const int64_t* token_of,
                                      int64_t num_rows) {
  for (int64_t j = 0; j < k; ++j) {
    const int64_t r = row_of_token[j];
    if (r < -1 || r >= num_rows) return PlanError::kRowOutOfRange;
    if (r < 0) continue;
    if (token_of[r] != t) return PlanError::kRowNotOwned;
    for (int64_t i = 0; i < j; ++i) {
      if (row_of_token[i] == r) return PlanError::kDuplicateRow;
    }
  }
  return PlanError::kOk;
}

MOE_INLINE PlanError check_row_token(int64_t r, const int64_t* token_of, const int64_t* row_of, int64_t num_tokens,
                                     int64_t k) {
  const int64_t t = token_of[r];
  if (t < -1 || t >= num_tokens) return PlanError::kTokenOutOfRange;
  if (t < 0) return PlanError::kOk;
  for (int64_t j = 0; j < k; ++j) {
    if (row_of[t * k + j] == r) return PlanError::kOk;
  }
  return PlanError::kRowNotListed;
}

}  // namespace kernels
}  // namespace moe_ext
