// libFuzzer target: decodes shapes, expert indices, capacities, priorities, hand-made plans and offsets from
// its input and runs make_plan, expert_choice_plan, dispatch, combine (and their backward ops), grouped_mm,
// topk_gating (and its backward) and load_balancing_loss through the dispatcher. Each call must throw a
// c10::Error exactly when the contract rejects the input, and otherwise agree with the loops of
// plan_reference.h. A crash, a sanitizer report, any other exception or a disagreement is a finding.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "moe_ext.h"
#include "op_checks.h"
#include "plan_reference.h"

namespace {

using at::Tensor;
using namespace moe_ext::op_checks;  // NOLINT: the shared helpers of op_checks.h
namespace ref = moe_ext::reference;

// Plans with more rows than this are only expected to fail allocating (E * C of 2^61 and more).
constexpr int64_t kMaxRows = int64_t{1} << 24;

[[noreturn]] void finding(const std::string& what) {
  std::fprintf(stderr, "moe_ext fuzz finding: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

// Whether `fn` returned (false: it threw a c10::Error). Other exceptions reach libFuzzer, which reports them.
template <typename Fn>
bool runs(Fn&& fn) {
  return !c10_error_of(fn).has_value();
}

void expect_outcome(bool ran, bool valid, const char* op) {
  if (ran != valid) finding(std::string(op) + (valid ? " rejected a valid input" : " accepted an invalid input"));
}

// num_experts * capacity rows without int64 overflow.
bool rows_fit(int64_t num_experts, int64_t capacity) { return capacity == 0 || num_experts <= kMax / capacity; }

// The fuzz input as the values the ops care about: small shapes, indices that are mostly in range but
// sometimes int64 edge values, and floats that are sometimes non-finite.
class Input {
 public:
  Input(const uint8_t* data, size_t size) : in_(data, size) {}

  int64_t small(int64_t lo, int64_t hi) { return in_.ConsumeIntegralInRange<int64_t>(lo, hi); }
  bool flag() { return in_.ConsumeBool(); }
  uint64_t seed() { return in_.ConsumeIntegral<uint64_t>(); }

  // Mostly in [lo, hi], else an int64 edge value.
  int64_t index(int64_t lo, int64_t hi) {
    static constexpr int64_t kEdges[] = {
        -2, -1, kMax, kMin, kMax - 1, kMin + 1, int64_t{1} << 31, int64_t{1} << 32, -(int64_t{1} << 40)};
    const uint8_t selector = in_.ConsumeIntegral<uint8_t>();
    if (selector < 224) return lo + static_cast<int64_t>(selector) % (hi - lo + 1);
    return kEdges[selector % std::size(kEdges)];
  }

  // A number of experts: 1..9, else a value make_plan must reject (never one it would try to allocate).
  int64_t num_experts() {
    static constexpr int64_t kEdges[] = {0, -1, kMin, kMax, kMax - 1, int64_t{1} << 31, int64_t{1} << 32};
    const uint8_t selector = in_.ConsumeIntegral<uint8_t>();
    if (selector < 232) return 1 + selector % 9;
    return kEdges[selector % std::size(kEdges)];
  }

  // None, small, negative, or so large that E * C rows (or their bytes) overflow int64.
  std::optional<int64_t> capacity() {
    static constexpr int64_t kEdges[] = {-1, -2, kMin, kMax, kMax / 2 + 1, int64_t{1} << 62, int64_t{1} << 61};
    const uint8_t selector = in_.ConsumeIntegral<uint8_t>();
    if (selector < 64) return std::nullopt;
    if (selector < 240) return selector % 9;
    return kEdges[selector % std::size(kEdges)];
  }

  double real() {
    static constexpr double kSpecial[] = {0.0, -0.0, 0.5, 0.5, 1.0, -1.0, 1e30, -1e30, 1e-30, kInf, -kInf, kNaN};
    const uint8_t selector = in_.ConsumeIntegral<uint8_t>();
    if (selector < 128) return in_.ConsumeFloatingPointInRange<double>(-4.0, 4.0);
    return kSpecial[selector % std::size(kSpecial)];
  }

  Reals reals(int64_t n) {
    Reals values(n);
    for (auto& v : values) v = real();
    return values;
  }

  at::ScalarType float_dtype() {
    static constexpr at::ScalarType kDtypes[] = {at::kDouble, at::kFloat, at::kHalf, at::kBFloat16};
    return kDtypes[in_.ConsumeIntegralInRange<size_t>(0, std::size(kDtypes) - 1)];
  }

 private:
  FuzzedDataProvider in_;
};

bool any_nan(const Reals& values) {
  for (const double v : values) {
    if (std::isnan(v)) return true;
  }
  return false;
}

bool all_in(const Ints& values, int64_t lo, int64_t end) {
  for (const int64_t v : values) {
    if (v < lo || v >= end) return false;
  }
  return true;
}

void expect_no_mismatch(const Tensor& row_of, const Tensor& token_of, int64_t hidden, uint64_t seed, const char* op) {
  std::mt19937_64 rng(seed);
  const std::string mismatches = permutation_mismatches(row_of, token_of, hidden, rng);
  if (!mismatches.empty()) finding(std::string("on a plan of ") + op + ", loops disagree with: " + mismatches);
}

void fuzz_make_plan(Input& in) {
  const int64_t T = in.small(0, 12), k = in.small(0, 4), E = in.num_experts();
  Ints indices(T * k);
  for (auto& e : indices) e = in.index(0, std::min<int64_t>(std::max<int64_t>(E, 1), 9) - 1);
  const std::optional<int64_t> capacity = in.capacity();
  std::optional<Tensor> priority;
  if (in.flag()) priority = double_tensor(in.reals(T * k), {T, k}, in.float_dtype());
  // The priority as make_plan sees it: rounded to its dtype, then compared in float64.
  const Reals priority_values = priority.has_value() ? to_reals(*priority) : Reals();

  const bool valid = E >= 1 && E <= std::numeric_limits<int32_t>::max() && all_in(indices, 0, E) &&
                     (!capacity.has_value() || (*capacity >= 0 && rows_fit(E, *capacity))) &&
                     (!priority.has_value() || (capacity.has_value() && !any_nan(priority_values)));
  const bool fits = !capacity.has_value() || !valid || E * *capacity <= kMaxRows;
  Plan plan;
  const bool ran = runs([&] { plan = make_plan(long_tensor(indices, {T, k}), E, capacity, priority); });
  expect_outcome(ran, valid && fits, "make_plan");
  if (!ran) return;
  if (!plan_equals(plan, ref::make_plan(indices, T, k, E, capacity, priority_values))) {
    finding("make_plan disagrees with the loop reference");
  }
  expect_no_mismatch(plan.row_of, plan.token_of, in.small(0, 3), in.seed(), "make_plan");
}

void fuzz_hand_made_plan(Input& in) {
  const int64_t T = in.small(0, 6), k = in.small(0, 3), N = in.small(0, 10), H = in.small(0, 3);
  Ints row_of(T * k, -1), token_of(N, -1);
  if (in.flag()) {
    // A consistent plan from a shuffled pool of rows, then a few entries overwritten.
    std::mt19937_64 rng(in.seed());
    Ints pool(N);
    for (int64_t r = 0; r < N; ++r) pool[r] = r;
    std::shuffle(pool.begin(), pool.end(), rng);
    size_t next = 0;
    for (int64_t a = 0; a < T * k && next < pool.size(); ++a) {
      if (rng() % 4 == 0) continue;
      row_of[a] = pool[next++];
      token_of[row_of[a]] = a / k;
    }
    for (int64_t edits = in.small(0, 3); edits > 0; --edits) {
      if (in.flag() && N > 0) {
        token_of[in.small(0, N - 1)] = in.index(-1, T);
      } else if (T * k > 0) {
        row_of[in.small(0, T * k - 1)] = in.index(-1, N);
      }
    }
  } else {
    for (auto& r : row_of) r = in.index(-1, N);
    for (auto& t : token_of) t = in.index(-1, T);
  }
  const bool valid = ref::plan_is_consistent(row_of, token_of, T, k);
  const Tensor row_of_t = long_tensor(row_of, {T, k}), token_of_t = long_tensor(token_of, {N});
  const auto dtype = in.float_dtype();
  for (const auto consumer :
       {Consumer::kDispatch, Consumer::kDispatchBackward, Consumer::kCombine, Consumer::kCombineBackward}) {
    expect_outcome(runs([&] { consume(consumer, row_of_t, token_of_t, H, dtype); }), valid,
                   consumer_name(consumer).c_str());
  }
  if (valid) expect_no_mismatch(row_of_t, token_of_t, H, in.seed(), "hand-made plan");
}

void fuzz_grouped_mm(Input& in) {
  const int64_t E = in.small(0, 4), N = in.small(0, 8), in_cols = in.small(1, 3), out_cols = in.small(1, 3);
  Ints offsets(E + 1 + in.small(-1, 1));
  if (in.flag()) {
    int64_t row = 0;
    for (size_t e = 0; e < offsets.size(); ++e) offsets[e] = row = e == 0 ? 0 : in.small(row, N);
    if (!offsets.empty() && in.flag())
      offsets[in.small(0, static_cast<int64_t>(offsets.size()) - 1)] = in.index(-1, N + 1);
  } else {
    for (auto& o : offsets) o = in.index(-1, N + 1);
  }
  const bool valid = static_cast<int64_t>(offsets.size()) == E + 1 && ref::offsets_are_valid(offsets, N);
  std::mt19937_64 rng(in.seed());
  std::normal_distribution<double> normal;
  Reals x(N * in_cols), w(E * in_cols * out_cols);
  for (auto& v : x) v = normal(rng);
  for (auto& v : w) v = normal(rng);
  const Tensor x_t = double_tensor(x, {N, in_cols}), w_t = double_tensor(w, {E, in_cols, out_cols});
  const Tensor offsets_t = long_tensor(offsets, {static_cast<int64_t>(offsets.size())});
  Tensor y;
  const bool ran = runs([&] { y = moe_ext::grouped_mm(x_t, w_t, offsets_t); });
  expect_outcome(ran, valid, "grouped_mm");
  if (ran && !ref::all_close(to_reals(y), ref::grouped_mm(x, w, offsets, in_cols, out_cols), 1e-9)) {
    finding("grouped_mm disagrees with the loop reference");
  }
  expect_outcome(runs([&] {
                   moe_ext::detail::grouped_mm_backward_op().call(at::randn({N, out_cols}, at::kDouble), x_t, w_t,
                                                                  offsets_t);
                 }),
                 valid, "grouped_mm_backward");
}

void fuzz_expert_choice_plan(Input& in) {
  const int64_t T = in.small(0, 8), E = in.small(0, 4);
  const int64_t C = in.capacity().value_or(in.small(0, 12));
  const Tensor scores = double_tensor(in.reals(T * E), {T, E}, in.float_dtype());
  const Reals values = to_reals(scores);
  const bool valid = E >= 1 && C >= 0 && rows_fit(E, C) && !any_nan(values);
  Plan plan;
  const bool ran = runs([&] { plan = expert_choice_plan(scores, C); });
  expect_outcome(ran, valid && E * C <= kMaxRows, "expert_choice_plan");
  if (!ran) return;
  if (!plan_equals(plan, ref::expert_choice_plan(values, T, E, C))) {
    finding("expert_choice_plan disagrees with the loop reference");
  }
  expect_no_mismatch(plan.row_of, plan.token_of, in.small(0, 3), in.seed(), "expert_choice_plan");
}

void fuzz_gating_and_losses(Input& in) {
  const int64_t T = in.small(0, 5), E = in.small(0, 6);
  const Tensor logits = double_tensor(in.reals(T * E), {T, E}, in.float_dtype());
  const int64_t k = in.index(1, std::max<int64_t>(E, 1));
  const int64_t n_group = in.flag() ? 1 : in.index(1, std::max<int64_t>(E, 1));
  const int64_t topk_group = in.index(1, std::max<int64_t>(std::min<int64_t>(n_group, 8), 1));
  const char* score_func = in.flag() ? "softmax" : "sigmoid";
  std::optional<Tensor> bias, mask;
  if (in.flag()) bias = double_tensor(in.reals(E), {E});
  if (in.flag()) {
    const int64_t rows = in.flag() ? T : 1;
    Ints bits(rows * E);
    for (auto& b : bits) b = in.small(0, 3) != 0;
    mask = long_tensor(bits, rows == 1 && in.flag() ? at::IntArrayRef{E} : at::IntArrayRef{rows, E}).to(at::kBool);
  }
  const double scale = in.flag() ? 1.0 : in.real();
  Tensor weights, indices, scores;
  const bool ran = runs([&] {
    std::tie(weights, indices, scores) =
        moe_ext::topk_gating(logits, k, score_func, in.flag(), bias, scale, n_group, topk_group, mask);
  });
  if (ran) {
    // Each token: k distinct enabled experts in [0, E), finite weights and scores.
    const Ints chosen = to_ints(indices);
    const Reals w = to_reals(weights), s = to_reals(scores);
    const Ints enabled = mask.has_value() ? to_ints(mask->to(at::kLong).expand({T, E}).contiguous()) : Ints(T * E, 1);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t j = 0; j < k; ++j) {
        const int64_t e = chosen[t * k + j];
        if (e < 0 || e >= E || !enabled[t * E + e]) finding("topk_gating chose an expert out of range or disabled");
        for (int64_t i = 0; i < j; ++i) {
          if (chosen[t * k + i] == e) finding("topk_gating chose an expert twice");
        }
      }
    }
    for (const double v : w) {
      if (!std::isfinite(v)) finding("topk_gating gave a non-finite weight");
    }
    for (const double v : s) {
      if (!std::isfinite(v)) finding("topk_gating gave a non-finite score");
    }
  }

  // The backward and the balance loss with indices of a possibly different token count, possibly out of range.
  const int64_t index_rows = in.flag() ? T : in.small(0, 6), index_cols = in.small(0, 3);
  Ints fuzzed(index_rows * index_cols);
  for (auto& e : fuzzed) e = in.index(0, std::max<int64_t>(E, 1) - 1);
  const Tensor fuzzed_t = long_tensor(fuzzed, {index_rows, index_cols});
  const bool rows_match = index_rows == T && all_in(fuzzed, 0, E);
  const Tensor probs = at::rand({T, E}, at::kDouble);
  expect_outcome(runs([&] {
                   moe_ext::detail::topk_gating_backward_op().call(at::ones({index_rows, index_cols}, at::kDouble),
                                                                   at::ones({T, E}, at::kDouble), probs, fuzzed_t,
                                                                   "softmax", true, 1.0, at::kDouble);
                 }),
                 rows_match, "topk_gating_backward");
  const int64_t num_experts = in.flag() ? E : in.num_experts();
  Tensor loss;
  const bool loss_ran = runs([&] { loss = moe_ext::load_balancing_loss(probs, fuzzed_t, num_experts); });
  expect_outcome(loss_ran, rows_match && E >= 1 && num_experts == E, "load_balancing_loss");
  if (loss_ran && T > 0) {
    // E * sum_e (count_e / T) * mean_t probs[t, e]
    const Reals p = to_reals(probs);
    double want = 0;
    for (const int64_t e : fuzzed) {
      double column = 0;
      for (int64_t t = 0; t < T; ++t) column += p[t * E + e];
      want += static_cast<double>(E) * column / (static_cast<double>(T) * T);
    }
    if (!ref::all_close({loss.item<double>()}, {want}, 1e-9)) finding("load_balancing_loss disagrees with its formula");
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // One thread: libFuzzer runs one input at a time, and the ops give the same bits whatever the thread count.
  at::set_num_threads(1);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Input in(data, size);
  switch (in.small(0, 4)) {
    case 0:
      fuzz_make_plan(in);
      break;
    case 1:
      fuzz_hand_made_plan(in);
      break;
    case 2:
      fuzz_grouped_mm(in);
      break;
    case 3:
      fuzz_expert_choice_plan(in);
      break;
    default:
      fuzz_gating_and_losses(in);
      break;
  }
  return 0;
}
