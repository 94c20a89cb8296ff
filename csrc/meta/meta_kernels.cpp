// Meta (shape-only) kernels of every op, so torch.compile and torch.export can trace them.
#include <torch/library.h>

#include "../activation_checks.h"
#include "../checks.h"

namespace moe_ext {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_gating_meta(const at::Tensor& logits, int64_t k,
                                                                c10::string_view score_func, bool normalize,
                                                                const std::optional<at::Tensor>& bias, double scale,
                                                                int64_t n_group, int64_t topk_group,
                                                                const std::optional<at::Tensor>& expert_mask) {
  check_topk_gating(logits, k, score_func, bias, scale, n_group, topk_group, expert_mask);
  const auto opts = logits.options().dtype(routing_dtype(logits.scalar_type()));
  const c10::SymInt T = logits.sym_size(0);
  return {at::empty_symint({T, k}, opts), at::empty_symint({T, k}, logits.options().dtype(at::kLong)),
          at::empty_symint(logits.sym_sizes(), opts)};
}

at::Tensor topk_gating_backward_meta(const at::Tensor& grad_weights, const at::Tensor& grad_scores,
                                     const at::Tensor& scores, const at::Tensor& indices, c10::string_view score_func,
                                     bool normalize, double scale, at::ScalarType logits_dtype) {
  parse_score_func(score_func);
  return at::empty_symint(scores.sym_sizes(), scores.options().dtype(logits_dtype));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> make_plan_meta(const at::Tensor& indices,
                                                                          int64_t num_experts,
                                                                          std::optional<int64_t> capacity,
                                                                          const std::optional<at::Tensor>& priority) {
  check_make_plan(indices, num_experts, capacity, priority);
  const auto opts = indices.options().dtype(at::kLong);
  const c10::SymInt rows =
      capacity.has_value() ? c10::SymInt(num_experts * *capacity) : indices.sym_size(0) * indices.sym_size(1);
  return {at::empty_symint(indices.sym_sizes(), opts), at::empty_symint({rows}, opts), at::empty({num_experts}, opts),
          at::empty({num_experts + 1}, opts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_choice_plan_meta(const at::Tensor& scores,
                                                                                   int64_t capacity) {
  check_expert_choice_plan(scores, capacity);
  const auto opts = scores.options().dtype(at::kLong);
  const c10::SymInt E = scores.sym_size(1);
  return {at::empty_symint(scores.sym_sizes(), opts), at::empty_symint({E * capacity}, opts),
          at::empty_symint({E}, opts), at::empty_symint({E + 1}, opts)};
}

at::Tensor dispatch_meta(const at::Tensor& x, const at::Tensor& token_of, const at::Tensor& row_of) {
  check_dispatch(x, token_of, row_of);
  return at::empty_symint({token_of.sym_size(0), x.sym_size(1)}, x.options());
}

at::Tensor dispatch_backward_meta(const at::Tensor& grad, const at::Tensor& token_of, const at::Tensor& row_of) {
  check_floating(grad, "grad_x_sorted");
  check_dim(grad, 2, "grad_x_sorted", "[N, H]");
  check_plan_tensors(token_of, row_of, grad, "grad_x_sorted");
  return at::empty_symint({row_of.sym_size(0), grad.sym_size(1)}, grad.options());
}

at::Tensor combine_meta(const at::Tensor& y_sorted, const at::Tensor& weights, const at::Tensor& row_of,
                        const at::Tensor& token_of) {
  check_combine(y_sorted, weights, row_of, token_of);
  return at::empty_symint({row_of.sym_size(0), y_sorted.sym_size(1)}, y_sorted.options());
}

std::tuple<at::Tensor, at::Tensor> combine_backward_meta(const at::Tensor& grad, const at::Tensor& y_sorted,
                                                         const at::Tensor& weights, const at::Tensor& row_of,
                                                         const at::Tensor& token_of) {
  check_combine(y_sorted, weights, row_of, token_of);
  return {at::empty_symint(y_sorted.sym_sizes(), y_sorted.options()),
          at::empty_symint(weights.sym_sizes(), weights.options())};
}

at::Tensor grouped_mm_meta(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets) {
  check_grouped_mm(x, w, offsets);
  return at::empty_symint({x.sym_size(0), w.sym_size(2)}, x.options());
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_meta(const at::Tensor& grad, const at::Tensor& x,
                                                            const at::Tensor& w, const at::Tensor& offsets) {
  check_grouped_mm(x, w, offsets);
  // grad_w in w's layout, as every backend returns it
  at::Tensor grad_w = is_transposed_weight(w)
                          ? at::empty_symint({w.sym_size(0), w.sym_size(2), w.sym_size(1)}, w.options()).transpose(1, 2)
                          : at::empty_symint(w.sym_sizes(), w.options());
  return {at::empty_symint(x.sym_sizes(), x.options()), grad_w};
}

at::Tensor linear_meta(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_linear(x, weight, bias);
  return at::empty_symint({x.sym_size(0), weight.sym_size(0)}, x.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward_meta(const at::Tensor& grad, const at::Tensor& x,
                                                                    const at::Tensor& weight, bool with_bias) {
  check_linear_backward(grad, x, weight);
  const c10::SymInt bias_size = with_bias ? weight.sym_size(0) : c10::SymInt(0);
  return {at::empty_symint(x.sym_sizes(), x.options()), at::empty_symint(weight.sym_sizes(), weight.options()),
          at::empty_symint({bias_size}, weight.options())};
}

at::Tensor load_balancing_loss_meta(const at::Tensor& scores, const at::Tensor& indices, int64_t num_experts) {
  check_load_balancing_loss(scores, indices, num_experts);
  return at::empty({}, scores.options());
}

at::Tensor load_balancing_loss_backward_meta(const at::Tensor& grad, const at::Tensor& scores,
                                             const at::Tensor& indices, int64_t num_experts) {
  check_load_balancing_loss(scores, indices, num_experts);
  return at::empty_symint(scores.sym_sizes(), scores.options());
}

at::Tensor router_z_loss_meta(const at::Tensor& logits) {
  check_router_z_loss(logits);
  return at::empty({}, logits.options().dtype(routing_dtype(logits.scalar_type())));
}

at::Tensor router_z_loss_backward_meta(const at::Tensor& grad, const at::Tensor& logits) {
  check_router_z_loss(logits);
  return at::empty_symint(logits.sym_sizes(), logits.options());
}

at::Tensor swiglu_meta(const at::Tensor& h) {
  check_swiglu(h);
  return at::empty_symint({h.sym_size(0), h.sym_size(1) / 2}, h.options());
}

at::Tensor swiglu_backward_meta(const at::Tensor& grad, const at::Tensor& h) {
  check_swiglu_backward(grad, h);
  return at::empty_symint(h.sym_sizes(), h.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ext, Meta, m) {
  m.impl("topk_gating", &topk_gating_meta);
  m.impl("topk_gating_backward", &topk_gating_backward_meta);
  m.impl("make_plan", &make_plan_meta);
  m.impl("expert_choice_plan", &expert_choice_plan_meta);
  m.impl("dispatch", &dispatch_meta);
  m.impl("dispatch_backward", &dispatch_backward_meta);
  m.impl("combine", &combine_meta);
  m.impl("combine_backward", &combine_backward_meta);
  m.impl("grouped_mm", &grouped_mm_meta);
  m.impl("grouped_mm_backward", &grouped_mm_backward_meta);
  m.impl("linear", &linear_meta);
  m.impl("linear_backward", &linear_backward_meta);
  m.impl("load_balancing_loss", &load_balancing_loss_meta);
  m.impl("load_balancing_loss_backward", &load_balancing_loss_backward_meta);
  m.impl("router_z_loss", &router_z_loss_meta);
  m.impl("router_z_loss_backward", &router_z_loss_backward_meta);
  m.impl("swiglu", &swiglu_meta);
  m.impl("swiglu_backward", &swiglu_backward_meta);
}

}  // namespace moe_ext
