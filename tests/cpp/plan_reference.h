// Plain-loop references of routing plans and the row permutations on std::vector (no torch), shared by
// test_adversarial.cpp and fuzz_plan.cpp: make_plan, expert_choice_plan, plan consistency, dispatch, combine,
// their backward, and grouped_mm. Written from the contract in DESIGN.md, not from the kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

namespace moe_ext {
namespace reference {

using Ints = std::vector<int64_t>;
using Reals = std::vector<double>;

struct Plan {
  Ints row_of, token_of, counts, offsets;
};

// Dropless: rows grouped by expert, token order inside an expert. Capacity C: expert e keeps its first C
// assignments by (priority descending, slot j, token t), a priority of -inf is never kept, and the kept ones
// sit in token order in rows [e*C, (e+1)*C). `indices` [T*k] must hold experts in [0, E).
inline Plan make_plan(const Ints& indices, int64_t T, int64_t k, int64_t E, std::optional<int64_t> capacity,
                      const Reals& priority = {}) {
  const int64_t A = T * k;
  Plan plan;
  plan.counts.assign(E, 0);
  for (int64_t a = 0; a < A; ++a) ++plan.counts[indices[a]];
  plan.row_of.assign(A, -1);
  plan.offsets.assign(E + 1, 0);
  if (!capacity.has_value()) {
    for (int64_t e = 0; e < E; ++e) plan.offsets[e + 1] = plan.offsets[e] + plan.counts[e];
    plan.token_of.assign(A, -1);
    Ints next(plan.offsets.begin(), plan.offsets.end() - 1);
    for (int64_t a = 0; a < A; ++a) {
      const int64_t row = next[indices[a]]++;
      plan.row_of[a] = row;
      plan.token_of[row] = a / k;
    }
    return plan;
  }
  const int64_t C = *capacity;
  for (int64_t e = 0; e <= E; ++e) plan.offsets[e] = e * C;
  plan.token_of.assign(E * C, -1);
  for (int64_t e = 0; e < E; ++e) {
    Ints mine;
    for (int64_t a = 0; a < A; ++a) {
      if (indices[a] == e && (priority.empty() || priority[a] != -std::numeric_limits<double>::infinity())) {
        mine.push_back(a);
      }
    }
    std::stable_sort(mine.begin(), mine.end(), [&](int64_t a, int64_t b) {
      if (!priority.empty() && priority[a] != priority[b]) return priority[a] > priority[b];
      return std::make_pair(a % k, a / k) < std::make_pair(b % k, b / k);
    });
    if (static_cast<int64_t>(mine.size()) > C) mine.resize(C);
    std::sort(mine.begin(), mine.end());
    for (size_t i = 0; i < mine.size(); ++i) {
      plan.row_of[mine[i]] = e * C + static_cast<int64_t>(i);
      plan.token_of[e * C + static_cast<int64_t>(i)] = mine[i] / k;
    }
  }
  return plan;
}

// Expert choice: expert e takes its min(T, C) best tokens by (score descending, token ascending), in token
// order in rows [e*C, e*C + taken); row_of is [T, E]. `scores` [T*E] must hold no NaN.
inline Plan expert_choice_plan(const Reals& scores, int64_t T, int64_t E, int64_t C) {
  Plan plan;
  plan.row_of.assign(T * E, -1);
  plan.token_of.assign(E * C, -1);
  plan.counts.assign(E, std::min(T, C));
  for (int64_t e = 0; e <= E; ++e) plan.offsets.push_back(e * C);
  for (int64_t e = 0; e < E; ++e) {
    Ints tokens(T);
    for (int64_t t = 0; t < T; ++t) tokens[t] = t;
    std::stable_sort(tokens.begin(), tokens.end(),
                     [&](int64_t a, int64_t b) { return scores[a * E + e] > scores[b * E + e]; });
    tokens.resize(std::min(T, C));
    std::sort(tokens.begin(), tokens.end());
    for (size_t i = 0; i < tokens.size(); ++i) {
      plan.row_of[tokens[i] * E + e] = e * C + static_cast<int64_t>(i);
      plan.token_of[e * C + static_cast<int64_t>(i)] = tokens[i];
    }
  }
  return plan;
}

// Whether row_of [T*k] and token_of [N] describe one consistent plan: every entry in range (-1 = none), every
// listed row listed once and owned by the token listing it, every owned row listed by its token.
inline bool plan_is_consistent(const Ints& row_of, const Ints& token_of, int64_t T, int64_t k) {
  const int64_t N = static_cast<int64_t>(token_of.size());
  if (static_cast<int64_t>(row_of.size()) != T * k) return false;
  Ints listed_by(N, -1);
  for (int64_t a = 0; a < T * k; ++a) {
    const int64_t r = row_of[a];
    if (r == -1) continue;
    if (r < -1 || r >= N || listed_by[r] != -1 || token_of[r] != a / k) return false;
    listed_by[r] = a / k;
  }
  for (int64_t r = 0; r < N; ++r) {
    if (token_of[r] < -1 || token_of[r] >= T || token_of[r] != listed_by[r]) return false;
  }
  return true;
}

// x_sorted [N, H]: row r is x[token_of[r]], zeros for token_of[r] == -1.
inline Reals dispatch(const Reals& x, const Ints& token_of, int64_t H) {
  Reals out(token_of.size() * H, 0.0);
  for (size_t r = 0; r < token_of.size(); ++r) {
    if (token_of[r] < 0) continue;
    for (int64_t h = 0; h < H; ++h) out[r * H + h] = x[token_of[r] * H + h];
  }
  return out;
}

// y [T, H] = sum_j weights[t, j] * y_sorted[row_of[t, j]] over the kept slots. dispatch_backward is this
// with all weights 1.
inline Reals combine(const Reals& y_sorted, const Reals& weights, const Ints& row_of, int64_t T, int64_t k, int64_t H) {
  Reals out(T * H, 0.0);
  for (int64_t a = 0; a < T * k; ++a) {
    if (row_of[a] < 0) continue;
    for (int64_t h = 0; h < H; ++h) out[(a / k) * H + h] += weights[a] * y_sorted[row_of[a] * H + h];
  }
  return out;
}

// combine's backward: grad_y_sorted [N, H] (row of slot (t, j) = weights[t, j] * grad[t], unlisted rows 0)
// and grad_weights [T, k] (dot of grad[t] and that row, 0 for dropped slots).
inline std::pair<Reals, Reals> combine_backward(const Reals& grad, const Reals& y_sorted, const Reals& weights,
                                                const Ints& row_of, int64_t N, int64_t T, int64_t k, int64_t H) {
  Reals grad_y_sorted(N * H, 0.0), grad_weights(T * k, 0.0);
  for (int64_t a = 0; a < T * k; ++a) {
    const int64_t r = row_of[a];
    if (r < 0) continue;
    for (int64_t h = 0; h < H; ++h) {
      grad_y_sorted[r * H + h] = weights[a] * grad[(a / k) * H + h];
      grad_weights[a] += grad[(a / k) * H + h] * y_sorted[r * H + h];
    }
  }
  return {grad_y_sorted, grad_weights};
}

// offsets [E+1] usable by grouped_mm over N rows: starts at 0, never decreases, ends at N.
inline bool offsets_are_valid(const Ints& offsets, int64_t N) {
  if (offsets.empty() || offsets.front() != 0 || offsets.back() != N) return false;
  for (size_t e = 1; e < offsets.size(); ++e) {
    if (offsets[e] < offsets[e - 1]) return false;
  }
  return true;
}

// y [N, out] with the rows of expert e multiplied by w[e] [in, out].
inline Reals grouped_mm(const Reals& x, const Reals& w, const Ints& offsets, int64_t in, int64_t out) {
  const int64_t N = offsets.back();
  Reals y(N * out, 0.0);
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
      for (int64_t c = 0; c < out; ++c) {
        double sum = 0;
        for (int64_t i = 0; i < in; ++i) sum += x[r * in + i] * w[(e * in + i) * out + c];
        y[r * out + c] = sum;
      }
    }
  }
  return y;
}

// Whether a and b have the same size and agree elementwise within tol * (1 + |b|) (NaN never agrees).
inline bool all_close(const Reals& a, const Reals& b, double tol) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!(std::abs(a[i] - b[i]) <= tol * (1 + std::abs(b[i])))) return false;
  }
  return true;
}

}  // namespace reference
}  // namespace moe_ext
