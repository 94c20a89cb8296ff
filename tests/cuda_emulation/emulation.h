// A test-only execution model of CUDA for host C++: it compiles moe_ext's kernel headers
// (csrc/cuda/*_kernels.cuh) with the host compiler and runs a launch with CUDA's semantics, so that CI,
// which has no GPU, executes exactly the kernel code the CUDA build ships.
//
// What a launch models (emu::launch):
//  * gridDim / blockDim / blockIdx / threadIdx; the blocks run one after another in a random order (seeded:
//    MOE_EXT_EMULATION_SEED, default 0). The threads of a block are fibers on the calling OS thread: each runs
//    until it finishes or waits at a __syncthreads or a warp function, in a random order drawn afresh for
//    every round between barriers, so a thread that reads what another writes without a barrier between
//    them reads it before it is written about half the time, and a launch replays exactly from its seed.
//  * __syncthreads as a barrier of the whole block. Every thread must reach the same __syncthreads (same
//    source line) before any goes on; a thread that reaches a different one, or exits while others wait,
//    fails the launch ("divergent barrier"), as does a barrier or warp function that can never complete
//    ("deadlock", found when no thread can go on: no timeout).
//  * Warps of 32 consecutive threads: __shfl_sync / _up / _down / _xor, __ballot_sync and __syncwarp wait
//    for every lane of `mask`, which must hold the calling lane, name only lanes that exist and have not
//    exited, and be the same on every lane; width must be a power of two up to 32, and a lane reads from
//    a lane outside `mask` only as an error. Results follow the CUDA programming guide's rules for width.
//  * Dynamic shared memory (MOE_EXT_DYNAMIC_SHARED in csrc/cuda/device.cuh): one allocation per block of
//    exactly the launch's byte count, 16-byte aligned, so AddressSanitizer sees any access past it. More
//    than the default 48 KiB without an opt-in fails the launch, as on the device.
//  * Atomics (std::atomic_ref), __ldg, __fmul_rn / __dmul_rn (the build has no FMA contraction), device
//    asserts (a failing CUDA_KERNEL_ASSERT_PRINTF fails the launch with its message).
//  * uint2 / uint4 with CUDA's 8- and 16-byte alignment; a misaligned vector access is undefined behaviour
//    that UndefinedBehaviorSanitizer reports (the sanitized ctest build).
//
// A launch that breaks one of these rules throws emu::LaunchError naming the rule, the block and the thread.
// Not modelled: nvcc's code generation (FMA contraction, fast-math intrinsics), memory ordering between
// threads beyond what the barriers give, real cuBLAS/CUB internals, and performance.
#pragma once

#define MOE_EXT_CUDA_EMULATION 1

#include <array>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <source_location>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __align__(n) alignas(n)
#define __launch_bounds__(...)

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};

extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;
constexpr int warpSize = 32;

using std::isfinite;

namespace emu {

// A launch that broke a rule of the model (or of CUDA), with where and why.
struct LaunchError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Fails the running launch from inside a kernel thread.
[[noreturn]] void fail(const std::string& what);

void syncthreads(std::source_location where);
// Waits for every lane of `mask` of the calling warp; returns the 32 lanes' `value`s (lanes outside the mask
// read as 0).
std::array<uint64_t, 32> warp_exchange(unsigned mask, uint64_t value, std::source_location where);
int lane_id();
void* dynamic_shared_base(size_t alignment);

template <typename T, size_t kAlignment>
T* dynamic_shared() {
  return static_cast<T*>(dynamic_shared_base(kAlignment));
}

// The launch's dynamic shared memory size, grid and block, and the kernel body every thread runs.
void run(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body);

}  // namespace emu

// The CUDA runtime's stream and error types, as far as the shared launch code (csrc/cuda/launch.cuh) uses them.
using cudaStream_t = struct CUstream_st*;
enum cudaError_t : int { cudaSuccess = 0, cudaErrorInvalidValue = 1 };

namespace emu {

// MOE_EXT_CUDA_CHECK: a CUDA call that did not return cudaSuccess fails the caller with the call's text.
inline void check_cuda(cudaError_t error, const char* call) {
  if (error != cudaSuccess) throw LaunchError(std::string("CUDA error ") + std::to_string(error) + " from " + call);
}

// Names of the kernels launched so far, instantiation included ("ns::kernel<float, 4>"), sorted.
std::vector<std::string> launched_kernels();
void record_launch(std::string kernel_name);

template <auto Kernel>
std::string kernel_name() {
  const std::string pretty = __PRETTY_FUNCTION__;  // "... [with auto Kernel = ns::name<T>; ...]"
  const size_t begin = pretty.find("Kernel = ");
  const size_t end = pretty.find_first_of(";]", begin);
  return begin == std::string::npos ? pretty : pretty.substr(begin + 9, end - begin - 9);
}

// Kernel<<<grid, block, shared_bytes>>>(args...): the arguments are converted to the kernel's parameter types
// once, on the host, as a CUDA launch copies them; every thread calls the kernel with a copy.
template <typename... Params, typename... Args>
void launch_function(dim3 grid, dim3 block, size_t shared_bytes, void (*kernel)(Params...), Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "emu::launch: wrong number of kernel arguments");
  const std::tuple<std::decay_t<Params>...> params(static_cast<std::decay_t<Params>>(std::forward<Args>(args))...);
  run(grid, block, shared_bytes, [&] { std::apply(kernel, params); });
}

