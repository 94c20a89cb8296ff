// Kernels of the auxiliary losses and their backward (launched by losses_kernel.cu).
#pragma once

#include <cmath>

#include "../kernels/common.h"
#include "device.cuh"

namespace moe_ext {
namespace cuda {
namespace {

// Experts whose counts fit a block's shared-memory histogram (8 bytes each, within 48 KiB).
constexpr int64_t kSharedHistogram = 6144;

// Launch geometry of expert_counts_kernel<kShared = num_experts <= kSharedHistogram>: the shared-memory
// histogram is merged once per block, so the grid is bounded (the grid-stride loop covers the rest).
inline unsigned int expert_counts_grid(int64_t num_indices, int64_t num_experts) {
  return num_experts <= kSharedHistogram ? std::min(blocks_for(num_indices), 1024u) : blocks_for(num_indices);
}

inline size_t expert_counts_shared_bytes(int64_t num_experts) {
  return num_experts <= kSharedHistogram ? static_cast<size_t>(num_experts) * sizeof(unsigned long long) : 0;
}

// counts[e] = number of valid indices equal to e; an index outside [0, E) is reported by flat position.
template <bool kShared>
__global__ void expert_counts_kernel(const int64_t* __restrict__ indices, int64_t num_indices, int64_t num_experts,
                                     unsigned long long* __restrict__ counts, ErrorSink sink) {
  MOE_EXT_DYNAMIC_SHARED(unsigned long long, histogram, alignof(unsigned long long));
  if (kShared) {
    for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) histogram[e] = 0;
    __syncthreads();
  }
  MOE_EXT_GRID_STRIDE_LOOP(a, num_indices) {
    const int64_t e = indices[a];
    if (e < 0 || e >= num_experts) {
      sink.report(0, a);
      continue;
    }
    atomicAdd(kShared ? histogram + e : counts + e, 1ull);
  }
  if (kShared) {
    __syncthreads();
    for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) {
      if (histogram[e] != 0) atomicAdd(counts + e, histogram[e]);
    }
  }
}

// partial[b, c] = sum of value(r, c) over rows r of block b (kReduceBlock rows), in row order.
template <typename scalar_t, typename acc>
__global__ void block_column_sums_kernel(const scalar_t* __restrict__ values, int64_t rows, int64_t width,
                                         acc* __restrict__ partial) {
  const int64_t blocks = (rows + kReduceBlock - 1) / kReduceBlock;
  MOE_EXT_GRID_STRIDE_LOOP(i, blocks * width) {
    const int64_t b = i / width, c = i - b * width;
    const int64_t end = (b + 1) * kReduceBlock < rows ? (b + 1) * kReduceBlock : rows;
    acc sum = 0;
    for (int64_t r = b * kReduceBlock; r < end; ++r) sum += static_cast<acc>(values[r * width + c]);
    partial[i] = sum;
  }
}

// totals[c] = sum over the blocks, in order.
template <typename acc>
__global__ void sum_blocks_kernel(const acc* __restrict__ partial, int64_t blocks, int64_t width,
                                  acc* __restrict__ totals) {
  MOE_EXT_GRID_STRIDE_LOOP(c, width) {
    acc total = 0;
    for (int64_t b = 0; b < blocks; ++b) total += partial[b * width + c];
    totals[c] = total;
  }
}

// loss = E * sum_e count_e * column_sum_e / T^2, added over e in order, rounding like the CPU kernel.
template <typename scalar_t, typename acc>
__global__ void load_balancing_finish_kernel(const acc* __restrict__ column_sums, const int64_t* __restrict__ counts,
                                             int64_t num_tokens, int64_t num_experts, scalar_t* __restrict__ loss) {
  acc total = 0;
  for (int64_t e = 0; e < num_experts; ++e) total += mul_rn(static_cast<acc>(counts[e]), column_sums[e]);
  const acc value = num_tokens > 0 ? static_cast<acc>(num_experts) * total /
                                         (static_cast<acc>(num_tokens) * static_cast<acc>(num_tokens))
                                   : acc(0);
  *loss = static_cast<scalar_t>(value);
}

template <typename scalar_t, typename acc>
__device__ __forceinline__ void token_logsumexp(const scalar_t* row, int64_t num_experts, acc& max_logit, acc& sum) {
  acc m = kernels::neg_infinity<acc>();
  for (int64_t e = 0; e < num_experts; ++e) {
    const acc x = static_cast<acc>(row[e]);
    m = m < x ? x : m;  // std::max(m, x), NaN handling included
  }
  acc total = 0;
  for (int64_t e = 0; e < num_experts; ++e) total += std::exp(static_cast<acc>(row[e]) - m);
  max_logit = m;
  sum = total;
}

template <typename scalar_t, typename acc>
__global__ void squared_logsumexp_kernel(const scalar_t* __restrict__ logits, int64_t num_tokens, int64_t num_experts,
                                         acc* __restrict__ squared) {
  MOE_EXT_GRID_STRIDE_LOOP(t, num_tokens) {
    acc m, sum;
    token_logsumexp<scalar_t, acc>(logits + t * num_experts, num_experts, m, sum);
    const acc lse = m + std::log(sum);
    squared[t] = lse * lse;
  }
}

template <typename acc>
__global__ void mean_finish_kernel(const acc* __restrict__ total, int64_t num_tokens, acc* __restrict__ loss) {
  *loss = num_tokens > 0 ? total[0] / static_cast<acc>(num_tokens) : acc(0);
}

// d/dl[t, e] = g * 2 * lse_t / T * softmax(l_t)[e], with g read on the device (no host sync).
template <typename scalar_t, typename acc>
__global__ void router_z_loss_backward_kernel(const acc* __restrict__ grad, const scalar_t* __restrict__ logits,
                                              int64_t num_tokens, int64_t num_experts, scalar_t* __restrict__ out) {
  const acc g = *grad;
  MOE_EXT_GRID_STRIDE_LOOP(t, num_tokens) {
    const scalar_t* row = logits + t * num_experts;
    acc m, sum;
    token_logsumexp<scalar_t, acc>(row, num_experts, m, sum);
    const acc lse = m + std::log(sum);
    const acc factor = g * acc(2) * lse / static_cast<acc>(num_tokens) / sum;
    for (int64_t e = 0; e < num_experts; ++e) {
      out[t * num_experts + e] = static_cast<scalar_t>(factor * std::exp(static_cast<acc>(row[e]) - m));
    }
  }
}

}  // namespace
}  // namespace cuda
}  // namespace moe_ext
