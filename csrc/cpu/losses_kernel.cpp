// CPU kernels of the auxiliary losses (load balancing, router z-loss) and their backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../checks.h"
#include "../kernels/plan.h"
#include "cpu_utils.h"

namespace moe_ext {
namespace {

// count_e for every expert, validating every index.
std::vector<int64_t> expert_counts(const at::Tensor& indices_in, int64_t num_experts) {
  const at::Tensor indices = indices_in.contiguous();
  std::vector<int64_t> counts(static_cast<size_t>(num_experts), 0);
  const int64_t first_bad =
      kernels::count_experts(indices.const_data_ptr<int64_t>(), 0, indices.numel(), num_experts, counts.data());
  TORCH_CHECK(first_bad < 0, "moe_ext: indices holds ",
              indices.const_data_ptr<int64_t>()[std::max<int64_t>(first_bad, 0)], " at flat position ", first_bad,
              ", outside [0, num_experts = ", num_experts, ")");
  return counts;
}

at::Tensor load_balancing_loss_cpu(const at::Tensor& scores_in, const at::Tensor& indices, int64_t num_experts) {
  check_load_balancing_loss(scores_in, indices, num_experts);
  const at::Tensor scores = scores_in.contiguous();
  const int64_t T = scores.size(0), E = num_experts;
  const auto counts = expert_counts(indices, E);
  at::Tensor loss = at::empty({}, scores.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, scores.scalar_type(), "load_balancing_loss_cpu", [&] {
    using acc = at::opmath_type<scalar_t>;
    const scalar_t* s = scores.const_data_ptr<scalar_t>();
    const auto column_sums =
        cpu::blocked_column_sums<acc>(T, E, [&](int64_t t, int64_t e) { return static_cast<acc>(s[t * E + e]); });
    // E * sum_e (count_e / T) * (sum_t s[t, e] / T)
    acc total = 0;
    for (int64_t e = 0; e < E; ++e) total += static_cast<acc>(counts[e]) * column_sums[e];
    const acc value = T > 0 ? static_cast<acc>(E) * total / (static_cast<acc>(T) * static_cast<acc>(T)) : acc(0);
    loss.fill_(value);
  });
  return loss;
}

at::Tensor load_balancing_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& scores_in,
                                            const at::Tensor& indices, int64_t num_experts) {
  check_load_balancing_loss(scores_in, indices, num_experts);
  const int64_t T = scores_in.size(0), E = num_experts;
  const auto counts = expert_counts(indices, E);
  const auto acc_dtype = routing_dtype(scores_in.scalar_type());
  // d loss / d s[t, e] = E * count_e / T^2, the same for every token.
  at::Tensor per_expert = at::empty({E}, scores_in.options().dtype(at::kDouble));
  double* ptr = per_expert.mutable_data_ptr<double>();
  for (int64_t e = 0; e < E; ++e) {
    ptr[e] = T > 0 ? static_cast<double>(E) * static_cast<double>(counts[e]) / (static_cast<double>(T) * T) : 0.0;
  }
  const at::Tensor g = grad.to(acc_dtype).reshape({});
  return (per_expert.to(acc_dtype) * g).expand({T, E}).to(scores_in.scalar_type()).contiguous();
}

at::Tensor router_z_loss_cpu(const at::Tensor& logits_in) {
  check_router_z_loss(logits_in);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto acc_dtype = routing_dtype(logits.scalar_type());
  at::Tensor loss = at::empty({}, logits.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "router_z_loss_cpu", [&] {
    using acc = at::opmath_type<scalar_t>;
    const scalar_t* l = logits.const_data_ptr<scalar_t>();
    std::vector<acc> squared(static_cast<size_t>(T));
    at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* row = l + t * E;
        acc m = -std::numeric_limits<acc>::infinity();
        for (int64_t e = 0; e < E; ++e) m = std::max(m, static_cast<acc>(row[e]));
        acc sum = 0;
        for (int64_t e = 0; e < E; ++e) sum += std::exp(static_cast<acc>(row[e]) - m);
        const acc lse = m + std::log(sum);
        squared[t] = lse * lse;
      }
    });
    const auto total = cpu::blocked_column_sums<acc>(T, 1, [&](int64_t t, int64_t) { return squared[t]; });
    loss.fill_(T > 0 ? total[0] / static_cast<acc>(T) : acc(0));
  });
  return loss;
}

at::Tensor router_z_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& logits_in) {
  check_router_z_loss(logits_in);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  at::Tensor grad_logits = at::empty({T, E}, logits.options());
  const auto acc_dtype = routing_dtype(logits.scalar_type());
  const at::Tensor g_host = grad.to(at::kCPU, acc_dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "router_z_loss_backward_cpu", [&] {
    using acc = at::opmath_type<scalar_t>;
    const acc g = g_host.item<acc>();
    const scalar_t* l = logits.const_data_ptr<scalar_t>();
    scalar_t* out = grad_logits.mutable_data_ptr<scalar_t>();
    // d/dl[t, e] = g * 2 * lse_t / T * softmax(l_t)[e]
    at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* row = l + t * E;
        acc m = -std::numeric_limits<acc>::infinity();
        for (int64_t e = 0; e < E; ++e) m = std::max(m, static_cast<acc>(row[e]));
        acc sum = 0;
        for (int64_t e = 0; e < E; ++e) sum += std::exp(static_cast<acc>(row[e]) - m);
        const acc lse = m + std::log(sum);
        const acc factor = g * acc(2) * lse / static_cast<acc>(T) / sum;
        for (int64_t e = 0; e < E; ++e) {
          out[t * E + e] = static_cast<scalar_t>(factor * std::exp(static_cast<acc>(row[e]) - m));
        }
      }
    });
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ext, CPU, m) {
  m.impl("load_balancing_loss", &load_balancing_loss_cpu);
  m.impl("load_balancing_loss_backward", &load_balancing_loss_backward_cpu);
  m.impl("router_z_loss", &router_z_loss_cpu);
  m.impl("router_z_loss_backward", &router_z_loss_backward_cpu);
}

}  // namespace moe_ext
