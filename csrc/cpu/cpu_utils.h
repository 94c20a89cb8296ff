// Helpers shared by the CPU kernels: first-error tracking across threads and deterministic blocked sums.
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <vector>

namespace moe_ext {
namespace cpu {

// Records the smallest failing item index across threads, so the error a
// user sees does not depend on thread scheduling.
class FirstFailure {
 public:
  void record(int64_t item) {
    int64_t current = first_.load(std::memory_order_relaxed);
    while ((current < 0 || item < current) && !first_.compare_exchange_weak(current, item, std::memory_order_relaxed)) {
    }
  }
  int64_t get() const { return first_.load(std::memory_order_relaxed); }

 private:
  std::atomic<int64_t> first_{-1};
};

// Items per block in reductions: fixed, never derived from the thread count,
// so sums are bitwise identical whatever the number of threads.
constexpr int64_t kReduceBlock = 256;

// Sums `width` columns over `rows` rows: block partial sums are computed in
// parallel, then added in block order. `row_value(r, c)` gives one element.
template <typename acc, typename RowValue>
std::vector<acc> blocked_column_sums(int64_t rows, int64_t width, RowValue row_value) {
  const int64_t blocks = (rows + kReduceBlock - 1) / kReduceBlock;
  std::vector<acc> partial(static_cast<size_t>(blocks * width), acc(0));
  const int64_t grain = std::max<int64_t>(1, 65536 / (kReduceBlock * std::max<int64_t>(1, width)));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      acc* out = partial.data() + b * width;
      const int64_t end = std::min(rows, (b + 1) * kReduceBlock);
      for (int64_t r = b * kReduceBlock; r < end; ++r) {
        for (int64_t c = 0; c < width; ++c) out[c] += row_value(r, c);
      }
    }
  });
  std::vector<acc> total(static_cast<size_t>(width), acc(0));
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t c = 0; c < width; ++c) total[c] += partial[b * width + c];
  }
  return total;
}

}  // namespace cpu
}  // namespace moe_ext
