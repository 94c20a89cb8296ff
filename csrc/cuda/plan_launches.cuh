// The launch sequence of make_plan and expert_choice_plan on a stream: CUB's stable radix sorts and scans
// between the kernels of plan_kernels.cuh. plan_kernel.cu runs it on CUDA tensors; the CUDA execution model
// of the tests runs the same code on CPU tensors, with host stand-ins of the CUB algorithms
// (tests/cuda_emulation/cub_standin.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#if !defined(MOE_EXT_CUDA_EMULATION)
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>
#endif

#include "device.cuh"
#include "launch.cuh"
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
    MOE_EXT_CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(nullptr, bytes, keys_in, keys_out, values_in,
                                                                 values_out, items, begin_bit, end_bit, stream));
    at::Tensor storage = cub_storage(bytes, like);
    MOE_EXT_CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(storage.mutable_data_ptr(), bytes, keys_in, keys_out,
                                                                 values_in, values_out, items, begin_bit, end_bit,
                                                                 stream));
  } else {
    MOE_EXT_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys_in, keys_out, values_in, values_out, items,
                                                       begin_bit, end_bit, stream));
    at::Tensor storage = cub_storage(bytes, like);
    MOE_EXT_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(storage.mutable_data_ptr(), bytes, keys_in, keys_out, values_in,
                                                       values_out, items, begin_bit, end_bit, stream));
  }
}

void exclusive_sum(const int32_t* in, int32_t* out, int64_t n, const at::Tensor& like, cudaStream_t stream) {
  const int items = static_cast<int>(n);
  size_t bytes = 0;
  MOE_EXT_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, bytes, in, out, items, stream));
  at::Tensor storage = cub_storage(bytes, like);
  MOE_EXT_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(storage.mutable_data_ptr(), bytes, in, out, items, stream));
}

