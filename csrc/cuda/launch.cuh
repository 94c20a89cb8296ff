// How host code that is shared with the CUDA execution model of the tests (csrc/cuda/*_launches.cuh)
// launches kernels and checks CUDA calls: under nvcc, the triple-chevron launch and c10's checks; under the
// model (MOE_EXT_CUDA_EMULATION, tests/cuda_emulation/emulation.h), its launch and its stand-ins.
//
//   MOE_EXT_LAUNCH(grid, block, shared_bytes, stream, kernel<T>)(args...);
//   MOE_EXT_LAUNCH_CHECK();
//   MOE_EXT_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(...));
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#if defined(MOE_EXT_CUDA_EMULATION)
#define MOE_EXT_LAUNCH(grid, block, shared_bytes, stream, ...) \
  ::emu::Launcher<__VA_ARGS__> { (grid), (block), (shared_bytes) }
#define MOE_EXT_LAUNCH_CHECK() \
  do {                         \
  } while (false)
#define MOE_EXT_CUDA_CHECK(expr) ::emu::check_cuda((expr), #expr)
#else
#include <c10/cuda/CUDAException.h>
#define MOE_EXT_LAUNCH(grid, block, shared_bytes, stream, ...) \
  __VA_ARGS__<<<(grid), (block), (shared_bytes), (stream)>>>
#define MOE_EXT_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define MOE_EXT_CUDA_CHECK(expr) C10_CUDA_CHECK(expr)
#endif

namespace moe_ext {
namespace cuda {

// Temporary device storage for CUB, from PyTorch's caching allocator (the model: host memory).
inline at::Tensor cub_storage(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))}, like.options().dtype(at::kByte));
}

}  // namespace cuda
}  // namespace moe_ext
