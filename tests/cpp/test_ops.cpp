// GoogleTest of the moe_ext operators called from C++ through the dispatcher (csrc/moe_ext.h), values and
// autograd gradients checked against the same math written with plain ATen ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/autograd.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "moe_ext.h"
#include "op_checks.h"
#include "plan_reference.h"

namespace {

using at::Tensor;
using moe_ext::op_checks::make_plan;
using moe_ext::op_checks::Plan;

Tensor randn(at::IntArrayRef sizes, at::ScalarType dtype = at::kDouble) {
  return at::randn(sizes, at::TensorOptions().dtype(at::kDouble)).to(dtype);
}

// A leaf copy that records gradients, for the ATen reference.
Tensor leaf(const Tensor& t) { return t.detach().clone().set_requires_grad(true); }

void expect_close(const Tensor& actual, const Tensor& expected, double rtol, double atol, const std::string& what) {
  ASSERT_TRUE(actual.defined()) << what << " is undefined";
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
  if (actual.numel() == 0) return;
  const Tensor a = actual.detach().to(at::kDouble), e = expected.detach().to(at::kDouble);
  EXPECT_TRUE(at::allclose(a, e, rtol, atol))
      << what << ": max |actual - expected| = " << (a - e).abs().max().item<double>();
}

// The message of the c10::Error thrown by `fn`, or a test failure if it does not throw one.
template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const c10::Error& error) {
    return error.what_without_backtrace();
  }
  ADD_FAILURE() << "expected a c10::Error";
  return "";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// ---------------------------------------------------------------------------------------------------------
// ATen references

struct GatingRef {
  Tensor weights, indices, scores;
};

// Softmax / sigmoid + top-k of (scores + bias) + gather (+ renormalize) * scale, in float64.
GatingRef reference_gating(const Tensor& logits, int64_t k, bool softmax = true, bool normalize = true,
                           double scale = 1.0, const std::optional<Tensor>& bias = std::nullopt) {
  const Tensor l = logits.to(at::kDouble);
  const Tensor scores = softmax ? at::softmax(l, -1) : at::sigmoid(l);
  const Tensor select = bias.has_value() ? scores.detach() + bias->to(at::kDouble) : scores.detach();
  const Tensor indices = std::get<1>(at::topk(select, k, -1, /*largest=*/true, /*sorted=*/true));
  Tensor weights = scores.gather(1, indices);
  if (normalize) weights = weights / weights.sum(-1, /*keepdim=*/true);
  return {weights * scale, indices, scores};
}

// y[t] = sum_j keep[t, j] * weights[t, j] * (x[t] @ w[indices[t, j]]): the MoE layer without permutation.
Tensor reference_moe(const Tensor& x, const Tensor& w, const Tensor& weights, const Tensor& indices,
                     const Tensor& keep) {
  const int64_t T = x.size(0), H = x.size(1), k = indices.size(1), F = w.size(2);
  const Tensor x_rep = x.unsqueeze(1).expand({T, k, H}).reshape({T * k, 1, H});
  const Tensor w_sel = w.index_select(0, indices.reshape({-1}));
  const Tensor out = at::bmm(x_rep, w_sel).reshape({T, k, F});
  return (out * (weights * keep.to(weights.scalar_type())).unsqueeze(-1)).sum(1);
}

Tensor reference_load_balancing_loss(const Tensor& scores, const Tensor& indices, int64_t E) {
  const int64_t T = scores.size(0);
  const Tensor counts = at::one_hot(indices, E).sum({0, 1}).to(scores.scalar_type());
  return E * (counts / T * scores.mean(0)).sum();
}

Tensor reference_z_loss(const Tensor& logits) { return at::logsumexp(logits, 1).pow(2).mean(); }

// make_plan in plain loops (tests/cpp/plan_reference.h).
moe_ext::reference::Plan reference_plan(const Tensor& indices, int64_t E,
                                        std::optional<int64_t> capacity = std::nullopt,
                                        const std::optional<Tensor>& priority = std::nullopt) {
  return moe_ext::reference::make_plan(
      moe_ext::op_checks::to_ints(indices), indices.size(0), indices.size(1), E, capacity,
      priority.has_value() ? moe_ext::op_checks::to_reals(*priority) : moe_ext::reference::Reals());
}

std::vector<int64_t> to_vector(const Tensor& t) {
  const Tensor c = t.contiguous();
  return std::vector<int64_t>(c.const_data_ptr<int64_t>(), c.const_data_ptr<int64_t>() + c.numel());
}

void expect_plan_equals(const Plan& plan, const moe_ext::reference::Plan& ref) {
  EXPECT_EQ(to_vector(plan.row_of), ref.row_of);
  EXPECT_EQ(to_vector(plan.token_of), ref.token_of);
  EXPECT_EQ(to_vector(plan.counts), ref.counts);
  EXPECT_EQ(to_vector(plan.offsets), ref.offsets);
}

// ---------------------------------------------------------------------------------------------------------
// topk_gating

class TopkGatingValues : public ::testing::TestWithParam<std::tuple<at::ScalarType, bool>> {};

