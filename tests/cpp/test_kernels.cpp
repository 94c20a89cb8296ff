// GoogleTest of the torch-free routing headers (csrc/kernels/*.h, csrc/cuda/plan_steps.cuh) on raw arrays; no torch.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/plan_steps.cuh"
#include "kernels/gating.h"
#include "kernels/permute.h"
#include "kernels/plan.h"

namespace moe_ext {
namespace kernels {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

GatingConfig config(int64_t num_experts, int64_t k, ScoreFunc func = ScoreFunc::kSoftmax, bool normalize = true,
                    double scale = 1.0, int64_t n_group = 1, int64_t topk_group = 1) {
  return GatingConfig{num_experts, k, func, normalize, scale, n_group, topk_group};
}

// Selection of the top k of `values` through token_select, on a copy (token_select overwrites its input).
std::vector<int64_t> select_topk(std::vector<double> values, const GatingConfig& cfg, const bool* enabled = nullptr,
                                 GateStatus expected = GateStatus::kOk) {
  std::vector<double> groups(static_cast<size_t>(cfg.n_group));
  std::vector<int64_t> indices(static_cast<size_t>(cfg.k), -7);
  EXPECT_EQ(token_select(values.data(), enabled, cfg, groups.data(), indices.data()), expected);
  return indices;
}

// ---------------------------------------------------------------------------------------------------------
// common.h

TEST(Common, AccumulationTypes) {
  static_assert(std::is_same_v<acc_t<double>, double>);
  static_assert(std::is_same_v<acc_t<float>, float>);
  static_assert(std::is_same_v<acc_t<uint16_t>, float>);  // stands in for bf16 / fp16 storage types
  EXPECT_EQ(neg_infinity<float>(), -std::numeric_limits<float>::infinity());
  EXPECT_EQ(neg_infinity<double>(), -kInf);
}

// ---------------------------------------------------------------------------------------------------------
// gating.h: token_scores

TEST(TokenScores, SoftmaxMatchesDefinitionAndSumsToOne) {
  const std::vector<float> logits = {1.5f, -2.0f, 0.25f, 3.0f, 0.0f, -0.75f};
  const auto cfg = config(6, 2);
  std::vector<double> scores(6);
  ASSERT_EQ(token_scores(logits.data(), nullptr, cfg, scores.data()), GateStatus::kOk);
  double denom = 0;
  for (float l : logits) denom += std::exp(static_cast<double>(l));
  double total = 0;
  for (int e = 0; e < 6; ++e) {
    EXPECT_NEAR(scores[e], std::exp(static_cast<double>(logits[e])) / denom, 1e-15) << "expert " << e;
    total += scores[e];
  }
  EXPECT_NEAR(total, 1.0, 1e-15);
}

TEST(TokenScores, SoftmaxIsShiftInvariantForHugeLogits) {
  // Without the max subtraction exp(1000) overflows to inf and every score is NaN.
  const std::vector<double> logits = {1000.0, 999.0, 998.0};
  std::vector<double> scores(3);
  ASSERT_EQ(token_scores(logits.data(), nullptr, config(3, 1), scores.data()), GateStatus::kOk);
  const double denom = 1 + std::exp(-1.0) + std::exp(-2.0);
  EXPECT_NEAR(scores[0], 1 / denom, 1e-15);
  EXPECT_NEAR(scores[1], std::exp(-1.0) / denom, 1e-15);
  EXPECT_NEAR(scores[2], std::exp(-2.0) / denom, 1e-15);
}

TEST(TokenScores, SoftmaxOverEnabledExpertsOnly) {
  const std::vector<double> logits = {0.5, 4.0, -1.0, 2.0};
  const bool enabled[] = {true, false, true, true};
  std::vector<double> scores(4, -1.0);
  ASSERT_EQ(token_scores(logits.data(), enabled, config(4, 1), scores.data()), GateStatus::kOk);
  EXPECT_EQ(scores[1], 0.0);
  const double denom = std::exp(0.5) + std::exp(-1.0) + std::exp(2.0);
  EXPECT_NEAR(scores[0], std::exp(0.5) / denom, 1e-15);
  EXPECT_NEAR(scores[2], std::exp(-1.0) / denom, 1e-15);
  EXPECT_NEAR(scores[3], std::exp(2.0) / denom, 1e-15);
  EXPECT_NEAR(scores[0] + scores[2] + scores[3], 1.0, 1e-15);
}

TEST(TokenScores, SoftmaxNegativeInfinityLogitGetsZero) {
  const std::vector<double> logits = {-kInf, 0.0, 0.0};
  std::vector<double> scores(3);
  ASSERT_EQ(token_scores(logits.data(), nullptr, config(3, 1), scores.data()), GateStatus::kOk);
  EXPECT_EQ(scores[0], 0.0);
  EXPECT_DOUBLE_EQ(scores[1], 0.5);
  EXPECT_DOUBLE_EQ(scores[2], 0.5);
}

TEST(TokenScores, SoftmaxRejectsInputsWithoutADistribution) {
  std::vector<double> scores(3);
  const auto cfg = config(3, 1);
  const std::vector<double> nan_logit = {0.0, kNaN, 1.0};
  const std::vector<double> pos_inf = {0.0, kInf, 1.0};
  const std::vector<double> all_neg_inf = {-kInf, -kInf, -kInf};
  EXPECT_EQ(token_scores(nan_logit.data(), nullptr, cfg, scores.data()), GateStatus::kNonFinite);
  EXPECT_EQ(token_scores(pos_inf.data(), nullptr, cfg, scores.data()), GateStatus::kNonFinite);
  EXPECT_EQ(token_scores(all_neg_inf.data(), nullptr, cfg, scores.data()), GateStatus::kNonFinite);
  // The only finite logits belong to disabled experts: no distribution over the enabled ones.
  const std::vector<double> finite_only_disabled = {1.0, -kInf, -kInf};
  const bool enabled[] = {false, true, true};
  EXPECT_EQ(token_scores(finite_only_disabled.data(), enabled, cfg, scores.data()), GateStatus::kNonFinite);
  // A NaN is rejected even in a disabled expert's column.
  const bool only_first[] = {true, false, false};
  EXPECT_EQ(token_scores(nan_logit.data(), only_first, cfg, scores.data()), GateStatus::kNonFinite);
}

TEST(TokenScores, SigmoidIsElementwise) {
  const std::vector<float> logits = {0.0f, 2.0f, -3.0f, 40.0f, -std::numeric_limits<float>::infinity()};
  const bool enabled[] = {true, true, false, true, true};
  std::vector<float> scores(5, -1.0f);
  ASSERT_EQ(token_scores(logits.data(), enabled, config(5, 1, ScoreFunc::kSigmoid), scores.data()), GateStatus::kOk);
  EXPECT_FLOAT_EQ(scores[0], 0.5f);
  EXPECT_FLOAT_EQ(scores[1], 1.0f / (1.0f + std::exp(-2.0f)));
  EXPECT_EQ(scores[2], 0.0f);  // disabled
  EXPECT_FLOAT_EQ(scores[3], 1.0f);
  EXPECT_EQ(scores[4], 0.0f);
  // Sigmoid scores need not sum to 1.
  const float total = std::accumulate(scores.begin(), scores.end(), 0.0f);
  EXPECT_GT(total, 1.5f);
  const std::vector<double> nan_logit = {kNaN, 0.0};
  std::vector<double> out(2);
  EXPECT_EQ(token_scores(nan_logit.data(), nullptr, config(2, 1, ScoreFunc::kSigmoid), out.data()),
            GateStatus::kNonFinite);
}

// ---------------------------------------------------------------------------------------------------------
// gating.h: token_select

TEST(TokenSelect, DescendingOrder) {
  EXPECT_EQ(select_topk({0.1, 0.7, 0.05, 0.9, 0.3}, config(5, 3)), (std::vector<int64_t>{3, 1, 4}));
}

TEST(TokenSelect, TiesGoToTheLowerIndex) {
  EXPECT_EQ(select_topk({0.5, 0.9, 0.9, 0.1}, config(4, 2)), (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(select_topk({0.2, 0.2, 0.2, 0.2}, config(4, 3)), (std::vector<int64_t>{0, 1, 2}));
  EXPECT_EQ(select_topk({0.1, 0.3, 0.3, 0.3}, config(4, 4)), (std::vector<int64_t>{1, 2, 3, 0}));
}

TEST(TokenSelect, MatchesKPassesOfOutranksOnRandomTiedInputs) {
  // token_select ranks in one pass; the definition is k passes, each taking the candidate that
  // outranks all others left (larger value, ties to the lower index). Values come from a set of 5
  // (ties everywhere), -inf marks non-candidates, and some experts are disabled.
  std::mt19937 rng(12345);
  const double levels[] = {-kInf, -1.0, 0.0, 0.25, 0.25, 2.0};
  int too_few = 0;
  for (int trial = 0; trial < 5000; ++trial) {
    const int64_t E = 1 + static_cast<int64_t>(rng() % 40);
    const int64_t k = 1 + static_cast<int64_t>(rng() % static_cast<uint32_t>(E));
    std::vector<double> values(static_cast<size_t>(E));
    std::unique_ptr<bool[]> enabled(new bool[static_cast<size_t>(E)]);
    for (int64_t e = 0; e < E; ++e) {
      values[e] = levels[rng() % 6];
      enabled[e] = rng() % 8 != 0;
    }
    std::vector<double> left = values;
    for (int64_t e = 0; e < E; ++e) {
      if (!enabled[e]) left[e] = -kInf;
    }
    std::vector<int64_t> want;
    for (int64_t j = 0; j < k; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e) {
        if (left[e] > -kInf && (best < 0 || outranks(left[e], e, left[best], best))) best = e;
      }
      if (best < 0) break;
      want.push_back(best);
      left[best] = -kInf;
    }
    const bool enough = static_cast<int64_t>(want.size()) == k;
    too_few += enough ? 0 : 1;
    const auto got =
        select_topk(values, config(E, k), enabled.get(), enough ? GateStatus::kOk : GateStatus::kTooFewExperts);
    if (enough) {
      ASSERT_EQ(got, want) << "trial " << trial << " E = " << E << " k = " << k;
    }
  }
  EXPECT_GT(too_few, 100);  // both outcomes were exercised
}

TEST(TokenSelect, DisabledExpertsAreNeverChosen) {
  const bool enabled[] = {true, false, true, false};
  EXPECT_EQ(select_topk({0.1, 0.9, 0.2, 0.8}, config(4, 2), enabled), (std::vector<int64_t>{2, 0}));
  // Only two enabled experts for k = 3.
  select_topk({0.1, 0.9, 0.2, 0.8}, config(4, 3), enabled, GateStatus::kTooFewExperts);
}

TEST(TokenSelect, NegativeSelectionValuesAreStillCandidates) {
  // score + bias can be negative: only -inf means "not a candidate".
  EXPECT_EQ(select_topk({-0.5, -0.1, -2.0}, config(3, 2)), (std::vector<int64_t>{1, 0}));
}

TEST(TokenSelect, GroupLimitedKeepsTheBestGroupsByTopTwoSum) {
  // Groups of two: g0 = {0.9, 0.0} -> 0.9, g1 = {0.5, 0.45} -> 0.95, g2 = {0.8, 0.05} -> 0.85, g3 -> 0.2.
  const std::vector<double> values = {0.9, 0.0, 0.5, 0.45, 0.8, 0.05, 0.1, 0.1};
  // Unlimited: the two best experts overall.
  EXPECT_EQ(select_topk(values, config(8, 2)), (std::vector<int64_t>{0, 4}));
  // Two groups kept (g1, g0): expert 4 in g2 is out of reach.
  EXPECT_EQ(select_topk(values, config(8, 2, ScoreFunc::kSigmoid, true, 1.0, 4, 2)), (std::vector<int64_t>{0, 2}));
  // One group kept (g1): both picks come from it.
  EXPECT_EQ(select_topk(values, config(8, 2, ScoreFunc::kSigmoid, true, 1.0, 4, 1)), (std::vector<int64_t>{2, 3}));
  // k larger than the experts of the kept groups.
  select_topk(values, config(8, 3, ScoreFunc::kSigmoid, true, 1.0, 4, 1), nullptr, GateStatus::kTooFewExperts);
}

TEST(TokenSelect, GroupTiesGoToTheLowerGroup) {
  // g0 = {0.375, 0.375} and g1 = {0.5, 0.25} both score 0.75 (exactly); topk_group = 1 must keep g0,
  // although the best single expert (2) is in g1.
  const std::vector<double> values = {0.375, 0.375, 0.5, 0.25};
  EXPECT_EQ(select_topk(values, config(4, 1)), (std::vector<int64_t>{2}));
  EXPECT_EQ(select_topk(values, config(4, 1, ScoreFunc::kSoftmax, true, 1.0, 2, 1)), (std::vector<int64_t>{0}));
}

TEST(TokenSelect, SingleExpertGroupsScoreByTheirOnlyExpert) {
  // Group size 1: a group's score is its expert's value, so group-limited == plain top-k.
  const std::vector<double> values = {0.3, 0.8, 0.1, 0.5};
  EXPECT_EQ(select_topk(values, config(4, 2, ScoreFunc::kSoftmax, true, 1.0, 4, 2)), (std::vector<int64_t>{1, 3}));
}

TEST(TokenSelect, GroupScoreIgnoresDisabledExperts) {
  // g0 = {0.9 disabled, 0.1} -> 0.1, g1 = {0.3, 0.2} -> 0.5: keeping one group must keep g1.
  const bool enabled[] = {false, true, true, true};
  EXPECT_EQ(select_topk({0.9, 0.1, 0.3, 0.2}, config(4, 1, ScoreFunc::kSoftmax, true, 1.0, 2, 1), enabled),
            (std::vector<int64_t>{2}));
}

// ---------------------------------------------------------------------------------------------------------
// gating.h: token_weights

TEST(TokenWeights, NormalizeSumsToScale) {
  const std::vector<double> scores = {0.1, 0.4, 0.2, 0.3};
  const std::vector<int64_t> indices = {1, 3};
  std::vector<double> weights(2);
  token_weights(scores.data(), indices.data(), config(4, 2, ScoreFunc::kSoftmax, true, 2.5), weights.data());
  EXPECT_NEAR(weights[0], 2.5 * 0.4 / 0.7, 1e-15);
  EXPECT_NEAR(weights[1], 2.5 * 0.3 / 0.7, 1e-15);
  EXPECT_NEAR(weights[0] + weights[1], 2.5, 1e-15);
}

TEST(TokenWeights, WithoutNormalizeTheyAreScaledScores) {
  const std::vector<float> scores = {0.1f, 0.4f, 0.2f, 0.3f};
  const std::vector<int64_t> indices = {2, 0};
  std::vector<float> weights(2);
  token_weights(scores.data(), indices.data(), config(4, 2, ScoreFunc::kSigmoid, false, 3.0), weights.data());
  EXPECT_FLOAT_EQ(weights[0], 0.6f);
  EXPECT_FLOAT_EQ(weights[1], 0.3f);
}

TEST(TokenWeights, AllZeroScoresGiveZeroWeightsNotNaN) {
  const std::vector<float> scores = {0.0f, 0.0f, 1.0f};
  const std::vector<int64_t> indices = {0, 1};
  std::vector<float> weights(2);
  token_weights(scores.data(), indices.data(), config(3, 2), weights.data());
  EXPECT_EQ(weights[0], 0.0f);
  EXPECT_EQ(weights[1], 0.0f);
}

// ---------------------------------------------------------------------------------------------------------
// gating.h: token_gating_backward against central finite differences

struct GatingCase {
  ScoreFunc func;
  bool normalize;
  double scale;
  bool with_grad_weights;
  bool with_grad_scores;
};

// L(logits) = sum_j gw_j * w_j + sum_e gs_e * s_e with the chosen experts held fixed.
double gating_objective(const std::vector<double>& logits, const std::vector<int64_t>& indices,
                        const std::vector<double>& grad_weights, const std::vector<double>& grad_scores,
                        const GatingConfig& cfg, const GatingCase& c) {
  const auto E = static_cast<size_t>(cfg.num_experts);
  std::vector<double> scores(E), weights(static_cast<size_t>(cfg.k));
  EXPECT_EQ(token_scores(logits.data(), nullptr, cfg, scores.data()), GateStatus::kOk);
  token_weights(scores.data(), indices.data(), cfg, weights.data());
  double value = 0;
  if (c.with_grad_weights) {
    for (int64_t j = 0; j < cfg.k; ++j) value += grad_weights[j] * weights[j];
  }
  if (c.with_grad_scores) {
    for (size_t e = 0; e < E; ++e) value += grad_scores[e] * scores[e];
  }
  return value;
}

class GatingBackward : public ::testing::TestWithParam<GatingCase> {};

TEST_P(GatingBackward, MatchesFiniteDifferences) {
  const GatingCase c = GetParam();
  const int64_t E = 6, k = 3;
  const auto cfg = config(E, k, c.func, c.normalize, c.scale);
  const std::vector<double> logits = {0.3, -1.2, 2.0, 0.7, -0.4, 1.1};
  const std::vector<double> grad_weights = {0.8, -1.5, 0.35};
  const std::vector<double> grad_scores = {0.2, -0.6, 1.3, 0.05, -0.9, 0.4};

  std::vector<double> scores(E), select(E), groups(1);
  std::vector<int64_t> indices(k);
  ASSERT_EQ(token_scores(logits.data(), nullptr, cfg, scores.data()), GateStatus::kOk);
  select = scores;
  ASSERT_EQ(token_select(select.data(), nullptr, cfg, groups.data(), indices.data()), GateStatus::kOk);

  std::vector<double> buffer(E), grad_logits(E);
  token_gating_backward(c.with_grad_weights ? grad_weights.data() : nullptr,
                        c.with_grad_scores ? grad_scores.data() : nullptr, scores.data(), indices.data(), cfg,
                        buffer.data(), grad_logits.data());

  const double h = 1e-6;
  for (int64_t e = 0; e < E; ++e) {
    std::vector<double> plus = logits, minus = logits;
    plus[e] += h;
    minus[e] -= h;
    const double numeric = (gating_objective(plus, indices, grad_weights, grad_scores, cfg, c) -
                            gating_objective(minus, indices, grad_weights, grad_scores, cfg, c)) /
                           (2 * h);
    EXPECT_NEAR(grad_logits[e], numeric, 1e-8) << "expert " << e;
  }
}

TEST_P(GatingBackward, WritesTheRequestedOutputType) {
  // The same gradient written to float storage (as for float32/bf16/fp16 logits).
  const GatingCase c = GetParam();
  const auto cfg = config(4, 2, c.func, c.normalize, c.scale);
  const std::vector<double> scores_in = {0.1, 0.2, 0.3, 0.4};
  const std::vector<int64_t> indices = {3, 2};
  const std::vector<double> gw = {1.0, -0.5}, gs = {0.3, 0.1, -0.2, 0.7};
  std::vector<double> buffer(4), as_double(4);
  std::vector<float> as_float(4);
  const double* gw_ptr = c.with_grad_weights ? gw.data() : nullptr;
  const double* gs_ptr = c.with_grad_scores ? gs.data() : nullptr;
  token_gating_backward(gw_ptr, gs_ptr, scores_in.data(), indices.data(), cfg, buffer.data(), as_double.data());
  token_gating_backward(gw_ptr, gs_ptr, scores_in.data(), indices.data(), cfg, buffer.data(), as_float.data());
  for (int e = 0; e < 4; ++e) EXPECT_EQ(as_float[e], static_cast<float>(as_double[e]));
}

INSTANTIATE_TEST_SUITE_P(Kernels, GatingBackward,
                         ::testing::Values(GatingCase{ScoreFunc::kSoftmax, true, 1.0, true, true},
                                           GatingCase{ScoreFunc::kSoftmax, true, 2.5, true, false},
                                           GatingCase{ScoreFunc::kSoftmax, false, 1.0, true, true},
                                           GatingCase{ScoreFunc::kSoftmax, false, 0.5, false, true},
                                           GatingCase{ScoreFunc::kSigmoid, true, 1.0, true, true},
                                           GatingCase{ScoreFunc::kSigmoid, true, 2.5, true, false},
                                           GatingCase{ScoreFunc::kSigmoid, false, 1.7, true, true},
                                           GatingCase{ScoreFunc::kSigmoid, false, 1.0, false, false}),
                         [](const ::testing::TestParamInfo<GatingCase>& info) {
                           const GatingCase& c = info.param;
                           return std::string(c.func == ScoreFunc::kSoftmax ? "softmax" : "sigmoid") +
                                  (c.normalize ? "_norm" : "") + "_scale" +
                                  std::to_string(static_cast<int>(c.scale * 10)) + (c.with_grad_weights ? "_gw" : "") +
                                  (c.with_grad_scores ? "_gs" : "");
                         });

TEST(GatingBackwardNoGrad, ZeroGradientsGiveZero) {
  const auto cfg = config(3, 1);
  const std::vector<double> scores = {0.2, 0.5, 0.3};
  const std::vector<int64_t> indices = {1};
  std::vector<double> buffer(3, 123.0), grad(3, 123.0);
  token_gating_backward<double, double>(nullptr, nullptr, scores.data(), indices.data(), cfg, buffer.data(),
                                        grad.data());
  for (double g : grad) EXPECT_EQ(g, 0.0);
}

// ---------------------------------------------------------------------------------------------------------
// plan.h

TEST(CountExperts, CountsValidIndicesAndReportsTheFirstBadOne) {
  const std::vector<int64_t> indices = {0, 2, 5, 1, -1, 2, 2, 7};
  std::vector<int64_t> counts(3, 0);
  EXPECT_EQ(count_experts(indices.data(), 0, 8, 3, counts.data()), 2);
  EXPECT_EQ(counts, (std::vector<int64_t>{1, 1, 3}));  // 5, -1 and 7 are not counted
}

TEST(CountExperts, RangesAccumulateAndReportAbsolutePositions) {
  const std::vector<int64_t> indices = {1, 1, 0, 3, 2, 0};
  std::vector<int64_t> counts(3, 0);
  EXPECT_EQ(count_experts(indices.data(), 0, 3, 3, counts.data()), -1);
  EXPECT_EQ(counts, (std::vector<int64_t>{1, 2, 0}));
  EXPECT_EQ(count_experts(indices.data(), 3, 6, 3, counts.data()), 3);
  EXPECT_EQ(counts, (std::vector<int64_t>{2, 2, 1}));
  EXPECT_EQ(count_experts(indices.data(), 4, 4, 3, counts.data()), -1);  // empty range
}

TEST(PlaceStable, GroupsByExpertInAssignmentOrder) {
  // Assignments (flat t * k + j) routed to experts 1,0,1,2,0,1; expert rows start at 0, 2, 5.
  const std::vector<int64_t> indices = {1, 0, 1, 2, 0, 1};
  std::vector<int64_t> cursor = {0, 2, 5};
  std::vector<int64_t> position(6, -1);
  place_stable(indices.data(), 0, 6, cursor.data(), position.data());
  EXPECT_EQ(position, (std::vector<int64_t>{2, 0, 3, 5, 1, 4}));
  EXPECT_EQ(cursor, (std::vector<int64_t>{2, 5, 6}));
}

TEST(PlaceStable, ChunksWithPrecomputedCursorsMatchOnePass) {
  const std::vector<int64_t> indices = {2, 0, 1, 1, 0, 2, 2, 1, 0, 0};
  std::vector<int64_t> one_cursor = {0, 4, 7};
  std::vector<int64_t> expected(10);
  place_stable(indices.data(), 0, 10, one_cursor.data(), expected.data());
  // Chunk [0, 4) then [4, 10): the second chunk starts after the first chunk's rows of each expert.
  std::vector<int64_t> first = {0, 4, 7}, second = {1, 6, 8};
  std::vector<int64_t> chunked(10);
  place_stable(indices.data(), 4, 10, second.data(), chunked.data());
  place_stable(indices.data(), 0, 4, first.data(), chunked.data());
  EXPECT_EQ(chunked, expected);
  std::vector<int64_t> sorted = expected;
  std::sort(sorted.begin(), sorted.end());
  std::vector<int64_t> iota(10);
  std::iota(iota.begin(), iota.end(), 0);
  EXPECT_EQ(sorted, iota);  // a permutation of the rows
}

TEST(KeptBefore, FirstChoicesThenTokenOrder) {
  const int64_t k = 2;
  const double* none = nullptr;
  // a = t * k + j
  EXPECT_TRUE(kept_before(0, 1, k, none));  // (t0, j0) before (t0, j1)
  EXPECT_TRUE(kept_before(4, 1, k, none));  // (t2, j0) before (t0, j1): first choices first
  EXPECT_FALSE(kept_before(1, 4, k, none));
  EXPECT_TRUE(kept_before(0, 2, k, none));  // same slot: token order
  EXPECT_TRUE(kept_before(3, 5, k, none));
  EXPECT_FALSE(kept_before(3, 3, k, none));  // irreflexive
  std::vector<int64_t> order = {5, 1, 4, 0, 3, 2};
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return kept_before(a, b, k, none); });
  EXPECT_EQ(order, (std::vector<int64_t>{0, 2, 4, 1, 3, 5}));
}

TEST(KeptBefore, PriorityFirstThenTheDefaultOrder) {
  const int64_t k = 2;
  const std::vector<float> priority = {0.2f, 0.9f, 0.5f, 0.5f, 0.9f, 0.1f};
  std::vector<int64_t> order = {0, 1, 2, 3, 4, 5};
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return kept_before(a, b, k, priority.data()); });
  // 0.9: {1 (j1), 4 (j0)} -> 4, 1; 0.5: {2 (j0), 3 (j1)} -> 2, 3; then 0.2 (a0), 0.1 (a5).
  EXPECT_EQ(order, (std::vector<int64_t>{4, 1, 2, 3, 0, 5}));
  EXPECT_FALSE(kept_before(2, 2, k, priority.data()));
}

