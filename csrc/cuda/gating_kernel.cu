// CUDA kernels of topk_gating and its backward: one thread per token running the kernels/gating.h functions.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../checks.h"
#include "../kernels/gating.h"
#include "cuda_utils.cuh"

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
  extern __shared__ __align__(16) unsigned char shared_raw[];
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_gating_cuda(const at::Tensor& logits_in, int64_t k,
                                                                c10::string_view score_func, bool normalize,
                                                                const std::optional<at::Tensor>& bias, double scale,
                                                                int64_t n_group, int64_t topk_group,
                                                                const std::optional<at::Tensor>& expert_mask) {
  const auto func = check_topk_gating(logits_in, k, score_func, bias, scale, n_group, topk_group, expert_mask);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto out_dtype = routing_dtype(logits.scalar_type());
  const auto float_opts = logits.options().dtype(out_dtype);
  at::Tensor weights = at::empty({T, k}, float_opts);
  at::Tensor indices = at::empty({T, k}, logits.options().dtype(at::kLong));
  at::Tensor scores = at::empty({T, E}, float_opts);
  const at::Tensor mask = expert_mask.has_value() ? expert_mask->contiguous() : at::Tensor();
  const at::Tensor bias_acc = bias.has_value() ? bias->to(out_dtype).contiguous() : at::Tensor();
  const GatingConfig cfg{E, k, func, normalize, scale, n_group, topk_group};
  const DeviceChecks checks(logits, kGatingSlots);
  const cudaStream_t stream = current_stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "topk_gating_cuda", [&] {
    using acc = at::opmath_type<scalar_t>;
    const scalar_t* logit_ptr = logits.const_data_ptr<scalar_t>();
    const bool* mask_ptr = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
    const int64_t mask_stride = mask.defined() && mask.dim() == 2 ? E : 0;
    const acc* bias_ptr = bias_acc.defined() ? bias_acc.const_data_ptr<acc>() : nullptr;
    acc* weight_ptr = weights.mutable_data_ptr<acc>();
    acc* score_ptr = scores.mutable_data_ptr<acc>();
    int64_t* index_ptr = indices.mutable_data_ptr<int64_t>();
    const int tokens_per_block = gating_tokens_per_block<acc>(E, n_group);
    if (tokens_per_block > 0) {
      const size_t shared = (2 * gating_row_stride(E) + n_group) * static_cast<size_t>(tokens_per_block) * sizeof(acc);
      topk_gating_shared_kernel<scalar_t, acc><<<blocks_for(T, tokens_per_block), tokens_per_block, shared, stream>>>(
          logit_ptr, mask_ptr, mask_stride, bias_ptr, cfg, T, score_ptr, index_ptr, weight_ptr, checks.sink());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      at::Tensor scratch = at::empty({T, E + n_group}, float_opts);
      topk_gating_global_kernel<scalar_t, acc><<<blocks_for(T, 128), 128, 0, stream>>>(
          logit_ptr, mask_ptr, mask_stride, bias_ptr, cfg, T, score_ptr, index_ptr, weight_ptr,
          scratch.mutable_data_ptr<acc>(), checks.sink());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });

  const auto failed = checks.read();
  TORCH_CHECK(failed[kMaskCount] == kNoError, "moe_ext: expert_mask enables ", failed[kMaskCount],
              " experts, fewer than k = ", k);
  TORCH_CHECK(failed[kBiasNotFinite] == kNoError, "moe_ext: bias must be finite");
  TORCH_CHECK(failed[kNonFinite] == kNoError, "moe_ext: logits of token ", failed[kNonFinite],
              " are non-finite (NaN, +inf under softmax, or no finite logit among enabled experts)");
  TORCH_CHECK(failed[kTooFewExperts] == kNoError, "moe_ext: token ", failed[kTooFewExperts], " has fewer than k = ", k,
              " candidate experts after expert_mask and the group limit (k = ", k, ")");
  return {weights, indices, scores};
}

// ---------------------------------------------------------------------------------------------------------
// Backward: one thread per token through kernels::token_gating_backward; its [E] scratch row lives in
// shared memory when a block of >= 32 tokens fits, else in global memory.

