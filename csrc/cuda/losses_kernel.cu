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

namespace moe_ext {
namespace cuda {
namespace {

// Experts whose counts fit a block's shared-memory histogram (8 bytes each, within 48 KiB).
constexpr int64_t kSharedHistogram = 6144;

// counts[e] = number of valid indices equal to e; an index outside [0, E) is reported by flat position.
template <bool kShared>
__global__ void expert_counts_kernel(const int64_t* __restrict__ indices, int64_t num_indices, int64_t num_experts,
                                     unsigned long long* __restrict__ counts, ErrorSink sink) {
  extern __shared__ unsigned long long histogram[];
  if (kShared) {
    for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) histogram[e] = 0;
    __syncthreads();
  }
  MOE_EXT_GRID_STRIDE_LOOP(a, num_indices) {
    const int64_t e = indices[a];
    if (e < 0 || e >= num_experts) {
      sink.report(0, a);
      continue;
    }
    atomicAdd(kShared ? histogram + e : counts + e, 1ull);
  }
  if (kShared) {
    __syncthreads();
    for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) {
      if (histogram[e] != 0) atomicAdd(counts + e, histogram[e]);
    }
  }
}

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
  if (num_experts <= kSharedHistogram) {
    const size_t shared = static_cast<size_t>(num_experts) * sizeof(unsigned long long);
    expert_counts_kernel<true>
        <<<std::min(blocks_for(n), 1024u), kThreads, shared, stream>>>(idx, n, num_experts, count_ptr, checks.sink());
  } else {
    expert_counts_kernel<false><<<blocks_for(n), kThreads, 0, stream>>>(idx, n, num_experts, count_ptr, checks.sink());
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

// partial[b, c] = sum of value(r, c) over rows r of block b (kReduceBlock rows), in row order.
template <typename scalar_t, typename acc>
__global__ void block_column_sums_kernel(const scalar_t* __restrict__ values, int64_t rows, int64_t width,
                                         acc* __restrict__ partial) {
  const int64_t blocks = (rows + kReduceBlock - 1) / kReduceBlock;
  MOE_EXT_GRID_STRIDE_LOOP(i, blocks * width) {
    const int64_t b = i / width, c = i - b * width;
    const int64_t end = (b + 1) * kReduceBlock < rows ? (b + 1) * kReduceBlock : rows;
    acc sum = 0;
    for (int64_t r = b * kReduceBlock; r < end; ++r) sum += static_cast<acc>(values[r * width + c]);
    partial[i] = sum;
  }
}

// totals[c] = sum over the blocks, in order.
template <typename acc>
__global__ void sum_blocks_kernel(const acc* __restrict__ partial, int64_t blocks, int64_t width,
                                  acc* __restrict__ totals) {
  MOE_EXT_GRID_STRIDE_LOOP(c, width) {
    acc total = 0;
    for (int64_t b = 0; b < blocks; ++b) total += partial[b * width + c];
    totals[c] = total;
  }
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

// loss = E * sum_e count_e * column_sum_e / T^2, added over e in order, rounding like the CPU kernel.
template <typename scalar_t, typename acc>
__global__ void load_balancing_finish_kernel(const acc* __restrict__ column_sums, const int64_t* __restrict__ counts,
                                             int64_t num_tokens, int64_t num_experts, scalar_t* __restrict__ loss) {
  acc total = 0;
  for (int64_t e = 0; e < num_experts; ++e) total += mul_rn(static_cast<acc>(counts[e]), column_sums[e]);
  const acc value = num_tokens > 0 ? static_cast<acc>(num_experts) * total /
                                         (static_cast<acc>(num_tokens) * static_cast<acc>(num_tokens))
                                   : acc(0);
  *loss = static_cast<scalar_t>(value);
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

template <typename scalar_t, typename acc>
__device__ __forceinline__ void token_logsumexp(const scalar_t* row, int64_t num_experts, acc& max_logit, acc& sum) {
  acc m = kernels::neg_infinity<acc>();
  for (int64_t e = 0; e < num_experts; ++e) {
    const acc x = static_cast<acc>(row[e]);
    m = m < x ? x : m;  // std::max(m, x), NaN handling included
  }
  acc total = 0;
  for (int64_t e = 0; e < num_experts; ++e) total += std::exp(static_cast<acc>(row[e]) - m);
  max_logit = m;
  sum = total;
}

template <typename scalar_t, typename acc>
__global__ void squared_logsumexp_kernel(const scalar_t* __restrict__ logits, int64_t num_tokens, int64_t num_experts,
                                         acc* __restrict__ squared) {
  MOE_EXT_GRID_STRIDE_LOOP(t, num_tokens) {
    acc m, sum;
    token_logsumexp<scalar_t, acc>(logits + t * num_experts, num_experts, m, sum);
    const acc lse = m + std::log(sum);
    squared[t] = lse * lse;
  }
}

template <typename acc>
__global__ void mean_finish_kernel(const acc* __restrict__ total, int64_t num_tokens, acc* __restrict__ loss) {
  *loss = num_tokens > 0 ? total[0] / static_cast<acc>(num_tokens) : acc(0);
}

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

// d/dl[t, e] = g * 2 * lse_t / T * softmax(l_t)[e], with g read on the device (no host sync).
template <typename scalar_t, typename acc>
__global__ void router_z_loss_backward_kernel(const acc* __restrict__ grad, const scalar_t* __restrict__ logits,
                                              int64_t num_tokens, int64_t num_experts, scalar_t* __restrict__ out) {
  const acc g = *grad;
  MOE_EXT_GRID_STRIDE_LOOP(t, num_tokens) {
    const scalar_t* row = logits + t * num_experts;
    acc m, sum;
    token_logsumexp<scalar_t, acc>(row, num_experts, m, sum);
    const acc lse = m + std::log(sum);
    const acc factor = g * acc(2) * lse / static_cast<acc>(num_tokens) / sum;
    for (int64_t e = 0; e < num_experts; ++e) {
      out[t * num_experts + e] = static_cast<scalar_t>(factor * std::exp(static_cast<acc>(row[e]) - m));
    }
  }
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
