// Kernels of make_plan and expert_choice_plan (launched, between CUB's sorts and scans, by plan_kernel.cu).
#pragma once

#include "device.cuh"
#include "plan_steps.cuh"

namespace moe_ext {
namespace cuda {
namespace {

enum PlanSlot : int { kBadIndex = 0, kPriorityNaN = 1, kPlanSlots = 2 };

// ---------------------------------------------------------------------------------------------------------
// make_plan kernels

__global__ void assignment_keys_kernel(const int64_t* __restrict__ indices, const double* __restrict__ priority,
                                       int64_t num_assignments, int64_t num_experts, int32_t* __restrict__ keys,
                                       int32_t* __restrict__ assignments, ErrorSink sink) {
  MOE_EXT_GRID_STRIDE_LOOP(a, num_assignments) {
    const int64_t e = indices[a];
    if (e < 0 || e >= num_experts) sink.report(kBadIndex, a);
    if (priority != nullptr && priority[a] != priority[a]) sink.report(kPriorityNaN, a);
    keys[a] = steps::expert_key(e, num_experts);
    assignments[a] = static_cast<int32_t>(a);
  }
}

__global__ void boundaries_kernel(const int32_t* __restrict__ sorted_keys, int64_t num_items, int64_t num_experts,
                                  int64_t* __restrict__ offsets) {
  MOE_EXT_GRID_STRIDE_LOOP(r, num_items + 1) {
    steps::write_boundaries(r, sorted_keys, num_items, num_experts, offsets);
  }
}

__global__ void counts_kernel(const int64_t* __restrict__ offsets, int64_t num_experts, int64_t* __restrict__ counts) {
  MOE_EXT_GRID_STRIDE_LOOP(e, num_experts) { counts[e] = offsets[e + 1] - offsets[e]; }
}

__global__ void place_dropless_kernel(const int32_t* __restrict__ sorted_keys, const int32_t* __restrict__ sorted,
                                      int64_t num_assignments, int64_t num_experts, int64_t k,
                                      int64_t* __restrict__ row_of, int64_t* __restrict__ token_of) {
  MOE_EXT_GRID_STRIDE_LOOP(r, num_assignments) {
    const int64_t a = sorted[r];
    const bool valid = sorted_keys[r] < num_experts;
    row_of[a] = valid ? r : -1;
    token_of[r] = valid ? a / k : -1;
  }
}

__global__ void choice_major_kernel(const double* __restrict__ priority, int64_t num_tokens, int64_t k,
                                    int32_t* __restrict__ order, double* __restrict__ priority_keys) {
  MOE_EXT_GRID_STRIDE_LOOP(i, num_tokens * k) {
    const int64_t a = steps::choice_major_assignment(i, num_tokens, k);
    order[i] = static_cast<int32_t>(a);
    if (priority != nullptr) priority_keys[i] = steps::value_key(priority[a]);
  }
}

__global__ void expert_keys_of_kernel(const int64_t* __restrict__ indices, const int32_t* __restrict__ order,
                                      int64_t num_assignments, int64_t num_experts, int32_t* __restrict__ keys) {
  MOE_EXT_GRID_STRIDE_LOOP(i, num_assignments) { keys[i] = steps::expert_key(indices[order[i]], num_experts); }
}

__global__ void capacity_keep_kernel(const int32_t* __restrict__ ranked_keys, const int32_t* __restrict__ ranked,
                                     const int64_t* __restrict__ offsets, const double* __restrict__ priority,
                                     int64_t num_assignments, int64_t num_experts, int64_t capacity,
                                     int32_t* __restrict__ keep) {
  MOE_EXT_GRID_STRIDE_LOOP(p, num_assignments) {
    const int64_t e = ranked_keys[p], a = ranked[p];
    keep[a] = e < num_experts && steps::capacity_keeps(p - offsets[e], capacity, priority, a) ? 1 : 0;
  }
}

__global__ void gather_keep_kernel(const int32_t* __restrict__ keep, const int32_t* __restrict__ sorted,
                                   int64_t num_assignments, int32_t* __restrict__ kept_flags) {
  MOE_EXT_GRID_STRIDE_LOOP(p, num_assignments) { kept_flags[p] = keep[sorted[p]]; }
}

__global__ void place_capacity_kernel(const int32_t* __restrict__ sorted_keys, const int32_t* __restrict__ sorted,
                                      const int32_t* __restrict__ kept_flags, const int32_t* __restrict__ kept_scan,
                                      const int64_t* __restrict__ offsets, int64_t num_assignments, int64_t num_experts,
                                      int64_t k, int64_t capacity, int64_t* __restrict__ row_of,
                                      int64_t* __restrict__ token_of) {
  MOE_EXT_GRID_STRIDE_LOOP(p, num_assignments) {
    const int64_t e = sorted_keys[p], a = sorted[p];
    if (e < num_experts && kept_flags[p] != 0) {
      const int64_t row = steps::capacity_row(e, capacity, kept_scan[p], kept_scan[offsets[e]]);
      row_of[a] = row;
      token_of[row] = a / k;
    } else {
      row_of[a] = -1;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// expert_choice_plan: every expert's tokens sorted by score (descending, stable: ties to the lower token)
// with a segmented radix sort over the transposed scores; the first min(T, C) of each are flagged, and a
// scan of the flags numbers the kept tokens of each expert in token order.

template <typename acc>
__global__ void expert_choice_keys_kernel(const acc* __restrict__ scores, int64_t num_tokens, int64_t num_experts,
                                          acc* __restrict__ keys, int32_t* __restrict__ tokens, ErrorSink sink) {
  MOE_EXT_GRID_STRIDE_LOOP(i, num_tokens * num_experts) {
    const int64_t e = i / num_tokens, t = i % num_tokens;
    const acc value = scores[t * num_experts + e];
    if (value != value) sink.report(0, t * num_experts + e);
    keys[i] = steps::value_key(value);
    tokens[i] = static_cast<int32_t>(t);
  }
}

__global__ void expert_choice_flags_kernel(const int32_t* __restrict__ sorted_tokens, int64_t num_tokens,
                                           int64_t num_experts, int64_t take, int32_t* __restrict__ flags) {
  MOE_EXT_GRID_STRIDE_LOOP(i, num_experts * take) {
    const int64_t e = i / take, rank = i % take;
    flags[e * num_tokens + sorted_tokens[e * num_tokens + rank]] = 1;
  }
}

__global__ void expert_choice_place_kernel(const int32_t* __restrict__ flags, const int32_t* __restrict__ scan,
                                           int64_t num_tokens, int64_t num_experts, int64_t capacity,
                                           int64_t* __restrict__ row_of, int64_t* __restrict__ token_of) {
  MOE_EXT_GRID_STRIDE_LOOP(i, num_tokens * num_experts) {
    if (flags[i] == 0) continue;
    const int64_t e = i / num_tokens, t = i % num_tokens;
    const int64_t row = steps::capacity_row(e, capacity, scan[i], scan[e * num_tokens]);
    row_of[t * num_experts + e] = row;
    token_of[row] = t;
  }
}

}  // namespace
}  // namespace cuda
}  // namespace moe_ext