// ---------------------------------------------------------------------------------------------------------
// make_plan on contiguous indices [T, k] (T * k < 2^31 - 1) and an optional float64 priority [T, k]
// (undefined: none): (row_of, token_of, counts, offsets). Bad indices and NaN priorities go to `sink`'s
// slots kBadIndex and kPriorityNaN.

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> make_plan_launches(
    const at::Tensor& indices, int64_t num_experts, std::optional<int64_t> capacity, const at::Tensor& prio,
    ErrorSink sink, cudaStream_t stream) {
  const int64_t T = indices.size(0), k = indices.size(1), E = num_experts;
  const int64_t A = T * k;
  const auto long_opts = indices.options().dtype(at::kLong);
  const auto int_opts = indices.options().dtype(at::kInt);
  at::Tensor row_of = at::empty({T, k}, long_opts);
  at::Tensor counts = at::empty({E}, long_opts);
  at::Tensor dropless_offsets = at::empty({E + 1}, long_opts);
  at::Tensor token_of = capacity.has_value() ? at::full({E * *capacity}, -1, long_opts) : at::empty({A}, long_opts);
  at::Tensor offsets = capacity.has_value() ? at::arange(E + 1, long_opts) * *capacity : dropless_offsets;
  const double* prio_ptr = prio.defined() ? prio.const_data_ptr<double>() : nullptr;
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  const unsigned int grid = blocks_for(A + 1);

  // Dropless order: assignments stably sorted by expert.
  at::Tensor keys = at::empty({A}, int_opts), assignments = at::empty({A}, int_opts);
  at::Tensor sorted_keys = at::empty({A}, int_opts), sorted = at::empty({A}, int_opts);
  MOE_EXT_LAUNCH(grid, kThreads, 0, stream, assignment_keys_kernel)(
      idx, prio_ptr, A, E, keys.mutable_data_ptr<int32_t>(), assignments.mutable_data_ptr<int32_t>(), sink);
  MOE_EXT_LAUNCH_CHECK();
  if (A > 0) {
    sort_pairs<int32_t>(keys.const_data_ptr<int32_t>(), sorted_keys.mutable_data_ptr<int32_t>(),
                        assignments.const_data_ptr<int32_t>(), sorted.mutable_data_ptr<int32_t>(), A,
                        steps::key_bits(E), /*descending=*/false, indices, stream);
  }
  MOE_EXT_LAUNCH(grid, kThreads, 0, stream, boundaries_kernel)(sorted_keys.const_data_ptr<int32_t>(), A, E,
                                                               dropless_offsets.mutable_data_ptr<int64_t>());
  MOE_EXT_LAUNCH_CHECK();
  MOE_EXT_LAUNCH(blocks_for(E), kThreads, 0, stream, counts_kernel)(dropless_offsets.const_data_ptr<int64_t>(), E,
                                                                    counts.mutable_data_ptr<int64_t>());
  MOE_EXT_LAUNCH_CHECK();

  if (!capacity.has_value()) {
    MOE_EXT_LAUNCH(grid, kThreads, 0, stream, place_dropless_kernel)(
        sorted_keys.const_data_ptr<int32_t>(), sorted.const_data_ptr<int32_t>(), A, E, k,
        row_of.mutable_data_ptr<int64_t>(), token_of.mutable_data_ptr<int64_t>());
    MOE_EXT_LAUNCH_CHECK();
  } else if (A > 0) {
    const int64_t C = *capacity;
    // Kept order (kernels::kept_before): choice-major, then stably by priority (descending), then
    // stably by expert; the rank within an expert's segment decides what is kept.
    at::Tensor order = at::empty({A}, int_opts);
    at::Tensor prio_keys = at::empty({prio.defined() ? A : 0}, prio.defined() ? prio.options() : indices.options());
    MOE_EXT_LAUNCH(grid, kThreads, 0, stream, choice_major_kernel)(
        prio_ptr, T, k, order.mutable_data_ptr<int32_t>(),
        prio.defined() ? prio_keys.mutable_data_ptr<double>() : nullptr);
    MOE_EXT_LAUNCH_CHECK();
    if (prio.defined()) {
      at::Tensor prio_sorted = at::empty({A}, prio.options()), order_sorted = at::empty({A}, int_opts);
      sort_pairs<double>(prio_keys.const_data_ptr<double>(), prio_sorted.mutable_data_ptr<double>(),
                         order.const_data_ptr<int32_t>(), order_sorted.mutable_data_ptr<int32_t>(), A, 64,
                         /*descending=*/true, indices, stream);
      order = order_sorted;
    }
    at::Tensor ranked_keys_in = at::empty({A}, int_opts);
    MOE_EXT_LAUNCH(grid, kThreads, 0, stream, expert_keys_of_kernel)(idx, order.const_data_ptr<int32_t>(), A, E,
                                                                     ranked_keys_in.mutable_data_ptr<int32_t>());
    MOE_EXT_LAUNCH_CHECK();
    at::Tensor ranked_keys = at::empty({A}, int_opts), ranked = at::empty({A}, int_opts);
    sort_pairs<int32_t>(ranked_keys_in.const_data_ptr<int32_t>(), ranked_keys.mutable_data_ptr<int32_t>(),
                        order.const_data_ptr<int32_t>(), ranked.mutable_data_ptr<int32_t>(), A, steps::key_bits(E),
                        /*descending=*/false, indices, stream);

    at::Tensor keep = at::empty({A}, int_opts), kept_flags = at::empty({A}, int_opts);
    at::Tensor kept_scan = at::empty({A}, int_opts);
    MOE_EXT_LAUNCH(grid, kThreads, 0, stream, capacity_keep_kernel)(
        ranked_keys.const_data_ptr<int32_t>(), ranked.const_data_ptr<int32_t>(),
        dropless_offsets.const_data_ptr<int64_t>(), prio_ptr, A, E, C, keep.mutable_data_ptr<int32_t>());
    MOE_EXT_LAUNCH_CHECK();
    MOE_EXT_LAUNCH(grid, kThreads, 0, stream, gather_keep_kernel)(
        keep.const_data_ptr<int32_t>(), sorted.const_data_ptr<int32_t>(), A, kept_flags.mutable_data_ptr<int32_t>());
    MOE_EXT_LAUNCH_CHECK();
    exclusive_sum(kept_flags.const_data_ptr<int32_t>(), kept_scan.mutable_data_ptr<int32_t>(), A, indices, stream);
    MOE_EXT_LAUNCH(grid, kThreads, 0, stream, place_capacity_kernel)(
        sorted_keys.const_data_ptr<int32_t>(), sorted.const_data_ptr<int32_t>(), kept_flags.const_data_ptr<int32_t>(),
        kept_scan.const_data_ptr<int32_t>(), dropless_offsets.const_data_ptr<int64_t>(), A, E, k, C,
        row_of.mutable_data_ptr<int64_t>(), token_of.mutable_data_ptr<int64_t>());
    MOE_EXT_LAUNCH_CHECK();
  }

  return {row_of, token_of, counts, offsets};
}

