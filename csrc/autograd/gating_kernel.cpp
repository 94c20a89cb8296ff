// Autograd of topk_gating: forward and backward both through the dispatcher.
#include <torch/library.h>

#include "autograd_utils.h"

namespace moe_ext {
namespace autograd {
namespace {

class TopkGating : public torch::autograd::Function<TopkGating> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, int64_t k, c10::string_view score_func,
                               bool normalize, const std::optional<at::Tensor>& bias, double scale, int64_t n_group,
                               int64_t topk_group, const std::optional<at::Tensor>& expert_mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [weights, indices, scores] =
        detail::topk_gating_op().call(logits, k, score_func, normalize, bias, scale, n_group, topk_group, expert_mask);
    ctx->save_for_backward({scores, indices});
    ctx->saved_data["score_func"] = std::string(score_func);
    ctx->saved_data["normalize"] = normalize;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["logits_dtype"] = static_cast<int64_t>(logits.scalar_type());
    ctx->mark_non_differentiable({indices});
    return {weights, indices, scores};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    check_no_double_backward(grads, "topk_gating", {saved[0]});
    const std::string score_func = ctx->saved_data["score_func"].toStringRef();
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["logits_dtype"].toInt());
    at::Tensor grad_logits = detail::topk_gating_backward_op().call(grads[0], grads[2], saved[0], saved[1], score_func,
                                                                    ctx->saved_data["normalize"].toBool(),
                                                                    ctx->saved_data["scale"].toDouble(), dtype);
    return {grad_logits, {}, {}, {}, {}, {}, {}, {}, {}};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_gating_autograd(const at::Tensor& logits, int64_t k,
                                                                    c10::string_view score_func, bool normalize,
                                                                    const std::optional<at::Tensor>& bias, double scale,
                                                                    int64_t n_group, int64_t topk_group,
                                                                    const std::optional<at::Tensor>& expert_mask) {
  auto out = TopkGating::apply(logits, k, score_func, normalize, bias, scale, n_group, topk_group, expert_mask);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace autograd

TORCH_LIBRARY_IMPL(moe_ext, Autograd, m) {
  m.impl("topk_gating", &autograd::topk_gating_autograd);
  // Routing plans are integer bookkeeping: nothing to differentiate.
  m.impl("make_plan", torch::CppFunction::makeFallthrough());
  m.impl("expert_choice_plan", torch::CppFunction::makeFallthrough());
}

}  // namespace moe_ext
