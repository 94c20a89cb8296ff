// CUDA kernels of make_plan and expert_choice_plan: CUB stable radix sorts, expert boundaries, and scans.
//
// make_plan, dropless: a stable sort of the assignments a = t * k + j by expert gives the CPU kernel's
// stable placement (histogram + exclusive scan + token-order placement) directly: rows of expert e are
// its assignments in token order, and the expert boundaries are the offsets (the histogram's scan).
// Capacity: a second stable sort orders every expert's assignments by kernels::kept_before (choice-major
// enumeration, then a stable sort by priority, then a stable sort by expert); an assignment is kept when
// its rank is below C, and kept rows are numbered in token order by a scan of the kept flags. Every step
// is a sort, a scan or an elementwise kernel: deterministic, and no host sync but the error check.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#include "cuda_utils.cuh"
#include "plan_launches.cuh"

namespace moe_ext {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> make_plan_cuda(const at::Tensor& indices_in,
                                                                          int64_t num_experts,
                                                                          std::optional<int64_t> capacity,
                                                                          const std::optional<at::Tensor>& priority) {
  check_make_plan(indices_in, num_experts, capacity, priority);
  const c10::cuda::CUDAGuard guard(indices_in.device());
  const at::Tensor indices = indices_in.contiguous();
  const int64_t T = indices.size(0), k = indices.size(1), E = num_experts;
  const int64_t A = T * k;
  TORCH_CHECK(A < std::numeric_limits<int32_t>::max(), "moe_ext: make_plan on CUDA supports fewer than 2^31 - 1 ",
              "assignments (T * k), got ", A);
  const at::Tensor prio = priority.has_value() ? priority->to(at::kDouble).contiguous() : at::Tensor();
  const DeviceChecks checks(indices, kPlanSlots);
  const auto [row_of, token_of, counts, offsets] =
      make_plan_launches(indices, num_experts, capacity, prio, checks.sink(), current_stream());
  const auto failed = checks.read();
  if (const int64_t bad = failed[kBadIndex]; bad != kNoError) {
    TORCH_CHECK(false, "moe_ext: indices[", bad / k, ", ", bad % k, "] = ", indices.view(-1)[bad].item<int64_t>(),
                " is outside [0, num_experts = ", E, ")");
  }
  TORCH_CHECK(failed[kPriorityNaN] == kNoError, "moe_ext: priority must not contain NaN");
  return {row_of, token_of, counts, offsets};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_choice_plan_cuda(const at::Tensor& scores_in,
                                                                                   int64_t capacity) {
  check_expert_choice_plan(scores_in, capacity);
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.to(routing_dtype(scores_in.scalar_type())).contiguous();
  const int64_t items = scores.size(0) * scores.size(1);
  TORCH_CHECK(items < std::numeric_limits<int32_t>::max(),
              "moe_ext: expert_choice_plan on CUDA supports fewer than 2^31 - 1 scores (T * E), got ", items);
  const DeviceChecks checks(scores, 1);
  const auto [row_of, token_of, counts, offsets] =
      expert_choice_plan_launches(scores, capacity, checks.sink(), current_stream());
  TORCH_CHECK(checks.read()[0] == kNoError, "moe_ext: scores must not contain NaN");
  return {row_of, token_of, counts, offsets};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("make_plan", &cuda::make_plan_cuda);
  m.impl("expert_choice_plan", &cuda::expert_choice_plan_cuda);
}

}  // namespace moe_ext
