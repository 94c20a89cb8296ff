// Argument validation of the fused activation op (CPU, CUDA, Meta): errors name the argument.
#pragma once

#include "checks.h"

namespace moe_ext {

// h: [N, 2F], the first F columns the gate, the last F the up projection.
inline void check_swiglu(const at::Tensor& h) {
  check_floating(h, "h");
  check_dim(h, 2, "h", "[N, 2F] (gate columns first, then up)");
  TORCH_CHECK(h.sym_size(1) % 2 == 0, "moe_ext: h must have an even number of columns [N, 2F] (gate | up), got shape ",
              h.sym_sizes());
}

inline void check_swiglu_backward(const at::Tensor& grad, const at::Tensor& h) {
  check_swiglu(h);
  TORCH_CHECK(grad.scalar_type() == h.scalar_type(), "moe_ext: grad must have h's dtype ", h.scalar_type(), ", got ",
              grad.scalar_type());
  check_same_device(grad, h, "grad", "h");
  TORCH_CHECK(grad.dim() == 2 && grad.sym_size(0) == h.sym_size(0) && grad.sym_size(1) * 2 == h.sym_size(1),
              "moe_ext: grad must have shape [N, F] = [", h.sym_size(0), ", ", h.sym_size(1) / 2, "], got ",
              grad.sym_sizes());
}

}  // namespace moe_ext
