// CPU kernels of grouped_mm and its backward: per-expert GEMMs on fixed tiles run in parallel (gemm_tiles.h).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
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

// Tiles of at most this many rows (a decode step: a few tokens per expert) skip BLAS. A GEMM call
// with M this small runs at a fraction of memory bandwidth (packing the weights costs as much as
// using them; measured 7 GB/s for M = 2 in bfloat16 against ~12 GB/s for a plain stream), so
// small_rows_gemm reads each weight row once and updates every output row from it.
constexpr int64_t kSmallRows = 16;
// Output columns per pass: kSmallRows x kSmallCols float accumulators (16 KB) stay in L1.
constexpr int64_t kSmallCols = 256;

// y[m, c] = sum_i x[m, i] * w[i, c] for rows m < M, columns c < cols: x rows `x_stride` apart,
// w and y rows `w_stride` / `y_stride` apart. Summed over i in order, in the accumulation type.
template <typename T>
MOE_EXT_ALWAYS_INLINE void small_rows_gemm(const T* x, int64_t x_stride, int64_t M, int64_t K, const T* w,
                                           int64_t w_stride, int64_t cols, T* y, int64_t y_stride) {
  using acc = kernels::acc_t<T>;
  acc sum[kSmallRows * kSmallCols];
  for (int64_t c0 = 0; c0 < cols; c0 += kSmallCols) {
    const int64_t width = std::min(kSmallCols, cols - c0);
    for (int64_t i = 0; i < M * kSmallCols; ++i) sum[i] = acc(0);
    for (int64_t i = 0; i < K; ++i) {
      const T* w_row = w + i * w_stride + c0;
      for (int64_t m = 0; m < M; ++m) {
        const acc a = static_cast<acc>(x[m * x_stride + i]);
        acc* s = sum + m * kSmallCols;
        MOE_EXT_IVDEP
        for (int64_t c = 0; c < width; ++c) s[c] += a * static_cast<acc>(w_row[c]);
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      T* dst = y + m * y_stride + c0;
      const acc* s = sum + m * kSmallCols;
      MOE_EXT_IVDEP
      for (int64_t c = 0; c < width; ++c) dst[c] = static_cast<T>(s[c]);
    }
  }
}

#define MOE_EXT_SMALL_ROWS_GEMM(T, name)                                                                         \
  MOE_EXT_CPU_CLONES void small_rows_gemm_##name(const T* x, int64_t x_stride, int64_t M, int64_t K, const T* w, \
                                                 int64_t w_stride, int64_t cols, T* y, int64_t y_stride) {       \
    small_rows_gemm<T>(x, x_stride, M, K, w, w_stride, cols, y, y_stride);                                       \
  }                                                                                                              \
  void call_small_rows_gemm(const T* x, int64_t x_stride, int64_t M, int64_t K, const T* w, int64_t w_stride,    \
                            int64_t cols, T* y, int64_t y_stride) {                                              \
    small_rows_gemm_##name(x, x_stride, M, K, w, w_stride, cols, y, y_stride);                                   \
  }

MOE_EXT_FOR_EACH_CPU_DTYPE(MOE_EXT_SMALL_ROWS_GEMM)
#undef MOE_EXT_SMALL_ROWS_GEMM

// Partial sums of one dot product in small_rows_gemm_transposed: enough independent lanes to fill the
// widest vector registers, a number fixed by nothing but this constant.
constexpr int64_t kDotLanes = 16;

// small_rows_gemm for a transposed w: y[m, c] = sum_i x[m, i] * wt[c, i], wt rows `wt_stride` apart and
// contiguous along i (the [out, in] storage of transformers' experts). Each output is a dot product of two
// contiguous rows, accumulated in kDotLanes interleaved partial sums (lane l takes i = l mod kDotLanes)
// that are then added in lane order: an order fixed by K alone. Each weight row is read once, from L1
// for every one of the M rows.
template <typename T>
MOE_EXT_ALWAYS_INLINE void small_rows_gemm_transposed(const T* x, int64_t x_stride, int64_t M, int64_t K, const T* wt,
                                                      int64_t wt_stride, int64_t cols, T* y, int64_t y_stride) {
  using acc = kernels::acc_t<T>;
  const int64_t body = K - K % kDotLanes;
  for (int64_t c = 0; c < cols; ++c) {
    const T* w_row = wt + c * wt_stride;
    for (int64_t m = 0; m < M; ++m) {
      const T* x_row = x + m * x_stride;
      acc lane[kDotLanes];
      for (int64_t l = 0; l < kDotLanes; ++l) lane[l] = acc(0);
      for (int64_t i = 0; i < body; i += kDotLanes) {
        MOE_EXT_IVDEP
        for (int64_t l = 0; l < kDotLanes; ++l) {
          lane[l] += static_cast<acc>(x_row[i + l]) * static_cast<acc>(w_row[i + l]);
        }
      }
      for (int64_t i = body; i < K; ++i) lane[i - body] += static_cast<acc>(x_row[i]) * static_cast<acc>(w_row[i]);
      acc sum = lane[0];
      for (int64_t l = 1; l < kDotLanes; ++l) sum += lane[l];
      y[m * y_stride + c] = static_cast<T>(sum);
    }
  }
}