TEST_P(TopkGatingValues, SoftmaxMatchesAtenSoftmaxTopk) {
  const auto [dtype, normalize] = GetParam();
  at::manual_seed(1);
  const Tensor logits = randn({37, 8}, dtype);
  const auto [weights, indices, scores] = moe_ext::topk_gating(logits, 3, "softmax", normalize);
  const auto ref = reference_gating(logits, 3, true, normalize);
  const auto out_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  EXPECT_EQ(weights.scalar_type(), out_dtype);
  EXPECT_EQ(scores.scalar_type(), out_dtype);
  EXPECT_EQ(indices.scalar_type(), at::kLong);
  EXPECT_TRUE(at::equal(indices, ref.indices));
  const double tol = dtype == at::kDouble ? 1e-12 : 1e-6;
  expect_close(scores, ref.scores, tol, tol, "scores");
  expect_close(weights, ref.weights, tol, tol, "weights");
  if (normalize) expect_close(weights.sum(-1), at::ones({37}, at::kDouble), tol, tol, "sum of weights");
}

INSTANTIATE_TEST_SUITE_P(Ops, TopkGatingValues,
                         ::testing::Combine(::testing::Values(at::kFloat, at::kDouble, at::kBFloat16, at::kHalf),
                                            ::testing::Bool()),
                         [](const auto& info) {
                           return std::string(c10::toString(std::get<0>(info.param))) +
                                  (std::get<1>(info.param) ? "_normalize" : "_raw");
                         });

TEST(TopkGating, SigmoidWithBiasAndScale) {
  at::manual_seed(2);
  const Tensor logits = randn({25, 6}, at::kFloat);
  const Tensor bias = randn({6}, at::kFloat) * 0.5;
  const auto [weights, indices, scores] = moe_ext::topk_gating(logits, 2, "sigmoid", false, bias, 2.5);
  const auto ref = reference_gating(logits, 2, false, false, 2.5, bias);
  EXPECT_TRUE(at::equal(indices, ref.indices));
  expect_close(scores, ref.scores, 1e-6, 1e-6, "scores");
  // The bias steers the choice only: the weights are the unbiased scores of the chosen experts.
  expect_close(weights, ref.weights, 1e-6, 1e-6, "weights");
}

TEST(TopkGating, ExpertMaskReroutes) {
  at::manual_seed(3);
  const Tensor logits = randn({40, 6});
  const Tensor mask = at::tensor({1, 0, 1, 1, 0, 1}, at::kLong).to(at::kBool);
  const auto [weights, indices, scores] =
      moe_ext::topk_gating(logits, 2, "softmax", true, std::nullopt, 1.0, 1, 1, mask);
  // Disabled experts behave as if their logits were -inf.
  const Tensor masked = logits.masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity());
  const auto ref = reference_gating(masked, 2);
  EXPECT_TRUE(at::equal(indices, ref.indices));
  expect_close(scores, ref.scores, 1e-12, 1e-12, "scores");
  expect_close(weights, ref.weights, 1e-12, 1e-12, "weights");
  EXPECT_FALSE(at::isin(indices, at::tensor({1, 4}, at::kLong)).any().item<bool>());
}

TEST(TopkGating, GroupLimitedMatchesAten) {
  at::manual_seed(4);
  const int64_t T = 50, E = 16, n_group = 4, topk_group = 2, k = 4;
  const Tensor logits = randn({T, E});
  const Tensor bias = randn({E}) * 0.1;
  const auto [weights, indices, scores] =
      moe_ext::topk_gating(logits, k, "sigmoid", true, bias, 1.0, n_group, topk_group);
  // DeepSeek-V3: a group scores the sum of its best two biased scores; keep topk_group groups.
  const Tensor ref_scores = at::sigmoid(logits);
  const Tensor select = ref_scores + bias;
  const Tensor group_scores = std::get<0>(select.view({T, n_group, E / n_group}).topk(2, -1)).sum(-1);
  const Tensor kept_groups = std::get<1>(group_scores.topk(topk_group, -1));
  const Tensor group_mask = at::zeros({T, n_group}, at::kBool).scatter_(1, kept_groups, true);
  const Tensor expert_mask = group_mask.unsqueeze(-1).expand({T, n_group, E / n_group}).reshape({T, E});
  const Tensor ref_indices =
      std::get<1>(select.masked_fill(expert_mask.logical_not(), -std::numeric_limits<double>::infinity()).topk(k));
  EXPECT_TRUE(at::equal(indices, ref_indices));
  const Tensor picked = ref_scores.gather(1, ref_indices);
  expect_close(weights, picked / picked.sum(-1, true), 1e-12, 1e-12, "weights");
  expect_close(scores, ref_scores, 1e-12, 1e-12, "scores");
}

TEST(TopkGating, TiesGoToTheLowerExpert) {
  const Tensor logits = at::tensor({0.5, 2.0, 2.0, 0.5, 2.0}, at::kDouble).reshape({1, 5});
  const auto [weights, indices, scores] = moe_ext::topk_gating(logits, 4);
  EXPECT_EQ(to_vector(indices), (std::vector<int64_t>{1, 2, 4, 0}));
}