// A consistent plan for T = 3, k = 2, N = 6 (token 2's second choice dropped, row 5 padding).
struct SmallPlan {
  std::vector<int64_t> row_of = {0, 3, 4, 1, 2, -1};
  std::vector<int64_t> token_of = {0, 1, 2, 0, 1, -1};
  static constexpr int64_t T = 3, k = 2, N = 6;
};

TEST(CheckPlan, ConsistentPlanPasses) {
  const SmallPlan p;
  for (int64_t t = 0; t < p.T; ++t) {
    EXPECT_EQ(check_token_rows(p.row_of.data() + t * p.k, p.k, t, p.token_of.data(), p.N), PlanError::kOk) << t;
  }
  for (int64_t r = 0; r < p.N; ++r) {
    EXPECT_EQ(check_row_token(r, p.token_of.data(), p.row_of.data(), p.T, p.k), PlanError::kOk) << r;
  }
}

TEST(CheckPlan, TokenRowsErrors) {
  SmallPlan p;
  const auto check_token = [&](int64_t t) {
    return check_token_rows(p.row_of.data() + t * p.k, p.k, t, p.token_of.data(), p.N);
  };
  p.row_of[1] = 6;  // == N
  EXPECT_EQ(check_token(0), PlanError::kRowOutOfRange);
  p.row_of[1] = -2;
  EXPECT_EQ(check_token(0), PlanError::kRowOutOfRange);
  p.row_of[1] = 1;  // row 1 belongs to token 1
  EXPECT_EQ(check_token(0), PlanError::kRowNotOwned);
  p.row_of[1] = 5;  // padding row (token_of = -1)
  EXPECT_EQ(check_token(0), PlanError::kRowNotOwned);
  p.row_of[1] = 0;  // row 0 twice
  EXPECT_EQ(check_token(0), PlanError::kDuplicateRow);
  p.row_of[0] = -1;  // dropped slots may repeat -1
  p.row_of[1] = -1;
  EXPECT_EQ(check_token(0), PlanError::kOk);
}

