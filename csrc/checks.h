// Argument validation shared by every backend (CPU, CUDA, Meta): errors name the argument.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <string_view>

#include "kernels/gating.h"

namespace moe_ext {

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "moe_ext: ", name,
              " must be a floating-point tensor (float32, bfloat16, float16 or float64), got ", t.scalar_type());
}

inline void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong, "moe_ext: ", name, " must be an int64 tensor, got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* shape) {
  TORCH_CHECK(t.dim() == dim, "moe_ext: ", name, " must be ", dim, "-D with shape ", shape, ", got shape ",
              t.sym_sizes());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "moe_ext: ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; move both to the same device");
}

// A capacity layout has num_experts * capacity rows; that count must fit in int64 (an overflow
// would size the buffer wrongly and write out of bounds).
inline void check_capacity_rows(int64_t num_experts, int64_t capacity) {
  TORCH_CHECK(num_experts < 1 || capacity <= std::numeric_limits<int64_t>::max() / num_experts,
              "moe_ext: capacity = ", capacity, " is too large: num_experts * capacity = ", num_experts, " * ",
              capacity, " rows overflows int64");
}

inline kernels::ScoreFunc parse_score_func(std::string_view score_func) {
  if (score_func == "softmax") return kernels::ScoreFunc::kSoftmax;
  if (score_func == "sigmoid") return kernels::ScoreFunc::kSigmoid;
  TORCH_CHECK(false, "moe_ext: score_func must be \"softmax\" or \"sigmoid\", got \"", score_func, "\"");
}

inline kernels::ScoreFunc check_topk_gating(const at::Tensor& logits, int64_t k, std::string_view score_func,
                                            const std::optional<at::Tensor>& bias, double scale, int64_t n_group,
                                            int64_t topk_group, const std::optional<at::Tensor>& expert_mask) {
  check_floating(logits, "logits");
  check_dim(logits, 2, "logits", "[T, E]");
  const c10::SymInt num_experts = logits.sym_size(1);
  TORCH_CHECK(num_experts >= 1, "moe_ext: logits must have at least one expert column, got shape ", logits.sym_sizes());
  TORCH_CHECK(k >= 1 && num_experts >= k, "moe_ext: k must satisfy 1 <= k <= E = ", num_experts, ", got k = ", k);
  const auto func = parse_score_func(score_func);
  TORCH_CHECK(std::isfinite(scale), "moe_ext: scale must be finite, got ", scale);
  if (bias.has_value()) {
    check_floating(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->sym_size(0) == num_experts, "moe_ext: bias must have shape [E] = [",
                num_experts, "], got ", bias->sym_sizes());
    check_same_device(*bias, logits, "bias", "logits");
  }
  if (expert_mask.has_value()) {
    TORCH_CHECK(expert_mask->scalar_type() == at::kBool, "moe_ext: expert_mask must be a bool tensor, got ",
                expert_mask->scalar_type());
    // [E]: the same experts for every token; [T, E]: per-token allowed experts.
    const bool shared_mask = expert_mask->dim() == 1 && expert_mask->sym_size(0) == num_experts;
    const bool per_token_mask = expert_mask->dim() == 2 && expert_mask->sym_sizes() == logits.sym_sizes();
    TORCH_CHECK(shared_mask || per_token_mask, "moe_ext: expert_mask must have shape [E] = [", num_experts,
                "] or [T, E] = ", logits.sym_sizes(), ", got ", expert_mask->sym_sizes());
    check_same_device(*expert_mask, logits, "expert_mask", "logits");
  }
  TORCH_CHECK(n_group >= 1, "moe_ext: n_group must be >= 1, got ", n_group);
  if (n_group > 1) {
    TORCH_CHECK(num_experts % n_group == 0, "moe_ext: n_group = ", n_group,
                " must divide the number of experts E = ", num_experts);
    TORCH_CHECK(topk_group >= 1 && topk_group <= n_group,
                "moe_ext: topk_group must satisfy 1 <= topk_group <= n_group = ", n_group, ", got ", topk_group);
    TORCH_CHECK(num_experts / n_group * topk_group >= k, "moe_ext: k = ", k,
                " exceeds the experts in the kept groups (",
                "topk_group * E / n_group = ", num_experts / n_group * topk_group, ")");
  }
  return func;
}

