// What the kernel headers (csrc/cuda/*_kernels.cuh) need besides the CUDA builtins: launch geometry, the
// grid-stride loop, the error sink, vector types and the CPU-exact products. Torch-free and free of CUDA
// host APIs, so the same kernel code compiles under nvcc and under the test-only CUDA execution model
// (tests/cuda_emulation/emulation.h, which defines MOE_EXT_CUDA_EMULATION and is included first).
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "../kernels/common.h"

#if !defined(MOE_EXT_CUDA_EMULATION)
#include <c10/macros/Macros.h>  // CUDA_KERNEL_ASSERT_PRINTF
#endif

namespace moe_ext {
namespace cuda {

constexpr int kThreads = 256;
// Grid-stride loops cover any size; this only bounds the grid.
constexpr int64_t kMaxBlocks = 1 << 20;

inline unsigned int blocks_for(int64_t items, int threads = kThreads) {
  const int64_t blocks = (items + threads - 1) / threads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(blocks, kMaxBlocks)));
}

// for (int64_t i = global thread index; i < n; i += threads in the grid)
#define MOE_EXT_GRID_STRIDE_LOOP(i, n)                                                   \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// The block's dynamic shared memory (the launch's third <<<>>> argument) as `type* name`, aligned to
// `alignment` bytes.
#if defined(MOE_EXT_CUDA_EMULATION)
#define MOE_EXT_DYNAMIC_SHARED(type, name, alignment) type* name = ::emu::dynamic_shared<type, alignment>()
#else
#define MOE_EXT_DYNAMIC_SHARED(type, name, alignment) \
  extern __shared__ __align__(alignment)              \
  type name[]
#endif

// ---------------------------------------------------------------------------------------------------------
// Data-dependent input checks: a failing thread folds its item into an error slot (see cuda_utils.cuh for
// how the slots reach the user).

constexpr int64_t kNoError = std::numeric_limits<int64_t>::max();

struct ErrorSink {
  long long* slots;  // nullptr: device-assert mode

  __device__ __forceinline__ void report(int slot, int64_t key) const {
    if (slots == nullptr) {
      CUDA_KERNEL_ASSERT_PRINTF(false,
                                "moe_ext: invalid input (check %d, item %lld); rerun with "
                                "MOE_EXT_CUDA_CHECKS=sync for the error message",
                                slot, static_cast<long long>(key));
    } else {
      atomicMin(slots + slot, static_cast<long long>(key));
    }
  }
};

// ---------------------------------------------------------------------------------------------------------
// Vector widths for row copies: 16 bytes (128-bit loads) when every row start is 16-byte aligned.

inline bool aligned_to(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// Elements per vector for rows of `hidden` elements of `elem_size` bytes starting at the given bases.
inline int vector_elems(int64_t hidden, int64_t elem_size, std::initializer_list<const void*> bases) {
  for (int64_t bytes = 16; bytes > elem_size; bytes /= 2) {
    const int64_t elems = bytes / elem_size;
    if (hidden % elems != 0) continue;
    bool ok = true;
    for (const void* base : bases) ok = ok && (base == nullptr || aligned_to(base, bytes));
    if (ok) return static_cast<int>(elems);
  }
  return 1;
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Calls f(std::integral_constant<int, N>) with N = elems when N elements of scalar_t fit 16 bytes, else
// N = 1: only the widths vector_elems can return are instantiated.
template <typename scalar_t, typename F>
void with_vector_width(int elems, F&& f) {
  if constexpr (sizeof(scalar_t) <= 2) {
    if (elems == 8) return f(std::integral_constant<int, 8>{});
  }
  if constexpr (sizeof(scalar_t) <= 4) {
    if (elems == 4) return f(std::integral_constant<int, 4>{});
  }
  if constexpr (sizeof(scalar_t) <= 8) {
    if (elems == 2) return f(std::integral_constant<int, 2>{});
  }
  return f(std::integral_constant<int, 1>{});
}

// Products that must round exactly like the CPU kernels' separate multiply and add: no FMA contraction.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// Rows per block of the blocked reductions: the CPU kernels' cpu::kReduceBlock, so that sums are added
// in the same order on both devices.
constexpr int64_t kReduceBlock = 256;

}  // namespace cuda
}  // namespace moe_ext
