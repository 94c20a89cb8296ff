// CUDA kernels of topk_gating and its backward: one thread per token running the kernels/gating.h functions.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../checks.h"
#include "../kernels/gating.h"
#include "cuda_utils.cuh"
#include "gating_kernels.cuh"

namespace moe_ext {
namespace cuda {
namespace {

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
      const size_t shared = gating_shared_bytes<acc>(E, n_group, tokens_per_block);
      topk_gating_shared_kernel<scalar_t, acc><<<blocks_for(T, tokens_per_block), tokens_per_block, shared, stream>>>(
          logit_ptr, mask_ptr, mask_stride, bias_ptr, cfg, T, score_ptr, index_ptr, weight_ptr, checks.sink());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      at::Tensor scratch = at::empty({T, E + n_group}, float_opts);
      topk_gating_global_kernel<scalar_t, acc>
          <<<blocks_for(T, kGlobalGatingThreads), kGlobalGatingThreads, 0, stream>>>(
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
    const int threads = gating_backward_threads<acc>(E);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits_dtype, "topk_gating_backward_out", [&] {
      scalar_t* out_ptr = grad_logits.mutable_data_ptr<scalar_t>();
      if (threads > 0) {
        topk_gating_backward_kernel<acc, scalar_t, true>
            <<<blocks_for(T, threads), threads, gating_backward_shared_bytes<acc>(E, threads), stream>>>(
                gw_ptr, gs_ptr, s_ptr, idx_ptr, cfg, T, nullptr, out_ptr, checks.sink());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        at::Tensor scratch = at::empty({T, E}, scores.options());
        topk_gating_backward_kernel<acc, scalar_t, false>
            <<<blocks_for(T, kGlobalGatingThreads), kGlobalGatingThreads, 0, stream>>>(
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