TEST(TopkGating, KGreaterThanExpertsThrows) {
  const Tensor logits = randn({4, 3});
  const std::string message = error_of([&] { moe_ext::topk_gating(logits, 5); });
  EXPECT_TRUE(contains(message, "k")) << message;
  EXPECT_TRUE(contains(message, "k = 5")) << message;
  EXPECT_TRUE(contains(message, "E = 3")) << message;
  EXPECT_TRUE(contains(error_of([&] { moe_ext::topk_gating(logits, 0); }), "k")) << "k = 0";
}

TEST(TopkGating, BadArgumentsThrowNamingTheArgument) {
  const Tensor logits = randn({4, 6});
  EXPECT_TRUE(contains(error_of([&] { moe_ext::topk_gating(logits, 2, "relu"); }), "score_func"));
  EXPECT_TRUE(contains(error_of([&] { moe_ext::topk_gating(logits.view({24}), 2); }), "logits"));
  EXPECT_TRUE(contains(error_of([&] { moe_ext::topk_gating(logits, 2, "softmax", true, randn({5})); }), "bias"));
  EXPECT_TRUE(contains(error_of([&] { moe_ext::topk_gating(logits, 2, "softmax", true, std::nullopt, 1.0, 4, 2); }),
                       "n_group"));
  const Tensor nan_logits = logits.clone().index_fill_(1, at::tensor({2}, at::kLong), NAN);
  EXPECT_TRUE(contains(error_of([&] { moe_ext::topk_gating(nan_logits, 2); }), "non-finite"));
}

// ---------------------------------------------------------------------------------------------------------
// make_plan

TEST(MakePlan, DroplessIsAStableSortByExpert) {
  at::manual_seed(5);
  const Tensor indices = at::randint(0, 5, {31, 3}, at::kLong);
  const Plan plan = make_plan(indices, 5);
  expect_plan_equals(plan, reference_plan(indices, 5));
  EXPECT_TRUE(at::equal(plan.counts, at::bincount(indices.reshape({-1}), {}, 5)));
}

TEST(MakePlan, CapacityDropsSecondChoicesFirstThenLaterTokens) {
  at::manual_seed(6);
  const Tensor indices = std::get<1>(at::randn({40, 8}).topk(2));  // distinct experts per token
  const Plan plan = make_plan(indices, 8, 6);
  expect_plan_equals(plan, reference_plan(indices, 8, 6));
  EXPECT_EQ(plan.token_of.size(0), 8 * 6);
  EXPECT_TRUE((plan.row_of == -1).any().item<bool>()) << "the case should drop something";
}

TEST(MakePlan, PriorityDropPolicy) {
  at::manual_seed(7);
  const Tensor indices = std::get<1>(at::randn({40, 6}).topk(2));
  const Tensor priority = at::rand({40, 2}, at::kFloat);
  const Plan plan = make_plan(indices, 6, 5, priority);
  expect_plan_equals(plan, reference_plan(indices, 6, 5, priority));
}

TEST(MakePlan, NegativeInfinityPriorityIsNeverKept) {
  at::manual_seed(18);
  const Tensor indices = std::get<1>(at::randn({30, 4}).topk(2));
  Tensor priority = at::rand({30, 2}, at::kDouble);
  priority.index_put_({at::arange(0, 30, 3, at::kLong), 0}, -std::numeric_limits<double>::infinity());
  const Plan plan = make_plan(indices, 4, 100, priority);  // room for all: only the -inf ones drop
  expect_plan_equals(plan, reference_plan(indices, 4, 100, priority));
  EXPECT_TRUE(at::equal(plan.row_of.eq(-1), priority.isneginf()));
}

TEST(MakePlan, CapacityZeroDropsEverything) {
  const Tensor indices = at::tensor({0, 1, 1, 0, 2, 1}, at::kLong).reshape({3, 2});
  const Plan plan = make_plan(indices, 3, 0);
  EXPECT_EQ(plan.token_of.numel(), 0);
  EXPECT_TRUE(plan.row_of.eq(-1).all().item<bool>());
  EXPECT_EQ(to_vector(plan.counts), (std::vector<int64_t>{2, 3, 1}));  // before capacity
  EXPECT_EQ(to_vector(plan.offsets), (std::vector<int64_t>{0, 0, 0, 0}));
  const Tensor y =
      moe_ext::combine(at::zeros({0, 4}, at::kDouble), at::rand({3, 2}, at::kDouble), plan.row_of, plan.token_of);
  EXPECT_TRUE(at::equal(y, at::zeros({3, 4}, at::kDouble)));
}

TEST(MakePlan, BadArgumentsThrow) {
  const Tensor indices = at::tensor({0, 1, 4, 2}, at::kLong).reshape({2, 2});
  const std::string message = error_of([&] { make_plan(indices, 4); });
  EXPECT_TRUE(contains(message, "indices[1, 0] = 4")) << message;
  EXPECT_TRUE(contains(error_of([&] { make_plan(indices, 5, -1); }), "capacity"));
  EXPECT_TRUE(contains(error_of([&] { make_plan(indices.to(at::kInt), 5); }), "int64"));
}

// ---------------------------------------------------------------------------------------------------------
// expert_choice_plan (no wrapper in moe_ext.h: called through its schema)

Plan expert_choice_plan(const Tensor& scores, int64_t capacity) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("moe_ext::expert_choice_plan", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, int64_t)>();
  auto [row_of, token_of, counts, offsets] = op.call(scores, capacity);
  return {row_of, token_of, counts, offsets};
}

