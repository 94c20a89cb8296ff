// CUDA kernels of dispatch and combine and their backward: vectorized row gathers and per-token weighted sums.
//
// No atomics anywhere: every output row has one writer (a token's row of grad_x / y, or a row of x_sorted /
// grad_y_sorted through its owning (t, j), as in the CPU kernel), and sums run over j in order in the
// accumulation type, so the results are deterministic and match the CPU kernels' rounding steps.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../checks.h"
#include "../kernels/permute.h"
#include "../kernels/plan.h"
#include "cuda_utils.cuh"
#include "permute_kernels.cuh"

namespace moe_ext {
namespace cuda {
namespace {

const char* plan_error_text(PlanError error) {
  switch (error) {
    case PlanError::kRowOutOfRange:
      return "row_of holds a row outside [-1, N)";
    case PlanError::kRowNotOwned:
      return "row_of[t, j] = r but token_of[r] != t";
    case PlanError::kDuplicateRow:
      return "row_of lists the same row twice for one token";
    case PlanError::kTokenOutOfRange:
      return "token_of holds a token outside [-1, T)";
    case PlanError::kRowNotListed:
      return "token_of[r] = t but row_of[t] does not list r";
    default:
      return "ok";
  }
}

// Starts the validation of a plan on the current stream; its result is read after the op's own kernels,
// which never index out of bounds whatever the plan holds.
DeviceChecks launch_plan_validation(const at::Tensor& row_of, const at::Tensor& token_of, cudaStream_t stream) {
  DeviceChecks checks(row_of, kPlanCheckSlots);
  const int64_t T = row_of.size(0), k = row_of.size(1), N = token_of.size(0);
  if (T > 0 || N > 0) {
    validate_plan_kernel<<<blocks_for(std::max(T, N)), kThreads, 0, stream>>>(
        row_of.const_data_ptr<int64_t>(), token_of.const_data_ptr<int64_t>(), T, k, N, checks.sink());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return checks;
}

void raise_plan_errors(const DeviceChecks& checks, int64_t T, int64_t N) {
  const auto failed = checks.read();
  if (const int64_t key = failed[kTokenSide]; key != kNoError) {
    TORCH_CHECK(false, "moe_ext: inconsistent routing plan at token ", key / kCodeBits, ": ",
                plan_error_text(static_cast<PlanError>(key % kCodeBits)), " (N = ", N,
                "); pass a plan made by make_plan");
  }
  if (const int64_t key = failed[kRowSide]; key != kNoError) {
    TORCH_CHECK(false, "moe_ext: inconsistent routing plan at row ", key / kCodeBits, ": ",
                plan_error_text(static_cast<PlanError>(key % kCodeBits)), " (T = ", T,
                "); pass a plan made by make_plan");
  }
}

// ---------------------------------------------------------------------------------------------------------
// Ops

at::Tensor dispatch_cuda(const at::Tensor& x_in, const at::Tensor& token_of_in, const at::Tensor& row_of_in) {
  check_dispatch(x_in, token_of_in, row_of_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), token_of = token_of_in.contiguous(), row_of = row_of_in.contiguous();
  const cudaStream_t stream = current_stream();
  const DeviceChecks checks = launch_plan_validation(row_of, token_of, stream);
  const int64_t T = x.size(0), N = token_of.size(0), H = x.size(1);
  at::Tensor out = at::empty({N, H}, x.options());
  const int64_t row_bytes = H * static_cast<int64_t>(x.element_size());
  if (N > 0 && row_bytes > 0) {
    const void* src = x.const_data_ptr();
    void* dst = out.mutable_data_ptr();
    const int64_t* tokens = token_of.const_data_ptr<int64_t>();
    // The widest unit (16 bytes = one 128-bit load) that divides the row and both buffers' alignment.
    int64_t unit = 16;
    while (unit > 1 && (row_bytes % unit != 0 || !aligned_to(src, unit) || !aligned_to(dst, unit))) unit /= 2;
    const int64_t units = row_bytes / unit;
    const unsigned int grid = blocks_for(N * units);
    switch (unit) {
      case 16:
        gather_rows_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const uint4*>(src), tokens, T, N, units,
                                                          static_cast<uint4*>(dst));
        break;
      case 8:
        gather_rows_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const uint2*>(src), tokens, T, N, units,
                                                          static_cast<uint2*>(dst));
        break;
      case 4:
        gather_rows_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const uint32_t*>(src), tokens, T, N, units,
                                                          static_cast<uint32_t*>(dst));
        break;
      case 2:
        gather_rows_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const uint16_t*>(src), tokens, T, N, units,
                                                          static_cast<uint16_t*>(dst));
        break;
      default:
        gather_rows_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const uint8_t*>(src), tokens, T, N, units,
                                                          static_cast<uint8_t*>(dst));
        break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  raise_plan_errors(checks, T, N);
  return out;
}

// Launches weighted_row_sum_kernel with the widest vector the rows allow.
template <typename scalar_t, typename acc>
void launch_weighted_row_sum(const scalar_t* rows, const acc* weights, const int64_t* row_of, int64_t T, int64_t k,
                             int64_t N, int64_t H, scalar_t* out, cudaStream_t stream) {
  if (T == 0 || H == 0) return;
  with_vector_width<scalar_t>(vector_elems(H, sizeof(scalar_t), {rows, out}), [&](auto width) {
    constexpr int kVec = decltype(width)::value;
    weighted_row_sum_kernel<scalar_t, acc, kVec>
        <<<blocks_for(T * (H / kVec)), kThreads, 0, stream>>>(rows, weights, row_of, T, k, N, H, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor dispatch_backward_cuda(const at::Tensor& grad_in, const at::Tensor& token_of_in,
                                  const at::Tensor& row_of_in) {
  check_floating(grad_in, "grad_x_sorted");
  check_dim(grad_in, 2, "grad_x_sorted", "[N, H]");
  check_plan_tensors(token_of_in, row_of_in, grad_in, "grad_x_sorted");
  TORCH_CHECK(grad_in.size(0) == token_of_in.size(0), "moe_ext: grad_x_sorted must have N = ", token_of_in.size(0),
              " rows, got ", grad_in.size(0));
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous(), token_of = token_of_in.contiguous(), row_of = row_of_in.contiguous();
  const cudaStream_t stream = current_stream();
  const DeviceChecks checks = launch_plan_validation(row_of, token_of, stream);
  const int64_t T = row_of.size(0), k = row_of.size(1), N = grad.size(0), H = grad.size(1);
  at::Tensor grad_x = at::empty({T, H}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "dispatch_backward_cuda", [&] {
    using acc = at::opmath_type<scalar_t>;
    launch_weighted_row_sum<scalar_t, acc>(grad.const_data_ptr<scalar_t>(), nullptr, row_of.const_data_ptr<int64_t>(),
                                           T, k, N, H, grad_x.mutable_data_ptr<scalar_t>(), stream);
  });
  raise_plan_errors(checks, T, N);
  return grad_x;
}

at::Tensor combine_cuda(const at::Tensor& y_in, const at::Tensor& weights_in, const at::Tensor& row_of_in,
                        const at::Tensor& token_of_in) {
  check_combine(y_in, weights_in, row_of_in, token_of_in);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor y = y_in.contiguous(), row_of = row_of_in.contiguous(), token_of = token_of_in.contiguous();
  const cudaStream_t stream = current_stream();
  const DeviceChecks checks = launch_plan_validation(row_of, token_of, stream);
  const int64_t T = row_of.size(0), k = row_of.size(1), N = y.size(0), H = y.size(1);
  at::Tensor out = at::empty({T, H}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "combine_cuda", [&] {
    using acc = at::opmath_type<scalar_t>;
    const at::Tensor w = weights_in.to(c10::CppTypeToScalarType<acc>::value).contiguous();
    launch_weighted_row_sum<scalar_t, acc>(y.const_data_ptr<scalar_t>(), w.const_data_ptr<acc>(),
                                           row_of.const_data_ptr<int64_t>(), T, k, N, H,
                                           out.mutable_data_ptr<scalar_t>(), stream);
  });
  raise_plan_errors(checks, T, N);
  return out;
}

std::tuple<at::Tensor, at::Tensor> combine_backward_cuda(const at::Tensor& grad_in, const at::Tensor& y_in,
                                                         const at::Tensor& weights_in, const at::Tensor& row_of_in,
                                                         const at::Tensor& token_of_in) {
  check_combine(y_in, weights_in, row_of_in, token_of_in);
  check_floating(grad_in, "grad_y");
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == row_of_in.size(0) && grad_in.size(1) == y_in.size(1),
              "moe_ext: grad_y must have shape [T, H] = [", row_of_in.size(0), ", ", y_in.size(1), "], got ",
              grad_in.sizes());
  check_same_device(grad_in, y_in, "grad_y", "y_sorted");
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor y = y_in.contiguous(), row_of = row_of_in.contiguous(), token_of = token_of_in.contiguous();
  const at::Tensor grad = grad_in.to(y.scalar_type()).contiguous();
  const cudaStream_t stream = current_stream();
  const DeviceChecks checks = launch_plan_validation(row_of, token_of, stream);
  const int64_t T = row_of.size(0), k = row_of.size(1), N = y.size(0), H = y.size(1);
  at::Tensor grad_y_sorted = at::empty({N, H}, y.options());
  at::Tensor grad_weights;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "combine_backward_cuda", [&] {
    using acc = at::opmath_type<scalar_t>;
    const at::Tensor w = weights_in.to(c10::CppTypeToScalarType<acc>::value).contiguous();
    const acc* w_ptr = w.const_data_ptr<acc>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const int64_t* rows = row_of.const_data_ptr<int64_t>();
    scalar_t* gy = grad_y_sorted.mutable_data_ptr<scalar_t>();
    if (N > 0 && H > 0) {
      with_vector_width<scalar_t>(vector_elems(H, sizeof(scalar_t), {g, gy}), [&](auto width) {
        constexpr int kVec = decltype(width)::value;
        scale_owned_rows_kernel<scalar_t, acc, kVec><<<blocks_for(N * (H / kVec)), kThreads, 0, stream>>>(
            g, w_ptr, rows, token_of.const_data_ptr<int64_t>(), T, k, N, H, gy);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    at::Tensor gw = at::empty({T, k}, w.options());
    if (T * k > 0) {
      row_dot_kernel<scalar_t, acc><<<blocks_for(T * k * 32), kThreads, 0, stream>>>(
          g, y.const_data_ptr<scalar_t>(), rows, T, k, N, H, gw.mutable_data_ptr<acc>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    grad_weights = gw.to(weights_in.scalar_type());
  });
  raise_plan_errors(checks, T, N);
  return {grad_y_sorted, grad_weights};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("dispatch", &cuda::dispatch_cuda);
  m.impl("dispatch_backward", &cuda::dispatch_backward_cuda);
  m.impl("combine", &cuda::combine_cuda);
  m.impl("combine_backward", &cuda::combine_backward_cuda);
}

}  // namespace moe_ext