TEST(CheckPlan, RowTokenErrors) {
  SmallPlan p;
  const auto check_row = [&](int64_t r) { return check_row_token(r, p.token_of.data(), p.row_of.data(), p.T, p.k); };
  p.token_of[5] = 3;  // == T
  EXPECT_EQ(check_row(5), PlanError::kTokenOutOfRange);
  p.token_of[5] = -2;
  EXPECT_EQ(check_row(5), PlanError::kTokenOutOfRange);
  p.token_of[5] = 2;  // token 2 does not list row 5
  EXPECT_EQ(check_row(5), PlanError::kRowNotListed);
  p.token_of[5] = -1;
  EXPECT_EQ(check_row(5), PlanError::kOk);
  p.token_of[3] = 1;  // row 3 claims token 1, which lists rows 4 and 1
  EXPECT_EQ(check_row(3), PlanError::kRowNotListed);
}

// ---------------------------------------------------------------------------------------------------------
// permute.h

TEST(Permute, AxpyRowAccumulatesInTheAccumulatorType) {
  const std::vector<float> row = {1.0f, -2.0f, 0.5f};
  std::vector<double> out = {10.0, 20.0, 30.0};
  axpy_row(0.25, row.data(), 3, out.data());
  EXPECT_EQ(out, (std::vector<double>{10.25, 19.5, 30.125}));
  // The sum is kept in the accumulator type: a float sum would round 1 + 1e-8 back to 1.
  const std::vector<float> tiny = {1e-8f};
  std::vector<double> big = {1.0};
  axpy_row(1.0, tiny.data(), 1, big.data());
  EXPECT_GT(big[0], 1.0);
}

