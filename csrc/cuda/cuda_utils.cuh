// Helpers shared by the CUDA kernels: launch geometry, vector widths, and device-side input checks.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

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

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// ---------------------------------------------------------------------------------------------------------
// Input checks that need the data (an index out of range, a NaN logit, an inconsistent plan) run inside the
// kernels, which stay memory-safe whatever the input. How a failure reaches the user:
//
//  * "sync" (the default): every failing thread folds its item into a slot with an integer atomicMin
//    (order-independent, so the reported item is deterministic: the first one, as on CPU). After its
//    kernels, the op copies the few slots to the host -- ONE device-to-host copy per op call, which waits
//    for the op's kernels on the current stream -- and raises the CPU kernel's RuntimeError.
//  * "device" (MOE_EXT_CUDA_CHECKS=device), and always while the current stream is being captured into a
//    CUDA graph (where a host read is illegal): no host read at all; a failing thread stops the kernel with
//    a device-side assert, as PyTorch's own index kernels do. Nothing is silently wrong, no op syncs, but
//    the CUDA context is lost on bad input, so the message is short.

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

// True when data-dependent checks must not read back to the host.
inline bool device_assert_checks() {
  static const bool from_env = [] {
    const char* mode = std::getenv("MOE_EXT_CUDA_CHECKS");
    if (mode == nullptr || std::strcmp(mode, "") == 0 || std::strcmp(mode, "sync") == 0) return false;
    TORCH_CHECK(std::strcmp(mode, "device") == 0, "moe_ext: MOE_EXT_CUDA_CHECKS must be \"sync\" or \"device\", got \"",
                mode, "\"");
    return true;
  }();
  return from_env || c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

class DeviceChecks {
 public:
  DeviceChecks(const at::Tensor& like, int num_slots) : num_slots_(num_slots) {
    if (!device_assert_checks()) slots_ = at::full({num_slots}, kNoError, like.options().dtype(at::kLong));
  }

  ErrorSink sink() const {
    return ErrorSink{slots_.defined() ? reinterpret_cast<long long*>(slots_.mutable_data_ptr<int64_t>()) : nullptr};
  }

  // The slots on the host (kNoError = passed): the op's one synchronizing device-to-host copy. In
  // device-assert mode every slot reads kNoError without touching the device.
  std::vector<int64_t> read() const {
    std::vector<int64_t> out(static_cast<size_t>(num_slots_), kNoError);
    if (!slots_.defined()) return out;
    const at::Tensor host = slots_.to(at::kCPU);
    std::copy(host.const_data_ptr<int64_t>(), host.const_data_ptr<int64_t>() + num_slots_, out.begin());
    return out;
  }

 private:
  int num_slots_;
  at::Tensor slots_;
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

// Temporary device storage for CUB, from PyTorch's caching allocator.
inline at::Tensor cub_storage(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))}, like.options().dtype(at::kByte));
}

}  // namespace cuda
}  // namespace moe_ext
