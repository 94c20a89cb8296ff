// Shared pieces of the autograd Functions: redispatch below Autograd and the double-backward guard.
#pragma once

#include <torch/autograd.h>

#include "../moe_ext.h"

namespace moe_ext {
namespace autograd {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The backward kernels are not themselves differentiable: say so instead of
// returning a silently wrong second derivative. A backward run with
// create_graph=True (grad mode on) would otherwise record the *_backward op
// without a gradient formula, and its dependence on the incoming gradients or
// on the saved inputs listed in `differentiable_saved` would be dropped.
inline void check_no_double_backward(const variable_list& grads, const char* op,
                                     const variable_list& differentiable_saved = {}) {
  bool needs_graph = false;
  for (const auto& g : grads) needs_graph = needs_graph || (g.defined() && g.requires_grad());
  if (at::GradMode::is_enabled()) {
    for (const auto& s : differentiable_saved) needs_graph = needs_graph || (s.defined() && s.requires_grad());
  }
  TORCH_CHECK(!needs_graph, "moe_ext: double backward through ", op,
              " is not supported (create_graph=True needs the gradient of ", op,
              "_backward); call backward/autograd.grad without create_graph through moe_ext ops");
}

}  // namespace autograd
}  // namespace moe_ext
