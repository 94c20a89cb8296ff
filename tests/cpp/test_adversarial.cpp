// Adversarial and randomized inputs for the ops (through the dispatcher) and the torch-free kernels: hand-made
// plans that are out of range or inconsistent, int64 edge values, empty and non-finite inputs must give a
// c10::Error naming the problem, never an out-of-bounds access (CI runs this suite under ASan + UBSan);
// seeded random valid inputs must match the plain loops of plan_reference.h.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cuda/plan_steps.cuh"
#include "kernels/gating.h"
#include "kernels/plan.h"
#include "moe_ext.h"
#include "op_checks.h"
#include "plan_reference.h"

namespace {

using at::Tensor;
using namespace moe_ext::op_checks;  // NOLINT: the shared helpers of op_checks.h
namespace ref = moe_ext::reference;
namespace kernels = moe_ext::kernels;

// The message of the c10::Error thrown by `fn`; a test failure if it throws nothing (or anything else).
std::string error_of(const std::function<void()>& fn) {
  const std::optional<std::string> message = c10_error_of(fn);
  if (!message.has_value()) ADD_FAILURE() << "expected a c10::Error";
  return message.value_or("");
}

#define EXPECT_ERROR_WITH(statement, part)                                                                    \
  do {                                                                                                        \
    const std::string message_ = error_of([&] { (void)(statement); });                                        \
    EXPECT_NE(message_.find(part), std::string::npos) << "message: " << message_ << "\nexpected: " << (part); \
  } while (0)

void expect_plan(const Plan& plan, const ref::Plan& want, const std::string& what) {
  EXPECT_EQ(to_ints(plan.row_of), want.row_of) << what;
  EXPECT_EQ(to_ints(plan.token_of), want.token_of) << what;
  EXPECT_EQ(to_ints(plan.counts), want.counts) << what;
  EXPECT_EQ(to_ints(plan.offsets), want.offsets) << what;
}

// dispatch, combine and both backward ops on a plan, each against its loop reference (float64 data).
void expect_permutations_match_loops(const Tensor& row_of, const Tensor& token_of, int64_t H, std::mt19937_64& rng,
                                     const std::string& what) {
  EXPECT_EQ(permutation_mismatches(row_of, token_of, H, rng), "") << what;
}

// ---------------------------------------------------------------------------------------------------------
// Hand-made plans: each of the four plan consumers validates the whole plan before it touches a row.

// make_plan's plan of indices {{0, 1}, {0, 2}, {0, 1}, {2, 0}} for 3 experts with capacity 3: token 3's
// second choice is dropped, rows 5 and 8 are padding.
const Ints kRowOf = {0, 3, 1, 6, 2, 4, 7, -1};
const Ints kTokenOf = {0, 1, 2, 0, 2, -1, 1, 3, -1};
constexpr int64_t kT = 4, kK = 2, kN = 9, kH = 3;

TEST(HandMadePlans, TheBasePlanIsMakePlans) {
  const Plan plan = make_plan(long_tensor({0, 1, 0, 2, 0, 1, 2, 0}, {kT, kK}), 3, 3);
  EXPECT_EQ(to_ints(plan.row_of), kRowOf);
  EXPECT_EQ(to_ints(plan.token_of), kTokenOf);
  EXPECT_TRUE(ref::plan_is_consistent(kRowOf, kTokenOf, kT, kK));
}

struct PlanMutation {
  const char* name;
  std::function<void(Ints& row_of, Ints& token_of)> apply;
  const char* message;  // part of the expected error
};

const char* const kOutOfRangeRow = "row_of holds a row outside [-1, N)";
const char* const kNotOwned = "row_of[t, j] = r but token_of[r] != t";
const char* const kDuplicate = "row_of lists the same row twice for one token";
const char* const kOutOfRangeToken = "token_of holds a token outside [-1, T)";
const char* const kNotListed = "token_of[r] = t but row_of[t] does not list r";

const std::vector<PlanMutation>& plan_mutations() {
  static const std::vector<PlanMutation> mutations = {
      {"RowIsN", [](Ints& r, Ints&) { r[1] = kN; }, kOutOfRangeRow},
      {"RowIsMinusTwo", [](Ints& r, Ints&) { r[1] = -2; }, kOutOfRangeRow},
      {"RowIsInt64Max", [](Ints& r, Ints&) { r[1] = kMax; }, kOutOfRangeRow},
      {"RowIsInt64Min", [](Ints& r, Ints&) { r[1] = kMin; }, kOutOfRangeRow},
      {"LastRowIsInt64Max", [](Ints& r, Ints&) { r[kT * kK - 1] = kMax; }, kOutOfRangeRow},
      {"DroppedSlotPointsAtPadding", [](Ints& r, Ints&) { r[7] = 5; }, kNotOwned},
      {"RowOfAnotherToken", [](Ints& r, Ints&) { r[1] = 1; }, kNotOwned},
      {"SameRowTwice", [](Ints& r, Ints&) { r[1] = 0; }, kDuplicate},
      {"TokensSwapped", [](Ints& r, Ints&) { std::swap_ranges(r.begin(), r.begin() + 2, r.begin() + 2); }, kNotOwned},
      {"RowsShiftedByOne",
       [](Ints& r, Ints&) {
         for (auto& v : r) v = v >= 0 ? v + 1 : v;
       },
       kNotOwned},
      {"AllSlotsDropped", [](Ints& r, Ints&) { std::fill(r.begin(), r.end(), -1); }, kNotListed},
      {"TokenIsT", [](Ints&, Ints& t) { t[5] = kT; }, kOutOfRangeToken},
      {"TokenIsMinusTwo", [](Ints&, Ints& t) { t[5] = -2; }, kOutOfRangeToken},
      {"TokenIsInt64Max", [](Ints&, Ints& t) { t[5] = kMax; }, kOutOfRangeToken},
      {"TokenIsInt64Min", [](Ints&, Ints& t) { t[8] = kMin; }, kOutOfRangeToken},
      {"PaddingRowClaimsAToken", [](Ints&, Ints& t) { t[5] = 0; }, kNotListed},
      {"AllRowsPadding", [](Ints&, Ints& t) { std::fill(t.begin(), t.end(), -1); }, kNotOwned},
      {"RowOwnerChanged", [](Ints&, Ints& t) { t[0] = 1; }, kNotOwned},
  };
  return mutations;
}

constexpr Consumer kConsumers[] = {Consumer::kDispatch, Consumer::kDispatchBackward, Consumer::kCombine,
                                   Consumer::kCombineBackward};

// One test per mutation, each running the four consumers (one process each would mostly time LibTorch's load).
class PlanMutations : public ::testing::TestWithParam<size_t> {};

TEST_P(PlanMutations, ThrowNamingTheProblem) {
  const PlanMutation& mutation = plan_mutations()[GetParam()];
  Ints row_of = kRowOf, token_of = kTokenOf;
  mutation.apply(row_of, token_of);
  ASSERT_FALSE(ref::plan_is_consistent(row_of, token_of, kT, kK)) << "the mutation must break the plan";
  for (const Consumer consumer : kConsumers) {
    SCOPED_TRACE(consumer_name(consumer));
    const std::string message =
        error_of([&] { consume(consumer, long_tensor(row_of, {kT, kK}), long_tensor(token_of, {kN}), kH); });
    EXPECT_NE(message.find("inconsistent routing plan"), std::string::npos) << message;
    EXPECT_NE(message.find(mutation.message), std::string::npos) << message;
  }
}

INSTANTIATE_TEST_SUITE_P(Adversarial, PlanMutations, ::testing::Range<size_t>(0, plan_mutations().size()),
                         [](const auto& info) { return std::string(plan_mutations()[info.param].name); });

TEST(HandMadePlans, WrongDtypesAndRanksThrow) {
  const Tensor row_of = long_tensor(kRowOf, {kT, kK}), token_of = long_tensor(kTokenOf, {kN});
  for (const Consumer consumer : kConsumers) {
    SCOPED_TRACE(consumer_name(consumer));
    EXPECT_ERROR_WITH(consume(consumer, row_of.to(at::kInt), token_of, kH), "row_of must be an int64 tensor");
    EXPECT_ERROR_WITH(consume(consumer, row_of, token_of.to(at::kFloat), kH), "token_of must be an int64 tensor");
    EXPECT_ERROR_WITH(consume(consumer, row_of.reshape({-1}), token_of, kH), "row_of must be 2-D");
    EXPECT_ERROR_WITH(consume(consumer, row_of.reshape({kT, kK, 1}), token_of, kH), "row_of must be 2-D");
    EXPECT_ERROR_WITH(consume(consumer, row_of, token_of.reshape({3, 3}), kH), "token_of must be 1-D");
    EXPECT_ERROR_WITH(consume(consumer, row_of, at::scalar_tensor(0, at::kLong), kH), "token_of must be 1-D");
  }
}

TEST(HandMadePlans, DataShapesThatDoNotFitThePlanThrow) {
  const Tensor row_of = long_tensor(kRowOf, {kT, kK}), token_of = long_tensor(kTokenOf, {kN});
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  EXPECT_ERROR_WITH(moe_ext::dispatch(at::randn({kT + 1, kH}, opts), token_of, row_of), "tokens but x has 5");
  EXPECT_ERROR_WITH(moe_ext::dispatch(at::randn({0, kH}, opts), token_of, row_of), "tokens but x has 0");
  EXPECT_ERROR_WITH(moe_ext::dispatch(at::ones({kT, kH}, at::kLong), token_of, row_of), "x must be a floating-point");
  EXPECT_ERROR_WITH(moe_ext::dispatch(at::randn({kT}, opts), token_of, row_of), "x must be 2-D");
  EXPECT_ERROR_WITH(moe_ext::combine(at::randn({kN + 1, kH}, opts), at::rand({kT, kK}, opts), row_of, token_of),
                    "rows but the plan has N = 9");
  EXPECT_ERROR_WITH(moe_ext::combine(at::randn({kN, kH}, opts), at::rand({kT, kK + 1}, opts), row_of, token_of),
                    "weights must have the shape of plan.row_of");
  EXPECT_ERROR_WITH(moe_ext::combine(at::randn({kN, kH}, opts), at::rand({kK, kT}, opts), row_of, token_of),
                    "weights must have the shape of plan.row_of");
  EXPECT_ERROR_WITH(moe_ext::detail::dispatch_backward_op().call(at::randn({kN - 1, kH}, opts), token_of, row_of),
                    "grad_x_sorted must have N = 9");
  EXPECT_ERROR_WITH(
      moe_ext::detail::combine_backward_op().call(at::randn({kT + 1, kH}, opts), at::randn({kN, kH}, opts),
                                                  at::rand({kT, kK}, opts), row_of, token_of),
      "grad_y must have shape [T, H] = [4, 3]");
  EXPECT_ERROR_WITH(
      moe_ext::detail::combine_backward_op().call(at::randn({kT, kH + 1}, opts), at::randn({kN, kH}, opts),
                                                  at::rand({kT, kK}, opts), row_of, token_of),
      "grad_y must have shape [T, H] = [4, 3]");
}

TEST(HandMadePlans, ConsistentButUnsortedPlansWork) {
  // Rows relabelled by a permutation: no longer grouped by expert, yet consistent, so every consumer accepts
  // it; the same for a plan where everything is dropped and a plan with more padding than rows.
  std::mt19937_64 rng(21);
  Ints permutation(kN);
  for (int64_t r = 0; r < kN; ++r) permutation[r] = r;
  std::shuffle(permutation.begin(), permutation.end(), rng);
  Ints row_of = kRowOf, token_of(kN);
  for (auto& r : row_of) r = r >= 0 ? permutation[r] : r;
  for (int64_t r = 0; r < kN; ++r) token_of[permutation[r]] = kTokenOf[r];
  ASSERT_TRUE(ref::plan_is_consistent(row_of, token_of, kT, kK));
  expect_permutations_match_loops(long_tensor(row_of, {kT, kK}), long_tensor(token_of, {kN}), kH, rng, "permuted");
  expect_permutations_match_loops(long_tensor(Ints(kT * kK, -1), {kT, kK}), long_tensor(Ints(5, -1), {5}), kH, rng,
                                  "all dropped");
  expect_permutations_match_loops(long_tensor(Ints(kT * kK, -1), {kT, kK}), long_tensor({}, {0}), kH, rng, "no rows");
}

TEST(HandMadePlans, ZeroSizedPlansWork) {
  std::mt19937_64 rng(22);
  expect_permutations_match_loops(long_tensor({}, {0, 2}), long_tensor({}, {0}), 3, rng, "T = 0");
  expect_permutations_match_loops(long_tensor({}, {3, 0}), long_tensor({}, {0}), 3, rng, "k = 0");
  expect_permutations_match_loops(long_tensor({-1, -1}, {1, 2}), long_tensor({-1, -1, -1}, {3}), 0, rng, "H = 0");
  // T = 0 with padding rows that claim no token is consistent; one that claims token 0 is not.
  expect_permutations_match_loops(long_tensor({}, {0, 2}), long_tensor({-1, -1}, {2}), 2, rng, "only padding");
  EXPECT_ERROR_WITH(consume(Consumer::kDispatch, long_tensor({}, {0, 2}), long_tensor({0}, {1}), 2), kOutOfRangeToken);
}

// ---------------------------------------------------------------------------------------------------------
// make_plan

TEST(MakePlanRejects, ExpertIndicesOutOfRange) {
  for (const int64_t bad : {int64_t{-1}, int64_t{4}, kMax, kMin}) {
    Ints indices = {0, 1, 2, 3, 3, 2};
    indices[3] = bad;
    EXPECT_ERROR_WITH(make_plan(long_tensor(indices, {3, 2}), 4), "indices[1, 1] = " + std::to_string(bad));
    EXPECT_ERROR_WITH(make_plan(long_tensor(indices, {3, 2}), 4, 2), "indices[1, 1] = " + std::to_string(bad));
  }
}

TEST(MakePlanRejects, TheFirstBadIndexIsNamedWhateverTheChunk) {
  // 6000 assignments span two of the CPU kernel's 4096-assignment chunks.
  Ints indices(6000, 1);
  indices[5001] = kMax;
  EXPECT_ERROR_WITH(make_plan(long_tensor(indices, {3000, 2}), 2), "indices[2500, 1] = " + std::to_string(kMax));
  indices[17] = -5;
  EXPECT_ERROR_WITH(make_plan(long_tensor(indices, {3000, 2}), 2), "indices[8, 1] = -5");
}

TEST(MakePlanRejects, BadNumExpertsAndCapacity) {
  const Tensor indices = long_tensor({0, 0, 0, 0}, {2, 2});
  for (const int64_t bad : {int64_t{0}, int64_t{-1}, kMin}) {
    EXPECT_ERROR_WITH(make_plan(indices, bad), "num_experts must be >= 1");
  }
  for (const int64_t bad : {int64_t{-1}, kMin}) {
    EXPECT_ERROR_WITH(make_plan(indices, 2, bad), "capacity must be >= 0");
  }
  EXPECT_ERROR_WITH(make_plan(indices.to(at::kInt), 2), "indices must be an int64 tensor");
  EXPECT_ERROR_WITH(make_plan(indices.reshape({-1}), 2), "indices must be 2-D");
  EXPECT_ERROR_WITH(make_plan(indices.reshape({1, 2, 2}), 2), "indices must be 2-D");
}

TEST(MakePlanRejects, BadPriority) {
  const Tensor indices = long_tensor({0, 1, 1, 0}, {2, 2});
  EXPECT_ERROR_WITH(make_plan(indices, 2, std::nullopt, at::rand({2, 2})), "priority only applies with a capacity");
  EXPECT_ERROR_WITH(make_plan(indices, 2, 1, at::rand({2, 3})), "priority must have the shape of indices");
  EXPECT_ERROR_WITH(make_plan(indices, 2, 1, at::ones({2, 2}, at::kLong)), "priority must be a floating-point");
  EXPECT_ERROR_WITH(make_plan(indices, 2, 1, double_tensor({0.5, kNaN, 0.1, 0.2}, {2, 2})),
                    "priority must not contain NaN");
}

TEST(MakePlanRejects, RowCountsThatOverflowInt64) {
  // N = E * C must be representable: these products overflow int64.
  const Tensor indices = long_tensor({0, 1}, {1, 2});
  EXPECT_ERROR_WITH(make_plan(indices, 2, kMax), "capacity");
  EXPECT_ERROR_WITH(make_plan(indices, 3, kMax / 2), "capacity");
  EXPECT_ERROR_WITH(make_plan(indices, int64_t{1} << 20, int64_t{1} << 44), "capacity");
  EXPECT_ERROR_WITH(make_plan(long_tensor({}, {0, 2}), 2, kMax), "capacity");
}

TEST(MakePlanRejects, NumExpertsAtTheInt64Limit) {
  // E + 1 offsets must be countable (and CUDA sorts int32 expert keys): at most 2^31 - 1 experts.
  EXPECT_ERROR_WITH(make_plan(long_tensor({0, 1}, {1, 2}), kMax), "num_experts");
  EXPECT_ERROR_WITH(make_plan(long_tensor({}, {0, 2}), kMax), "num_experts");
  EXPECT_ERROR_WITH(make_plan(long_tensor({}, {0, 2}), kMax, 0), "num_experts");
  EXPECT_ERROR_WITH(make_plan(long_tensor({0, 1}, {1, 2}), kMax - 1, 1), "num_experts");
  EXPECT_ERROR_WITH(make_plan(long_tensor({0, 1}, {1, 2}), int64_t{1} << 31), "num_experts");
}

TEST(MakePlanEdges, CapacityZeroAndZeroSizes) {
  const Plan none = make_plan(long_tensor({0, 1, 1, 0}, {2, 2}), 2, 0);
  EXPECT_EQ(to_ints(none.row_of), (Ints{-1, -1, -1, -1}));
  EXPECT_EQ(none.token_of.numel(), 0);
  EXPECT_EQ(to_ints(none.counts), (Ints{2, 2}));
  const Plan empty = make_plan(long_tensor({}, {0, 3}), 4, 5);
  EXPECT_EQ(empty.token_of.numel(), 20);
  EXPECT_TRUE(empty.token_of.eq(-1).all().item<bool>());
  EXPECT_EQ(to_ints(empty.offsets), (Ints{0, 5, 10, 15, 20}));
  const Plan no_slots = make_plan(long_tensor({}, {3, 0}), 2);
  EXPECT_EQ(no_slots.row_of.sizes(), (std::vector<int64_t>{3, 0}));
  EXPECT_EQ(no_slots.token_of.numel(), 0);
  EXPECT_EQ(to_ints(no_slots.offsets), (Ints{0, 0, 0}));
  std::mt19937_64 rng(23);
  expect_permutations_match_loops(no_slots.row_of, no_slots.token_of, 4, rng, "k = 0");
  expect_permutations_match_loops(none.row_of, none.token_of, 4, rng, "capacity 0");
}

TEST(MakePlanEdges, HugeKAndManyExperts) {
  // One token choosing the same two experts 3000 times (repeats are allowed), and 2^20 mostly empty experts.
  std::mt19937_64 rng(24);
  Ints indices(3000);
  for (size_t i = 0; i < indices.size(); ++i) indices[i] = static_cast<int64_t>(i % 2);
  const Plan plan = make_plan(long_tensor(indices, {1, 3000}), 2);
  expect_plan(plan, ref::make_plan(indices, 1, 3000, 2, std::nullopt), "k = 3000");
  expect_permutations_match_loops(plan.row_of, plan.token_of, 2, rng, "k = 3000");
  const Plan capped = make_plan(long_tensor(indices, {1, 3000}), 2, 7);
  expect_plan(capped, ref::make_plan(indices, 1, 3000, 2, 7), "k = 3000, capacity 7");
  const int64_t E = int64_t{1} << 20;
  const Ints wide = {E - 1, 0, 12345, E - 1};
  expect_plan(make_plan(long_tensor(wide, {2, 2}), E), ref::make_plan(wide, 2, 2, E, std::nullopt), "E = 2^20");
  expect_plan(make_plan(long_tensor(wide, {2, 2}), E, 1), ref::make_plan(wide, 2, 2, E, 1), "E = 2^20, C = 1");
}

// ---------------------------------------------------------------------------------------------------------
// expert_choice_plan

TEST(ExpertChoicePlanAdversarial, BadArguments) {
  const Tensor scores = at::rand({4, 3}, at::kDouble);
  for (const int64_t bad : {int64_t{-1}, kMin}) EXPECT_ERROR_WITH(expert_choice_plan(scores, bad), "capacity");
  EXPECT_ERROR_WITH(expert_choice_plan(scores, kMax), "capacity");                 // E * C overflows int64
  EXPECT_ERROR_WITH(expert_choice_plan(at::rand({4, 1}, at::kDouble), kMax), "");  // [kMax] int64 rows
  EXPECT_ERROR_WITH(expert_choice_plan(at::rand({4, 0}, at::kDouble), 2), "at least one expert column");
  EXPECT_ERROR_WITH(expert_choice_plan(double_tensor({0.1, kNaN, 0.3, 0.4}, {2, 2}), 1), "NaN");
  EXPECT_ERROR_WITH(expert_choice_plan(at::ones({2, 2}, at::kLong), 1), "scores must be a floating-point");
  EXPECT_ERROR_WITH(expert_choice_plan(at::rand({4}, at::kDouble), 1), "scores must be 2-D");
}

TEST(ExpertChoicePlanAdversarial, InfinitiesTiesAndEmptyInputsMatchLoops) {
  std::mt19937_64 rng(25);
  const Reals levels = {-kInf, -1.0, -0.0, 0.0, 0.5, 0.5, 2.0, kInf};
  for (const int64_t T : {0, 1, 5, 17}) {
    for (const int64_t E : {1, 3}) {
      for (const int64_t C : {0, 1, 4, 40}) {
        Reals scores(T * E);
        for (auto& s : scores) s = levels[rng() % levels.size()];
        const Plan plan = expert_choice_plan(double_tensor(scores, {T, E}), C);
        const std::string what = "T=" + std::to_string(T) + " E=" + std::to_string(E) + " C=" + std::to_string(C);
        expect_plan(plan, ref::expert_choice_plan(scores, T, E, C), what);
        expect_permutations_match_loops(plan.row_of, plan.token_of, 2, rng, what);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// topk_gating and its backward

TEST(TopkGatingAdversarial, KGroupsAndScaleOutOfRange) {
  const Tensor logits = at::randn({3, 8}, at::kDouble);
  for (const int64_t k : {int64_t{0}, int64_t{-1}, int64_t{9}, kMax, kMin}) {
    EXPECT_ERROR_WITH(moe_ext::topk_gating(logits, k), "k must satisfy 1 <= k <= E = 8");
  }
  for (const int64_t n_group : {int64_t{0}, int64_t{-1}, kMin}) {
    EXPECT_ERROR_WITH(moe_ext::topk_gating(logits, 2, "softmax", true, std::nullopt, 1.0, n_group, 1),
                      "n_group must be >= 1");
  }
  for (const int64_t n_group : {int64_t{3}, int64_t{16}, kMax}) {
    EXPECT_ERROR_WITH(moe_ext::topk_gating(logits, 2, "softmax", true, std::nullopt, 1.0, n_group, 1),
                      "must divide the number of experts");
  }
  for (const int64_t topk_group : {int64_t{0}, int64_t{-1}, int64_t{5}, kMax, kMin}) {
    EXPECT_ERROR_WITH(moe_ext::topk_gating(logits, 2, "softmax", true, std::nullopt, 1.0, 4, topk_group),
                      "topk_group must satisfy");
  }
  EXPECT_ERROR_WITH(moe_ext::topk_gating(logits, 3, "softmax", true, std::nullopt, 1.0, 4, 1), "exceeds the experts");
  for (const double scale : {kNaN, kInf, -kInf}) {
    EXPECT_ERROR_WITH(moe_ext::topk_gating(logits, 2, "softmax", true, std::nullopt, scale), "scale must be finite");
  }
  EXPECT_ERROR_WITH(moe_ext::topk_gating(at::randn({3, 0}, at::kDouble), 1), "at least one expert column");
  EXPECT_ERROR_WITH(moe_ext::topk_gating(logits, 2, ""), "score_func");
}

TEST(TopkGatingAdversarial, NonFiniteLogitsAreRejectedInEveryDtype) {
  for (const auto dtype : {at::kDouble, at::kFloat, at::kHalf, at::kBFloat16}) {
    for (const double bad : {kNaN, kInf}) {
      Reals values(12, 0.25);
      values[7] = bad;  // token 1
      EXPECT_ERROR_WITH(moe_ext::topk_gating(double_tensor(values, {3, 4}, dtype), 2), "logits of token 1");
    }
    EXPECT_ERROR_WITH(moe_ext::topk_gating(double_tensor({0, 1, -kInf, -kInf}, {2, 2}, dtype), 1), "logits of token 1");
    // Under sigmoid +inf is a score of 1 and -inf a score of 0: both meaningful.
    const auto [weights, indices, scores] =
        moe_ext::topk_gating(double_tensor({kInf, 0.0, -kInf, 1.0}, {1, 4}, dtype), 2, "sigmoid", false);
    EXPECT_EQ(to_ints(indices), (Ints{0, 3}));
    EXPECT_EQ(to_reals(scores)[0], 1.0);
    EXPECT_EQ(to_reals(scores)[2], 0.0);
  }
}

TEST(TopkGatingAdversarial, BadBiasAndMasks) {
  const Tensor logits = at::randn({3, 4}, at::kDouble);
  for (const double bad : {kNaN, kInf, -kInf}) {
    EXPECT_ERROR_WITH(moe_ext::topk_gating(logits, 2, "softmax", true, double_tensor({0, bad, 0, 0}, {4})),
                      "bias must be finite");
  }
  EXPECT_ERROR_WITH(moe_ext::topk_gating(logits, 2, "softmax", true, at::zeros({5}, at::kDouble)), "bias must have");
  const auto gate = [&](const Tensor& mask) {
    return moe_ext::topk_gating(logits, 2, "softmax", true, std::nullopt, 1.0, 1, 1, mask);
  };
  EXPECT_ERROR_WITH(gate(at::zeros({4}, at::kBool)), "expert_mask enables 0 experts");
  Tensor per_token = at::ones({3, 4}, at::kBool);
  per_token[2].fill_(false);
  per_token[2][1] = true;
  EXPECT_ERROR_WITH(gate(per_token), "token 2 has fewer than k = 2");
  EXPECT_ERROR_WITH(gate(at::ones({4}, at::kLong)), "expert_mask must be a bool tensor");
  EXPECT_ERROR_WITH(gate(at::ones({5}, at::kBool)), "expert_mask must have shape");
  EXPECT_ERROR_WITH(gate(at::ones({4, 3}, at::kBool)), "expert_mask must have shape");
}

TEST(TopkGatingAdversarial, HugeScaleGivesFiniteWeights) {
  // Found by the fuzzer: sigmoid scores that underflow to 0 with normalize and scale 1e30 gave NaN weights
  // (scale / 1e-20 overflows float, times a zero score).
  for (const auto dtype : {at::kBFloat16, at::kFloat}) {
    const auto [weights, indices, scores] =
        moe_ext::topk_gating(double_tensor({-1e30, -1e30}, {1, 2}, dtype), 2, "sigmoid", true, std::nullopt, 1e30);
    EXPECT_EQ(to_reals(scores), (Reals{0.0, 0.0}));
    EXPECT_EQ(to_reals(weights), (Reals{0.0, 0.0}));
  }
  const auto [weights, indices, scores] =
      moe_ext::topk_gating(double_tensor({1.0, 3.0, 2.0}, {1, 3}, at::kFloat), 2, "softmax", true, std::nullopt, 1e30);
  const Reals s = to_reals(scores), w = to_reals(weights);
  EXPECT_NEAR(w[0], 1e30 * s[1] / (s[1] + s[2]), 1e24);
  EXPECT_NEAR(w[1], 1e30 * s[2] / (s[1] + s[2]), 1e24);
}

TEST(TopkGatingBackwardAdversarial, IndicesOutOfRangeOrOfOtherTokens) {
  const auto backward = [](const Tensor& indices, const Tensor& scores) {
    return moe_ext::detail::topk_gating_backward_op().call(at::ones(indices.sizes(), at::kDouble),
                                                           at::ones(scores.sizes(), at::kDouble), scores, indices,
                                                           "softmax", true, 1.0, at::kDouble);
  };
  const Tensor scores = at::softmax(at::randn({4, 3}, at::kDouble), -1);
  for (const int64_t bad : {int64_t{-1}, int64_t{3}, kMax, kMin}) {
    EXPECT_ERROR_WITH(backward(long_tensor({0, 1, 2, 0, 1, bad, 0, 1}, {4, 2}), scores),
                      "indices of token 2 are outside [0, E = 3)");
  }
  // indices of fewer (or more) tokens than scores: the kernel must not read past them.
  EXPECT_ERROR_WITH(backward(long_tensor({0, 1}, {1, 2}), scores), "indices");
  EXPECT_ERROR_WITH(backward(long_tensor({}, {0, 2}), scores), "indices");
  EXPECT_ERROR_WITH(backward(long_tensor(Ints(12, 0), {6, 2}), scores), "indices");
  EXPECT_ERROR_WITH(moe_ext::detail::topk_gating_backward_op().call(
                        at::ones({4, 3}, at::kDouble), at::ones({4, 3}, at::kDouble), scores,
                        long_tensor(Ints(8, 0), {4, 2}), "softmax", true, 1.0, at::kDouble),
                    "grad_weights must have the shape of indices");
  EXPECT_ERROR_WITH(moe_ext::detail::topk_gating_backward_op().call(
                        at::ones({4, 2}, at::kDouble), at::ones({4, 2}, at::kDouble), scores,
                        long_tensor(Ints(8, 0), {4, 2}), "softmax", true, 1.0, at::kDouble),
                    "grad_scores must have the shape of scores");
}

// ---------------------------------------------------------------------------------------------------------
// grouped_mm: offsets out of range, non-monotone, of the wrong length

TEST(GroupedMMAdversarial, BadOffsetsThrowInForwardAndBackward) {
  const std::vector<std::pair<Ints, const char*>> cases = {
      {{0, 6, 5}, "non-decreasing"},     {{0, 6, 3}, "non-decreasing"},
      {{1, 6, 10}, "offsets[0]"},        {{-1, 6, 10}, "offsets[0]"},
      {{0, -3, 10}, "non-decreasing"},   {{0, 11, 10}, "non-decreasing"},
      {{0, 6, 11}, "offsets[E]"},        {{0, kMax, 10}, "non-decreasing"},
      {{0, kMin, 10}, "non-decreasing"}, {{kMin, 0, 10}, "offsets[0]"},
      {{0, 10, kMax}, "offsets[E]"},     {{0, 10}, "E + 1 = 3"},
      {{0, 5, 5, 10}, "E + 1 = 3"},      {{}, "E + 1 = 3"}};
  const Tensor x = at::randn({10, 3}, at::kDouble), w = at::randn({2, 3, 4}, at::kDouble);
  for (const auto& [offsets, message] : cases) {
    SCOPED_TRACE(::testing::PrintToString(offsets));
    const Tensor offsets_t = long_tensor(offsets, {static_cast<int64_t>(offsets.size())});
    EXPECT_ERROR_WITH(moe_ext::grouped_mm(x, w, offsets_t), message);
    EXPECT_ERROR_WITH(moe_ext::detail::grouped_mm_backward_op().call(at::randn({10, 4}, at::kDouble), x, w, offsets_t),
                      message);
  }
}

TEST(GroupedMMAdversarial, WrongDtypesAndEmptyShapes) {
  const Tensor x = at::randn({4, 3}, at::kDouble), w = at::randn({2, 3, 5}, at::kDouble);
  EXPECT_ERROR_WITH(moe_ext::grouped_mm(x, w, long_tensor({0, 2, 4}, {3}).to(at::kInt)), "offsets must be an int64");
  EXPECT_ERROR_WITH(moe_ext::grouped_mm(x, w, long_tensor({0, 2, 4}, {3, 1})), "offsets must be 1-D");
  EXPECT_ERROR_WITH(moe_ext::grouped_mm(x.to(at::kFloat), w, long_tensor({0, 2, 4}, {3})), "must match x dtype");
  EXPECT_ERROR_WITH(moe_ext::grouped_mm(x, at::randn({2, 4, 5}, at::kDouble), long_tensor({0, 2, 4}, {3})), "in =");
  // No rows, and no experts at all.
  const Tensor y0 = moe_ext::grouped_mm(at::randn({0, 3}, at::kDouble), w, long_tensor({0, 0, 0}, {3}));
  EXPECT_EQ(y0.sizes(), (std::vector<int64_t>{0, 5}));
  const auto [grad_x, grad_w] = moe_ext::detail::grouped_mm_backward_op().call(
      at::randn({0, 5}, at::kDouble), at::randn({0, 3}, at::kDouble), w, long_tensor({0, 0, 0}, {3}));
  EXPECT_EQ(grad_x.sizes(), (std::vector<int64_t>{0, 3}));
  EXPECT_TRUE(at::equal(grad_w, at::zeros_like(w)));
  const Tensor no_experts = at::randn({0, 3, 5}, at::kDouble);
  EXPECT_EQ(moe_ext::grouped_mm(at::randn({0, 3}, at::kDouble), no_experts, long_tensor({0}, {1})).numel(), 0);
  EXPECT_ERROR_WITH(moe_ext::grouped_mm(x, no_experts, long_tensor({0}, {1})), "offsets[E] must equal");
}

// ---------------------------------------------------------------------------------------------------------
// Auxiliary losses

TEST(LossesAdversarial, LoadBalancingLossIndicesOutOfRange) {
  const Tensor scores = at::softmax(at::randn({3, 4}, at::kDouble), -1);
  for (const int64_t bad : {int64_t{-1}, int64_t{4}, kMax, kMin}) {
    const Tensor indices = long_tensor({0, 1, 2, 3, bad, 0}, {3, 2});
    EXPECT_ERROR_WITH(moe_ext::load_balancing_loss(scores, indices, 4), "at flat position 4");
    EXPECT_ERROR_WITH(
        moe_ext::detail::load_balancing_loss_backward_op().call(at::ones({}, at::kDouble), scores, indices, 4),
        "at flat position 4");
  }
  const Tensor indices = long_tensor({0, 1, 2, 3, 1, 0}, {3, 2});
  for (const int64_t bad : {int64_t{0}, int64_t{3}, int64_t{5}, kMax, kMin}) {
    EXPECT_ERROR_WITH(moe_ext::load_balancing_loss(scores, indices, bad), "num_experts");
  }
  EXPECT_ERROR_WITH(moe_ext::load_balancing_loss(scores, long_tensor({0, 1}, {1, 2}), 4), "tokens but scores has 3");
  EXPECT_ERROR_WITH(
      moe_ext::detail::load_balancing_loss_backward_op().call(at::ones({2}, at::kDouble), scores, indices, 4), "");
}

TEST(LossesAdversarial, EmptyInputs) {
  EXPECT_EQ(moe_ext::load_balancing_loss(at::rand({0, 4}, at::kDouble), long_tensor({}, {0, 2}), 4).item<double>(),
            0.0);
  EXPECT_EQ(moe_ext::router_z_loss(at::randn({0, 4}, at::kDouble)).item<double>(), 0.0);
  // No experts: logsumexp of nothing is -inf, no meaningful loss.
  EXPECT_ERROR_WITH(moe_ext::router_z_loss(at::randn({2, 0}, at::kDouble)), "at least one expert column");
  EXPECT_ERROR_WITH(
      moe_ext::detail::router_z_loss_backward_op().call(at::ones({3}, at::kDouble), at::randn({2, 4}, at::kDouble)),
      "");
}

// ---------------------------------------------------------------------------------------------------------
// Seeded random valid inputs against the loops of plan_reference.h

TEST(RandomValidInputs, MakePlanAndItsConsumersMatchLoops) {
  std::mt19937_64 rng(31);
  const Reals levels = {-kInf, -0.0, 0.0, 0.25, 0.25, 0.5, 1.0, kInf};
  int checked = 0;
  for (int trial = 0; trial < 150; ++trial) {
    // Mostly small problems; a few span several of the CPU kernel's 4096-assignment chunks.
    const int64_t T = trial % 25 == 0 ? 2500 + static_cast<int64_t>(rng() % 1000) : static_cast<int64_t>(rng() % 20);
    const int64_t k = 1 + static_cast<int64_t>(rng() % 4), E = 1 + static_cast<int64_t>(rng() % 9);
    Ints indices(T * k);
    for (auto& e : indices) e = std::min<int64_t>(E - 1, static_cast<int64_t>(rng() % (E + 3)) / 2);  // skewed
    std::optional<int64_t> capacity;
    if (rng() % 3 != 0) capacity = static_cast<int64_t>(rng() % (T * k / E + 3));
    Reals priority;
    if (capacity.has_value() && rng() % 2 == 0) {
      priority.resize(T * k);
      for (auto& p : priority) p = levels[rng() % levels.size()];
    }
    const std::optional<Tensor> priority_t =
        priority.empty() ? std::nullopt : std::optional<Tensor>(double_tensor(priority, {T, k}));
    const std::string what = "T=" + std::to_string(T) + " k=" + std::to_string(k) + " E=" + std::to_string(E) +
                             " C=" + (capacity ? std::to_string(*capacity) : "none") +
                             (priority.empty() ? "" : " priority");
    const Plan plan = make_plan(long_tensor(indices, {T, k}), E, capacity, priority_t);
    expect_plan(plan, ref::make_plan(indices, T, k, E, capacity, priority), what);
    if (T < 100) expect_permutations_match_loops(plan.row_of, plan.token_of, 3, rng, what);
    ++checked;
  }
  EXPECT_EQ(checked, 150);
}

// A random consistent plan: each slot takes a distinct row from a shuffled pool of N >= kept rows or is
// dropped; the rows nobody takes are padding.
std::pair<Ints, Ints> random_consistent_plan(int64_t T, int64_t k, int64_t N, std::mt19937_64& rng) {
  Ints pool(N);
  for (int64_t r = 0; r < N; ++r) pool[r] = r;
  std::shuffle(pool.begin(), pool.end(), rng);
  Ints row_of(T * k, -1), token_of(N, -1);
  size_t next = 0;
  for (int64_t a = 0; a < T * k && next < pool.size(); ++a) {
    if (rng() % 4 == 0) continue;
    row_of[a] = pool[next++];
    token_of[row_of[a]] = a / k;
  }
  return {row_of, token_of};
}

TEST(RandomValidInputs, HandMadeConsistentPlansMatchLoops) {
  std::mt19937_64 rng(32);
  for (int trial = 0; trial < 60; ++trial) {
    const int64_t T = static_cast<int64_t>(rng() % 12), k = static_cast<int64_t>(rng() % 4);
    const int64_t N = static_cast<int64_t>(rng() % (T * k + 4));
    const auto [row_of, token_of] = random_consistent_plan(T, k, N, rng);
    ASSERT_TRUE(ref::plan_is_consistent(row_of, token_of, T, k));
    expect_permutations_match_loops(long_tensor(row_of, {T, k}), long_tensor(token_of, {N}),
                                    static_cast<int64_t>(rng() % 5), rng, "trial " + std::to_string(trial));
  }
}

// One entry of a consistent plan set to a random or edge value: the ops reject the plan exactly when the
// loop definition of consistency does, and so do the torch-free checks (run on vectors of exactly the plan's
// size, so that ASan sees any read past them).
TEST(RandomValidInputs, SingleEntryMutationsAreRejectedExactlyWhenInconsistent) {
  std::mt19937_64 rng(33);
  int rejected = 0, accepted = 0;
  for (int trial = 0; trial < 1500; ++trial) {
    const int64_t T = 1 + static_cast<int64_t>(rng() % 6), k = 1 + static_cast<int64_t>(rng() % 3);
    const int64_t N = static_cast<int64_t>(rng() % (T * k + 3));
    auto [row_of, token_of] = random_consistent_plan(T, k, N, rng);
    const Ints edges = {-2, -1, 0, 1, N - 1, N, T - 1, T, kMax, kMin, kMax - 1, kMin + 1};
    const int64_t value = rng() % 2 ? edges[rng() % edges.size()] : static_cast<int64_t>(rng() % (N + T + 2)) - 1;
    if (N > 0 && rng() % 2) {
      token_of[rng() % N] = value;
    } else {
      row_of[rng() % (T * k)] = value;
    }
    const bool consistent = ref::plan_is_consistent(row_of, token_of, T, k);

    bool kernels_ok = true;
    for (int64_t t = 0; t < T; ++t) {
      const Ints slots(row_of.begin() + t * k, row_of.begin() + (t + 1) * k);
      kernels_ok =
          kernels_ok && kernels::check_token_rows(slots.data(), k, t, token_of.data(), N) == kernels::PlanError::kOk;
    }
    // check_row_token reads row_of[t * k + j] for the token t a row names: it must return on a t outside
    // [-1, T) before that read.
    for (int64_t r = 0; r < N; ++r) {
      kernels_ok =
          kernels_ok && kernels::check_row_token(r, token_of.data(), row_of.data(), T, k) == kernels::PlanError::kOk;
    }
    EXPECT_EQ(kernels_ok, consistent) << "trial " << trial;

    const Tensor row_of_t = long_tensor(row_of, {T, k}), token_of_t = long_tensor(token_of, {N});
    bool op_ok = true;
    try {
      consume(static_cast<Consumer>(trial % 4), row_of_t, token_of_t, 2);
    } catch (const c10::Error&) {
      op_ok = false;
    }
    EXPECT_EQ(op_ok, consistent) << "trial " << trial;
    (consistent ? accepted : rejected) += 1;
  }
  EXPECT_GT(accepted, 100);
  EXPECT_GT(rejected, 500);
}

TEST(RandomValidInputs, GroupedMMWithEmptyExpertsMatchesLoops) {
  std::mt19937_64 rng(34);
  std::normal_distribution<double> normal;
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t E = static_cast<int64_t>(rng() % 5), in = 1 + static_cast<int64_t>(rng() % 4);
    const int64_t out = 1 + static_cast<int64_t>(rng() % 4);
    Ints offsets = {0};
    for (int64_t e = 0; e < E; ++e) offsets.push_back(offsets.back() + (rng() % 3 == 0 ? 0 : rng() % 6));
    const int64_t N = offsets.back();
    Reals x(N * in), w(E * in * out);
    for (auto& v : x) v = normal(rng);
    for (auto& v : w) v = normal(rng);
    const Tensor y =
        moe_ext::grouped_mm(double_tensor(x, {N, in}), double_tensor(w, {E, in, out}), long_tensor(offsets, {E + 1}));
    EXPECT_TRUE(ref::all_close(to_reals(y), ref::grouped_mm(x, w, offsets, in, out), 1e-12)) << "trial " << trial;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Torch-free kernels at the int64 edges

TEST(KernelEdges, CountExpertsSkipsAndReportsEdgeValues) {
  const Ints indices = {1, kMax, 0, kMin, -1, 2, 3};
  Ints counts(3, 0);
  EXPECT_EQ(kernels::count_experts(indices.data(), 0, 7, 3, counts.data()), 1);
  EXPECT_EQ(counts, (Ints{1, 1, 1}));
  Ints tail(3, 0);
  EXPECT_EQ(kernels::count_experts(indices.data(), 4, 7, 3, tail.data()), 4);
  EXPECT_EQ(tail, (Ints{0, 0, 1}));
}

TEST(KernelEdges, PlanChecksRejectEdgeValuesBeforeUsingThem) {
  // Exactly sized arrays: an edge value used as an index would be read far out of bounds.
  const Ints token_of = {0, 1};
  for (const int64_t bad : {kMax, kMin, kMin + 1, int64_t{2}, int64_t{-2}}) {
    const Ints rows = {0, bad};
    EXPECT_EQ(kernels::check_token_rows(rows.data(), 2, 0, token_of.data(), 2), kernels::PlanError::kRowOutOfRange);
    const Ints tokens = {bad, 1};
    const Ints row_of = {0, 1};
    EXPECT_EQ(kernels::check_row_token(0, tokens.data(), row_of.data(), 2, 1), kernels::PlanError::kTokenOutOfRange);
  }
  EXPECT_EQ(moe_ext::cuda::steps::expert_key(kMax, 4), 4);
  EXPECT_EQ(moe_ext::cuda::steps::expert_key(kMin, 4), 4);
  EXPECT_EQ(moe_ext::cuda::steps::expert_key(-1, 4), 4);
}

TEST(KernelEdges, WeightsStayFiniteForAHugeScale) {
  const kernels::GatingConfig cfg{3, 2, kernels::ScoreFunc::kSigmoid, true, 1e30, 1, 1};
  const Ints chosen = {0, 1};
  for (const std::vector<float>& scores : {std::vector<float>{0.0f, 0.0f, 0.5f}, {1e-30f, 3e-30f, 0.5f}}) {
    std::vector<float> weights(2);
    kernels::token_weights(scores.data(), chosen.data(), cfg, weights.data());
    EXPECT_TRUE(std::isfinite(weights[0]) && std::isfinite(weights[1])) << weights[0] << " " << weights[1];
    EXPECT_LE(weights[0] + weights[1], 1.0001e30f);
  }
}

TEST(KernelEdges, SelectionNeverPicksNaNOrMinusInfinity) {
  const kernels::GatingConfig one{3, 1, kernels::ScoreFunc::kSoftmax, true, 1.0, 1, 1};
  const kernels::GatingConfig two{3, 2, kernels::ScoreFunc::kSoftmax, true, 1.0, 1, 1};
  Reals groups(1);
  Ints indices(2, -7);
  Reals values = {kNaN, 0.5, -kInf};
  EXPECT_EQ(kernels::token_select(values.data(), nullptr, one, groups.data(), indices.data()),
            kernels::GateStatus::kOk);
  EXPECT_EQ(indices[0], 1);
  values = {kNaN, 0.5, -kInf};
  EXPECT_EQ(kernels::token_select(values.data(), nullptr, two, groups.data(), indices.data()),
            kernels::GateStatus::kTooFewExperts);
  // Sigmoid of +-inf is finite; softmax with no enabled expert has no distribution.
  const kernels::GatingConfig sigmoid{3, 1, kernels::ScoreFunc::kSigmoid, false, 1.0, 1, 1};
  const Reals logits = {kInf, -kInf, 0.0};
  Reals scores(3);
  EXPECT_EQ(kernels::token_scores(logits.data(), nullptr, sigmoid, scores.data()), kernels::GateStatus::kOk);
  EXPECT_EQ(scores, (Reals{1.0, 0.0, 0.5}));
  const bool none[] = {false, false, false};
  EXPECT_EQ(kernels::token_scores(logits.data(), none, one, scores.data()), kernels::GateStatus::kTooFewExperts);
}

}  // namespace