inline void check_make_plan(const at::Tensor& indices, int64_t num_experts, std::optional<int64_t> capacity,
                            const std::optional<at::Tensor>& priority) {
  check_index(indices, "indices");
  check_dim(indices, 2, "indices", "[T, k]");
  TORCH_CHECK(num_experts >= 1, "moe_ext: num_experts must be >= 1, got ", num_experts);
  // CUDA sorts int32 expert keys, and every backend sizes E + 1 offsets from it.
  TORCH_CHECK(num_experts <= std::numeric_limits<int32_t>::max(), "moe_ext: num_experts must be < 2^31, got ",
              num_experts);
  if (capacity.has_value()) {
    TORCH_CHECK(*capacity >= 0, "moe_ext: capacity must be >= 0 (or None for dropless), got ", *capacity);
    check_capacity_rows(num_experts, *capacity);
  }
  if (priority.has_value()) {
    TORCH_CHECK(capacity.has_value(), "moe_ext: priority only applies with a capacity; pass capacity or drop priority");
    check_floating(*priority, "priority");
    TORCH_CHECK(priority->sym_sizes() == indices.sym_sizes(), "moe_ext: priority must have the shape of indices ",
                indices.sym_sizes(), ", got ", priority->sym_sizes());
    check_same_device(*priority, indices, "priority", "indices");
  }
}

inline void check_expert_choice_plan(const at::Tensor& scores, int64_t capacity) {
  check_floating(scores, "scores");
  check_dim(scores, 2, "scores", "[T, E]");
  TORCH_CHECK(scores.sym_size(1) >= 1, "moe_ext: scores must have at least one expert column");
  TORCH_CHECK(capacity >= 0, "moe_ext: capacity must be >= 0, got ", capacity);
  if (const auto num_experts = scores.sym_size(1).maybe_as_int()) check_capacity_rows(*num_experts, capacity);
}

inline void check_plan_tensors(const at::Tensor& token_of, const at::Tensor& row_of, const at::Tensor& ref,
                               const char* ref_name) {
  check_index(token_of, "token_of");
  check_dim(token_of, 1, "token_of", "[N]");
  check_index(row_of, "row_of");
  check_dim(row_of, 2, "row_of", "[T, k]");
  check_same_device(token_of, ref, "token_of", ref_name);
  check_same_device(row_of, ref, "row_of", ref_name);
}

inline void check_dispatch(const at::Tensor& x, const at::Tensor& token_of, const at::Tensor& row_of) {
  check_floating(x, "x");
  check_dim(x, 2, "x", "[T, H]");
  check_plan_tensors(token_of, row_of, x, "x");
  TORCH_CHECK(row_of.sym_size(0) == x.sym_size(0), "moe_ext: plan.row_of has ", row_of.sym_size(0),
              " tokens but x has ", x.sym_size(0), "; the plan must come from the same tokens as x");
}

inline void check_combine(const at::Tensor& y_sorted, const at::Tensor& weights, const at::Tensor& row_of,
                          const at::Tensor& token_of) {
  check_floating(y_sorted, "y_sorted");
  check_dim(y_sorted, 2, "y_sorted", "[N, H]");
  check_floating(weights, "weights");
  check_dim(weights, 2, "weights", "[T, k]");
  check_same_device(weights, y_sorted, "weights", "y_sorted");
  check_plan_tensors(token_of, row_of, y_sorted, "y_sorted");
  TORCH_CHECK(weights.sym_sizes() == row_of.sym_sizes(), "moe_ext: weights must have the shape of plan.row_of ",
              row_of.sym_sizes(), ", got ", weights.sym_sizes());
  TORCH_CHECK(token_of.sym_size(0) == y_sorted.sym_size(0), "moe_ext: y_sorted has ", y_sorted.sym_size(0),
              " rows but the plan has N = ", token_of.sym_size(0));
}

