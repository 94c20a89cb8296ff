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

namespace moe_ext {
namespace cuda {
namespace {

using kernels::PlanError;

// ---------------------------------------------------------------------------------------------------------
// Plan validation (the CPU kernel's validate_plan, same checks from kernels/plan.h, same messages).

enum PlanCheckSlot : int { kTokenSide = 0, kRowSide = 1, kPlanCheckSlots = 2 };
constexpr int64_t kCodeBits = 8;  // a slot holds item * kCodeBits + PlanError: the smallest item, with its error

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

__global__ void validate_plan_kernel(const int64_t* __restrict__ row_of, const int64_t* __restrict__ token_of,
                                     int64_t num_tokens, int64_t k, int64_t num_rows, ErrorSink sink) {
  MOE_EXT_GRID_STRIDE_LOOP(i, num_tokens > num_rows ? num_tokens : num_rows) {
    if (i < num_tokens) {
      const PlanError error = kernels::check_token_rows(row_of + i * k, k, i, token_of, num_rows);
      if (error != PlanError::kOk) sink.report(kTokenSide, i * kCodeBits + static_cast<int64_t>(error));
    }
    if (i < num_rows) {
      const PlanError error = kernels::check_row_token(i, token_of, row_of, num_tokens, k);
      if (error != PlanError::kOk) sink.report(kRowSide, i * kCodeBits + static_cast<int64_t>(error));
    }
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
// Kernels

// out[r] = x[token_of[r]], or zeros for an empty row: a byte copy in vec_t units (16 bytes when aligned).
template <typename vec_t>
__global__ void gather_rows_kernel(const vec_t* __restrict__ x, const int64_t* __restrict__ token_of,
                                   int64_t num_tokens, int64_t num_rows, int64_t vecs_per_row,
                                   vec_t* __restrict__ out) {
  MOE_EXT_GRID_STRIDE_LOOP(i, num_rows * vecs_per_row) {
    const int64_t r = i / vecs_per_row, v = i - r * vecs_per_row;
    const int64_t t = token_of[r];
    out[i] = t >= 0 && t < num_tokens ? x[t * vecs_per_row + v] : vec_t{};
  }
}

// out[t] = sum_j w[t, j] * rows[row_of[t, j]] (w = 1 when weights is null), over j in order, in acc.
template <typename scalar_t, typename acc, int kVec>
__global__ void weighted_row_sum_kernel(const scalar_t* __restrict__ rows, const acc* __restrict__ weights,
                                        const int64_t* __restrict__ row_of, int64_t num_tokens, int64_t k,
                                        int64_t num_rows, int64_t hidden, scalar_t* __restrict__ out) {
  using vec_t = Vec<scalar_t, kVec>;
  const int64_t vecs_per_row = hidden / kVec;
  MOE_EXT_GRID_STRIDE_LOOP(i, num_tokens * vecs_per_row) {
    const int64_t t = i / vecs_per_row, v = i - t * vecs_per_row;
    acc sum[kVec];
#pragma unroll
    for (int u = 0; u < kVec; ++u) sum[u] = acc(0);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t r = row_of[t * k + j];
      if (r < 0 || r >= num_rows) continue;
      const acc weight = weights != nullptr ? weights[t * k + j] : acc(1);
      const vec_t in = reinterpret_cast<const vec_t*>(rows + r * hidden)[v];
#pragma unroll
      for (int u = 0; u < kVec; ++u) sum[u] += weight * static_cast<acc>(in.v[u]);
    }
    vec_t result;
#pragma unroll
    for (int u = 0; u < kVec; ++u) result.v[u] = static_cast<scalar_t>(sum[u]);
    reinterpret_cast<vec_t*>(out + t * hidden)[v] = result;
  }
}

// grad_y_sorted[r] = w[t, j] * grad_y[t] for the (t, j) owning row r (kernels::slot_of_row), else zeros.
template <typename scalar_t, typename acc, int kVec>
__global__ void scale_owned_rows_kernel(const scalar_t* __restrict__ grad, const acc* __restrict__ weights,
                                        const int64_t* __restrict__ row_of, const int64_t* __restrict__ token_of,
                                        int64_t num_tokens, int64_t k, int64_t num_rows, int64_t hidden,
                                        scalar_t* __restrict__ out) {
  using vec_t = Vec<scalar_t, kVec>;
  const int64_t vecs_per_row = hidden / kVec;
  MOE_EXT_GRID_STRIDE_LOOP(i, num_rows * vecs_per_row) {
    const int64_t r = i / vecs_per_row, v = i - r * vecs_per_row;
    const int64_t t = token_of[r];
    const int64_t j = t >= 0 && t < num_tokens ? kernels::slot_of_row(row_of + t * k, k, r) : -1;
    vec_t result;
    if (j < 0) {
#pragma unroll
      for (int u = 0; u < kVec; ++u) result.v[u] = scalar_t(0);
    } else {
      const acc weight = weights[t * k + j];
      const vec_t in = reinterpret_cast<const vec_t*>(grad + t * hidden)[v];
#pragma unroll
      for (int u = 0; u < kVec; ++u) result.v[u] = static_cast<scalar_t>(weight * static_cast<acc>(in.v[u]));
    }
    reinterpret_cast<vec_t*>(out + r * hidden)[v] = result;
  }
}

// grad_weights[t, j] = <grad_y[t], y_sorted[row_of[t, j]]>: one warp per (t, j), lanes striding over h,
// then a fixed butterfly of shuffles: the same summation order on every run.
template <typename scalar_t, typename acc>
__global__ void row_dot_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ y,
                               const int64_t* __restrict__ row_of, int64_t num_tokens, int64_t k, int64_t num_rows,
                               int64_t hidden, acc* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  for (int64_t pair = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; pair < num_tokens * k;
       pair += warps) {
    const int64_t t = pair / k, r = row_of[pair];
    acc partial = 0;
    if (r >= 0 && r < num_rows) {
      for (int64_t h = lane; h < hidden; h += 32) {
        partial += static_cast<acc>(grad[t * hidden + h]) * static_cast<acc>(y[r * hidden + h]);
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) partial += __shfl_xor_sync(0xffffffffu, partial, offset);
    if (lane == 0) out[pair] = partial;
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
