// Fixed GEMM tiles and the single-threaded BLAS guard (see gemm_tiles.h).
#include "gemm_tiles.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <utility>

#ifdef _OPENMP
#include <omp.h>
#endif

// MKL's service function, exported by libtorch_cpu when torch is built with MKL (mkl_set_num_threads_local
// is a macro for it in mkl_service.h). Weak: absent from a torch without MKL, where it resolves to null.
extern "C" int MKL_Set_Num_Threads_Local(int num_threads) __attribute__((weak));

namespace moe_ext {
namespace cpu {

bool SingleThreadedBlas::controls_mkl() { return MKL_Set_Num_Threads_Local != nullptr; }

SingleThreadedBlas::SingleThreadedBlas() {
  if (MKL_Set_Num_Threads_Local != nullptr) mkl_previous_ = MKL_Set_Num_Threads_Local(1);
#ifdef _OPENMP
  omp_previous_ = omp_get_max_threads();
  omp_set_num_threads(1);
#endif
}

SingleThreadedBlas::~SingleThreadedBlas() {
  // 0 (no thread-local setting before) restores MKL's global setting.
  if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(mkl_previous_);
#ifdef _OPENMP
  omp_set_num_threads(omp_previous_);
#endif
}

std::vector<Tile> make_tiles(const std::vector<int64_t>& row_begin, const std::vector<int64_t>& row_count, int64_t cols,
                             int64_t tile_rows, int64_t tile_cols) {
  std::vector<Tile> tiles;
  for (size_t g = 0; g < row_count.size(); ++g) {
    for (int64_t r = 0; r < row_count[g]; r += tile_rows) {
      for (int64_t c = 0; c < cols; c += tile_cols) {
        tiles.push_back({static_cast<int64_t>(g), row_begin[g] + r, std::min(tile_rows, row_count[g] - r), c,
                         std::min(tile_cols, cols - c)});
      }
    }
  }
  return tiles;
}

// Below this many multiply-adds a parallel region costs more than it saves.
constexpr int64_t kParallelMacs = int64_t(1) << 18;

void run_tiles(std::vector<Tile> tiles, const std::function<int64_t(const Tile&)>& macs,
               const std::function<void(const Tile&)>& body) {
  // Largest first: groups of a dropless plan differ in row count, so equal static chunks would leave a
  // thread idle at the end.
  std::vector<std::pair<int64_t, size_t>> order(tiles.size());
  int64_t total_macs = 0;
  for (size_t i = 0; i < tiles.size(); ++i) {
    order[i] = {-macs(tiles[i]), i};
    total_macs -= order[i].first;
  }
  std::sort(order.begin(), order.end());
  const int64_t count = static_cast<int64_t>(tiles.size());
  std::atomic<int64_t> next{0};
  const auto drain = [&](int64_t, int64_t) {
    // Worker threads do not inherit the caller's dispatch-key state: the per-tile ATen calls must skip
    // autograd explicitly.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const SingleThreadedBlas single_threaded;
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < count;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      body(tiles[order[i].second]);
    }
  };
  const int64_t workers = total_macs < kParallelMacs ? 1 : std::min<int64_t>(at::get_num_threads(), count);
  // One index per worker; a worker whose range holds several indices drains the same counter once, so no
  // tile runs twice and none is skipped.
  at::parallel_for(0, std::max<int64_t>(workers, 1), 1, drain);
}

namespace {

constexpr int64_t kAliasBytes = 8192;
// K below this packs too few rows for them to evict each other (L1 is 12-way or more on the CPUs measured).
constexpr int64_t kAliasDepth = 32;

}  // namespace

bool aliased_rhs(const at::Tensor& b) {
  const auto type = b.scalar_type();
  if (type != at::kFloat && type != at::kDouble) return false;
  if (b.dim() != 2 || b.stride(1) != 1 || b.size(0) < kAliasDepth || b.size(1) == 0) return false;
  return (b.stride(0) * b.element_size()) % kAliasBytes == 0;
}

int64_t packed_tile_cols(int64_t depth, int64_t element_size, int64_t tile_cols) {
  constexpr int64_t kStep = 64;
  const int64_t fit = kPackBytes / std::max<int64_t>(depth * element_size, 1);
  return std::clamp<int64_t>(fit / kStep * kStep, kStep, tile_cols);
}

at::Tensor unaliased_rhs(const at::Tensor& b) {
  if (!aliased_rhs(b)) return b;
  // Visible to torch.profiler: what the copy costs, and that it ran.
  RECORD_FUNCTION("moe_ext::unaliased_rhs", c10::ArrayRef<const c10::IValue>{});
  const int64_t rows = b.size(0), cols = b.size(1), size = b.element_size();
  int64_t stride = cols;
  if ((stride * size) % kAliasBytes == 0) stride += 64 / size;
  // One buffer per thread, grown as needed, 64-byte aligned like every CPU allocation of ATen's. Rows are
  // copied with memcpy, not Tensor::copy_: ATen's copy inside a tile's worker thread gave other bits from
  // run to run at 2 threads.
  thread_local at::Tensor buffer;
  const int64_t bytes = rows * stride * size;
  if (!buffer.defined() || buffer.numel() < bytes) buffer = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  at::Tensor packed = at::from_blob(buffer.mutable_data_ptr(), {rows, cols}, {stride, 1}, b.options());
  const char* src = static_cast<const char*>(b.const_data_ptr());
  char* dst = static_cast<char*>(packed.mutable_data_ptr());
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + r * stride * size, src + r * b.stride(0) * size, cols * size);
  }
  return packed;
}

at::Tensor view(const at::Tensor& base, int64_t offset, int64_t rows, int64_t cols, int64_t row_stride,
                int64_t col_stride) {
  void* data = static_cast<char*>(const_cast<void*>(base.const_data_ptr())) + offset * base.element_size();
  return at::from_blob(data, {rows, cols}, {row_stride, col_stride}, base.options());
}

}  // namespace cpu
}  // namespace moe_ext