TEST(ExpertChoicePlan, EachExpertTakesItsTopTokensInTokenOrder) {
  at::manual_seed(19);
  const int64_t T = 13, E = 4, C = 5;
  Tensor scores = at::softmax(randn({T, E}), -1);
  scores.index_put_({3, 1}, scores.index({5, 1}).item<double>());  // a tie: token 3 must win it
  const Plan plan = expert_choice_plan(scores, C);
  ASSERT_EQ(plan.row_of.sizes(), (std::vector<int64_t>{T, E}));
  EXPECT_EQ(to_vector(plan.offsets), (std::vector<int64_t>{0, 5, 10, 15, 20}));
  EXPECT_EQ(to_vector(plan.counts), (std::vector<int64_t>{C, C, C, C}));
  std::vector<int64_t> want_row_of(T * E, -1), want_token_of(E * C, -1);
  for (int64_t e = 0; e < E; ++e) {
    std::vector<int64_t> order(T);
    for (int64_t t = 0; t < T; ++t) order[t] = t;
    const Tensor column = scores.select(1, e).contiguous();
    const double* s = column.const_data_ptr<double>();
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return s[a] > s[b]; });
    order.resize(C);
    std::sort(order.begin(), order.end());
    for (int64_t i = 0; i < C; ++i) {
      want_row_of[order[i] * E + e] = e * C + i;
      want_token_of[e * C + i] = order[i];
    }
  }
  EXPECT_EQ(to_vector(plan.row_of), want_row_of);
  EXPECT_EQ(to_vector(plan.token_of), want_token_of);
  // Its plans feed dispatch / combine like make_plan's.
  const Tensor x = randn({T, 3});
  const Tensor weights = scores.where(plan.row_of.ge(0), 0.0);
  const Tensor y =
      moe_ext::combine(moe_ext::dispatch(x, plan.token_of, plan.row_of), weights, plan.row_of, plan.token_of);
  expect_close(y, x * weights.sum(1, true), 1e-12, 1e-12, "y");
}

TEST(ExpertChoicePlan, MoreCapacityThanTokens) {
  const Tensor scores = at::rand({3, 2}, at::kDouble);
  const Plan plan = expert_choice_plan(scores, 5);
  EXPECT_EQ(to_vector(plan.counts), (std::vector<int64_t>{3, 3}));
  EXPECT_EQ(to_vector(plan.token_of), (std::vector<int64_t>{0, 1, 2, -1, -1, 0, 1, 2, -1, -1}));
  EXPECT_TRUE(contains(error_of([&] { expert_choice_plan(scores, -1); }), "capacity"));
}

// ---------------------------------------------------------------------------------------------------------
// dispatch, grouped_mm, combine

TEST(Dispatch, MatchesIndexSelectWithZeroPadding) {
  at::manual_seed(8);
  const Tensor x = randn({20, 7}, at::kFloat);
  const Tensor indices = std::get<1>(at::randn({20, 4}).topk(2));
  const Plan plan = make_plan(indices, 4, 8);  // 32 rows for 40 assignments: drops and padding
  const Tensor x_sorted = moe_ext::dispatch(x, plan.token_of, plan.row_of);
  const Tensor valid = plan.token_of.ge(0);
  const Tensor expected = x.index_select(0, plan.token_of.clamp_min(0)) * valid.unsqueeze(1).to(x.scalar_type());
  EXPECT_TRUE(at::equal(x_sorted, expected));
}

TEST(Dispatch, PlanOfOtherTokensThrows) {
  const Plan plan = make_plan(at::zeros({3, 1}, at::kLong), 2);
  EXPECT_TRUE(contains(error_of([&] { moe_ext::dispatch(randn({4, 5}), plan.token_of, plan.row_of); }), "tokens"));
}

TEST(GroupedMM, MatchesPerExpertMm) {
  at::manual_seed(9);
  const Tensor offsets = at::tensor({0, 3, 3, 7, 300, 301}, at::kLong);  // an empty expert, a large one
  const Tensor x = leaf(randn({301, 6}));
  const Tensor w = leaf(randn({5, 6, 4}));
  const Tensor y = moe_ext::grouped_mm(x, w, offsets);
  const Tensor g = randn({301, 4});
  (y * g).sum().backward();

  const Tensor x_ref = leaf(x), w_ref = leaf(w);
  std::vector<Tensor> pieces;
  const auto bounds = to_vector(offsets);
  for (int64_t e = 0; e < 5; ++e) {
    pieces.push_back(at::mm(x_ref.narrow(0, bounds[e], bounds[e + 1] - bounds[e]), w_ref[e]));
  }
  const Tensor y_ref = at::cat(pieces);
  (y_ref * g).sum().backward();
  expect_close(y, y_ref, 1e-12, 1e-12, "y");
  expect_close(x.grad(), x_ref.grad(), 1e-12, 1e-12, "grad x");
  expect_close(w.grad(), w_ref.grad(), 1e-12, 1e-12, "grad w");
  EXPECT_TRUE(at::equal(w.grad()[1], at::zeros({6, 4}, at::kDouble))) << "an expert with no rows";
}