template <typename acc, typename out_t, bool kShared>
__global__ void topk_gating_backward_kernel(const acc* __restrict__ grad_weights, const acc* __restrict__ grad_scores,
                                            const acc* __restrict__ scores, const int64_t* __restrict__ indices,
                                            GatingConfig cfg, int64_t num_tokens, acc* __restrict__ scratch,
                                            out_t* __restrict__ grad_logits, ErrorSink sink) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
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

at::Tensor topk_gating_backward_cuda(const at::Tensor& grad_weights_in, const at::Tensor& grad_scores_in,
                                     const at::Tensor& scores_in, const at::Tensor& indices_in,
                                     c10::string_view score_func, bool normalize, double scale,
                                     at::ScalarType logits_dtype) {
  const auto func = parse_score_func(score_func);
  check_floating(scores_in, "scores");
  check_dim(scores_in, 2, "scores", "[T, E]");
  check_index(indices_in, "indices");
  check_dim(indices_in, 2, "indices", "[T, k]");
  TORCH_CHECK(grad_weights_in.sizes() == indices_in.sizes(), "moe_ext: grad_weights must have the shape of indices");
  TORCH_CHECK(grad_scores_in.sizes() == scores_in.sizes(), "moe_ext: grad_scores must have the shape of scores");
  TORCH_CHECK(indices_in.size(0) == scores_in.size(0), "moe_ext: indices has ", indices_in.size(0),
              " tokens but scores has ", scores_in.size(0));
  check_same_device(indices_in, scores_in, "indices", "scores");
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const int64_t T = scores_in.size(0), E = scores_in.size(1), k = indices_in.size(1);
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor grad_weights = grad_weights_in.to(scores.device(), scores.scalar_type()).contiguous();
  const at::Tensor grad_scores = grad_scores_in.to(scores.device(), scores.scalar_type()).contiguous();
  const at::Tensor indices = indices_in.contiguous();
  at::Tensor grad_logits = at::empty({T, E}, scores.options().dtype(logits_dtype));
  const GatingConfig cfg{E, k, func, normalize, scale, 1, 1};
  const DeviceChecks checks(scores, 1);
  const cudaStream_t stream = current_stream();

  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "topk_gating_backward_cuda", [&] {
    using acc = scalar_t;
    const acc* s_ptr = scores.const_data_ptr<acc>();
    const acc* gw_ptr = grad_weights.const_data_ptr<acc>();
    const acc* gs_ptr = grad_scores.const_data_ptr<acc>();
    const int64_t* idx_ptr = indices.const_data_ptr<int64_t>();
    const int64_t per_token = (E + 1) * static_cast<int64_t>(sizeof(acc));
    const int64_t fit = std::min<int64_t>(kMaxTokensPerBlock, kSharedBudget / per_token);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits_dtype, "topk_gating_backward_out", [&] {
      scalar_t* out_ptr = grad_logits.mutable_data_ptr<scalar_t>();
      if (fit >= 32) {
        const int threads = static_cast<int>(fit / 32 * 32);
        topk_gating_backward_kernel<acc, scalar_t, true>
            <<<blocks_for(T, threads), threads, static_cast<size_t>(threads * per_token), stream>>>(
                gw_ptr, gs_ptr, s_ptr, idx_ptr, cfg, T, nullptr, out_ptr, checks.sink());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        at::Tensor scratch = at::empty({T, E}, scores.options());
        topk_gating_backward_kernel<acc, scalar_t, false><<<blocks_for(T, 128), 128, 0, stream>>>(
            gw_ptr, gs_ptr, s_ptr, idx_ptr, cfg, T, scratch.mutable_data_ptr<acc>(), out_ptr, checks.sink());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  const int64_t bad_token = checks.read()[0];
  TORCH_CHECK(bad_token == kNoError, "moe_ext: indices of token ", bad_token, " are outside [0, E = ", E, ")");
  return grad_logits;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("topk_gating", &cuda::topk_gating_cuda);
  m.impl("topk_gating_backward", &cuda::topk_gating_backward_cuda);
}

}  // namespace moe_ext
