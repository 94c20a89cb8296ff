// Helpers shared by the CPU kernels: ISA clones of row loops, first-error tracking across threads, deterministic sums.
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <vector>

// Element-wise row loops (activation, dispatch/combine) are compiled three times and picked at load time
// (ifunc) by CPU features, not CPU model:
// x86-64-v4 (AVX-512, 16 floats per instruction), x86-64-v3 (AVX2 + FMA, 8) and baseline x86-64 (4). The loops
// are always inlined into each clone so that they are compiled for its ISA. With FMA contraction the last bit can
// differ between clones (machines), never between runs or thread counts.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MOE_EXT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MOE_EXT_CPU_CLONES
#endif
#define MOE_EXT_ALWAYS_INLINE __attribute__((always_inline)) inline
// For loops whose rows read and written never overlap (distinct tensors, or distinct columns of one): say so,
// since after inlining the compiler may not see it and would guard the vector loop with run-time overlap
// checks that send adjacent rows down the scalar loop.
#if defined(__GNUC__) && !defined(__clang__)
#define MOE_EXT_IVDEP _Pragma("GCC ivdep")
#else
#define MOE_EXT_IVDEP
#endif

// Expands X(type, name) once per floating dtype of the CPU kernels: how each file instantiates its
// per-ISA row-loop entry points.
#define MOE_EXT_FOR_EACH_CPU_DTYPE(X) X(float, float) X(double, double) X(c10::BFloat16, bfloat16) X(c10::Half, half)

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
