// CPU kernels of topk_gating and its backward: one token per task, the math in kernels/gating.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../kernels/gating.h"
#include "cpu_utils.h"

namespace moe_ext {
namespace {

using kernels::GateStatus;
using kernels::GatingConfig;

int64_t token_grain(int64_t num_experts) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, num_experts)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_gating_cpu(const at::Tensor& logits_in, int64_t k,
                                                               c10::string_view score_func, bool normalize,
                                                               const std::optional<at::Tensor>& bias, double scale,
                                                               int64_t n_group, int64_t topk_group,
                                                               const std::optional<at::Tensor>& expert_mask) {
  const auto func = check_topk_gating(logits_in, k, score_func, bias, scale, n_group, topk_group, expert_mask);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto out_dtype = routing_dtype(logits.scalar_type());
  const auto float_opts = logits.options().dtype(out_dtype);
  at::Tensor weights = at::empty({T, k}, float_opts);
  at::Tensor indices = at::empty({T, k}, logits.options().dtype(at::kLong));
  at::Tensor scores = at::empty({T, E}, float_opts);

  at::Tensor mask;
  if (expert_mask.has_value()) {
    mask = expert_mask->contiguous();
    if (mask.dim() == 1) {
      // Counted here, not with mask.sum().item(): three ATen calls per routing step at decode.
      const bool* enabled_ptr = mask.const_data_ptr<bool>();
      const int64_t enabled = std::count(enabled_ptr, enabled_ptr + mask.numel(), true);
      TORCH_CHECK(enabled >= k, "moe_ext: expert_mask enables ", enabled, " experts, fewer than k = ", k);
    }
  }
  at::Tensor bias_acc;
  if (bias.has_value()) {
    bias_acc = bias->to(out_dtype).contiguous();
    TORCH_CHECK(at::isfinite(bias_acc).all().item<bool>(), "moe_ext: bias must be finite");
  }
  const GatingConfig cfg{E, k, func, normalize, scale, n_group, topk_group};
  cpu::FirstFailure non_finite, too_few;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "topk_gating_cpu", [&] {
    using acc = at::opmath_type<scalar_t>;
    const scalar_t* logit_ptr = logits.const_data_ptr<scalar_t>();
    const bool* mask_ptr = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
    const int64_t mask_stride = mask.defined() && mask.dim() == 2 ? E : 0;
    const acc* bias_ptr = bias_acc.defined() ? bias_acc.const_data_ptr<acc>() : nullptr;
    acc* weight_ptr = weights.mutable_data_ptr<acc>();
    acc* score_ptr = scores.mutable_data_ptr<acc>();
    int64_t* index_ptr = indices.mutable_data_ptr<int64_t>();
    at::parallel_for(0, T, token_grain(E), [&](int64_t t0, int64_t t1) {
      std::vector<acc> select(E), groups(n_group);
      for (int64_t t = t0; t < t1; ++t) {
        acc* s = score_ptr + t * E;
        int64_t* idx = index_ptr + t * k;
        const bool* enabled = mask_ptr != nullptr ? mask_ptr + t * mask_stride : nullptr;
        const GateStatus status = kernels::token_scores(logit_ptr + t * E, enabled, cfg, s);
        if (status != GateStatus::kOk) {
          (status == GateStatus::kTooFewExperts ? too_few : non_finite).record(t);
          std::fill(s, s + E, acc(0));
          std::fill(idx, idx + k, int64_t(0));
          continue;
        }
        for (int64_t e = 0; e < E; ++e) select[e] = bias_ptr ? s[e] + bias_ptr[e] : s[e];
        if (kernels::token_select(select.data(), enabled, cfg, groups.data(), idx) != GateStatus::kOk) {
          too_few.record(t);
          std::fill(idx, idx + k, int64_t(0));
        }
        kernels::token_weights(s, idx, cfg, weight_ptr + t * k);
      }
    });
  });
  TORCH_CHECK(non_finite.get() < 0, "moe_ext: logits of token ", non_finite.get(),
              " are non-finite (NaN, +inf under softmax, or no finite logit among enabled experts)");
  TORCH_CHECK(too_few.get() < 0, "moe_ext: token ", too_few.get(), " has fewer than k = ", k,
              " candidate experts after expert_mask and the group limit (k = ", k, ")");
  return {weights, indices, scores};
}

at::Tensor topk_gating_backward_cpu(const at::Tensor& grad_weights_in, const at::Tensor& grad_scores_in,
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
  const int64_t T = scores_in.size(0), E = scores_in.size(1), k = indices_in.size(1);
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor grad_weights = grad_weights_in.to(scores.scalar_type()).contiguous();
  const at::Tensor grad_scores = grad_scores_in.to(scores.scalar_type()).contiguous();
  const at::Tensor indices = indices_in.contiguous();
  at::Tensor grad_logits = at::empty({T, E}, scores.options().dtype(logits_dtype));
  const GatingConfig cfg{E, k, func, normalize, scale, 1, 1};
  cpu::FirstFailure bad_index;

  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "topk_gating_backward_cpu", [&] {
    using acc = scalar_t;
    const acc* s_ptr = scores.const_data_ptr<acc>();
    const acc* gw_ptr = grad_weights.const_data_ptr<acc>();
    const acc* gs_ptr = grad_scores.const_data_ptr<acc>();
    const int64_t* idx_ptr = indices.const_data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits_dtype, "topk_gating_backward_out", [&] {
      scalar_t* out_ptr = grad_logits.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, T, token_grain(E), [&](int64_t t0, int64_t t1) {
        std::vector<acc> buf(E);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t* idx = idx_ptr + t * k;
          bool valid = true;
          for (int64_t j = 0; j < k; ++j) valid = valid && idx[j] >= 0 && idx[j] < E;
          if (!valid) {
            bad_index.record(t);
            continue;
          }
          kernels::token_gating_backward(gw_ptr + t * k, gs_ptr + t * E, s_ptr + t * E, idx, cfg, buf.data(),
                                         out_ptr + t * E);
        }
      });
    });
  });
  TORCH_CHECK(bad_index.get() < 0, "moe_ext: indices of token ", bad_index.get(), " are outside [0, E = ", E, ")");
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ext, CPU, m) {
  m.impl("topk_gating", &topk_gating_cpu);
  m.impl("topk_gating_backward", &topk_gating_backward_cpu);
}

}  // namespace moe_ext