TEST(GroupedMM, BadOffsetsThrow) {
  const Tensor x = randn({10, 3}), w = randn({2, 3, 4});
  EXPECT_TRUE(contains(error_of([&] { moe_ext::grouped_mm(x, w, at::tensor({0, 6, 5}, at::kLong)); }), "offsets"));
  EXPECT_TRUE(contains(error_of([&] { moe_ext::grouped_mm(x, w, at::tensor({0, 6, 9}, at::kLong)); }), "offsets"));
  EXPECT_TRUE(contains(error_of([&] { moe_ext::grouped_mm(x, w, at::tensor({0, 10}, at::kLong)); }), "offsets"));
  EXPECT_TRUE(
      contains(error_of([&] { moe_ext::grouped_mm(x, randn({2, 4, 4}), at::tensor({0, 5, 10}, at::kLong)); }), "w"));
}

TEST(Combine, MatchesWeightedSumAndGradients) {
  at::manual_seed(10);
  const int64_t T = 24, k = 3, E = 5, H = 9;
  const Tensor indices = std::get<1>(at::randn({T, E}).topk(k));
  const Plan plan = make_plan(indices, E, 10);  // drops some assignments
  const int64_t N = plan.token_of.size(0);
  const Tensor y_sorted = leaf(randn({N, H}));
  const Tensor weights = leaf(at::rand({T, k}, at::kDouble));
  const Tensor y = moe_ext::combine(y_sorted, weights, plan.row_of, plan.token_of);
  const Tensor g = randn({T, H});
  (y * g).sum().backward();

  const Tensor y_sorted_ref = leaf(y_sorted), weights_ref = leaf(weights);
  const Tensor keep = plan.row_of.ge(0).to(at::kDouble);
  const Tensor gathered = y_sorted_ref.index_select(0, plan.row_of.clamp_min(0).reshape({-1})).view({T, k, H});
  const Tensor y_ref = (gathered * (weights_ref * keep).unsqueeze(-1)).sum(1);
  (y_ref * g).sum().backward();
  expect_close(y, y_ref, 1e-12, 1e-12, "y");
  expect_close(y_sorted.grad(), y_sorted_ref.grad(), 1e-12, 1e-12, "grad y_sorted");
  expect_close(weights.grad(), weights_ref.grad(), 1e-12, 1e-12, "grad weights");
}

TEST(Combine, InconsistentPlanThrows) {
  const Tensor indices = at::tensor({0, 1, 1, 0}, at::kLong).reshape({2, 2});
  const Plan plan = make_plan(indices, 2);
  const Tensor row_of = plan.row_of.flip({0});  // token 0 now claims token 1's rows
  const std::string message =
      error_of([&] { moe_ext::combine(randn({4, 3}), at::rand({2, 2}, at::kDouble), row_of, plan.token_of); });
  EXPECT_TRUE(contains(message, "plan")) << message;
}

// ---------------------------------------------------------------------------------------------------------
// auxiliary losses

TEST(Losses, LoadBalancingLossMatchesFormulaAndGradient) {
  at::manual_seed(11);
  const int64_t T = 33, E = 6, k = 2;
  const Tensor logits = randn({T, E});
  const Tensor scores = leaf(at::softmax(logits, -1));
  const Tensor indices = std::get<1>(scores.detach().topk(k));
  const Tensor loss = moe_ext::load_balancing_loss(scores, indices, E);
  loss.backward();
  const Tensor scores_ref = leaf(scores);
  const Tensor loss_ref = reference_load_balancing_loss(scores_ref, indices, E);
  loss_ref.backward();
  EXPECT_EQ(loss.dim(), 0);
  expect_close(loss, loss_ref, 1e-12, 1e-12, "loss");
  expect_close(scores.grad(), scores_ref.grad(), 1e-12, 1e-12, "grad scores");
  // A perfectly balanced router scores k.
  const Tensor uniform = at::full({4, 4}, 0.25, at::kDouble);
  const Tensor balanced = at::tensor({0, 1, 2, 3, 1, 2, 3, 0}, at::kLong).reshape({4, 2});
  EXPECT_NEAR(moe_ext::load_balancing_loss(uniform, balanced, 4).item<double>(), 2.0, 1e-12);
}

TEST(Losses, RouterZLossMatchesFormulaAndGradient) {
  at::manual_seed(12);
  const Tensor logits = leaf(randn({19, 7}) * 3);
  const Tensor z = moe_ext::router_z_loss(logits);
  z.backward();
  const Tensor logits_ref = leaf(logits);
  const Tensor z_ref = reference_z_loss(logits_ref);
  z_ref.backward();
  expect_close(z, z_ref, 1e-12, 1e-12, "z loss");
  expect_close(logits.grad(), logits_ref.grad(), 1e-12, 1e-12, "grad logits");
}

// ---------------------------------------------------------------------------------------------------------
// The whole layer through autograd: topk_gating -> make_plan -> dispatch -> grouped_mm -> combine (+ losses)

struct PipelineCase {
  at::ScalarType dtype;
  const char* score_func;
  bool normalize;
  double scale;
  std::optional<int64_t> capacity;
  bool bias;
};

