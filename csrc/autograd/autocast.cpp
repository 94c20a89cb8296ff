// Autocast wrappers (beside the autograd ones: both are dispatch-key layers above the backends).
// Under torch.autocast the expert matmuls and linear run in the autocast dtype, like nn.Linear; every other op
// keeps its inputs' dtypes (routing math is float32 at least whatever the input).
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "../moe_ext.h"

namespace moe_ext {
namespace {

template <c10::DeviceType device_type>
at::Tensor grouped_mm_autocast(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
  const auto dtype = at::autocast::get_autocast_dtype(device_type);
  return detail::grouped_mm_op().call(at::autocast::cached_cast(dtype, x, device_type),
                                      at::autocast::cached_cast(dtype, w, device_type), offsets);
}

// As nn.Linear under autocast: x, weight and bias in the autocast dtype.
template <c10::DeviceType device_type>
at::Tensor linear_autocast(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
  const auto dtype = at::autocast::get_autocast_dtype(device_type);
  std::optional<at::Tensor> cast_bias;
  if (bias.has_value()) cast_bias = at::autocast::cached_cast(dtype, *bias, device_type);
  return detail::linear_op().call(at::autocast::cached_cast(dtype, x, device_type),
                                  at::autocast::cached_cast(dtype, weight, device_type), cast_bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ext, AutocastCPU, m) {
  m.impl("grouped_mm", &grouped_mm_autocast<c10::DeviceType::CPU>);
  m.impl("linear", &linear_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(moe_ext, AutocastCUDA, m) {
  m.impl("grouped_mm", &grouped_mm_autocast<c10::DeviceType::CUDA>);
  m.impl("linear", &linear_autocast<c10::DeviceType::CUDA>);
}

}  // namespace moe_ext
