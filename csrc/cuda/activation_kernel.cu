// CUDA kernels of the fused SwiGLU activation: one thread per (row, column) element of the output, the
// per-element math of kernels/activation.h (shared with the CPU kernels, fast_exp included).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../activation_checks.h"
#include "../kernels/activation.h"
#include "activation_kernels.cuh"
#include "cuda_utils.cuh"

namespace moe_ext {
namespace cuda {
namespace {

at::Tensor swiglu_cuda(const at::Tensor& h_in) {
  check_swiglu(h_in);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous();
  const int64_t N = h.size(0), F = h.size(1) / 2;
  at::Tensor out = at::empty({N, F}, h.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "swiglu_cuda", [&] {
    swiglu_kernel<scalar_t><<<blocks_for(N * F), kThreads, 0, current_stream()>>>(h.const_data_ptr<scalar_t>(), N, F,
                                                                                  out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor swiglu_backward_cuda(const at::Tensor& grad_in, const at::Tensor& h_in) {
  check_swiglu_backward(grad_in, h_in);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous(), grad = grad_in.contiguous();
  const int64_t N = h.size(0), F = h.size(1) / 2;
  at::Tensor grad_h = at::empty({N, 2 * F}, h.options());
  if (grad_h.numel() == 0) return grad_h;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "swiglu_backward_cuda", [&] {
    swiglu_backward_kernel<scalar_t><<<blocks_for(N * F), kThreads, 0, current_stream()>>>(
        grad.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), N, F, grad_h.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_h;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("swiglu", &cuda::swiglu_cuda);
  m.impl("swiglu_backward", &cuda::swiglu_backward_cuda);
}

}  // namespace moe_ext
