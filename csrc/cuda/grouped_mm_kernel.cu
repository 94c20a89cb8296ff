// CUDA kernels of grouped_mm and its backward: per-expert cuBLAS GEMMs, or torch's grouped GEMM for bf16.
//
// Two paths:
//  * per expert (every dtype): the expert row ranges are read on the host -- ONE device-to-host copy of the
//    E + 1 offsets per call, which waits for the work already queued on the stream -- then one at::mm_out
//    (cuBLAS) per non-empty expert on row slices. The host read makes this path impossible inside a CUDA
//    graph capture, which is reported as an error.
//  * at::_grouped_mm (the kernel behind torch's grouped GEMM): bf16 on sm_90 and sm_100, where it is a
//    single CUTLASS launch, with feature sizes that are multiples of 8 (16-byte strides). The offsets stay
//    on the device and are validated by a one-thread kernel reported like every other device check
//    (cuda_utils.cuh): no host sync at all with MOE_EXT_CUDA_CHECKS=device.
// MOE_EXT_CUDA_GROUPED_MM=loop forces the per-expert path (to compare the two, or to rule one out).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "cuda_utils.cuh"
#include "grouped_mm_kernels.cuh"
#include "grouped_mm_launches.cuh"

namespace moe_ext {
namespace cuda {
namespace {

// Host copy of offsets (which, as on CPU, may live on any device), validated: 0 = offsets[0] <= ... <= offsets[E] = N
// (the CPU kernel's messages).
std::vector<int64_t> read_offsets(const at::Tensor& offsets, int64_t num_rows) {
  TORCH_CHECK(
      !offsets.is_cuda() || c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
      "moe_ext: grouped_mm on CUDA reads the expert offsets on the host for this dtype/device, which a CUDA "
      "graph capture forbids (only bfloat16 on sm_90/sm_100 with feature sizes divisible by 8 runs without it)");
  const at::Tensor host = offsets.to(at::kCPU).contiguous();
  const int64_t* ptr = host.const_data_ptr<int64_t>();
  std::vector<int64_t> out(ptr, ptr + host.numel());
  TORCH_CHECK(out.front() == 0, "moe_ext: offsets[0] must be 0, got ", out.front());
  for (size_t e = 1; e < out.size(); ++e) {
    TORCH_CHECK(out[e] >= out[e - 1], "moe_ext: offsets must be non-decreasing, but offsets[", e, "] = ", out[e],
                " < offsets[", e - 1, "] = ", out[e - 1]);
  }
  TORCH_CHECK(out.back() == num_rows, "moe_ext: offsets[E] must equal the number of rows N = ", num_rows, ", got ",
              out.back());
  return out;
}

// The per-expert GEMM of grouped_mm_launches.cuh: cuBLAS through ATen, on the slices as they are.
void cublas_mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }

bool use_torch_grouped_mm(const at::Tensor& x, const at::Tensor& w) {
  if (x.scalar_type() != at::kBFloat16) return false;
  const char* mode = std::getenv("MOE_EXT_CUDA_GROUPED_MM");
  if (mode != nullptr && std::strcmp(mode, "loop") == 0) return false;
  const int64_t N = x.size(0), in_cols = w.size(1), out_cols = w.size(2);
  if (N == 0 || N >= std::numeric_limits<int32_t>::max() || in_cols % 8 != 0 || out_cols % 8 != 0) return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device()));
  return major == 9 || major == 10;  // Hopper and datacenter Blackwell: the CUTLASS grouped GEMM
}

// The group ends of at::_grouped_mm (int32 offsets[1:]), validated on the device.
at::Tensor device_group_ends(const at::Tensor& offsets, int64_t num_rows) {
  const int64_t E = offsets.size(0) - 1;
  const DeviceChecks checks(offsets, 1);
  check_offsets_kernel<<<1, 1, 0, current_stream()>>>(offsets.const_data_ptr<int64_t>(), E, num_rows, checks.sink());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Only on failure: the host copy names the problem with the CPU kernel's message.
  if (checks.read()[0] != kNoError) read_offsets(offsets, num_rows);
  return offsets.narrow(0, 1, E).to(at::kInt);
}

at::Tensor grouped_mm_cuda(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& offsets_in) {
  check_grouped_mm(x_in, w_in, offsets_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  // A transposed w (is_transposed_weight) is used as it is: cuBLAS reads it with the transpose flag.
  const at::Tensor x = x_in.contiguous(), offsets = offsets_in.contiguous();
  const at::Tensor w = is_transposed_weight(w_in) ? w_in : w_in.contiguous();
  const int64_t N = x.size(0);
  // .contiguous(): the Meta kernel promises contiguous outputs (a no-op for the sizes this path takes).
  if (use_torch_grouped_mm(x, w)) {
    return at::_grouped_mm(x, w, device_group_ends(offsets.to(x.device()), N)).contiguous();
  }

  return per_expert_grouped_mm(x, w, read_offsets(offsets, N), cublas_mm_out);
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                            const at::Tensor& w_in, const at::Tensor& offsets_in) {
  check_grouped_mm(x_in, w_in, offsets_in);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == x_in.size(0) && grad_in.size(1) == w_in.size(2),
              "moe_ext: grad_y must have shape [N, out] = [", x_in.size(0), ", ", w_in.size(2), "], got ",
              grad_in.sizes());
  check_same_device(grad_in, x_in, "grad_y", "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool transposed = is_transposed_weight(w_in);
  const at::Tensor x = x_in.contiguous(), offsets = offsets_in.contiguous();
  const at::Tensor w = transposed ? w_in : w_in.contiguous();
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  const int64_t N = x.size(0);
  // grad_w comes back in w's layout (the Meta kernel's promise), so autograd takes it without a copy.
  if (use_torch_grouped_mm(x, w)) {
    const at::Tensor ends = device_group_ends(offsets.to(x.device()), N);
    // grad_x = grad_y @ w[e]^T per row group; grad_w[e] = x[rows]^T @ grad_y[rows] (groups along N,
    // empty groups give zeros), for a transposed w computed as its [E, out, in] storage grad_y[rows]^T @ x[rows].
    at::Tensor grad_x = at::_grouped_mm(grad, w.transpose(1, 2), ends).contiguous();
    if (transposed) return {grad_x, at::_grouped_mm(grad.t(), x, ends).contiguous().transpose(1, 2)};
    return {grad_x, at::_grouped_mm(x.t(), grad, ends).contiguous()};
  }

  return per_expert_grouped_mm_backward(grad, x, w, transposed, read_offsets(offsets, N), cublas_mm_out);
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("grouped_mm", &cuda::grouped_mm_cuda);
  m.impl("grouped_mm_backward", &cuda::grouped_mm_backward_cuda);
}

}  // namespace moe_ext
