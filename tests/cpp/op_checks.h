// Helpers shared by the op tests and the fuzz target: tensors from and to std::vector, the plan ops' outputs by
// name, the four plan consumers called through the dispatcher, and their comparison with plan_reference.h.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "moe_ext.h"
#include "plan_reference.h"

namespace moe_ext {
namespace op_checks {

using reference::Ints;
using reference::Reals;

inline constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
inline constexpr int64_t kMin = std::numeric_limits<int64_t>::min();
inline constexpr double kInf = std::numeric_limits<double>::infinity();
inline constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

inline at::Tensor long_tensor(const Ints& values, at::IntArrayRef shape) {
  return at::tensor(at::ArrayRef<int64_t>(values), at::kLong).reshape(shape);
}

inline at::Tensor double_tensor(const Reals& values, at::IntArrayRef shape, at::ScalarType dtype = at::kDouble) {
  return at::tensor(at::ArrayRef<double>(values), at::kDouble).reshape(shape).to(dtype);
}

inline Ints to_ints(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return Ints(c.const_data_ptr<int64_t>(), c.const_data_ptr<int64_t>() + c.numel());
}

inline Reals to_reals(const at::Tensor& t) {
  const at::Tensor c = t.detach().to(at::kDouble).contiguous();
  return Reals(c.const_data_ptr<double>(), c.const_data_ptr<double>() + c.numel());
}

// The message of the c10::Error that `fn` throws, or nullopt when it returns; other exceptions propagate.
template <typename Fn>
std::optional<std::string> c10_error_of(Fn&& fn) {
  try {
    fn();
  } catch (const c10::Error& error) {
    return std::string(error.what_without_backtrace());
  }
  return std::nullopt;
}

// A routing plan's four tensors by name.
struct Plan {
  at::Tensor row_of, token_of, counts, offsets;
};

inline Plan make_plan(const at::Tensor& indices, int64_t num_experts, std::optional<int64_t> capacity = std::nullopt,
                      const std::optional<at::Tensor>& priority = std::nullopt) {
  auto [row_of, token_of, counts, offsets] = moe_ext::make_plan(indices, num_experts, capacity, priority);
  return {row_of, token_of, counts, offsets};
}

inline Plan expert_choice_plan(const at::Tensor& scores, int64_t capacity) {
  auto [row_of, token_of, counts, offsets] = moe_ext::expert_choice_plan(scores, capacity);
  return {row_of, token_of, counts, offsets};
}

// Whether a plan's tensors hold exactly the reference plan's values.
inline bool plan_equals(const Plan& plan, const reference::Plan& want) {
  return to_ints(plan.row_of) == want.row_of && to_ints(plan.token_of) == want.token_of &&
         to_ints(plan.counts) == want.counts && to_ints(plan.offsets) == want.offsets;
}

// The ops that read a routing plan (row_of [T, k], token_of [N]).
enum class Consumer { kDispatch, kDispatchBackward, kCombine, kCombineBackward };

inline std::string consumer_name(Consumer consumer) {
  const char* names[] = {"Dispatch", "DispatchBackward", "Combine", "CombineBackward"};
  return names[static_cast<int>(consumer)];
}

// Calls one consumer with random data tensors whose shapes fit the plan tensors (whatever their rank).
inline void consume(Consumer consumer, const at::Tensor& row_of, const at::Tensor& token_of, int64_t hidden,
                    at::ScalarType dtype = at::kDouble) {
  const int64_t T = row_of.dim() >= 1 ? row_of.size(0) : 1;
  const int64_t k = row_of.dim() >= 2 ? row_of.size(1) : 1;
  const int64_t N = token_of.dim() >= 1 ? token_of.size(0) : 1;
  const auto opts = at::TensorOptions().dtype(dtype);
  switch (consumer) {
    case Consumer::kDispatch:
      moe_ext::dispatch(at::randn({T, hidden}, opts), token_of, row_of);
      break;
    case Consumer::kDispatchBackward:
      moe_ext::detail::dispatch_backward_op().call(at::randn({N, hidden}, opts), token_of, row_of);
      break;
    case Consumer::kCombine:
      moe_ext::combine(at::randn({N, hidden}, opts), at::rand({T, k}, opts), row_of, token_of);
      break;
    case Consumer::kCombineBackward:
      moe_ext::detail::combine_backward_op().call(at::randn({T, hidden}, opts), at::randn({N, hidden}, opts),
                                                  at::rand({T, k}, opts), row_of, token_of);
      break;
  }
}

// Runs dispatch, combine and both backward ops on a consistent plan with random float64 data and compares each
// with its loop reference. Returns the names of the ops that disagree ("" when all agree).
inline std::string permutation_mismatches(const at::Tensor& row_of, const at::Tensor& token_of, int64_t H,
                                          std::mt19937_64& rng) {
  const int64_t T = row_of.size(0), k = row_of.size(1), N = token_of.size(0);
  std::normal_distribution<double> normal;
  const auto random_reals = [&](int64_t n) {
    Reals v(n);
    for (auto& x : v) x = normal(rng);
    return v;
  };
  const Ints rows = to_ints(row_of), tokens = to_ints(token_of);
  const Reals x = random_reals(T * H), y_sorted = random_reals(N * H), weights = random_reals(T * k);
  const Reals grad_y = random_reals(T * H), grad_x_sorted = random_reals(N * H);
  const at::Tensor y_t = double_tensor(y_sorted, {N, H}), w_t = double_tensor(weights, {T, k});
  std::string mismatches;
  const auto expect = [&](bool ok, const char* op) {
    if (!ok) mismatches += std::string(mismatches.empty() ? "" : ", ") + op;
  };

  expect(reference::all_close(to_reals(moe_ext::dispatch(double_tensor(x, {T, H}), token_of, row_of)),
                              reference::dispatch(x, tokens, H), 0),
         "dispatch");
  expect(reference::all_close(to_reals(moe_ext::combine(y_t, w_t, row_of, token_of)),
                              reference::combine(y_sorted, weights, rows, T, k, H), 1e-12),
         "combine");
  const at::Tensor grad_x =
      moe_ext::detail::dispatch_backward_op().call(double_tensor(grad_x_sorted, {N, H}), token_of, row_of);
  expect(reference::all_close(to_reals(grad_x), reference::combine(grad_x_sorted, Reals(T * k, 1.0), rows, T, k, H),
                              1e-12),
         "dispatch_backward");
  const auto [grad_y_sorted, grad_weights] =
      moe_ext::detail::combine_backward_op().call(double_tensor(grad_y, {T, H}), y_t, w_t, row_of, token_of);
  const auto [want_grad_y_sorted, want_grad_weights] =
      reference::combine_backward(grad_y, y_sorted, weights, rows, N, T, k, H);
  expect(reference::all_close(to_reals(grad_y_sorted), want_grad_y_sorted, 1e-12), "combine_backward (y_sorted)");
  expect(reference::all_close(to_reals(grad_weights), want_grad_weights, 1e-12), "combine_backward (weights)");
  return mismatches;
}

}  // namespace op_checks
}  // namespace moe_ext