#define MOE_EXT_SMALL_ROWS_GEMM_TRANSPOSED(T, name)                                                             \
  MOE_EXT_CPU_CLONES void small_rows_gemm_transposed_##name(const T* x, int64_t x_stride, int64_t M, int64_t K, \
                                                            const T* wt, int64_t wt_stride, int64_t cols, T* y, \
                                                            int64_t y_stride) {                                 \
    small_rows_gemm_transposed<T>(x, x_stride, M, K, wt, wt_stride, cols, y, y_stride);                         \
  }                                                                                                             \
  void call_small_rows_gemm_transposed(const T* x, int64_t x_stride, int64_t M, int64_t K, const T* wt,         \
                                       int64_t wt_stride, int64_t cols, T* y, int64_t y_stride) {               \
    small_rows_gemm_transposed_##name(x, x_stride, M, K, wt, wt_stride, cols, y, y_stride);                     \
  }

MOE_EXT_FOR_EACH_CPU_DTYPE(MOE_EXT_SMALL_ROWS_GEMM_TRANSPOSED)
#undef MOE_EXT_SMALL_ROWS_GEMM_TRANSPOSED

// w [E, in, out] as the kernels read it: element (e, i, c) at e * in * out + i * in_stride + c * out_stride of
// w's data. Row-major, or the transposed view of a row-major [E, out, in] tensor used without a copy.
struct Weight {
  at::Tensor w;
  bool transposed;
  int64_t in_stride, out_stride;
};