std::string case_name(const ::testing::TestParamInfo<PipelineCase>& info) {
  const auto& c = info.param;
  return std::string(c.dtype == at::kDouble ? "f64" : "f32") + "_" + c.score_func + (c.normalize ? "_norm" : "") +
         (c.capacity ? "_cap" + std::to_string(*c.capacity) : "_dropless") + (c.bias ? "_bias" : "");
}

class Pipeline : public ::testing::TestWithParam<PipelineCase> {};

TEST_P(Pipeline, GradientsMatchAten) {
  const PipelineCase c = GetParam();
  at::manual_seed(13);
  const int64_t T = 29, E = 6, k = 2, H = 8, F = 5;
  const Tensor logits = leaf(randn({T, E}, c.dtype));
  const Tensor x = leaf(randn({T, H}, c.dtype));
  const Tensor w = leaf(randn({E, H, F}, c.dtype) * 0.3);
  const std::optional<Tensor> bias = c.bias ? std::optional<Tensor>(randn({E}, c.dtype) * 0.2) : std::nullopt;
  const Tensor g = randn({T, F});

  const auto [weights, indices, scores] = moe_ext::topk_gating(logits, k, c.score_func, c.normalize, bias, c.scale);
  const Plan plan = make_plan(indices, E, c.capacity);
  const Tensor x_sorted = moe_ext::dispatch(x, plan.token_of, plan.row_of);
  const Tensor y_sorted = moe_ext::grouped_mm(x_sorted, w, plan.offsets);
  const Tensor y = moe_ext::combine(y_sorted, weights, plan.row_of, plan.token_of);
  const Tensor loss = (y.to(at::kDouble) * g).sum() + 0.3 * moe_ext::load_balancing_loss(scores, indices, E) +
                      0.2 * moe_ext::router_z_loss(logits);
  const auto grads = torch::autograd::grad({loss}, {logits, x, w});

  // The same model in float64 ATen on copies of the same values.
  const Tensor logits_ref = leaf(logits.to(at::kDouble)), x_ref = leaf(x.to(at::kDouble));
  const Tensor w_ref = leaf(w.to(at::kDouble));
  const bool softmax = std::string(c.score_func) == "softmax";
  const auto ref = reference_gating(logits_ref, k, softmax, c.normalize, c.scale, bias);
  ASSERT_TRUE(at::equal(indices, ref.indices));
  const Tensor keep = plan.row_of.ge(0);
  const Tensor y_ref = reference_moe(x_ref, w_ref, ref.weights, ref.indices, keep);
  const Tensor loss_ref = (y_ref * g).sum() + 0.3 * reference_load_balancing_loss(ref.scores, ref.indices, E) +
                          0.2 * reference_z_loss(logits_ref);
  const auto grads_ref = torch::autograd::grad({loss_ref}, {logits_ref, x_ref, w_ref});

  const double tol = c.dtype == at::kDouble ? 1e-10 : 2e-4;
  expect_close(y, y_ref, tol, tol, "y");
  expect_close(loss, loss_ref, tol, tol, "loss");
  expect_close(grads[0], grads_ref[0], tol, tol, "grad logits");
  expect_close(grads[1], grads_ref[1], tol, tol, "grad x");
  expect_close(grads[2], grads_ref[2], tol, tol, "grad w");
  EXPECT_EQ(grads[0].scalar_type(), c.dtype);
  EXPECT_EQ(grads[1].scalar_type(), c.dtype);
  EXPECT_EQ(grads[2].scalar_type(), c.dtype);
}

INSTANTIATE_TEST_SUITE_P(Ops, Pipeline,
                         ::testing::Values(PipelineCase{at::kDouble, "softmax", true, 1.0, std::nullopt, false},
                                           PipelineCase{at::kDouble, "softmax", false, 1.0, std::nullopt, false},
                                           PipelineCase{at::kDouble, "softmax", true, 1.0, 7, false},
                                           PipelineCase{at::kDouble, "sigmoid", true, 2.5, std::nullopt, true},
                                           PipelineCase{at::kDouble, "sigmoid", false, 1.5, 6, true},
                                           PipelineCase{at::kFloat, "softmax", true, 1.0, std::nullopt, false},
                                           PipelineCase{at::kFloat, "sigmoid", true, 2.5, 8, true}),
                         case_name);

TEST(Pipeline, TensorBackwardFillsLeafGradients) {
  at::manual_seed(14);
  const int64_t T = 10, E = 4, k = 2, H = 3;
  const Tensor logits = leaf(randn({T, E}));
  const Tensor x = leaf(randn({T, H}));
  const Tensor w = leaf(randn({E, H, H}));
  const auto [weights, indices, scores] = moe_ext::topk_gating(logits, k);
  const Plan plan = make_plan(indices, E);
  const Tensor y =
      moe_ext::combine(moe_ext::grouped_mm(moe_ext::dispatch(x, plan.token_of, plan.row_of), w, plan.offsets), weights,
                       plan.row_of, plan.token_of);
  EXPECT_TRUE(y.requires_grad());
  EXPECT_FALSE(indices.requires_grad());
  EXPECT_FALSE(plan.row_of.requires_grad());
  y.pow(2).sum().backward();
  ASSERT_TRUE(logits.grad().defined());
  ASSERT_TRUE(x.grad().defined());
  ASSERT_TRUE(w.grad().defined());
  EXPECT_GT(logits.grad().abs().sum().item<double>(), 0.0);
  EXPECT_GT(x.grad().abs().sum().item<double>(), 0.0);
  EXPECT_GT(w.grad().abs().sum().item<double>(), 0.0);
}

