// Fixed GEMM tiles run in parallel, each on one thread with BLAS held to that thread: what makes every CPU
// matmul of moe_ext (grouped_mm, linear and their backward ops) bitwise independent of the thread count.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <vector>

namespace moe_ext {
namespace cpu {

// Tiles are fixed by the shapes, never by the thread count, and each tile's GEMM runs on one thread with
// the BLAS library's own threading off, so every output element is reduced in the same order whatever the
// number of threads. Large tiles keep BLAS at full speed; many tiles keep every core busy when groups
// (experts) are small.
constexpr int64_t kTileRows = 256;
constexpr int64_t kTileCols = 1024;

struct Tile {
  int64_t group, row0, rows, col0, cols;
};

// Tiles of at most tile_rows x tile_cols over rows [row_begin[g], row_begin[g] + row_count[g]) and
// columns [0, cols) of every group g.
std::vector<Tile> make_tiles(const std::vector<int64_t>& row_begin, const std::vector<int64_t>& row_count, int64_t cols,
                             int64_t tile_rows = kTileRows, int64_t tile_cols = kTileCols);

// Runs every tile once, largest first (by `macs(tile)`, its multiply-add count), on at most
// at::get_num_threads() threads taking tiles from a shared counter. Which thread runs a tile changes from
// call to call; what the tile computes does not: `body` runs with SingleThreadedBlas in force.
void run_tiles(std::vector<Tile> tiles, const std::function<int64_t(const Tile&)>& macs,
               const std::function<void(const Tile&)>& body);

// MKL's float32/float64 GEMM runs 2-3x slower when its right-hand operand B (row-major, [K, N]) has rows a
// multiple of 8 KiB apart and K is long: the rows it packs fall into the same cache sets (measured on Intel
// Xeon, one thread, 128 x 512 x 1024: 1.10 ms at a 1024-float row stride, 2.48 ms at 2048, 3.00 ms at 4096,
// 1.22 ms at 2064). Weights of width 2048, 4096, 14336, ... are laid out so, and a column tile of them keeps
// the stride. bfloat16/float16 (oneDNN) is not affected.
bool aliased_rhs(const at::Tensor& b);

// Columns per tile for B = a weight of `depth` rows when it is aliased: the packed copy of one tile
// (depth x cols) stays within kPackBytes.
constexpr int64_t kPackBytes = int64_t(8) << 20;
int64_t packed_tile_cols(int64_t depth, int64_t element_size, int64_t tile_cols = kTileCols);

// B copied into this thread's buffer with a row stride that is not a multiple of 8 KiB, if aliased_rhs(b);
// else b itself. The copy is exact and its layout a function of b's shape alone, so the GEMM that reads it
// computes the same bits on any thread. Valid until this thread's next call.
at::Tensor unaliased_rhs(const at::Tensor& b);

// A [rows, cols] matrix at element `offset` of `base`'s data with the given strides, as a non-owning
// tensor: one TensorImpl instead of the three to five dispatcher calls of narrow/select/t per tile.
// `base` outlives every such view.
at::Tensor view(const at::Tensor& base, int64_t offset, int64_t rows, int64_t cols, int64_t row_stride,
                int64_t col_stride);

// While alive, BLAS calls on this thread run on this thread alone. MKL (torch's BLAS on x86-64) splits a
// GEMM with a small output and a long reduction between its threads on Intel CPUs, so the same product
// has other bits at another thread count; inside a parallel region it may still plan for several
// threads. This sets MKL's thread-local thread count to 1 (MKL_Set_Num_Threads_Local, when the loaded
// torch has MKL) and OpenMP's (what oneDNN, torch's bfloat16/float16 GEMM, and OpenBLAS read) to 1,
// and restores both on destruction.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas();
  ~SingleThreadedBlas();
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

  // Whether MKL's thread-local control was found (false on a torch without MKL).
  static bool controls_mkl();

 private:
  int mkl_previous_ = 0;
  int omp_previous_ = 1;
};

}  // namespace cpu
}  // namespace moe_ext