TEST(Permute, DotRow) {
  const std::vector<float> a = {1.0f, 2.0f, 3.0f, 4.0f};
  const std::vector<float> b = {0.5f, -1.0f, 2.0f, 0.25f};
  EXPECT_DOUBLE_EQ((dot_row<float, double>(a.data(), b.data(), 4)), 0.5 - 2.0 + 6.0 + 1.0);
  EXPECT_EQ((dot_row<float, double>(a.data(), b.data(), 0)), 0.0);
}

TEST(Permute, DotRowSumsSixteenLanesThenTheTail) {
  // 37 = two whole 16-element blocks and a tail of 5: the order is documented, so check it exactly.
  std::vector<float> a(37), b(37);
  for (int h = 0; h < 37; ++h) {
    a[h] = 1.0f + 0.37f * static_cast<float>(h % 7) - 1e-3f * static_cast<float>(h);
    b[h] = 0.5f - 0.11f * static_cast<float>(h % 5) + 3e-4f * static_cast<float>(h * h);
  }
  float lane[kDotLanes] = {};
  for (int h = 0; h < 32; ++h) lane[h % kDotLanes] += a[h] * b[h];
  float want = 0.0f;
  for (float v : lane) want += v;
  for (int h = 32; h < 37; ++h) want += a[h] * b[h];
  EXPECT_EQ((dot_row<float, float>(a.data(), b.data(), 37)), want);
  double exact = 0.0;
  for (int h = 0; h < 37; ++h) exact += static_cast<double>(a[h]) * static_cast<double>(b[h]);
  EXPECT_NEAR((dot_row<float, double>(a.data(), b.data(), 37)), exact, 1e-12 * std::abs(exact) + 1e-12);
  // fewer elements than one block: the tail alone, left to right
  EXPECT_EQ((dot_row<float, float>(a.data(), b.data(), 3)), (a[0] * b[0] + a[1] * b[1]) + a[2] * b[2]);
}

