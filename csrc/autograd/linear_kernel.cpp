// Autograd of linear: forward and backward both through the dispatcher.
#include <torch/library.h>

#include "autograd_utils.h"

namespace moe_ext {
namespace autograd {
namespace {

class Linear : public torch::autograd::Function<Linear> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, weight});
    ctx->saved_data["with_bias"] = bias.has_value();
    return {detail::linear_op().call(x, weight, bias)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    check_no_double_backward(grads, "linear", {saved[0], saved[1]});
    const bool with_bias = ctx->saved_data["with_bias"].toBool();
    auto [grad_x, grad_w, grad_b] = detail::linear_backward_op().call(grads[0], saved[0], saved[1], with_bias);
    return {grad_x, grad_w, with_bias ? grad_b : at::Tensor()};
  }
};

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return Linear::apply(x, weight, bias)[0];
}

}  // namespace
}  // namespace autograd

TORCH_LIBRARY_IMPL(moe_ext, Autograd, m) { m.impl("linear", &autograd::linear_autograd); }

}  // namespace moe_ext
