// The one kernel of grouped_mm (launched by grouped_mm_kernel.cu): the device-side check of the offsets.
#pragma once

#include "device.cuh"

namespace moe_ext {
namespace cuda {
namespace {

__global__ void check_offsets_kernel(const int64_t* __restrict__ offsets, int64_t num_experts, int64_t num_rows,
                                     ErrorSink sink) {
  bool ok = offsets[0] == 0 && offsets[num_experts] == num_rows;
  for (int64_t e = 1; e <= num_experts; ++e) ok = ok && offsets[e] >= offsets[e - 1];
  if (!ok) sink.report(0, 0);
}

}  // namespace
}  // namespace cuda
}  // namespace moe_ext