Weight read_weight(const at::Tensor& w_in) {
  const bool transposed = is_transposed_weight(w_in);
  at::Tensor w = transposed ? w_in : w_in.contiguous();
  const int64_t in_cols = w.size(1), out_cols = w.size(2);
  return {std::move(w), transposed, transposed ? 1 : out_cols, transposed ? in_cols : 1};
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
  const at::Tensor x = x_in.contiguous();
  const Weight wt = read_weight(w_in);
  const at::Tensor& w = wt.w;
  const int64_t N = x.size(0), E = w.size(0), out_cols = w.size(2);
  const auto bounds = read_offsets(offsets, N);
  std::vector<int64_t> begin(bounds.begin(), bounds.end() - 1), count(E);
  for (int64_t e = 0; e < E; ++e) count[e] = bounds[e + 1] - bounds[e];
  at::Tensor y = cpu::empty_output({N, out_cols}, x.options());
  const int64_t in_cols = x.size(1);
  const bool aliased = cpu::aliased_rhs(view(w, 0, in_cols, out_cols, wt.in_stride, wt.out_stride));
  const int64_t tile_cols = aliased ? cpu::packed_tile_cols(in_cols, w.element_size()) : cpu::kTileCols;
  run_tiles(
      make_tiles(begin, count, out_cols, cpu::kTileRows, tile_cols),
      [&](const Tile& t) { return t.rows * t.cols * in_cols; },
      [&](const Tile& t) {
        // w[e][:, col0:col0 + cols]
        const int64_t w_offset = t.group * in_cols * out_cols + t.col0 * wt.out_stride;
        if (t.rows <= kSmallRows) {
          AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "grouped_mm_small_rows", [&] {
            const scalar_t* x_rows = x.const_data_ptr<scalar_t>() + t.row0 * in_cols;
            const scalar_t* w_cols = w.const_data_ptr<scalar_t>() + w_offset;
            scalar_t* y_rows = y.mutable_data_ptr<scalar_t>() + t.row0 * out_cols + t.col0;
            if (wt.transposed) {
              call_small_rows_gemm_transposed(x_rows, in_cols, t.rows, in_cols, w_cols, in_cols, t.cols, y_rows,
                                              out_cols);
            } else {
              call_small_rows_gemm(x_rows, in_cols, t.rows, in_cols, w_cols, out_cols, t.cols, y_rows, out_cols);
            }
          });
          return;
        }
        at::Tensor out = view(y, t.row0 * out_cols + t.col0, t.rows, t.cols, out_cols, 1);
        at::mm_out(out, view(x, t.row0 * in_cols, t.rows, in_cols, in_cols, 1),
                   cpu::unaliased_rhs(view(w, w_offset, in_cols, t.cols, wt.in_stride, wt.out_stride)));
      });
  return y;
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                           const at::Tensor& w_in, const at::Tensor& offsets) {
  check_grouped_mm(x_in, w_in, offsets);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == x_in.size(0) && grad_in.size(1) == w_in.size(2),
              "moe_ext: grad_y must have shape [N, out] = [", x_in.size(0), ", ", w_in.size(2), "], got ",
              grad_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const Weight wt = read_weight(w_in);
  const at::Tensor& w = wt.w;
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  const int64_t N = x.size(0), E = w.size(0), in_cols = w.size(1), out_cols = w.size(2);
  const auto bounds = read_offsets(offsets, N);
  std::vector<int64_t> begin(bounds.begin(), bounds.end() - 1), count(E);
  for (int64_t e = 0; e < E; ++e) count[e] = bounds[e + 1] - bounds[e];

  // grad_x[rows of e] = grad_y[rows of e] @ w[e]^T
  at::Tensor grad_x = cpu::empty_output({N, in_cols}, x.options());
  // w[e]^T is the right-hand operand; row-major (and so possibly aliased) when w is a transposed view.
  const bool aliased = cpu::aliased_rhs(view(w, 0, out_cols, in_cols, wt.out_stride, wt.in_stride));
  const int64_t tile_cols = aliased ? cpu::packed_tile_cols(out_cols, w.element_size()) : cpu::kTileCols;
  run_tiles(
      make_tiles(begin, count, in_cols, cpu::kTileRows, tile_cols),
      [&](const Tile& t) { return t.rows * t.cols * out_cols; },
      [&](const Tile& t) {
        at::Tensor out = view(grad_x, t.row0 * in_cols + t.col0, t.rows, t.cols, in_cols, 1);
        // w[e][col0:col0 + cols, :]^T
        at::mm_out(out, view(grad, t.row0 * out_cols, t.rows, out_cols, out_cols, 1),
                   cpu::unaliased_rhs(view(w, t.group * in_cols * out_cols + t.col0 * wt.in_stride, out_cols, t.cols,
                                           wt.out_stride, wt.in_stride)));
      });

  // grad_w[e] = x[rows of e]^T @ grad_y[rows of e], stored in w's layout so that autograd takes it without a
  // copy: row-major [E, in, out], or for a transposed w the row-major [E, out, in] grad_y[rows]^T @ x[rows].
  // Tiles over that stored matrix of every expert, each reducing over all of that expert's rows.
  const at::Tensor& left = wt.transposed ? grad : x;
  const at::Tensor& right = wt.transposed ? x : grad;
  const int64_t left_cols = left.size(1), right_cols = right.size(1);
  at::Tensor grad_w_stored = cpu::empty_output({E, left_cols, right_cols}, w.options());
  std::vector<int64_t> zero_begin(E, 0), stored_rows(E, left_cols);
  const auto depth = [&](const Tile& t) { return t.rows * t.cols * count[t.group]; };
  run_tiles(make_tiles(zero_begin, stored_rows, right_cols), depth, [&](const Tile& t) {
    at::Tensor out =
        view(grad_w_stored, (t.group * left_cols + t.row0) * right_cols + t.col0, t.rows, t.cols, right_cols, 1);
    const int64_t rows = count[t.group], first = begin[t.group];
    if (rows == 0) {
      out.zero_();
      return;
    }
    // left[first:first + rows, row0:row0 + tile rows]^T @ right[first:first + rows, col0:col0 + cols]
    at::mm_out(out, view(left, first * left_cols + t.row0, t.rows, rows, 1, left_cols),
               view(right, first * right_cols + t.col0, rows, t.cols, right_cols, 1));
  });
  return {grad_x, wt.transposed ? grad_w_stored.transpose(1, 2) : grad_w_stored};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ext, CPU, m) {
  m.impl("grouped_mm", &grouped_mm_cpu);
  m.impl("grouped_mm_backward", &grouped_mm_backward_cpu);
}

}  // namespace moe_ext
