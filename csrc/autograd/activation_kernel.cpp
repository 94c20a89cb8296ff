// Autograd of the fused SwiGLU activation: forward and backward both through the dispatcher.
#include <torch/library.h>

#include "autograd_utils.h"

namespace moe_ext {
namespace autograd {
namespace {

class SwiGLU : public torch::autograd::Function<SwiGLU> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({h});
    return {detail::swiglu_op().call(h)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    check_no_double_backward(grads, "swiglu", {saved[0]});
    return {detail::swiglu_backward_op().call(grads[0], saved[0])};
  }
};

at::Tensor swiglu_autograd(const at::Tensor& h) { return SwiGLU::apply(h)[0]; }

}  // namespace
}  // namespace autograd

TORCH_LIBRARY_IMPL(moe_ext, Autograd, m) { m.impl("swiglu", &autograd::swiglu_autograd); }

}  // namespace moe_ext
