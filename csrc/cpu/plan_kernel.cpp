// CPU kernel of make_plan: chunked histogram, stable placement, and capacity ranking per expert.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../checks.h"
#include "../kernels/gating.h"
#include "../kernels/plan.h"
#include "cpu_utils.h"

namespace moe_ext {
namespace {

// offsets of a capacity layout: expert e owns rows [e*C, (e+1)*C).
at::Tensor capacity_offsets(int64_t num_experts, int64_t capacity, const at::TensorOptions& opts) {
  return at::arange(num_experts + 1, opts) * capacity;
}

// Assignments per chunk; fixed so the work split never depends on threads.
constexpr int64_t kPlanChunk = 4096;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> make_plan_cpu(const at::Tensor& indices_in,
                                                                         int64_t num_experts,
                                                                         std::optional<int64_t> capacity,
                                                                         const std::optional<at::Tensor>& priority) {
  check_make_plan(indices_in, num_experts, capacity, priority);
  const at::Tensor indices = indices_in.contiguous();
  const int64_t T = indices.size(0), k = indices.size(1), E = num_experts;
  const int64_t A = T * k;
  const auto long_opts = indices.options().dtype(at::kLong);
  const int64_t* idx = indices.const_data_ptr<int64_t>();

  const int64_t chunks = (A + kPlanChunk - 1) / kPlanChunk;
  std::vector<int64_t> chunk_counts(static_cast<size_t>(chunks * E), 0);
  cpu::FirstFailure bad;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t first_bad = kernels::count_experts(idx, c * kPlanChunk, std::min(A, (c + 1) * kPlanChunk), E,
                                                       chunk_counts.data() + c * E);
      if (first_bad >= 0) bad.record(first_bad);
    }
  });
  TORCH_CHECK(bad.get() < 0, "moe_ext: indices[", bad.get() / std::max<int64_t>(k, 1), ", ",
              bad.get() % std::max<int64_t>(k, 1), "] = ", idx[std::max<int64_t>(bad.get(), 0)],
              " is outside [0, num_experts = ", E, ")");

  at::Tensor counts = at::zeros({E}, long_opts);
  int64_t* count_ptr = counts.mutable_data_ptr<int64_t>();
  // Turn chunk counts into each chunk's first row per expert (dropless layout).
  std::vector<int64_t> dropless_offsets(static_cast<size_t>(E + 1), 0);
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t e = 0; e < E; ++e) count_ptr[e] += chunk_counts[c * E + e];
  }
  for (int64_t e = 0; e < E; ++e) dropless_offsets[e + 1] = dropless_offsets[e] + count_ptr[e];
  std::vector<int64_t> running(dropless_offsets.begin(), dropless_offsets.end() - 1);
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = chunk_counts[c * E + e];
      chunk_counts[c * E + e] = running[e];
      running[e] += n;
    }
  }
  std::vector<int64_t> position_of(static_cast<size_t>(A));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      kernels::place_stable(idx, c * kPlanChunk, std::min(A, (c + 1) * kPlanChunk), chunk_counts.data() + c * E,
                            position_of.data());
    }
  });

  at::Tensor row_of = at::empty({T, k}, long_opts);
  int64_t* row_ptr = row_of.mutable_data_ptr<int64_t>();
  if (!capacity.has_value()) {
    at::Tensor token_of = at::empty({A}, long_opts);
    at::Tensor offsets = at::empty({E + 1}, long_opts);
    int64_t* token_ptr = token_of.mutable_data_ptr<int64_t>();
    std::copy(dropless_offsets.begin(), dropless_offsets.end(), offsets.mutable_data_ptr<int64_t>());
    at::parallel_for(0, A, kPlanChunk, [&](int64_t a0, int64_t a1) {
      for (int64_t a = a0; a < a1; ++a) {
        row_ptr[a] = position_of[a];
        token_ptr[position_of[a]] = a / k;
      }
    });
    return {row_of, token_of, counts, offsets};
  }

  const int64_t C = *capacity;
  at::Tensor token_of = at::full({E * C}, -1, long_opts);
  at::Tensor offsets = capacity_offsets(E, C, long_opts);
  int64_t* token_ptr = token_of.mutable_data_ptr<int64_t>();
  std::vector<int64_t> sorted(static_cast<size_t>(A));
  for (int64_t a = 0; a < A; ++a) sorted[position_of[a]] = a;
  at::Tensor prio;
  if (priority.has_value()) {
    prio = priority->to(at::kDouble).contiguous();
    TORCH_CHECK(!at::isnan(prio).any().item<bool>(), "moe_ext: priority must not contain NaN");
  }
  const double* prio_ptr = prio.defined() ? prio.const_data_ptr<double>() : nullptr;
  // Small plans stay on one thread: a parallel region costs more than the work.
  at::parallel_for(0, E, A < kPlanChunk ? E : 1, [&](int64_t e0, int64_t e1) {
    std::vector<int64_t> ranked;
    std::vector<char> keep;
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t begin = dropless_offsets[e], n = count_ptr[e];
      const int64_t* mine = sorted.data() + begin;  // expert e's assignments, token order
      // A priority of -inf means "never keep" (random routing, per-token drops).
      keep.assign(static_cast<size_t>(n), 1);
      ranked.clear();
      for (int64_t i = 0; i < n; ++i) {
        if (prio_ptr != nullptr && prio_ptr[mine[i]] == -std::numeric_limits<double>::infinity()) {
          keep[i] = 0;
        } else {
          ranked.push_back(i);
        }
      }
      if (static_cast<int64_t>(ranked.size()) > C) {
        // (priority, j, t) is a total order, so the kept set is unique.
        std::sort(ranked.begin(), ranked.end(),
                  [&](int64_t x, int64_t y) { return kernels::kept_before(mine[x], mine[y], k, prio_ptr); });
        for (size_t i = static_cast<size_t>(C); i < ranked.size(); ++i) keep[ranked[i]] = 0;
      }
      int64_t row = e * C;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t a = mine[i];
        if (keep[i]) {
          row_ptr[a] = row;
          token_ptr[row] = a / k;
          ++row;
        } else {
          row_ptr[a] = -1;
        }
      }
    }
  });
  return {row_of, token_of, counts, offsets};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_choice_plan_cpu(const at::Tensor& scores_in,
                                                                                  int64_t capacity) {
  check_expert_choice_plan(scores_in, capacity);
  const at::Tensor scores = scores_in.to(routing_dtype(scores_in.scalar_type())).contiguous();
  TORCH_CHECK(!at::isnan(scores).any().item<bool>(), "moe_ext: scores must not contain NaN");
  const int64_t T = scores.size(0), E = scores.size(1), C = capacity;
  const auto long_opts = scores.options().dtype(at::kLong);
  at::Tensor row_of = at::full({T, E}, -1, long_opts);
  at::Tensor token_of = at::full({E * C}, -1, long_opts);
  at::Tensor counts = at::empty({E}, long_opts);
  at::Tensor offsets = capacity_offsets(E, C, long_opts);
  int64_t* row_ptr = row_of.mutable_data_ptr<int64_t>();
  int64_t* token_ptr = token_of.mutable_data_ptr<int64_t>();
  int64_t* count_ptr = counts.mutable_data_ptr<int64_t>();
  const int64_t take = std::min(T, C);
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "expert_choice_plan_cpu", [&] {
    const scalar_t* s = scores.const_data_ptr<scalar_t>();
    at::parallel_for(0, E, T < kPlanChunk ? E : 1, [&](int64_t e0, int64_t e1) {
      std::vector<int64_t> order(static_cast<size_t>(T));
      for (int64_t e = e0; e < e1; ++e) {
        for (int64_t t = 0; t < T; ++t) order[t] = t;
        // Each expert takes its top-C tokens; ties go to the lower token index.
        auto better = [&](int64_t a, int64_t b) { return kernels::outranks(s[a * E + e], a, s[b * E + e], b); };
        std::nth_element(order.begin(), order.begin() + take, order.end(), better);
        std::sort(order.begin(), order.begin() + take);  // rows in token order
        for (int64_t i = 0; i < take; ++i) {
          row_ptr[order[i] * E + e] = e * C + i;
          token_ptr[e * C + i] = order[i];
        }
        count_ptr[e] = take;
      }
    });
  });
  return {row_of, token_of, counts, offsets};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ext, CPU, m) {
  m.impl("make_plan", &make_plan_cpu);
  m.impl("expert_choice_plan", &expert_choice_plan_cpu);
}

}  // namespace moe_ext
