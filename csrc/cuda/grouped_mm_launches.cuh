// The per-expert path of grouped_mm and its backward: one GEMM per non-empty expert on row slices of x,
// grad_y and the outputs, and a zeroed grad_w[e] for an empty expert. grouped_mm_kernel.cu passes
// at::mm_out (cuBLAS, which takes every slice here as it is: row-major, or column-major for a transposed
// w and its grad_w); the CUDA execution model of the tests passes a reference that checks each operand is
// such a matrix (no hidden copy), that every output is written where the slice lies, and the values.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace moe_ext {
namespace cuda {
namespace {

// y [N, out] = x[rows of e] @ w[e] for every expert e, with bounds = the validated offsets (E + 1 of them).
template <typename MmOut>
at::Tensor per_expert_grouped_mm(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& bounds,
                                 MmOut&& mm_out) {
  const int64_t N = x.size(0), E = w.size(0), out_cols = w.size(2);
  at::Tensor y = at::empty({N, out_cols}, x.options());
  for (int64_t e = 0; e < E; ++e) {
    const int64_t begin = bounds[e], count = bounds[e + 1] - bounds[e];
    if (count == 0) continue;
    at::Tensor out = y.narrow(0, begin, count);
    mm_out(out, x.narrow(0, begin, count), w[e]);
  }
  return y;
}

// (grad_x [N, in], grad_w [E, in, out] in w's layout: [E, out, in] storage when w is transposed).
template <typename MmOut>
std::tuple<at::Tensor, at::Tensor> per_expert_grouped_mm_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                  const at::Tensor& w, bool transposed,
                                                                  const std::vector<int64_t>& bounds, MmOut&& mm_out) {
  const int64_t N = x.size(0), E = w.size(0), in_cols = w.size(1), out_cols = w.size(2);
  at::Tensor grad_x = at::empty({N, in_cols}, x.options());
  // cuBLAS writes a column-major grad_w[e] (the transposed layout) as directly as a row-major one.
  at::Tensor grad_w = transposed ? at::empty({E, out_cols, in_cols}, w.options()).transpose(1, 2)
                                 : at::empty({E, in_cols, out_cols}, w.options());
  for (int64_t e = 0; e < E; ++e) {
    const int64_t begin = bounds[e], count = bounds[e + 1] - bounds[e];
    at::Tensor grad_w_e = grad_w[e];
    if (count == 0) {
      grad_w_e.zero_();
      continue;
    }
    const at::Tensor grad_e = grad.narrow(0, begin, count), x_e = x.narrow(0, begin, count);
    at::Tensor grad_x_e = grad_x.narrow(0, begin, count);
    mm_out(grad_x_e, grad_e, w[e].t());
    mm_out(grad_w_e, x_e.t(), grad_e);
  }
  return {grad_x, grad_w};
}

}  // namespace
}  // namespace cuda
}  // namespace moe_ext