TEST(Permute, CopyRowAndZeroRow) {
  const std::vector<float> in = {1.0f, 2.0f, 3.0f};
  std::vector<float> out(3, -1.0f);
  copy_row(in.data(), 3, out.data());
  EXPECT_EQ(out, in);
  copy_row<float>(nullptr, 3, out.data());
  EXPECT_EQ(out, (std::vector<float>{0.0f, 0.0f, 0.0f}));
}

TEST(Permute, SlotOfRow) {
  const std::vector<int64_t> rows = {7, -1, 3};
  EXPECT_EQ(slot_of_row(rows.data(), 3, 7), 0);
  EXPECT_EQ(slot_of_row(rows.data(), 3, 3), 2);
  EXPECT_EQ(slot_of_row(rows.data(), 3, 4), -1);
}

// ---------------------------------------------------------------------------------------------------------
// cuda/plan_steps.cuh: the sort-based CUDA make_plan / expert_choice_plan (csrc/cuda/plan_kernel.cu),
// replayed on CPU with std::stable_sort in place of CUB's stable radix sorts, must give the CPU kernels'
// plans (csrc/cpu/plan_kernel.cpp, rebuilt here from kernels/plan.h) bit for bit.

struct HostPlan {
  std::vector<int64_t> row_of, token_of, counts, offsets;
};

