// Public C++ API of moe_ext: every operator called through the dispatcher (autograd included).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace moe_ext {

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_gating(
    const at::Tensor& logits, int64_t k, std::string_view score_func = "softmax", bool normalize = true,
    const std::optional<at::Tensor>& bias = std::nullopt, double scale = 1.0, int64_t n_group = 1,
    int64_t topk_group = 1, const std::optional<at::Tensor>& expert_mask = std::nullopt);

// (row_of, token_of, counts, offsets)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> make_plan(
    const at::Tensor& indices, int64_t num_experts, std::optional<int64_t> capacity = std::nullopt,
    const std::optional<at::Tensor>& priority = std::nullopt);

// Expert-choice routing: (row_of [T, E], token_of [E*C], counts, offsets)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_choice_plan(const at::Tensor& scores,
                                                                              int64_t capacity);

at::Tensor dispatch(const at::Tensor& x, const at::Tensor& token_of, const at::Tensor& row_of);
at::Tensor combine(const at::Tensor& y_sorted, const at::Tensor& weights, const at::Tensor& row_of,
                   const at::Tensor& token_of);
at::Tensor grouped_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets);
// x [T, in] @ weight[out, in]^T (+ bias [out]): nn.Linear's function, with its weight gradient reduced in
// an order no thread count changes.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias = std::nullopt);
at::Tensor load_balancing_loss(const at::Tensor& scores, const at::Tensor& indices, int64_t num_experts);
at::Tensor router_z_loss(const at::Tensor& logits);
// Fused SwiGLU: h [N, 2F] = [gate | up] -> silu(gate) * up [N, F].
at::Tensor swiglu(const at::Tensor& h);

namespace detail {
// Typed handles of the registered ops, shared by the public API and autograd.
const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, int64_t, c10::string_view, bool, const std::optional<at::Tensor>&, double, int64_t, int64_t,
    const std::optional<at::Tensor>&)>&
topk_gating_op();
const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          c10::string_view, bool, double, at::ScalarType)>&
topk_gating_backward_op();
const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>& dispatch_op();
const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>&
dispatch_backward_op();
const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>&
combine_op();
const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>&
combine_backward_op();
const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>& grouped_mm_op();
const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                  const at::Tensor&, const at::Tensor&)>&
grouped_mm_backward_op();
const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>&
linear_op();
const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                              const at::Tensor&, bool)>&
linear_backward_op();
const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>& load_balancing_loss_op();
const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>&
load_balancing_loss_backward_op();
const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&)>& router_z_loss_op();
const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&)>& router_z_loss_backward_op();
const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&)>& swiglu_op();
const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&)>& swiglu_backward_op();
}  // namespace detail

}  // namespace moe_ext
