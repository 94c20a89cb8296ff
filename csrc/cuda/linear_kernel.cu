// CUDA kernels of linear and its backward: cuBLAS GEMMs (bitwise reproducible for a given GPU and
// library version) and the bias gradient as torch's column sum in the accumulation type.
#include <torch/library.h>

#include "../checks.h"
#include "cuda_utils.cuh"

namespace moe_ext {
namespace cuda {
namespace {

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_linear(x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  if (bias.has_value()) return at::addmm(bias->expand({x.size(0), weight.size(0)}), x, weight.t()).contiguous();
  return at::mm(x, weight.t()).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x,
                                                                    const at::Tensor& weight, bool with_bias) {
  check_linear_backward(grad_in, x, weight);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor grad = grad_in.to(x.scalar_type());
  at::Tensor grad_b = at::empty({with_bias ? weight.size(0) : 0}, weight.options());
  if (with_bias) {
    const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    grad_b = grad.sum(0, /*keepdim=*/false, acc).to(weight.scalar_type());
  }
  return {at::mm(grad, weight).contiguous(), at::mm(grad.t(), x).contiguous(), grad_b};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("linear", &cuda::linear_cuda);
  m.impl("linear_backward", &cuda::linear_backward_cuda);
}

}  // namespace moe_ext
