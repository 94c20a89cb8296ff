// CUDA kernels of the fused SwiGLU activation: one thread per (row, column) element of the output, the
// per-element math of kernels/activation.h (shared with the CPU kernels, fast_exp included).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../activation_checks.h"
#include "../kernels/activation.h"
#include "cuda_utils.cuh"

namespace moe_ext {
namespace cuda {
namespace {

template <typename scalar_t>
__global__ void swiglu_kernel(const scalar_t* __restrict__ h, int64_t rows, int64_t width, scalar_t* __restrict__ out) {
  using acc = kernels::acc_t<scalar_t>;
  MOE_EXT_GRID_STRIDE_LOOP(i, rows * width) {
    const int64_t r = i / width, c = i - r * width;
    const scalar_t* row = h + r * 2 * width;
    out[i] =
        static_cast<scalar_t>(kernels::swiglu_forward<acc>(static_cast<acc>(row[c]), static_cast<acc>(row[width + c])));
  }
}

template <typename scalar_t>
__global__ void swiglu_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ h, int64_t rows,
                                       int64_t width, scalar_t* __restrict__ grad_h) {
  using acc = kernels::acc_t<scalar_t>;
  MOE_EXT_GRID_STRIDE_LOOP(i, rows * width) {
    const int64_t r = i / width, c = i - r * width;
    const int64_t at = r * 2 * width + c;
    acc dg, du;
    kernels::swiglu_backward<acc>(static_cast<acc>(h[at]), static_cast<acc>(h[at + width]), static_cast<acc>(grad[i]),
                                  dg, du);
    grad_h[at] = static_cast<scalar_t>(dg);
    grad_h[at + width] = static_cast<scalar_t>(du);
  }
}

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