// Positions [0, n) stably sorted by key(i); `descending` reverses the key order, not the tie order.
template <typename Key>
std::vector<int32_t> stable_order(const std::vector<int32_t>& items, const std::vector<Key>& keys, bool descending) {
  std::vector<size_t> pos(items.size());
  std::iota(pos.begin(), pos.end(), 0);
  std::stable_sort(pos.begin(), pos.end(),
                   [&](size_t a, size_t b) { return descending ? keys[a] > keys[b] : keys[a] < keys[b]; });
  std::vector<int32_t> out(items.size());
  for (size_t i = 0; i < pos.size(); ++i) out[i] = items[pos[i]];
  return out;
}

// The CUDA make_plan's steps, in order (capacity < 0: dropless).
HostPlan cuda_steps_make_plan(const std::vector<int64_t>& idx, int64_t T, int64_t k, int64_t E, int64_t capacity,
                              const double* priority) {
  namespace steps = cuda::steps;
  const int64_t A = T * k;
  std::vector<int32_t> keys(A), assignments(A);
  for (int64_t a = 0; a < A; ++a) {
    keys[a] = steps::expert_key(idx[a], E);
    assignments[a] = static_cast<int32_t>(a);
  }
  const std::vector<int32_t> sorted = stable_order(assignments, keys, false);
  std::vector<int32_t> sorted_keys(A);
  for (int64_t r = 0; r < A; ++r) sorted_keys[r] = keys[sorted[r]];
  HostPlan plan;
  std::vector<int64_t> offsets(E + 1, -7);
  for (int64_t r = 0; r <= A; ++r) steps::write_boundaries(r, sorted_keys.data(), A, E, offsets.data());
  for (int64_t e = 0; e < E; ++e) plan.counts.push_back(offsets[e + 1] - offsets[e]);
  plan.row_of.assign(A, -7);
  if (capacity < 0) {
    plan.token_of.assign(A, -7);
    for (int64_t r = 0; r < A; ++r) {
      plan.row_of[sorted[r]] = r;
      plan.token_of[r] = sorted[r] / k;
    }
    plan.offsets = offsets;
    return plan;
  }
  plan.token_of.assign(E * capacity, -1);
  for (int64_t e = 0; e <= E; ++e) plan.offsets.push_back(e * capacity);
  std::vector<int32_t> order(A);
  for (int64_t i = 0; i < A; ++i) order[i] = static_cast<int32_t>(steps::choice_major_assignment(i, T, k));
  if (priority != nullptr) {
    std::vector<double> prio_keys(A);
    for (int64_t i = 0; i < A; ++i) prio_keys[i] = steps::value_key(priority[order[i]]);
    order = stable_order(order, prio_keys, true);
  }
  std::vector<int32_t> ranked_keys_in(A);
  for (int64_t i = 0; i < A; ++i) ranked_keys_in[i] = steps::expert_key(idx[order[i]], E);
  const std::vector<int32_t> ranked = stable_order(order, ranked_keys_in, false);
  std::vector<int32_t> keep(A);
  for (int64_t p = 0; p < A; ++p) {
    const int64_t e = steps::expert_key(idx[ranked[p]], E);
    keep[ranked[p]] = e < E && steps::capacity_keeps(p - offsets[e], capacity, priority, ranked[p]);
  }
  std::vector<int64_t> scan(A);
  int64_t running = 0;
  for (int64_t p = 0; p < A; ++p) {
    scan[p] = running;
    running += keep[sorted[p]];
  }
  for (int64_t p = 0; p < A; ++p) {
    const int64_t a = sorted[p], e = sorted_keys[p];
    if (keep[a]) {
      const int64_t row = steps::capacity_row(e, capacity, scan[p], scan[offsets[e]]);
      plan.row_of[a] = row;
      plan.token_of[row] = a / k;
    } else {
      plan.row_of[a] = -1;
    }
  }
  return plan;
}

