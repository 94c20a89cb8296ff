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

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include "../checks.h"
#include "cuda_utils.cuh"
#include "plan_kernels.cuh"
#include "plan_steps.cuh"

namespace moe_ext {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------------------
// CUB wrappers: query the temporary storage, allocate it from the caching allocator, run.

template <typename key_t>
void sort_pairs(const key_t* keys_in, key_t* keys_out, const int32_t* values_in, int32_t* values_out, int64_t n,
                int end_bit, bool descending, const at::Tensor& like, cudaStream_t stream) {
  const int items = static_cast<int>(n);
  const int begin_bit = 0;
  size_t bytes = 0;
  if (descending) {
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(nullptr, bytes, keys_in, keys_out, values_in, values_out,
                                                             items, begin_bit, end_bit, stream));
    at::Tensor storage = cub_storage(bytes, like);
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(storage.mutable_data_ptr(), bytes, keys_in, keys_out,
                                                             values_in, values_out, items, begin_bit, end_bit, stream));
  } else {
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys_in, keys_out, values_in, values_out, items,
                                                   begin_bit, end_bit, stream));
    at::Tensor storage = cub_storage(bytes, like);
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(storage.mutable_data_ptr(), bytes, keys_in, keys_out, values_in,
                                                   values_out, items, begin_bit, end_bit, stream));
  }
}

