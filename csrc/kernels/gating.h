// Per-token top-k routing math (scores, group-limited selection, weights) and its backward.
#pragma once

#include <cmath>

#include "common.h"

namespace moe_ext {
namespace kernels {

enum class ScoreFunc : int { kSoftmax = 0, kSigmoid = 1 };

// Result of routing one token; anything but kOk is reported to the user.
enum class GateStatus : int {
  kOk = 0,
  kNonFinite = 1,     // NaN logit, +inf logit under softmax, or no finite enabled logit
  kTooFewExperts = 2  // fewer than k candidate experts (mask / group limit)
};

struct GatingConfig {
  int64_t num_experts;
  int64_t k;
  ScoreFunc score_func;
  bool normalize;
  double scale;
  int64_t n_group;     // 1 = no group limit
  int64_t topk_group;  // groups kept per token when n_group > 1
};

// Added to the sum of the k selected scores before renormalizing so that a
// token whose selected scores all underflow to 0 gets weights 0, not NaN.
constexpr double kNormalizeEps = 1e-20;

// Scores of one token: softmax over the enabled experts (disabled -> 0) or an
// elementwise sigmoid (disabled -> 0). Writes scores[E]; returns kNonFinite for
// inputs that have no meaningful answer.
template <typename in_t, typename acc>
MOE_INLINE GateStatus token_scores(const in_t* logits, const bool* enabled, const GatingConfig& cfg, acc* scores) {
  const int64_t E = cfg.num_experts;
  if (cfg.score_func == ScoreFunc::kSigmoid) {
    for (int64_t e = 0; e < E; ++e) {
      const acc l = static_cast<acc>(logits[e]);
      if (l != l) return GateStatus::kNonFinite;
      scores[e] = (enabled == nullptr || enabled[e]) ? acc(1) / (acc(1) + std::exp(-l)) : acc(0);
    }
    return GateStatus::kOk;
  }
  acc max_logit = neg_infinity<acc>();
  bool any_enabled = false;
  for (int64_t e = 0; e < E; ++e) {
    const acc l = static_cast<acc>(logits[e]);
    if (l != l) return GateStatus::kNonFinite;
    const bool on = enabled == nullptr || enabled[e];
    any_enabled = any_enabled || on;
    if (on && l > max_logit) max_logit = l;
  }
  if (!any_enabled) return GateStatus::kTooFewExperts;
  // +inf has no finite softmax; all -inf (or all disabled) has no distribution.
  if (!(max_logit > neg_infinity<acc>()) || max_logit == -neg_infinity<acc>()) {
    return GateStatus::kNonFinite;
  }
  acc total = 0;
  for (int64_t e = 0; e < E; ++e) {
    const bool on = enabled == nullptr || enabled[e];
    const acc p = on ? std::exp(static_cast<acc>(logits[e]) - max_logit) : acc(0);
    scores[e] = p;
    total += p;
  }
  const acc inv = acc(1) / total;
  for (int64_t e = 0; e < E; ++e) scores[e] *= inv;
  return GateStatus::kOk;
}

// True when candidate a outranks candidate b: larger value first, ties to the
// lower index. Shared by every selection so CPU and CUDA order identically.
template <typename acc>
MOE_INLINE bool outranks(acc value_a, int64_t a, acc value_b, int64_t b) {
  return value_a > value_b || (value_a == value_b && a < b);
}

// Top-k selection of one token. `select` [E] holds the selection values
// (score + bias) and is overwritten: non-candidates are set to -inf.
// `group_buf` [n_group] is scratch.
template <typename acc>
MOE_INLINE GateStatus token_select(acc* select, const bool* enabled, const GatingConfig& cfg, acc* group_buf,
                                   int64_t* indices) {
  const int64_t E = cfg.num_experts;
  const acc ninf = neg_infinity<acc>();
  for (int64_t e = 0; e < E; ++e) {
    if (enabled != nullptr && !enabled[e]) select[e] = ninf;
  }
  if (cfg.n_group > 1) {
    const int64_t group_size = E / cfg.n_group;
    // A group's score is the sum of its best two candidates (DeepSeek-V3).
    for (int64_t g = 0; g < cfg.n_group; ++g) {
      acc best = ninf, second = ninf;
      for (int64_t e = g * group_size; e < (g + 1) * group_size; ++e) {
        const acc v = select[e];
        if (v > best) {
          second = best;
          best = v;
        } else if (v > second) {
          second = v;
        }
      }
      acc score = best;
      if (group_size > 1 && second > ninf) score += second;
      group_buf[g] = score;
    }
    // Keep the topk_group best groups; mark the others by -inf scores.
    for (int64_t pick = 0; pick < cfg.topk_group; ++pick) {
      int64_t best_g = -1;
      for (int64_t g = 0; g < cfg.n_group; ++g) {
        if (group_buf[g] == -ninf) continue;  // +inf marks an already kept group
        if (best_g < 0 || outranks(group_buf[g], g, group_buf[best_g], best_g)) best_g = g;
      }
      if (best_g >= 0) group_buf[best_g] = -ninf;
    }
    for (int64_t g = 0; g < cfg.n_group; ++g) {
      if (group_buf[g] == -ninf) continue;
      for (int64_t e = g * group_size; e < (g + 1) * group_size; ++e) select[e] = ninf;
    }
  }
  // One pass keeping indices[0..found) ranked: O(E) compares plus the rare insertions, instead of
  // k passes over E. Experts come in ascending index, so a newcomer outranks a listed expert only
  // by a strictly larger value (ties keep the lower index first, as `outranks` orders them).
  const int64_t k = cfg.k;
  if (k <= 0) return GateStatus::kOk;
  int64_t found = 0;
  for (int64_t e = 0; e < E; ++e) {
    const acc v = select[e];
    if (!(v > ninf)) continue;
    if (found == k && !(v > select[indices[k - 1]])) continue;
    int64_t pos = found < k ? found : k - 1;
    for (; pos > 0 && v > select[indices[pos - 1]]; --pos) indices[pos] = indices[pos - 1];
    indices[pos] = e;
    if (found < k) ++found;
  }
  return found == k ? GateStatus::kOk : GateStatus::kTooFewExperts;
}

// Routing weights of one token from its scores and chosen experts.
template <typename acc>
MOE_INLINE void token_weights(const acc* scores, const int64_t* indices, const GatingConfig& cfg, acc* weights) {
  acc total = 0;
  for (int64_t j = 0; j < cfg.k; ++j) {
    weights[j] = scores[indices[j]];
    total += weights[j];
  }
  // Normalize first, then scale (as transformers does): s_j / D <= 1, so a large scale cannot overflow
  // where scale / D would (scale / 1e-20 is inf in float for any scale above ~3e18, and 0 * inf is NaN).
  const acc denom = cfg.normalize ? total + static_cast<acc>(kNormalizeEps) : acc(1);
  for (int64_t j = 0; j < cfg.k; ++j) weights[j] = weights[j] / denom * static_cast<acc>(cfg.scale);
}

// Gradient of one token's logits given the gradients of its weights [k] and
// scores [E] (either may be null = zero). `grad_scores_buf` [E] is scratch.
template <typename acc, typename out_t>
MOE_INLINE void token_gating_backward(const acc* grad_weights, const acc* grad_scores, const acc* scores,
                                      const int64_t* indices, const GatingConfig& cfg, acc* grad_scores_buf,
                                      out_t* grad_logits) {
  const int64_t E = cfg.num_experts;
  for (int64_t e = 0; e < E; ++e) grad_scores_buf[e] = grad_scores != nullptr ? grad_scores[e] : acc(0);
  if (grad_weights != nullptr) {
    const acc scale = static_cast<acc>(cfg.scale);
    if (cfg.normalize) {
      // w_j = scale * s_j / D, D = sum_m s_m + eps:
      // dL/ds_m = scale / D * (g_m - sum_j g_j * s_j / D)
      acc total = 0;
      for (int64_t j = 0; j < cfg.k; ++j) total += scores[indices[j]];
      const acc denom = total + static_cast<acc>(kNormalizeEps);
      acc dot = 0;
      for (int64_t j = 0; j < cfg.k; ++j) dot += grad_weights[j] * scores[indices[j]];
      dot /= denom;
      for (int64_t j = 0; j < cfg.k; ++j) grad_scores_buf[indices[j]] += (grad_weights[j] - dot) / denom * scale;
    } else {
      for (int64_t j = 0; j < cfg.k; ++j) grad_scores_buf[indices[j]] += scale * grad_weights[j];
    }
  }
  if (cfg.score_func == ScoreFunc::kSigmoid) {
    for (int64_t e = 0; e < E; ++e) {
      const acc s = scores[e];
      grad_logits[e] = static_cast<out_t>(grad_scores_buf[e] * s * (acc(1) - s));
    }
  } else {
    acc dot = 0;
    for (int64_t e = 0; e < E; ++e) dot += grad_scores_buf[e] * scores[e];
    for (int64_t e = 0; e < E; ++e) grad_logits[e] = static_cast<out_t>(scores[e] * (grad_scores_buf[e] - dot));
  }
}

}  // namespace kernels
}  // namespace moe_ext