// The CPU kernel's algorithm: histogram, stable placement, kept_before ranking per expert.
HostPlan cpu_make_plan(const std::vector<int64_t>& idx, int64_t T, int64_t k, int64_t E, int64_t capacity,
                       const double* priority) {
  const int64_t A = T * k;
  HostPlan plan;
  plan.counts.assign(E, 0);
  EXPECT_EQ(count_experts(idx.data(), 0, A, E, plan.counts.data()), -1);
  std::vector<int64_t> begin(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) begin[e + 1] = begin[e] + plan.counts[e];
  std::vector<int64_t> cursor(begin.begin(), begin.end() - 1), position(A), sorted(A);
  place_stable(idx.data(), 0, A, cursor.data(), position.data());
  for (int64_t a = 0; a < A; ++a) sorted[position[a]] = a;
  plan.row_of.assign(A, -1);
  if (capacity < 0) {
    plan.token_of.resize(A);
    for (int64_t a = 0; a < A; ++a) {
      plan.row_of[a] = position[a];
      plan.token_of[position[a]] = a / k;
    }
    plan.offsets = begin;
    return plan;
  }
  plan.token_of.assign(E * capacity, -1);
  for (int64_t e = 0; e <= E; ++e) plan.offsets.push_back(e * capacity);
  for (int64_t e = 0; e < E; ++e) {
    std::vector<int64_t> ranked;
    for (int64_t i = begin[e]; i < begin[e + 1]; ++i) {
      if (priority == nullptr || priority[sorted[i]] != -kInf) ranked.push_back(sorted[i]);
    }
    std::sort(ranked.begin(), ranked.end(), [&](int64_t x, int64_t y) { return kept_before(x, y, k, priority); });
    if (static_cast<int64_t>(ranked.size()) > capacity) ranked.resize(capacity);
    std::sort(ranked.begin(), ranked.end());  // rows in token order
    for (size_t i = 0; i < ranked.size(); ++i) {
      plan.row_of[ranked[i]] = e * capacity + static_cast<int64_t>(i);
      plan.token_of[e * capacity + static_cast<int64_t>(i)] = ranked[i] / k;
    }
  }
  return plan;
}

void expect_same_plan(const HostPlan& got, const HostPlan& want, const std::string& what) {
  EXPECT_EQ(got.row_of, want.row_of) << what;
  EXPECT_EQ(got.token_of, want.token_of) << what;
  EXPECT_EQ(got.counts, want.counts) << what;
  EXPECT_EQ(got.offsets, want.offsets) << what;
}