template <auto Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t shared_bytes, Args&&... args) {
  record_launch(kernel_name<Kernel>());
  launch_function(grid, block, shared_bytes, Kernel, std::forward<Args>(args)...);
}

// MOE_EXT_LAUNCH(grid, block, shared_bytes, stream, kernel)(args...)
template <auto Kernel>
struct Launcher {
  dim3 grid, block;
  size_t shared_bytes;
  template <typename... Args>
  void operator()(Args&&... args) const {
    launch<Kernel>(grid, block, shared_bytes, std::forward<Args>(args)...);
  }
};

template <typename T>
uint64_t to_bits(T value) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp functions move values of up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// Lane `src` of the exchange for the calling lane, checked against `mask`.
template <typename T>
T read_lane(const std::array<uint64_t, 32>& values, unsigned mask, int src, const char* op) {
  if (((mask >> src) & 1u) == 0) {
    fail(std::string(op) + ": lane " + std::to_string(lane_id()) + " reads lane " + std::to_string(src) +
         ", which is not in the mask");
  }
  return from_bits<T>(values[static_cast<size_t>(src)]);
}

inline void check_width(int width, const char* op) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fail(std::string(op) + ": width " + std::to_string(width) + " is not a power of two in [1, 32]");
  }
}

}  // namespace emu

inline void __syncthreads(std::source_location where = std::source_location::current()) { emu::syncthreads(where); }

inline void __syncwarp(unsigned mask = 0xffffffffu, std::source_location where = std::source_location::current()) {
  emu::warp_exchange(mask, 0, where);
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
              std::source_location where = std::source_location::current()) {
  emu::check_width(width, "__shfl_sync");
  const auto values = emu::warp_exchange(mask, emu::to_bits(var), where);
  const int lane = emu::lane_id();
  return emu::read_lane<T>(values, mask, lane / width * width + ((src_lane % width) + width) % width, "__shfl_sync");
}

template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 std::source_location where = std::source_location::current()) {
  emu::check_width(width, "__shfl_up_sync");
  const auto values = emu::warp_exchange(mask, emu::to_bits(var), where);
  const int lane = emu::lane_id();
  if (static_cast<unsigned>(lane % width) < delta) return var;
  return emu::read_lane<T>(values, mask, lane - static_cast<int>(delta), "__shfl_up_sync");
}

template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   std::source_location where = std::source_location::current()) {
  emu::check_width(width, "__shfl_down_sync");
  const auto values = emu::warp_exchange(mask, emu::to_bits(var), where);
  const int lane = emu::lane_id();
  if (static_cast<unsigned>(lane % width) + delta >= static_cast<unsigned>(width)) return var;
  return emu::read_lane<T>(values, mask, lane + static_cast<int>(delta), "__shfl_down_sync");
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  std::source_location where = std::source_location::current()) {
  emu::check_width(width, "__shfl_xor_sync");
  const auto values = emu::warp_exchange(mask, emu::to_bits(var), where);
  const int lane = emu::lane_id();
  const int src = lane ^ lane_mask;
  // A lane may read earlier groups of `width` lanes; reading a later group returns its own value.
  if (src / width > lane / width || src > 31) return var;
  return emu::read_lane<T>(values, mask, src, "__shfl_xor_sync");
}

inline unsigned __ballot_sync(unsigned mask, int predicate,
                              std::source_location where = std::source_location::current()) {
  const auto values = emu::warp_exchange(mask, predicate != 0 ? 1 : 0, where);
  unsigned bits = 0;
  for (int lane = 0; lane < 32; ++lane) bits |= ((mask >> lane) & 1u) && values[lane] != 0 ? (1u << lane) : 0u;
  return bits;
}

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

namespace emu {
// *address = better(value, old) ? value : old, atomically; returns old.
template <typename T, typename Better>
T atomic_replace_if(T* address, T value, Better better) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (better(value, old) && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}
}  // namespace emu

template <typename T>
T atomicMin(T* address, T value) {
  return emu::atomic_replace_if(address, value, [](T a, T b) { return a < b; });
}

template <typename T>
T atomicMax(T* address, T value) {
  return emu::atomic_replace_if(address, value, [](T a, T b) { return b < a; });
}

template <typename T>
T __ldg(const T* address) {
  return *address;
}

// The build compiles with -ffp-contract=off: a product is rounded before any addition, as __fmul_rn promises.
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }

#undef CUDA_KERNEL_ASSERT_PRINTF
#define CUDA_KERNEL_ASSERT_PRINTF(cond, ...)                                       \
  do {                                                                             \
    if (!(cond)) {                                                                 \
      char emu_message_[512];                                                      \
      std::snprintf(emu_message_, sizeof(emu_message_), __VA_ARGS__);              \
      ::emu::fail(std::string("device-side assert (" #cond "): ") + emu_message_); \
    }                                                                              \
  } while (false)
