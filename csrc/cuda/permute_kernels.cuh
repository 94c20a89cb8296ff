// Kernels of dispatch and combine and their backward (launched by permute_kernel.cu), and of the plan
// validation they share.
#pragma once

#include "../kernels/permute.h"
#include "../kernels/plan.h"
#include "device.cuh"

namespace moe_ext {
namespace cuda {
namespace {

using kernels::PlanError;

// ---------------------------------------------------------------------------------------------------------
// Plan validation (the CPU kernel's validate_plan, same checks from kernels/plan.h, same messages).

enum PlanCheckSlot : int { kTokenSide = 0, kRowSide = 1, kPlanCheckSlots = 2 };
constexpr int64_t kCodeBits = 8;  // a slot holds item * kCodeBits + PlanError: the smallest item, with its error

__global__ void validate_plan_kernel(const int64_t* __restrict__ row_of, const int64_t* __restrict__ token_of,
                                     int64_t num_tokens, int64_t k, int64_t num_rows, ErrorSink sink) {
  MOE_EXT_GRID_STRIDE_LOOP(i, num_tokens > num_rows ? num_tokens : num_rows) {
    if (i < num_tokens) {
      const PlanError error = kernels::check_token_rows(row_of + i * k, k, i, token_of, num_rows);
      if (error != PlanError::kOk) sink.report(kTokenSide, i * kCodeBits + static_cast<int64_t>(error));
    }
    if (i < num_rows) {
      const PlanError error = kernels::check_row_token(i, token_of, row_of, num_tokens, k);
      if (error != PlanError::kOk) sink.report(kRowSide, i * kCodeBits + static_cast<int64_t>(error));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Kernels

// out[r] = x[token_of[r]], or zeros for an empty row: a byte copy in vec_t units (16 bytes when aligned).
template <typename vec_t>
__global__ void gather_rows_kernel(const vec_t* __restrict__ x, const int64_t* __restrict__ token_of,
                                   int64_t num_tokens, int64_t num_rows, int64_t vecs_per_row,
                                   vec_t* __restrict__ out) {
  MOE_EXT_GRID_STRIDE_LOOP(i, num_rows * vecs_per_row) {
    const int64_t r = i / vecs_per_row, v = i - r * vecs_per_row;
    const int64_t t = token_of[r];
    out[i] = t >= 0 && t < num_tokens ? x[t * vecs_per_row + v] : vec_t{};
  }
}

// out[t] = sum_j w[t, j] * rows[row_of[t, j]] (w = 1 when weights is null), over j in order, in acc.
template <typename scalar_t, typename acc, int kVec>
__global__ void weighted_row_sum_kernel(const scalar_t* __restrict__ rows, const acc* __restrict__ weights,
                                        const int64_t* __restrict__ row_of, int64_t num_tokens, int64_t k,
                                        int64_t num_rows, int64_t hidden, scalar_t* __restrict__ out) {
  using vec_t = Vec<scalar_t, kVec>;
  const int64_t vecs_per_row = hidden / kVec;
  MOE_EXT_GRID_STRIDE_LOOP(i, num_tokens * vecs_per_row) {
    const int64_t t = i / vecs_per_row, v = i - t * vecs_per_row;
    acc sum[kVec];
#pragma unroll
    for (int u = 0; u < kVec; ++u) sum[u] = acc(0);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t r = row_of[t * k + j];
      if (r < 0 || r >= num_rows) continue;
      const acc weight = weights != nullptr ? weights[t * k + j] : acc(1);
      const vec_t in = reinterpret_cast<const vec_t*>(rows + r * hidden)[v];
#pragma unroll
      for (int u = 0; u < kVec; ++u) sum[u] += weight * static_cast<acc>(in.v[u]);
    }
    vec_t result;
#pragma unroll
    for (int u = 0; u < kVec; ++u) result.v[u] = static_cast<scalar_t>(sum[u]);
    reinterpret_cast<vec_t*>(out + t * hidden)[v] = result;
  }
}

// grad_y_sorted[r] = w[t, j] * grad_y[t] for the (t, j) owning row r (kernels::slot_of_row), else zeros.
template <typename scalar_t, typename acc, int kVec>
__global__ void scale_owned_rows_kernel(const scalar_t* __restrict__ grad, const acc* __restrict__ weights,
                                        const int64_t* __restrict__ row_of, const int64_t* __restrict__ token_of,
                                        int64_t num_tokens, int64_t k, int64_t num_rows, int64_t hidden,
                                        scalar_t* __restrict__ out) {
  using vec_t = Vec<scalar_t, kVec>;
  const int64_t vecs_per_row = hidden / kVec;
  MOE_EXT_GRID_STRIDE_LOOP(i, num_rows * vecs_per_row) {
    const int64_t r = i / vecs_per_row, v = i - r * vecs_per_row;
    const int64_t t = token_of[r];
    const int64_t j = t >= 0 && t < num_tokens ? kernels::slot_of_row(row_of + t * k, k, r) : -1;
    vec_t result;
    if (j < 0) {
#pragma unroll
      for (int u = 0; u < kVec; ++u) result.v[u] = scalar_t(0);
    } else {
      const acc weight = weights[t * k + j];
      const vec_t in = reinterpret_cast<const vec_t*>(grad + t * hidden)[v];
#pragma unroll
      for (int u = 0; u < kVec; ++u) result.v[u] = static_cast<scalar_t>(weight * static_cast<acc>(in.v[u]));
    }
    reinterpret_cast<vec_t*>(out + r * hidden)[v] = result;
  }
}

// grad_weights[t, j] = <grad_y[t], y_sorted[row_of[t, j]]>: one warp per (t, j), lanes striding over h,
// then a fixed butterfly of shuffles: the same summation order on every run.
template <typename scalar_t, typename acc>
__global__ void row_dot_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ y,
                               const int64_t* __restrict__ row_of, int64_t num_tokens, int64_t k, int64_t num_rows,
                               int64_t hidden, acc* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  for (int64_t pair = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; pair < num_tokens * k;
       pair += warps) {
    const int64_t t = pair / k, r = row_of[pair];
    acc partial = 0;
    if (r >= 0 && r < num_rows) {
      for (int64_t h = lane; h < hidden; h += 32) {
        partial += static_cast<acc>(grad[t * hidden + h]) * static_cast<acc>(y[r * hidden + h]);
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) partial += __shfl_xor_sync(0xffffffffu, partial, offset);
    if (lane == 0) out[pair] = partial;
  }
}

}  // namespace
}  // namespace cuda
}  // namespace moe_ext