void exclusive_sum(const int32_t* in, int32_t* out, int64_t n, const at::Tensor& like, cudaStream_t stream) {
  const int items = static_cast<int>(n);
  size_t bytes = 0;
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, bytes, in, out, items, stream));
  at::Tensor storage = cub_storage(bytes, like);
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(storage.mutable_data_ptr(), bytes, in, out, items, stream));
}

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
  const auto long_opts = indices.options().dtype(at::kLong);
  const auto int_opts = indices.options().dtype(at::kInt);
  at::Tensor row_of = at::empty({T, k}, long_opts);
  at::Tensor counts = at::empty({E}, long_opts);
  at::Tensor dropless_offsets = at::empty({E + 1}, long_opts);
  at::Tensor token_of = capacity.has_value() ? at::full({E * *capacity}, -1, long_opts) : at::empty({A}, long_opts);
  at::Tensor offsets = capacity.has_value() ? at::arange(E + 1, long_opts) * *capacity : dropless_offsets;
  const at::Tensor prio = priority.has_value() ? priority->to(at::kDouble).contiguous() : at::Tensor();
  const double* prio_ptr = prio.defined() ? prio.const_data_ptr<double>() : nullptr;
  const DeviceChecks checks(indices, kPlanSlots);
  const cudaStream_t stream = current_stream();
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  const unsigned int grid = blocks_for(A + 1);

  // Dropless order: assignments stably sorted by expert.
  at::Tensor keys = at::empty({A}, int_opts), assignments = at::empty({A}, int_opts);
  at::Tensor sorted_keys = at::empty({A}, int_opts), sorted = at::empty({A}, int_opts);
  assignment_keys_kernel<<<grid, kThreads, 0, stream>>>(idx, prio_ptr, A, E, keys.mutable_data_ptr<int32_t>(),
                                                        assignments.mutable_data_ptr<int32_t>(), checks.sink());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (A > 0) {
    sort_pairs<int32_t>(keys.const_data_ptr<int32_t>(), sorted_keys.mutable_data_ptr<int32_t>(),
                        assignments.const_data_ptr<int32_t>(), sorted.mutable_data_ptr<int32_t>(), A,
                        steps::key_bits(E), /*descending=*/false, indices, stream);
  }
  boundaries_kernel<<<grid, kThreads, 0, stream>>>(sorted_keys.const_data_ptr<int32_t>(), A, E,
                                                   dropless_offsets.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  counts_kernel<<<blocks_for(E), kThreads, 0, stream>>>(dropless_offsets.const_data_ptr<int64_t>(), E,
                                                        counts.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (!capacity.has_value()) {
    place_dropless_kernel<<<grid, kThreads, 0, stream>>>(
        sorted_keys.const_data_ptr<int32_t>(), sorted.const_data_ptr<int32_t>(), A, E, k,
        row_of.mutable_data_ptr<int64_t>(), token_of.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (A > 0) {
    const int64_t C = *capacity;
    // Kept order (kernels::kept_before): choice-major, then stably by priority (descending), then
    // stably by expert; the rank within an expert's segment decides what is kept.
    at::Tensor order = at::empty({A}, int_opts);
    at::Tensor prio_keys = at::empty({prio.defined() ? A : 0}, prio.defined() ? prio.options() : indices.options());
    choice_major_kernel<<<grid, kThreads, 0, stream>>>(prio_ptr, T, k, order.mutable_data_ptr<int32_t>(),
                                                       prio.defined() ? prio_keys.mutable_data_ptr<double>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (prio.defined()) {
      at::Tensor prio_sorted = at::empty({A}, prio.options()), order_sorted = at::empty({A}, int_opts);
      sort_pairs<double>(prio_keys.const_data_ptr<double>(), prio_sorted.mutable_data_ptr<double>(),
                         order.const_data_ptr<int32_t>(), order_sorted.mutable_data_ptr<int32_t>(), A, 64,
                         /*descending=*/true, indices, stream);
      order = order_sorted;
    }
    at::Tensor ranked_keys_in = at::empty({A}, int_opts);
    expert_keys_of_kernel<<<grid, kThreads, 0, stream>>>(idx, order.const_data_ptr<int32_t>(), A, E,
                                                         ranked_keys_in.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor ranked_keys = at::empty({A}, int_opts), ranked = at::empty({A}, int_opts);
    sort_pairs<int32_t>(ranked_keys_in.const_data_ptr<int32_t>(), ranked_keys.mutable_data_ptr<int32_t>(),
                        order.const_data_ptr<int32_t>(), ranked.mutable_data_ptr<int32_t>(), A, steps::key_bits(E),
                        /*descending=*/false, indices, stream);

    at::Tensor keep = at::empty({A}, int_opts), kept_flags = at::empty({A}, int_opts);
    at::Tensor kept_scan = at::empty({A}, int_opts);
    capacity_keep_kernel<<<grid, kThreads, 0, stream>>>(
        ranked_keys.const_data_ptr<int32_t>(), ranked.const_data_ptr<int32_t>(),
        dropless_offsets.const_data_ptr<int64_t>(), prio_ptr, A, E, C, keep.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gather_keep_kernel<<<grid, kThreads, 0, stream>>>(keep.const_data_ptr<int32_t>(), sorted.const_data_ptr<int32_t>(),
                                                      A, kept_flags.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    exclusive_sum(kept_flags.const_data_ptr<int32_t>(), kept_scan.mutable_data_ptr<int32_t>(), A, indices, stream);
    place_capacity_kernel<<<grid, kThreads, 0, stream>>>(
        sorted_keys.const_data_ptr<int32_t>(), sorted.const_data_ptr<int32_t>(), kept_flags.const_data_ptr<int32_t>(),
        kept_scan.const_data_ptr<int32_t>(), dropless_offsets.const_data_ptr<int64_t>(), A, E, k, C,
        row_of.mutable_data_ptr<int64_t>(), token_of.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

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
  const int64_t T = scores.size(0), E = scores.size(1), C = capacity;
  const int64_t items = T * E;
  TORCH_CHECK(items < std::numeric_limits<int32_t>::max(),
              "moe_ext: expert_choice_plan on CUDA supports fewer than 2^31 - 1 scores (T * E), got ", items);
  const auto long_opts = scores.options().dtype(at::kLong);
  const auto int_opts = scores.options().dtype(at::kInt);
  const int64_t take = std::min(T, C);
  at::Tensor row_of = at::full({T, E}, -1, long_opts);
  at::Tensor token_of = at::full({E * C}, -1, long_opts);
  at::Tensor counts = at::full({E}, take, long_opts);
  at::Tensor offsets = at::arange(E + 1, long_opts) * C;
  const DeviceChecks checks(scores, 1);
  const cudaStream_t stream = current_stream();
  const unsigned int grid = blocks_for(items);

  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "expert_choice_plan_cuda", [&] {
    at::Tensor keys = at::empty({items}, scores.options()), keys_sorted = at::empty({items}, scores.options());
    at::Tensor tokens = at::empty({items}, int_opts), tokens_sorted = at::empty({items}, int_opts);
    expert_choice_keys_kernel<scalar_t>
        <<<grid, kThreads, 0, stream>>>(scores.const_data_ptr<scalar_t>(), T, E, keys.mutable_data_ptr<scalar_t>(),
                                        tokens.mutable_data_ptr<int32_t>(), checks.sink());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (take == 0) return;
    const at::Tensor segments = at::arange(E + 1, long_opts) * T;
    const int64_t* segment_ptr = segments.const_data_ptr<int64_t>();
    size_t bytes = 0;
    const int end_bit = static_cast<int>(sizeof(scalar_t) * 8);
    C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
        nullptr, bytes, keys.const_data_ptr<scalar_t>(), keys_sorted.mutable_data_ptr<scalar_t>(),
        tokens.const_data_ptr<int32_t>(), tokens_sorted.mutable_data_ptr<int32_t>(), static_cast<int>(items),
        static_cast<int>(E), segment_ptr, segment_ptr + 1, 0, end_bit, stream));
    at::Tensor storage = cub_storage(bytes, scores);
    C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
        storage.mutable_data_ptr(), bytes, keys.const_data_ptr<scalar_t>(), keys_sorted.mutable_data_ptr<scalar_t>(),
        tokens.const_data_ptr<int32_t>(), tokens_sorted.mutable_data_ptr<int32_t>(), static_cast<int>(items),
        static_cast<int>(E), segment_ptr, segment_ptr + 1, 0, end_bit, stream));

    at::Tensor flags = at::zeros({items}, int_opts), scan = at::empty({items}, int_opts);
    expert_choice_flags_kernel<<<blocks_for(E * take), kThreads, 0, stream>>>(
        tokens_sorted.const_data_ptr<int32_t>(), T, E, take, flags.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    exclusive_sum(flags.const_data_ptr<int32_t>(), scan.mutable_data_ptr<int32_t>(), items, scores, stream);
    expert_choice_place_kernel<<<grid, kThreads, 0, stream>>>(
        flags.const_data_ptr<int32_t>(), scan.const_data_ptr<int32_t>(), T, E, C, row_of.mutable_data_ptr<int64_t>(),
        token_of.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
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