inline void check_grouped_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets) {
  check_floating(x, "x");
  check_dim(x, 2, "x", "[N, in]");
  check_floating(w, "w");
  check_dim(w, 3, "w", "[E, in, out]");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "moe_ext: w dtype ", w.scalar_type(), " must match x dtype ",
              x.scalar_type());
  check_same_device(w, x, "w", "x");
  check_index(offsets, "offsets");
  check_dim(offsets, 1, "offsets", "[E + 1]");
  // offsets are read on the host, so the CPU is accepted for any x; a meta offsets tensor has no values.
  TORCH_CHECK(offsets.device() == x.device() || offsets.is_cpu(), "moe_ext: offsets is on ", offsets.device(),
              " but x is on ", x.device(), "; offsets must be on x's device or on the CPU");
  TORCH_CHECK(offsets.sym_size(0) == w.sym_size(0) + 1, "moe_ext: offsets must have E + 1 = ", w.sym_size(0) + 1,
              " entries for w with E = ", w.sym_size(0), " experts, got ", offsets.sym_size(0));
  TORCH_CHECK(w.sym_size(1) == x.sym_size(1),
              "moe_ext: w must have shape [E, in, out] with in = x.shape[1] = ", x.sym_size(1), ", got ",
              w.sym_sizes());
}

// Whether grouped_mm reads w [E, in, out] through its transpose: a .transpose(1, 2) view of a row-major
// [E, out, in] tensor (transformers' experts layout, nn.Linear weights stacked). The kernels use it as it is
// and give grad_w the same strides; any other non-contiguous w is copied to row-major first.
inline bool is_transposed_weight(const at::Tensor& w) {
  return !w.is_contiguous() && w.transpose(1, 2).is_contiguous();
}

// linear: x [T, in], weight [out, in] (nn.Linear's layout), bias [out]; one dtype and device.
inline void check_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_floating(x, "x");
  check_dim(x, 2, "x", "[T, in]");
  check_floating(weight, "weight");
  check_dim(weight, 2, "weight", "[out, in]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "moe_ext: weight dtype ", weight.scalar_type(),
              " must match x dtype ", x.scalar_type());
  check_same_device(weight, x, "weight", "x");
  TORCH_CHECK(weight.sym_size(1) == x.sym_size(1),
              "moe_ext: weight must have shape [out, in] with in = x.shape[1] = ", x.sym_size(1), ", got ",
              weight.sym_sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "moe_ext: bias dtype ", bias->scalar_type(),
                " must match x dtype ", x.scalar_type());
    check_same_device(*bias, x, "bias", "x");
    TORCH_CHECK(bias->dim() == 1 && bias->sym_size(0) == weight.sym_size(0), "moe_ext: bias must have shape [out] = [",
                weight.sym_size(0), "], got ", bias->sym_sizes());
  }
}

inline void check_linear_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight) {
  check_linear(x, weight, std::nullopt);
  check_floating(grad_y, "grad_y");
  check_same_device(grad_y, x, "grad_y", "x");
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.sym_size(0) == x.sym_size(0) && grad_y.sym_size(1) == weight.sym_size(0),
              "moe_ext: grad_y must have shape [T, out] = [", x.sym_size(0), ", ", weight.sym_size(0), "], got ",
              grad_y.sym_sizes());
}

inline void check_load_balancing_loss(const at::Tensor& scores, const at::Tensor& indices, int64_t num_experts) {
  check_floating(scores, "scores");
  check_dim(scores, 2, "scores", "[T, E]");
  check_index(indices, "indices");
  check_dim(indices, 2, "indices", "[T, k]");
  check_same_device(indices, scores, "indices", "scores");
  TORCH_CHECK(num_experts >= 1, "moe_ext: num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(scores.sym_size(1) == num_experts, "moe_ext: scores must have shape [T, num_experts = ", num_experts,
              "], got ", scores.sym_sizes());
  TORCH_CHECK(indices.sym_size(0) == scores.sym_size(0), "moe_ext: indices has ", indices.sym_size(0),
              " tokens but scores has ", scores.sym_size(0));
}

inline void check_router_z_loss(const at::Tensor& logits) {
  check_floating(logits, "logits");
  check_dim(logits, 2, "logits", "[T, E]");
  // logsumexp over no experts is -inf: no meaningful loss.
  TORCH_CHECK(logits.sym_size(1) >= 1, "moe_ext: logits must have at least one expert column, got shape ",
              logits.sym_sizes());
}

// Float accumulation dtype for routing outputs: float64 stays, all else float32.
inline at::ScalarType routing_dtype(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace moe_ext