TEST(Pipeline, OnlyScoresUsedStillGivesLogitGradients) {
  // weights unused: its gradient is undefined and must count as zero.
  at::manual_seed(15);
  const Tensor logits = leaf(randn({12, 5}));
  const auto [weights, indices, scores] = moe_ext::topk_gating(logits, 2);
  const Tensor grad = torch::autograd::grad({(scores * scores).sum()}, {logits})[0];
  const Tensor logits_ref = leaf(logits);
  const Tensor s = at::softmax(logits_ref, -1);
  const Tensor grad_ref = torch::autograd::grad({(s * s).sum()}, {logits_ref})[0];
  expect_close(grad, grad_ref, 1e-12, 1e-12, "grad logits");
}

TEST(Pipeline, ZeroTokensWork) {
  const int64_t E = 4, k = 2, H = 3;
  const Tensor logits = leaf(randn({0, E}));
  const Tensor x = leaf(randn({0, H}));
  const Tensor w = leaf(randn({E, H, H}));
  const auto [weights, indices, scores] = moe_ext::topk_gating(logits, k);
  EXPECT_EQ(weights.sizes(), (std::vector<int64_t>{0, k}));
  const Plan plan = make_plan(indices, E);
  EXPECT_EQ(plan.token_of.numel(), 0);
  EXPECT_EQ(to_vector(plan.offsets), (std::vector<int64_t>{0, 0, 0, 0, 0}));
  const Tensor y =
      moe_ext::combine(moe_ext::grouped_mm(moe_ext::dispatch(x, plan.token_of, plan.row_of), w, plan.offsets), weights,
                       plan.row_of, plan.token_of);
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{0, H}));
  const Tensor loss = y.sum() + moe_ext::load_balancing_loss(scores, indices, E) + moe_ext::router_z_loss(logits);
  EXPECT_EQ(loss.item<double>(), 0.0);
  const auto grads = torch::autograd::grad({loss}, {logits, x, w});
  EXPECT_EQ(grads[0].sizes(), logits.sizes());
  EXPECT_EQ(grads[1].sizes(), x.sizes());
  EXPECT_TRUE(at::equal(grads[2], at::zeros_like(w)));
}

TEST(Pipeline, NonContiguousInputsGiveTheSameResults) {
  at::manual_seed(16);
  const int64_t T = 17, E = 5, k = 2, H = 6, F = 4;
  const Tensor logits_t = randn({E, T}), x_t = randn({H, T}), w_t = randn({E, F, H});
  const Tensor logits = logits_t.t(), x = x_t.t(), w = w_t.transpose(1, 2);
  ASSERT_FALSE(logits.is_contiguous());
  const auto run = [&](const Tensor& l, const Tensor& xs, const Tensor& ws) {
    const auto [weights, indices, scores] = moe_ext::topk_gating(l, k);
    const Plan plan = make_plan(indices, E);
    return moe_ext::combine(moe_ext::grouped_mm(moe_ext::dispatch(xs, plan.token_of, plan.row_of), ws, plan.offsets),
                            weights, plan.row_of, plan.token_of);
  };
  // Non-contiguous logits and x are copied first: the same bits.
  const Tensor reference = run(logits.contiguous(), x.contiguous(), w.contiguous());
  EXPECT_TRUE(at::equal(run(logits, x, w.contiguous()), reference));
  // A transposed w ([E, out, in] storage) is read in place, by GEMMs over the other layout: each output is
  // summed in another fixed order, so equal within rounding (and bitwise the same from run to run).
  const Tensor transposed = run(logits, x, w);
  EXPECT_TRUE(at::allclose(transposed, reference, 1e-5, 1e-6));
  EXPECT_TRUE(at::equal(transposed, run(logits, x, w)));
  // Any other non-contiguous w (here every other expert) is copied to row-major: the same bits again.
  const Tensor spaced_t = randn({2 * E, H, F}), spaced = spaced_t.slice(0, 0, 2 * E, 2);
  ASSERT_FALSE(spaced.is_contiguous());
  EXPECT_TRUE(at::equal(run(logits, x, spaced), run(logits, x, spaced.contiguous())));
}

// Runs `run` at 1, 2, 3 and 4 threads (3 and 4 oversubscribe a 2-core machine: still valid counts) and
// expects every result bitwise equal to the 1-thread one.
template <typename Run>
void expect_same_bits_for_1_to_4_threads(const Run& run, const std::vector<std::string>& names) {
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const std::vector<Tensor> one = run();
  ASSERT_EQ(one.size(), names.size());
  for (int n = 2; n <= 4; ++n) {
    at::set_num_threads(n);
    const std::vector<Tensor> many = run();
    for (size_t i = 0; i < one.size(); ++i)
      EXPECT_TRUE(at::equal(one[i], many[i])) << names[i] << ", " << n << " threads";
  }
  at::set_num_threads(threads);
}