TEST(CudaPlanSteps, KeysAndBoundaries) {
  EXPECT_EQ(cuda::steps::expert_key(2, 4), 2);
  EXPECT_EQ(cuda::steps::expert_key(-1, 4), 4);  // invalid indices sort last
  EXPECT_EQ(cuda::steps::expert_key(9, 4), 4);
  EXPECT_EQ(cuda::steps::key_bits(1), 1);
  EXPECT_EQ(cuda::steps::key_bits(4), 3);  // keys 0..4 (4 = invalid)
  EXPECT_EQ(cuda::steps::key_bits(7), 3);
  EXPECT_EQ(cuda::steps::key_bits(8), 4);
  // Sorted keys 1 1 3 with E = 5: experts 0, 2 and 4 are empty.
  const std::vector<int32_t> keys = {1, 1, 3};
  std::vector<int64_t> offsets(6, -7);
  for (int64_t r = 0; r <= 3; ++r) cuda::steps::write_boundaries(r, keys.data(), 3, 5, offsets.data());
  EXPECT_EQ(offsets, (std::vector<int64_t>{0, 0, 2, 2, 3, 3}));
  std::vector<int64_t> empty_offsets(3, -7);
  cuda::steps::write_boundaries(0, nullptr, 0, 2, empty_offsets.data());
  EXPECT_EQ(empty_offsets, (std::vector<int64_t>{0, 0, 0}));
  EXPECT_EQ(std::signbit(cuda::steps::value_key(-0.0)), false);
  EXPECT_EQ(cuda::steps::value_key(-kInf), -kInf);
}

TEST(CudaPlanSteps, ChoiceMajorOrderIsKeptBeforeWithoutPriority) {
  for (int64_t T : {1, 2, 5}) {
    for (int64_t k : {1, 2, 3}) {
      std::vector<int64_t> expected(T * k);
      std::iota(expected.begin(), expected.end(), 0);
      std::sort(expected.begin(), expected.end(),
                [&](int64_t a, int64_t b) { return kept_before<double>(a, b, k, nullptr); });
      for (int64_t i = 0; i < T * k; ++i) {
        EXPECT_EQ(cuda::steps::choice_major_assignment(i, T, k), expected[i]) << "T=" << T << " k=" << k;
      }
    }
  }
}

TEST(CudaPlanSteps, SortBasedMakePlanMatchesTheCpuAlgorithm) {
  std::mt19937_64 rng(1234);
  // Priorities from few levels (ties), with -inf (never kept) and both signs of zero.
  const std::vector<double> levels = {-kInf, -0.0, 0.0, 0.25, 0.25, 0.5, 1.0, kInf};
  int cases = 0;
  for (int64_t T : {0, 1, 2, 7, 40}) {
    for (int64_t E : {1, 2, 3, 8}) {
      for (int64_t k : {1, 2, 3}) {
        for (int trial = 0; trial < 3; ++trial) {
          std::vector<int64_t> idx(T * k);
          // Skewed toward low experts so capacity overflows; repeated experts within a token allowed.
          for (auto& e : idx) e = std::min<int64_t>(E - 1, static_cast<int64_t>(rng() % (E + 2)) / 2);
          std::vector<double> priority(T * k);
          for (auto& p : priority) p = levels[rng() % levels.size()];
          const std::string what = "T=" + std::to_string(T) + " E=" + std::to_string(E) + " k=" + std::to_string(k);
          expect_same_plan(cuda_steps_make_plan(idx, T, k, E, -1, nullptr), cpu_make_plan(idx, T, k, E, -1, nullptr),
                           what + " dropless");
          for (int64_t C : {int64_t{0}, int64_t{1}, (T * k + E - 1) / E, T * k}) {
            expect_same_plan(cuda_steps_make_plan(idx, T, k, E, C, nullptr), cpu_make_plan(idx, T, k, E, C, nullptr),
                             what + " C=" + std::to_string(C));
            expect_same_plan(cuda_steps_make_plan(idx, T, k, E, C, priority.data()),
                             cpu_make_plan(idx, T, k, E, C, priority.data()),
                             what + " priority C=" + std::to_string(C));
            ++cases;
          }
        }
      }
    }
  }
  EXPECT_GT(cases, 100);
}

TEST(CudaPlanSteps, ExpertChoiceBySortMatchesTheCpuAlgorithm) {
  std::mt19937_64 rng(99);
  const std::vector<double> levels = {-kInf, -1.0, -0.0, 0.0, 0.5, 0.5, 2.0, kInf};
  for (int64_t T : {1, 3, 9}) {
    for (int64_t E : {1, 4}) {
      for (int64_t C : {0, 1, 2, 5, 12}) {
        std::vector<double> scores(T * E);
        for (auto& s : scores) s = levels[rng() % levels.size()];
        const int64_t take = std::min(T, C);
        for (int64_t e = 0; e < E; ++e) {
          // CUDA: stable descending sort of the expert's tokens by value_key, first `take`, token order.
          std::vector<int32_t> tokens(T);
          std::iota(tokens.begin(), tokens.end(), 0);
          std::vector<double> keys(T);
          for (int64_t t = 0; t < T; ++t) keys[t] = cuda::steps::value_key(scores[t * E + e]);
          std::vector<int32_t> got = stable_order(tokens, keys, true);
          got.resize(take);
          std::sort(got.begin(), got.end());
          // CPU: nth_element with outranks, then token order.
          std::vector<int32_t> want(T);
          std::iota(want.begin(), want.end(), 0);
          std::nth_element(want.begin(), want.begin() + take, want.end(),
                           [&](int64_t a, int64_t b) { return outranks(scores[a * E + e], a, scores[b * E + e], b); });
          want.resize(take);
          std::sort(want.begin(), want.end());
          EXPECT_EQ(got, want) << "T=" << T << " E=" << E << " C=" << C << " expert " << e;
        }
      }
    }
  }
}

}  // namespace
}  // namespace kernels
}  // namespace moe_ext