// ---------------------------------------------------------------------------------------------------------
// expert_choice_plan on contiguous float scores [T, E] (T * E < 2^31 - 1): (row_of, token_of, counts,
// offsets); a NaN score goes to `sink`'s slot 0.

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_choice_plan_launches(const at::Tensor& scores,
                                                                                              int64_t capacity,
                                                                                              ErrorSink sink,
                                                                                              cudaStream_t stream) {
  const int64_t T = scores.size(0), E = scores.size(1), C = capacity;
  const int64_t items = T * E;
  const auto long_opts = scores.options().dtype(at::kLong);
  const auto int_opts = scores.options().dtype(at::kInt);
  const int64_t take = std::min(T, C);
  at::Tensor row_of = at::full({T, E}, -1, long_opts);
  at::Tensor token_of = at::full({E * C}, -1, long_opts);
  at::Tensor counts = at::full({E}, take, long_opts);
  at::Tensor offsets = at::arange(E + 1, long_opts) * C;
  const unsigned int grid = blocks_for(items);

  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "expert_choice_plan_cuda", [&] {
    at::Tensor keys = at::empty({items}, scores.options()), keys_sorted = at::empty({items}, scores.options());
    at::Tensor tokens = at::empty({items}, int_opts), tokens_sorted = at::empty({items}, int_opts);
    MOE_EXT_LAUNCH(grid, kThreads, 0, stream, expert_choice_keys_kernel<scalar_t>)(
        scores.const_data_ptr<scalar_t>(), T, E, keys.mutable_data_ptr<scalar_t>(), tokens.mutable_data_ptr<int32_t>(),
        sink);
    MOE_EXT_LAUNCH_CHECK();
    if (take == 0) return;
    const at::Tensor segments = at::arange(E + 1, long_opts) * T;
    const int64_t* segment_ptr = segments.const_data_ptr<int64_t>();
    size_t bytes = 0;
    const int end_bit = static_cast<int>(sizeof(scalar_t) * 8);
    MOE_EXT_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
        nullptr, bytes, keys.const_data_ptr<scalar_t>(), keys_sorted.mutable_data_ptr<scalar_t>(),
        tokens.const_data_ptr<int32_t>(), tokens_sorted.mutable_data_ptr<int32_t>(), static_cast<int>(items),
        static_cast<int>(E), segment_ptr, segment_ptr + 1, 0, end_bit, stream));
    at::Tensor storage = cub_storage(bytes, scores);
    MOE_EXT_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
        storage.mutable_data_ptr(), bytes, keys.const_data_ptr<scalar_t>(), keys_sorted.mutable_data_ptr<scalar_t>(),
        tokens.const_data_ptr<int32_t>(), tokens_sorted.mutable_data_ptr<int32_t>(), static_cast<int>(items),
        static_cast<int>(E), segment_ptr, segment_ptr + 1, 0, end_bit, stream));

    at::Tensor flags = at::zeros({items}, int_opts), scan = at::empty({items}, int_opts);
    MOE_EXT_LAUNCH(blocks_for(E * take), kThreads, 0, stream, expert_choice_flags_kernel)(
        tokens_sorted.const_data_ptr<int32_t>(), T, E, take, flags.mutable_data_ptr<int32_t>());
    MOE_EXT_LAUNCH_CHECK();
    exclusive_sum(flags.const_data_ptr<int32_t>(), scan.mutable_data_ptr<int32_t>(), items, scores, stream);
    MOE_EXT_LAUNCH(grid, kThreads, 0, stream, expert_choice_place_kernel)(
        flags.const_data_ptr<int32_t>(), scan.const_data_ptr<int32_t>(), T, E, C, row_of.mutable_data_ptr<int64_t>(),
        token_of.mutable_data_ptr<int64_t>());
    MOE_EXT_LAUNCH_CHECK();
  });
  return {row_of, token_of, counts, offsets};
}

}  // namespace
}  // namespace cuda
}  // namespace moe_ext
