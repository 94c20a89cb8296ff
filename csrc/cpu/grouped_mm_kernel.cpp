// CPU kernels of grouped_mm and its backward: per-expert BLAS GEMMs on fixed tiles run in parallel.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "../checks.h"
#include "output_cache.h"

namespace moe_ext {
namespace {

// Output tile of one task. Tiles are fixed by the shapes, never by the thread
// count, and each tile's GEMM runs on one thread, so every output element is
// reduced in the same order whatever the number of threads: bitwise
// deterministic results. Large tiles keep BLAS at full speed; many tiles keep
// both cores busy when experts are small.
constexpr int64_t kTileRows = 256;
constexpr int64_t kTileCols = 512;

struct Tile {
  int64_t expert, row0, rows, col0, cols;
};

std::vector<Tile> make_tiles(const std::vector<int64_t>& row_begin, const std::vector<int64_t>& row_count,
                             int64_t cols) {
  std::vector<Tile> tiles;
  for (size_t e = 0; e < row_count.size(); ++e) {
    for (int64_t r = 0; r < row_count[e]; r += kTileRows) {
      for (int64_t c = 0; c < cols; c += kTileCols) {
        tiles.push_back({static_cast<int64_t>(e), row_begin[e] + r, std::min(kTileRows, row_count[e] - r), c,
                         std::min(kTileCols, cols - c)});
      }
    }
  }
  return tiles;
}

// Below this many multiply-adds a parallel region costs more than it saves
// (and BLAS runs such small GEMMs on one thread anyway, so results are unchanged).
constexpr int64_t kParallelMacs = int64_t(1) << 18;

void run_tiles(const std::vector<Tile>& tiles, int64_t total_macs, const std::function<void(const Tile&)>& body) {
  const int64_t grain = total_macs < kParallelMacs ? std::max<int64_t>(1, tiles.size()) : 1;
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), grain, [&](int64_t i0, int64_t i1) {
    // Worker threads do not inherit the caller's dispatch-key state: the
    // per-tile ATen calls must skip autograd explicitly.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t i = i0; i < i1; ++i) body(tiles[i]);
  });
}

// Host copy of offsets, validated: 0 = offsets[0] <= ... <= offsets[E] = N.
std::vector<int64_t> read_offsets(const at::Tensor& offsets, int64_t num_rows) {
  const at::Tensor host = offsets.to(at::kCPU).contiguous();
  const int64_t* ptr = host.const_data_ptr<int64_t>();
  std::vector<int64_t> out(ptr, ptr + host.numel());
  TORCH_CHECK(out.front() == 0, "moe_ext: offsets[0] must be 0, got ", out.front());
  for (size_t e = 1; e < out.size(); ++e) {
    TORCH_CHECK(out[e] >= out[e - 1], "moe_ext: offsets must be non-decreasing, but offsets[", e, "] = ", out[e],
                " < offsets[", e - 1, "] = ", out[e - 1]);
  }
  TORCH_CHECK(out.back() == num_rows, "moe_ext: offsets[E] must equal the number of rows N = ", num_rows, ", got ",
              out.back());
  return out;
}

at::Tensor grouped_mm_cpu(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& offsets) {
  check_grouped_mm(x_in, w_in, offsets);
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t N = x.size(0), E = w.size(0), out_cols = w.size(2);
  const auto bounds = read_offsets(offsets, N);
  std::vector<int64_t> begin(bounds.begin(), bounds.end() - 1), count(E);
  for (int64_t e = 0; e < E; ++e) count[e] = bounds[e + 1] - bounds[e];
  at::Tensor y = cpu::empty_output({N, out_cols}, x.options());
  run_tiles(make_tiles(begin, count, out_cols), N * x.size(1) * out_cols, [&](const Tile& t) {
    at::Tensor out = y.narrow(0, t.row0, t.rows).narrow(1, t.col0, t.cols);
    at::mm_out(out, x.narrow(0, t.row0, t.rows), w[t.expert].narrow(1, t.col0, t.cols));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                           const at::Tensor& w_in, const at::Tensor& offsets) {
  check_grouped_mm(x_in, w_in, offsets);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == x_in.size(0) && grad_in.size(1) == w_in.size(2),
              "moe_ext: grad_y must have shape [N, out] = [", x_in.size(0), ", ", w_in.size(2), "], got ",
              grad_in.sizes());
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  const int64_t N = x.size(0), E = w.size(0), in_cols = w.size(1), out_cols = w.size(2);
  const auto bounds = read_offsets(offsets, N);
  std::vector<int64_t> begin(bounds.begin(), bounds.end() - 1), count(E);
  for (int64_t e = 0; e < E; ++e) count[e] = bounds[e + 1] - bounds[e];

  // grad_x[rows of e] = grad_y[rows of e] @ w[e]^T
  at::Tensor grad_x = cpu::empty_output({N, in_cols}, x.options());
  run_tiles(make_tiles(begin, count, in_cols), N * in_cols * out_cols, [&](const Tile& t) {
    at::Tensor out = grad_x.narrow(0, t.row0, t.rows).narrow(1, t.col0, t.cols);
    at::mm_out(out, grad.narrow(0, t.row0, t.rows), w[t.expert].narrow(0, t.col0, t.cols).t());
  });

  // grad_w[e] = x[rows of e]^T @ grad_y[rows of e]: tiles over [in, out] of
  // every expert, each reducing over all of that expert's rows.
  at::Tensor grad_w = cpu::empty_output({E, in_cols, out_cols}, w.options());
  std::vector<int64_t> zero_begin(E, 0), in_rows(E, in_cols);
  run_tiles(make_tiles(zero_begin, in_rows, out_cols), N * in_cols * out_cols, [&](const Tile& t) {
    at::Tensor out = grad_w[t.expert].narrow(0, t.row0, t.rows).narrow(1, t.col0, t.cols);
    if (count[t.expert] == 0) {
      out.zero_();
      return;
    }
    const at::Tensor xe = x.narrow(0, begin[t.expert], count[t.expert]).narrow(1, t.row0, t.rows);
    const at::Tensor ge = grad.narrow(0, begin[t.expert], count[t.expert]).narrow(1, t.col0, t.cols);
    at::mm_out(out, xe.t(), ge);
  });
  return {grad_x, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ext, CPU, m) {
  m.impl("grouped_mm", &grouped_mm_cpu);
  m.impl("grouped_mm_backward", &grouped_mm_backward_cpu);
}

}  // namespace moe_ext
