// Autograd of the auxiliary losses: forward and backward both through the dispatcher.
#include <torch/library.h>

#include "autograd_utils.h"

namespace moe_ext {
namespace autograd {
namespace {

class LoadBalancingLoss : public torch::autograd::Function<LoadBalancingLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& scores, const at::Tensor& indices,
                               int64_t num_experts) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({scores, indices});
    ctx->saved_data["num_experts"] = num_experts;
    return {detail::load_balancing_loss_op().call(scores, indices, num_experts)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_no_double_backward(grads, "load_balancing_loss");
    const auto saved = ctx->get_saved_variables();
    return {detail::load_balancing_loss_backward_op().call(grads[0], saved[0], saved[1],
                                                           ctx->saved_data["num_experts"].toInt()),
            {},
            {}};
  }
};

class RouterZLoss : public torch::autograd::Function<RouterZLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({logits});
    return {detail::router_z_loss_op().call(logits)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    check_no_double_backward(grads, "router_z_loss", {saved[0]});
    return {detail::router_z_loss_backward_op().call(grads[0], saved[0])};
  }
};

at::Tensor load_balancing_loss_autograd(const at::Tensor& scores, const at::Tensor& indices, int64_t num_experts) {
  return LoadBalancingLoss::apply(scores, indices, num_experts)[0];
}

at::Tensor router_z_loss_autograd(const at::Tensor& logits) { return RouterZLoss::apply(logits)[0]; }

}  // namespace
}  // namespace autograd

TORCH_LIBRARY_IMPL(moe_ext, Autograd, m) {
  m.impl("load_balancing_loss", &autograd::load_balancing_loss_autograd);
  m.impl("router_z_loss", &autograd::router_z_loss_autograd);
}

}  // namespace moe_ext
