// Shared pieces of the autograd Functions: redispatch below Autograd and the double-backward guard.
#pragma once

#include <torch/autograd.h>

#include "../moe_ext.h"

namespace moe_ext {
namespace autograd {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The backward kernels are not themselves differentiable: say so instead of
// returning a silently wrong second derivative.
inline void check_no_double_backward(const variable_list& grads, const char* op) {
  for (const auto& g : grads) {
    TORCH_CHECK(!g.defined() || !g.requires_grad(), "moe_ext: double backward through ", op,
                " is not supported (create_graph=True needs the gradient of ", op, "_backward)");
  }
}

}  // namespace autograd
}  // namespace moe_ext