TEST(Pipeline, BitwiseSameWhateverTheThreadCount) {
  at::manual_seed(17);
  const int64_t T = 3000, E = 8, k = 2, H = 64, F = 96;
  const Tensor x0 = randn({T, H}, at::kFloat), router0 = randn({E, H}, at::kFloat) * 0.1;
  const Tensor router_bias0 = randn({E}, at::kFloat), w0 = randn({E, H, F}, at::kFloat) * 0.1;
  const auto run = [&] {
    const Tensor x = leaf(x0), router = leaf(router0), router_bias = leaf(router_bias0), w = leaf(w0);
    const Tensor logits = moe_ext::linear(x, router, router_bias);
    const auto [weights, indices, scores] = moe_ext::topk_gating(logits, k);
    const Plan plan = make_plan(indices, E);
    const Tensor y =
        moe_ext::combine(moe_ext::grouped_mm(moe_ext::dispatch(x, plan.token_of, plan.row_of), w, plan.offsets),
                         weights, plan.row_of, plan.token_of);
    const Tensor balance = moe_ext::load_balancing_loss(scores, indices, E);
    const Tensor z = moe_ext::router_z_loss(logits);
    // y.pow(2).sum() is ATen's reduction, whose value may depend on the thread count; its gradient 2y
    // does not, so only the moe_ext values and the gradients are compared.
    auto grads = torch::autograd::grad({y.pow(2).sum() + balance + z}, {x, router, router_bias, w});
    grads.insert(grads.end(), {y.detach(), balance.detach(), z.detach(), scores.detach(), weights.detach()});
    return grads;
  };
  expect_same_bits_for_1_to_4_threads(run, {"grad x", "grad router", "grad router bias", "grad w", "y",
                                            "load_balancing_loss", "router_z_loss", "scores", "weights"});
}

// GEMMs too small for a parallel region run on the calling thread, where the BLAS library is otherwise free
// to split a long reduction between its threads: one expert with 4096 rows and 8 x 4 weights, a linear of
// 4096 rows to 4 outputs, in every dtype.
TEST(Pipeline, SmallGemmsWithLongReductionsBitwiseSameWhateverTheThreadCount) {
  for (const auto dtype : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}) {
    at::manual_seed(3);
    const int64_t N = 4096;
    const Tensor x0 = randn({N, 8}, dtype), w0 = randn({1, 8, 4}, dtype), weight0 = randn({4, 8}, dtype);
    const Tensor bias0 = randn({4}, dtype), grad0 = randn({N, 4}, dtype);
    const Tensor offsets = at::tensor({int64_t(0), N}, at::kLong);
    const auto run = [&] {
      const Tensor x = leaf(x0), w = leaf(w0), weight = leaf(weight0), bias = leaf(bias0);
      const Tensor y = moe_ext::grouped_mm(x, w, offsets), z = moe_ext::linear(x, weight, bias);
      auto grads = torch::autograd::grad({y, z}, {x, w, weight, bias}, {grad0, grad0});
      grads.insert(grads.end(), {y.detach(), z.detach()});
      return grads;
    };
    expect_same_bits_for_1_to_4_threads(run, {"grad x", "grad w", "grad weight", "grad bias", "grouped_mm", "linear"});
  }
}

// ---------------------------------------------------------------------------------------------------------
// Meta kernels: shapes without data

TEST(Meta, ShapesWithoutData) {
  const auto meta = at::TensorOptions().device(at::kMeta);
  const Tensor logits = at::empty({11, 6}, meta.dtype(at::kHalf));
  const auto [weights, indices, scores] = moe_ext::topk_gating(logits, 2);
  EXPECT_TRUE(weights.is_meta());
  EXPECT_EQ(weights.sizes(), (std::vector<int64_t>{11, 2}));
  EXPECT_EQ(weights.scalar_type(), at::kFloat);
  EXPECT_EQ(indices.scalar_type(), at::kLong);
  EXPECT_EQ(scores.sizes(), (std::vector<int64_t>{11, 6}));
  const Plan dropless = make_plan(indices, 6);
  EXPECT_EQ(dropless.token_of.sizes(), (std::vector<int64_t>{22}));
  EXPECT_EQ(dropless.offsets.sizes(), (std::vector<int64_t>{7}));
  const Plan capped = make_plan(indices, 6, 3);
  EXPECT_EQ(capped.token_of.sizes(), (std::vector<int64_t>{18}));
  const Tensor x = at::empty({11, 4}, meta.dtype(at::kHalf));
  const Tensor x_sorted = moe_ext::dispatch(x, capped.token_of, capped.row_of);
  EXPECT_EQ(x_sorted.sizes(), (std::vector<int64_t>{18, 4}));
  const Tensor y_sorted = moe_ext::grouped_mm(x_sorted, at::empty({6, 4, 5}, meta.dtype(at::kHalf)), capped.offsets);
  EXPECT_EQ(y_sorted.sizes(), (std::vector<int64_t>{18, 5}));
  const Tensor y = moe_ext::combine(y_sorted, weights, capped.row_of, capped.token_of);
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{11, 5}));
  EXPECT_EQ(y.scalar_type(), at::kHalf);
  EXPECT_EQ(moe_ext::load_balancing_loss(scores, indices, 6).dim(), 0);
  EXPECT_EQ(moe_ext::router_z_loss(logits).dim(), 0);
}

}  // namespace
