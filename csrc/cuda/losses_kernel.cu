// CUDA kernels of the auxiliary losses (load balancing, router z-loss) and their backward.
//
// Deterministic without float atomics: sums run in fixed blocks of kReduceBlock rows (one thread per
// (block, column)), then over the blocks in order -- the CPU kernels' blocked order, so the float sums are
// the CPU's too. Expert counts use integer atomics, which are exact in any order.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../checks.h"
#include "../kernels/common.h"
#include "cuda_utils.cuh"
#include "losses_kernels.cuh"

namespace moe_ext {
namespace cuda {
namespace {

// Launches the count of every expert in `indices` on the stream; the error slot 0 of `checks` says
// whether an index was out of range.
at::Tensor expert_counts(const at::Tensor& indices_in, int64_t num_experts, const DeviceChecks& checks,
                         cudaStream_t stream) {
  const at::Tensor indices = indices_in.contiguous();
  at::Tensor counts = at::zeros({num_experts}, indices.options().dtype(at::kLong));
  const int64_t n = indices.numel();
  if (n == 0) return counts;
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  auto* count_ptr = reinterpret_cast<unsigned long long*>(counts.mutable_data_ptr<int64_t>());
  const unsigned int grid = expert_counts_grid(n, num_experts);
  if (num_experts <= kSharedHistogram) {
    expert_counts_kernel<true><<<grid, kThreads, expert_counts_shared_bytes(num_experts), stream>>>(
        idx, n, num_experts, count_ptr, checks.sink());
  } else {
    expert_counts_kernel<false><<<grid, kThreads, 0, stream>>>(idx, n, num_experts, count_ptr, checks.sink());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return counts;
}

void raise_bad_index(const DeviceChecks& checks, const at::Tensor& indices, int64_t num_experts) {
  const int64_t bad = checks.read()[0];
  if (bad == kNoError) return;
  TORCH_CHECK(false, "moe_ext: indices holds ", indices.reshape(-1)[bad].item<int64_t>(), " at flat position ", bad,
              ", outside [0, num_experts = ", num_experts, ")");
}

// Column sums of a [rows, width] matrix, the CPU's cpu::blocked_column_sums order.
template <typename scalar_t, typename acc>
at::Tensor blocked_column_sums(const scalar_t* values, int64_t rows, int64_t width, const at::TensorOptions& acc_opts,
                               cudaStream_t stream) {
  const int64_t blocks = (rows + kReduceBlock - 1) / kReduceBlock;
  at::Tensor partial = at::empty({blocks, width}, acc_opts);
  at::Tensor totals = at::empty({width}, acc_opts);
  if (blocks * width > 0) {
    block_column_sums_kernel<scalar_t, acc>
        <<<blocks_for(blocks * width), kThreads, 0, stream>>>(values, rows, width, partial.mutable_data_ptr<acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  sum_blocks_kernel<acc><<<blocks_for(width), kThreads, 0, stream>>>(partial.const_data_ptr<acc>(), blocks, width,
                                                                     totals.mutable_data_ptr<acc>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return totals;
}

at::Tensor load_balancing_loss_cuda(const at::Tensor& scores_in, const at::Tensor& indices, int64_t num_experts) {
  check_load_balancing_loss(scores_in, indices, num_experts);
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  const int64_t T = scores.size(0), E = num_experts;
  const cudaStream_t stream = current_stream();
  const DeviceChecks checks(scores, 1);
  const at::Tensor counts = expert_counts(indices, E, checks, stream);
  at::Tensor loss = at::empty({}, scores.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, scores.scalar_type(), "load_balancing_loss_cuda", [&] {
    using acc = at::opmath_type<scalar_t>;
    const auto acc_opts = scores.options().dtype(c10::CppTypeToScalarType<acc>::value);
    const at::Tensor column_sums =
        blocked_column_sums<scalar_t, acc>(scores.const_data_ptr<scalar_t>(), T, E, acc_opts, stream);
    load_balancing_finish_kernel<scalar_t, acc><<<1, 1, 0, stream>>>(
        column_sums.const_data_ptr<acc>(), counts.const_data_ptr<int64_t>(), T, E, loss.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  raise_bad_index(checks, indices, E);
  return loss;
}

at::Tensor load_balancing_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& scores_in,
                                             const at::Tensor& indices, int64_t num_experts) {
  check_load_balancing_loss(scores_in, indices, num_experts);
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const int64_t T = scores_in.size(0), E = num_experts;
  const cudaStream_t stream = current_stream();
  const DeviceChecks checks(scores_in, 1);
  const at::Tensor counts = expert_counts(indices, E, checks, stream);
  const auto acc_dtype = routing_dtype(scores_in.scalar_type());
  // d loss / d s[t, e] = E * count_e / T^2 (in float64, as on CPU), the same for every token.
  const at::Tensor per_expert =
      T > 0 ? counts.to(at::kDouble).mul(static_cast<double>(E)).div(static_cast<double>(T) * static_cast<double>(T))
            : at::zeros({E}, counts.options().dtype(at::kDouble));
  const at::Tensor g = grad.to(scores_in.device(), acc_dtype).reshape({});
  at::Tensor out = (per_expert.to(acc_dtype) * g).expand({T, E}).to(scores_in.scalar_type()).contiguous();
  raise_bad_index(checks, indices, E);
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Router z-loss: mean_t logsumexp(logits[t])^2, one thread per token with the CPU kernel's arithmetic.

at::Tensor router_z_loss_cuda(const at::Tensor& logits_in) {
  check_router_z_loss(logits_in);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto acc_opts = logits.options().dtype(routing_dtype(logits.scalar_type()));
  at::Tensor loss = at::empty({}, acc_opts);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "router_z_loss_cuda", [&] {
    using acc = at::opmath_type<scalar_t>;
    at::Tensor squared = at::empty({T}, acc_opts);
    if (T > 0) {
      squared_logsumexp_kernel<scalar_t, acc><<<blocks_for(T), kThreads, 0, stream>>>(
          logits.const_data_ptr<scalar_t>(), T, E, squared.mutable_data_ptr<acc>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const at::Tensor total = blocked_column_sums<acc, acc>(squared.const_data_ptr<acc>(), T, 1, acc_opts, stream);
    mean_finish_kernel<acc><<<1, 1, 0, stream>>>(total.const_data_ptr<acc>(), T, loss.mutable_data_ptr<acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return loss;
}

at::Tensor router_z_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& logits_in) {
  check_router_z_loss(logits_in);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  at::Tensor grad_logits = at::empty({T, E}, logits.options());
  const auto acc_dtype = routing_dtype(logits.scalar_type());
  const at::Tensor g = grad.to(logits.device(), acc_dtype).contiguous();
  if (T == 0 || E == 0) return grad_logits;
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "router_z_loss_backward_cuda", [&] {
    using acc = at::opmath_type<scalar_t>;
    router_z_loss_backward_kernel<scalar_t, acc><<<blocks_for(T), kThreads, 0, stream>>>(
        g.const_data_ptr<acc>(), logits.const_data_ptr<scalar_t>(), T, E, grad_logits.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_logits;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("load_balancing_loss", &cuda::load_balancing_loss_cuda);
  m.impl("load_balancing_loss_backward", &cuda::load_balancing_loss_backward_cuda);
  m.impl("router_z_loss", &cuda::router_z_loss_cuda);
  m.impl("router_z_loss_backward", &cuda::router_z_loss_backward_cuda);
}

}  // namespace moe_ext
