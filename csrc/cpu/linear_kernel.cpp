// CPU kernels of linear and its backward: nn.Linear's function on fixed GEMM tiles (gemm_tiles.h), the bias
// gradient as fixed-block column sums, so no bit depends on the thread count.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "../kernels/common.h"
#include "cpu_utils.h"
#include "gemm_tiles.h"
#include "output_cache.h"

namespace moe_ext {
namespace {

using cpu::make_tiles;
using cpu::run_tiles;
using cpu::Tile;
using cpu::view;

// Weight-gradient tiles: narrower than the default so that a small weight (a router's [E, H], a gate's
// [1, H]) still gives every thread tiles. Each tile reduces over all T rows in one GEMM: the reduction is
// never split, so its order is BLAS's single-threaded one whatever the thread count.
constexpr int64_t kWeightTileRows = 64;
constexpr int64_t kWeightTileCols = 256;

at::Tensor linear_cpu(const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in) {
  check_linear(x_in, weight_in, bias_in);
  const at::Tensor x = x_in.contiguous(), w = weight_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const int64_t T = x.size(0), in_cols = x.size(1), out_cols = w.size(0);
  at::Tensor y = cpu::empty_output({T, out_cols}, x.options());
  run_tiles(
      make_tiles({0}, {T}, out_cols), [&](const Tile& t) { return t.rows * t.cols * in_cols; },
      [&](const Tile& t) {
        at::Tensor out = view(y, t.row0 * out_cols + t.col0, t.rows, t.cols, out_cols, 1);
        const at::Tensor x_rows = view(x, t.row0 * in_cols, t.rows, in_cols, in_cols, 1);
        // weight[col0:col0 + cols, :]^T
        const at::Tensor w_t = view(w, t.col0 * in_cols, in_cols, t.cols, 1, in_cols);
        if (bias.defined()) {
          at::addmm_out(out, view(bias, t.col0, t.rows, t.cols, 0, 1), x_rows, w_t);
        } else {
          at::mm_out(out, x_rows, w_t);
        }
      });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                   const at::Tensor& weight_in, bool with_bias) {
  check_linear_backward(grad_in, x_in, weight_in);
  const at::Tensor x = x_in.contiguous(), w = weight_in.contiguous();
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  const int64_t T = x.size(0), in_cols = x.size(1), out_cols = w.size(0);

  // grad_x = grad_y @ weight
  at::Tensor grad_x = cpu::empty_output({T, in_cols}, x.options());
  const bool aliased = cpu::aliased_rhs(w);
  const int64_t tile_cols = aliased ? cpu::packed_tile_cols(out_cols, w.element_size()) : cpu::kTileCols;
  run_tiles(
      make_tiles({0}, {T}, in_cols, cpu::kTileRows, tile_cols),
      [&](const Tile& t) { return t.rows * t.cols * out_cols; },
      [&](const Tile& t) {
        at::Tensor out = view(grad_x, t.row0 * in_cols + t.col0, t.rows, t.cols, in_cols, 1);
        at::mm_out(out, view(grad, t.row0 * out_cols, t.rows, out_cols, out_cols, 1),
                   cpu::unaliased_rhs(view(w, t.col0, out_cols, t.cols, in_cols, 1)));
      });

  // grad_weight = grad_y^T @ x, every tile reducing over all T rows
  at::Tensor grad_w = cpu::empty_output({out_cols, in_cols}, w.options());
  run_tiles(
      make_tiles({0}, {out_cols}, in_cols, kWeightTileRows, kWeightTileCols),
      [&](const Tile& t) { return t.rows * t.cols * T; },
      [&](const Tile& t) {
        at::Tensor out = view(grad_w, t.row0 * in_cols + t.col0, t.rows, t.cols, in_cols, 1);
        if (T == 0) {
          out.zero_();
          return;
        }
        at::mm_out(out, view(grad, t.row0, t.rows, T, 1, out_cols), view(x, t.col0, T, t.cols, in_cols, 1));
      });

  at::Tensor grad_b = at::empty({with_bias ? out_cols : 0}, w.options());
  if (with_bias) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "linear_backward_bias", [&] {
      using acc = kernels::acc_t<scalar_t>;
      const scalar_t* g = grad.const_data_ptr<scalar_t>();
      const std::vector<acc> sums = cpu::blocked_column_sums<acc>(
          T, out_cols, [&](int64_t r, int64_t c) { return static_cast<acc>(g[r * out_cols + c]); });
      scalar_t* dst = grad_b.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < out_cols; ++c) dst[c] = static_cast<scalar_t>(sums[c]);
    });
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ext, CPU, m) {
  m.impl("linear", &linear_cpu);
  m.impl("linear_backward", &linear_backward_cpu);
}

}  // namespace moe_ext
