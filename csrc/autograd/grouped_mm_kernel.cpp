// Autograd of grouped_mm: forward and backward both through the dispatcher.
#include <torch/library.h>

#include "autograd_utils.h"

namespace moe_ext {
namespace autograd {
namespace {

class GroupedMM : public torch::autograd::Function<GroupedMM> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                               const at::Tensor& offsets) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, w, offsets});
    return {detail::grouped_mm_op().call(x, w, offsets)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    check_no_double_backward(grads, "grouped_mm", {saved[0], saved[1]});
    auto [grad_x, grad_w] = detail::grouped_mm_backward_op().call(grads[0], saved[0], saved[1], saved[2]);
    return {grad_x, grad_w, {}};
  }
};

at::Tensor grouped_mm_autograd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets) {
  return GroupedMM::apply(x, w, offsets)[0];
}

}  // namespace
}  // namespace autograd

TORCH_LIBRARY_IMPL(moe_ext, Autograd, m) { m.impl("grouped_mm", &autograd::grouped_mm_autograd); }

}  // namespace moe_ext
