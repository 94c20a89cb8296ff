// Operator schemas of the moe_ext library (all in one place) and the C++ API that calls them.
#include "moe_ext.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace moe_ext {

TORCH_LIBRARY(moe_ext, m) {
  m.def(
      "topk_gating(Tensor logits, int k, str score_func=\"softmax\", bool normalize=True, Tensor? bias=None, "
      "float scale=1.0, int n_group=1, int topk_group=1, Tensor? expert_mask=None) "
      "-> (Tensor weights, Tensor indices, Tensor scores)");
  m.def(
      "topk_gating_backward(Tensor grad_weights, Tensor grad_scores, Tensor scores, Tensor indices, "
      "str score_func, bool normalize, float scale, ScalarType logits_dtype) -> Tensor");
  m.def(
      "make_plan(Tensor indices, int num_experts, int? capacity=None, Tensor? priority=None) "
      "-> (Tensor row_of, Tensor token_of, Tensor counts, Tensor offsets)");
  m.def(
      "expert_choice_plan(Tensor scores, int capacity) "
      "-> (Tensor row_of, Tensor token_of, Tensor counts, Tensor offsets)");
  m.def("dispatch(Tensor x, Tensor token_of, Tensor row_of) -> Tensor");
  m.def("dispatch_backward(Tensor grad_x_sorted, Tensor token_of, Tensor row_of) -> Tensor");
  m.def("combine(Tensor y_sorted, Tensor weights, Tensor row_of, Tensor token_of) -> Tensor");
  m.def(
      "combine_backward(Tensor grad_y, Tensor y_sorted, Tensor weights, Tensor row_of, Tensor token_of) "
      "-> (Tensor grad_y_sorted, Tensor grad_weights)");
  m.def("grouped_mm(Tensor x, Tensor w, Tensor offsets) -> Tensor");
  m.def("grouped_mm_backward(Tensor grad_y, Tensor x, Tensor w, Tensor offsets) -> (Tensor grad_x, Tensor grad_w)");
  m.def("linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def(
      "linear_backward(Tensor grad_y, Tensor x, Tensor weight, bool with_bias) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  m.def("load_balancing_loss(Tensor scores, Tensor indices, int num_experts) -> Tensor");
  m.def("load_balancing_loss_backward(Tensor grad, Tensor scores, Tensor indices, int num_experts) -> Tensor");
  m.def("router_z_loss(Tensor logits) -> Tensor");
  m.def("router_z_loss_backward(Tensor grad, Tensor logits) -> Tensor");
  m.def("swiglu(Tensor h) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor h) -> Tensor");
}

namespace detail {

template <typename Signature>
static c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

#define MOE_EXT_OP_HANDLE(fn, name, ...)                               \
  const c10::TypedOperatorHandle<__VA_ARGS__>& fn() {                  \
    static const auto handle = find_op<__VA_ARGS__>("moe_ext::" name); \
    return handle;                                                     \
  }

MOE_EXT_OP_HANDLE(topk_gating_op, "topk_gating",
                  std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t, c10::string_view, bool,
                                                                 const std::optional<at::Tensor>&, double, int64_t,
                                                                 int64_t, const std::optional<at::Tensor>&))
MOE_EXT_OP_HANDLE(topk_gating_backward_op, "topk_gating_backward",
                  at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             c10::string_view, bool, double, at::ScalarType))
MOE_EXT_OP_HANDLE(dispatch_op, "dispatch", at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&))
MOE_EXT_OP_HANDLE(dispatch_backward_op, "dispatch_backward",
                  at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&))
MOE_EXT_OP_HANDLE(combine_op, "combine",
                  at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&))
MOE_EXT_OP_HANDLE(combine_backward_op, "combine_backward",
                  std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, const at::Tensor&))
MOE_EXT_OP_HANDLE(grouped_mm_op, "grouped_mm", at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&))
MOE_EXT_OP_HANDLE(grouped_mm_backward_op, "grouped_mm_backward",
                  std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&))
MOE_EXT_OP_HANDLE(linear_op, "linear",
                  at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&))
MOE_EXT_OP_HANDLE(linear_backward_op, "linear_backward",
                  std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, bool))
MOE_EXT_OP_HANDLE(load_balancing_loss_op, "load_balancing_loss",
                  at::Tensor(const at::Tensor&, const at::Tensor&, int64_t))
MOE_EXT_OP_HANDLE(load_balancing_loss_backward_op, "load_balancing_loss_backward",
                  at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t))
MOE_EXT_OP_HANDLE(router_z_loss_op, "router_z_loss", at::Tensor(const at::Tensor&))
MOE_EXT_OP_HANDLE(router_z_loss_backward_op, "router_z_loss_backward", at::Tensor(const at::Tensor&, const at::Tensor&))
MOE_EXT_OP_HANDLE(swiglu_op, "swiglu", at::Tensor(const at::Tensor&))
MOE_EXT_OP_HANDLE(swiglu_backward_op, "swiglu_backward", at::Tensor(const at::Tensor&, const at::Tensor&))

#undef MOE_EXT_OP_HANDLE

}  // namespace detail

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_gating(const at::Tensor& logits, int64_t k,
                                                           std::string_view score_func, bool normalize,
                                                           const std::optional<at::Tensor>& bias, double scale,
                                                           int64_t n_group, int64_t topk_group,
                                                           const std::optional<at::Tensor>& expert_mask) {
  return detail::topk_gating_op().call(logits, k, score_func, normalize, bias, scale, n_group, topk_group, expert_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> make_plan(const at::Tensor& indices, int64_t num_experts,
                                                                     std::optional<int64_t> capacity,
                                                                     const std::optional<at::Tensor>& priority) {
  static const auto handle = detail::find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, int64_t, std::optional<int64_t>, const std::optional<at::Tensor>&)>("moe_ext::make_plan");
  return handle.call(indices, num_experts, capacity, priority);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_choice_plan(const at::Tensor& scores,
                                                                              int64_t capacity) {
  static const auto handle =
      detail::find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>(
          "moe_ext::expert_choice_plan");
  return handle.call(scores, capacity);
}

at::Tensor dispatch(const at::Tensor& x, const at::Tensor& token_of, const at::Tensor& row_of) {
  return detail::dispatch_op().call(x, token_of, row_of);
}

at::Tensor combine(const at::Tensor& y_sorted, const at::Tensor& weights, const at::Tensor& row_of,
                   const at::Tensor& token_of) {
  return detail::combine_op().call(y_sorted, weights, row_of, token_of);
}

at::Tensor grouped_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets) {
  return detail::grouped_mm_op().call(x, w, offsets);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return detail::linear_op().call(x, weight, bias);
}

at::Tensor load_balancing_loss(const at::Tensor& scores, const at::Tensor& indices, int64_t num_experts) {
  return detail::load_balancing_loss_op().call(scores, indices, num_experts);
}

at::Tensor router_z_loss(const at::Tensor& logits) { return detail::router_z_loss_op().call(logits); }

at::Tensor swiglu(const at::Tensor& h) { return detail::swiglu_op().call(h); }

}  // namespace moe_ext
