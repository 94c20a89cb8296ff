// Autograd of dispatch and combine: forward and backward both through the dispatcher.
#include <torch/library.h>

#include "autograd_utils.h"

namespace moe_ext {
namespace autograd {
namespace {

class Dispatch : public torch::autograd::Function<Dispatch> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& token_of,
                               const at::Tensor& row_of) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({token_of, row_of});
    return {detail::dispatch_op().call(x, token_of, row_of)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_no_double_backward(grads, "dispatch");
    const auto saved = ctx->get_saved_variables();
    return {detail::dispatch_backward_op().call(grads[0], saved[0], saved[1]), {}, {}};
  }
};

class Combine : public torch::autograd::Function<Combine> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& y_sorted, const at::Tensor& weights,
                               const at::Tensor& row_of, const at::Tensor& token_of) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({y_sorted, weights, row_of, token_of});
    return {detail::combine_op().call(y_sorted, weights, row_of, token_of)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    check_no_double_backward(grads, "combine", {saved[0], saved[1]});
    auto [grad_y_sorted, grad_weights] =
        detail::combine_backward_op().call(grads[0], saved[0], saved[1], saved[2], saved[3]);
    return {grad_y_sorted, grad_weights, {}, {}};
  }
};

at::Tensor dispatch_autograd(const at::Tensor& x, const at::Tensor& token_of, const at::Tensor& row_of) {
  return Dispatch::apply(x, token_of, row_of)[0];
}

at::Tensor combine_autograd(const at::Tensor& y_sorted, const at::Tensor& weights, const at::Tensor& row_of,
                            const at::Tensor& token_of) {
  return Combine::apply(y_sorted, weights, row_of, token_of)[0];
}

}  // namespace
}  // namespace autograd

TORCH_LIBRARY_IMPL(moe_ext, Autograd, m) {
  m.impl("dispatch", &autograd::dispatch_autograd);
  m.impl("combine", &autograd::combine_autograd);
}

}  // namespace moe_ext
