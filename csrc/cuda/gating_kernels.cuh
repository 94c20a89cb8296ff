// Kernels of topk_gating and its backward (launched by gating_kernel.cu), and the launch geometry both
// the glue and the CUDA execution model of the tests use: one thread per token running kernels/gating.h.
#pragma once

#include "../kernels/gating.h"
#include "device.cuh"

namespace moe_ext {
namespace cuda {
namespace {

using kernels::GateStatus;
using kernels::GatingConfig;

// Error slots of topk_gating, in the order the CPU kernel reports them.
enum GatingSlot : int { kMaskCount = 0, kBiasNotFinite = 1, kNonFinite = 2, kTooFewExperts = 3, kGatingSlots = 4 };

// The per-token math is the CPU kernel's (kernels/gating.h), one thread per token, so that both devices
// route identically and the CPU tests exercise it. A thread's per-token scratch (the selection values,
// the scores and the group scores) lives in shared memory when a block of >= 32 tokens fits the default
// 48 KiB, staged with coalesced loads and stores; for larger E (a few hundred experts and up) it lives in
// global memory (one scratch row per token) and the logits are read in place.
constexpr int kMaxTokensPerBlock = 128;
constexpr int64_t kSharedBudget = 48 * 1024;

__host__ __device__ inline int64_t gating_row_stride(int64_t num_experts) {
  return num_experts + 1;  // odd stride: threads of a warp walking their rows hit distinct banks
}

template <typename acc>
int gating_tokens_per_block(int64_t num_experts, int64_t n_group) {
  const int64_t per_token = (2 * gating_row_stride(num_experts) + n_group) * static_cast<int64_t>(sizeof(acc));
  const int64_t fit = std::min<int64_t>(kMaxTokensPerBlock, kSharedBudget / per_token);
  return fit >= 32 ? static_cast<int>(fit / 32 * 32) : 0;  // 0: use the global-memory path
}

// Dynamic shared memory of topk_gating_shared_kernel for blocks of `tokens_per_block` tokens.
template <typename acc>
size_t gating_shared_bytes(int64_t num_experts, int64_t n_group, int tokens_per_block) {
  return (2 * gating_row_stride(num_experts) + n_group) * static_cast<size_t>(tokens_per_block) * sizeof(acc);
}

// Threads per block of the global-memory paths (forward and backward).
constexpr int kGlobalGatingThreads = 128;

// Tokens (= threads) per block of topk_gating_backward_kernel<kShared = true>, each with an [E + 1] acc row
// of shared memory; 0 when fewer than 32 fit: the kShared = false kernel with global scratch.
template <typename acc>
int gating_backward_threads(int64_t num_experts) {
  const int64_t per_token = (num_experts + 1) * static_cast<int64_t>(sizeof(acc));
  const int64_t fit = std::min<int64_t>(kMaxTokensPerBlock, kSharedBudget / per_token);
  return fit >= 32 ? static_cast<int>(fit / 32 * 32) : 0;
}

template <typename acc>
size_t gating_backward_shared_bytes(int64_t num_experts, int threads) {
  return static_cast<size_t>(threads) * static_cast<size_t>(num_experts + 1) * sizeof(acc);
}

// Checks of the arguments themselves (the CPU kernel's host-side checks), by one thread.
template <typename acc>
__device__ void check_gating_arguments(const bool* mask, int64_t mask_stride, const acc* bias, const GatingConfig& cfg,
                                       const ErrorSink& sink) {
  if (mask != nullptr && mask_stride == 0) {
    int64_t enabled = 0;
    for (int64_t e = 0; e < cfg.num_experts; ++e) enabled += mask[e] ? 1 : 0;
    if (enabled < cfg.k) sink.report(kMaskCount, enabled);
  }
  if (bias != nullptr) {
    for (int64_t e = 0; e < cfg.num_experts; ++e) {
      if (!isfinite(bias[e])) {
        sink.report(kBiasNotFinite, e);
        break;
      }
    }
  }
}

// Routes one token: `logit_row` (in_t) -> scores, indices and weights, with the CPU kernel's failure handling.
template <typename in_t, typename acc>
__device__ void route_token(int64_t t, const in_t* logit_row, const bool* enabled, const acc* bias,
                            const GatingConfig& cfg, acc* score_row, acc* select_row, acc* group_row,
                            int64_t* index_row, acc* weight_row, const ErrorSink& sink) {
  const int64_t E = cfg.num_experts;
  const GateStatus status = kernels::token_scores(logit_row, enabled, cfg, score_row);
  if (status != GateStatus::kOk) {
    sink.report(status == GateStatus::kTooFewExperts ? kTooFewExperts : kNonFinite, t);
    for (int64_t e = 0; e < E; ++e) score_row[e] = acc(0);
    for (int64_t j = 0; j < cfg.k; ++j) index_row[j] = 0;
    return;
  }
  for (int64_t e = 0; e < E; ++e) select_row[e] = bias != nullptr ? score_row[e] + bias[e] : score_row[e];
  if (kernels::token_select(select_row, enabled, cfg, group_row, index_row) != GateStatus::kOk) {
    sink.report(kTooFewExperts, t);
    for (int64_t j = 0; j < cfg.k; ++j) index_row[j] = 0;
  }
  kernels::token_weights(score_row, index_row, cfg, weight_row);
}

// Shared-memory path: blockDim.x tokens per block, their logits and scores staged with coalesced accesses.
template <typename scalar_t, typename acc>
__global__ void topk_gating_shared_kernel(const scalar_t* __restrict__ logits, const bool* __restrict__ mask,
                                          int64_t mask_stride, const acc* __restrict__ bias, GatingConfig cfg,
                                          int64_t num_tokens, acc* __restrict__ scores, int64_t* __restrict__ indices,
                                          acc* __restrict__ weights, ErrorSink sink) {
  MOE_EXT_DYNAMIC_SHARED(unsigned char, shared_raw, 16);
  const int64_t E = cfg.num_experts, k = cfg.k;
  const int64_t stride = gating_row_stride(E);
  const int tokens = blockDim.x;
  acc* select_rows = reinterpret_cast<acc*>(shared_raw);
  acc* score_rows = select_rows + tokens * stride;
  acc* group_rows = score_rows + tokens * stride;
  if (blockIdx.x == 0 && threadIdx.x == 0) check_gating_arguments(mask, mask_stride, bias, cfg, sink);

  for (int64_t first = static_cast<int64_t>(blockIdx.x) * tokens; first < num_tokens;
       first += static_cast<int64_t>(gridDim.x) * tokens) {
    const int64_t count = num_tokens - first < tokens ? num_tokens - first : tokens;
    // The logits, converted to acc exactly as token_scores converts them, go to the selection rows,
    // which are free until the scores are known.
    for (int64_t i = threadIdx.x; i < count * E; i += tokens) {
      select_rows[(i / E) * stride + i % E] = static_cast<acc>(logits[first * E + i]);
    }
    __syncthreads();
    if (threadIdx.x < count) {
      const int64_t t = first + threadIdx.x;
      acc* select_row = select_rows + threadIdx.x * stride;
      const bool* enabled = mask != nullptr ? mask + t * mask_stride : nullptr;
      route_token<acc, acc>(t, select_row, enabled, bias, cfg, score_rows + threadIdx.x * stride, select_row,
                            group_rows + threadIdx.x * cfg.n_group, indices + t * k, weights + t * k, sink);
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < count * E; i += tokens)
      scores[first * E + i] = score_rows[(i / E) * stride + i % E];
    __syncthreads();
  }
}

// Global-memory path for large E: scratch rows [T, E + n_group] per token.
template <typename scalar_t, typename acc>
__global__ void topk_gating_global_kernel(const scalar_t* __restrict__ logits, const bool* __restrict__ mask,
                                          int64_t mask_stride, const acc* __restrict__ bias, GatingConfig cfg,
                                          int64_t num_tokens, acc* __restrict__ scores, int64_t* __restrict__ indices,
                                          acc* __restrict__ weights, acc* __restrict__ scratch, ErrorSink sink) {
  const int64_t E = cfg.num_experts, k = cfg.k;
  if (blockIdx.x == 0 && threadIdx.x == 0) check_gating_arguments(mask, mask_stride, bias, cfg, sink);
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < num_tokens;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc* select_row = scratch + t * (E + cfg.n_group);
    const bool* enabled = mask != nullptr ? mask + t * mask_stride : nullptr;
    route_token<scalar_t, acc>(t, logits + t * E, enabled, bias, cfg, scores + t * E, select_row, select_row + E,
                               indices + t * k, weights + t * k, sink);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward: one thread per token through kernels::token_gating_backward; its [E] scratch row lives in
// shared memory when a block of >= 32 tokens fits, else in global memory.

template <typename acc, typename out_t, bool kShared>
__global__ void topk_gating_backward_kernel(const acc* __restrict__ grad_weights, const acc* __restrict__ grad_scores,
                                            const acc* __restrict__ scores, const int64_t* __restrict__ indices,
                                            GatingConfig cfg, int64_t num_tokens, acc* __restrict__ scratch,
                                            out_t* __restrict__ grad_logits, ErrorSink sink) {
  MOE_EXT_DYNAMIC_SHARED(unsigned char, shared_raw, 16);
  const int64_t E = cfg.num_experts, k = cfg.k;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < num_tokens;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t* idx = indices + t * k;
    bool valid = true;
    for (int64_t j = 0; j < k; ++j) valid = valid && idx[j] >= 0 && idx[j] < E;
    if (!valid) {
      sink.report(0, t);
      continue;
    }
    acc* buf = kShared ? reinterpret_cast<acc*>(shared_raw) + threadIdx.x * (E + 1) : scratch + t * E;
    kernels::token_gating_backward(grad_weights + t * k, grad_scores + t * E, scores + t * E, idx, cfg, buf,
                                   grad_logits + t * E);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace moe_ext
