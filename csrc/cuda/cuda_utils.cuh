// Host-side helpers of the CUDA glue (csrc/cuda/*.cu): the stream and the error slots' read-back. What the
// kernels themselves use is in device.cuh; launch.cuh has the launch macros and CUB's temporary storage.
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

#include "device.cuh"
#include "launch.cuh"

namespace moe_ext {
namespace cuda {

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

}  // namespace cuda
}  // namespace moe_ext
