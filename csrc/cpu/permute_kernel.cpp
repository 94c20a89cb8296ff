// CPU kernels of dispatch and combine and their backward: row gathers and per-token weighted sums.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../kernels/permute.h"
#include "../kernels/plan.h"
#include "cpu_utils.h"
#include "output_cache.h"

namespace moe_ext {
namespace {

using kernels::PlanError;

int64_t row_grain(int64_t hidden) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, hidden)); }

// The k rows a token will gather are scattered over the expert-sorted buffer: ask for them a few
// tokens ahead (into L2), so their cache lines are in flight while earlier tokens are summed.
// Of 1, 2 and 4 tokens ahead, 4 measured best in bench_ops (2 was as good in float32).
constexpr int64_t kPrefetchTokens = 4;

template <typename T>
MOE_EXT_ALWAYS_INLINE void prefetch_rows(const T* src, const int64_t* rows, int64_t k, int64_t H) {
  constexpr int64_t kLine = 64;
  for (int64_t j = 0; j < k; ++j) {
    if (rows[j] < 0) continue;
    const char* row = reinterpret_cast<const char*>(src + rows[j] * H);
    for (int64_t b = 0; b < H * static_cast<int64_t>(sizeof(T)); b += kLine)
      __builtin_prefetch(row + b, 0, 2);  // read, keep in L2
  }
}

// Row loops of combine and of the backward of dispatch and combine, compiled per ISA (MOE_EXT_CPU_CLONES);
// the per-element math is kernels::axpy_row / dot_row. `weights` null means weight 1.
template <typename T>
MOE_EXT_ALWAYS_INLINE void weighted_row_sums(const T* src, const int64_t* rows, const kernels::acc_t<T>* weights,
                                             int64_t k, int64_t H, int64_t t0, int64_t t1, kernels::acc_t<T>* sum,
                                             T* out) {
  using acc = kernels::acc_t<T>;
  for (int64_t t = t0; t < t1; ++t) {
    if (t + kPrefetchTokens < t1) prefetch_rows(src, rows + (t + kPrefetchTokens) * k, k, H);
    for (int64_t h = 0; h < H; ++h) sum[h] = acc(0);
    // Rows are added two at a time (one load and store of `sum` per pair); the additions
    // happen in the same order as with one axpy_row per row.
    const T* pending = nullptr;
    acc pending_weight = acc(0);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t r = rows[t * k + j];
      if (r < 0) continue;
      const acc weight = weights == nullptr ? acc(1) : weights[t * k + j];
      const T* row = src + r * H;
      if (pending == nullptr) {
        pending = row;
        pending_weight = weight;
        continue;
      }
      MOE_EXT_IVDEP
      for (int64_t h = 0; h < H; ++h) {
        acc v = sum[h];
        v += pending_weight * static_cast<acc>(pending[h]);
        v += weight * static_cast<acc>(row[h]);
        sum[h] = v;
      }
      pending = nullptr;
    }
    if (pending != nullptr) kernels::axpy_row(pending_weight, pending, H, sum);
    T* dst = out + t * H;
    MOE_EXT_IVDEP
    for (int64_t h = 0; h < H; ++h) dst[h] = static_cast<T>(sum[h]);
  }
}

// out[r] = weight of (t, j) * grad[t] for the (t, j) that owns row r, 0 for unowned rows.
template <typename T>
MOE_EXT_ALWAYS_INLINE void scaled_rows(const T* grad, const int64_t* tokens, const int64_t* rows,
                                       const kernels::acc_t<T>* weights, int64_t k, int64_t H, int64_t r0, int64_t r1,
                                       T* out) {
  using acc = kernels::acc_t<T>;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t t = tokens[r];
    const int64_t j = t >= 0 ? kernels::slot_of_row(rows + t * k, k, r) : -1;
    T* dst = out + r * H;
    if (j < 0) {
      for (int64_t h = 0; h < H; ++h) dst[h] = T(0);
      continue;
    }
    const acc weight = weights[t * k + j];
    const T* g = grad + t * H;
    MOE_EXT_IVDEP
    for (int64_t h = 0; h < H; ++h) dst[h] = static_cast<T>(weight * static_cast<acc>(g[h]));
  }
}

// grad_weights[t, j] = <grad[t], y[row_of[t, j]]>, 0 for dropped assignments. Narrow types are widened
// into `scratch` [2H] first: the compiler vectorizes the conversion loops and the float dot, not a dot
// that converts as it goes.
template <typename T>
MOE_EXT_ALWAYS_INLINE void row_dots(const T* grad, const T* y, const int64_t* rows, int64_t k, int64_t H, int64_t t0,
                                    int64_t t1, kernels::acc_t<T>* scratch, kernels::acc_t<T>* out) {
  using acc = kernels::acc_t<T>;
  acc* g_wide = scratch;
  acc* y_wide = scratch + H;
  for (int64_t t = t0; t < t1; ++t) {
    if (t + kPrefetchTokens < t1) prefetch_rows(y, rows + (t + kPrefetchTokens) * k, k, H);
    const T* g = grad + t * H;
    if constexpr (!std::is_same_v<T, acc>) {
      MOE_EXT_IVDEP
      for (int64_t h = 0; h < H; ++h) g_wide[h] = static_cast<acc>(g[h]);
    }
    for (int64_t j = 0; j < k; ++j) {
      const int64_t r = rows[t * k + j];
      if (r < 0) {
        out[t * k + j] = acc(0);
      } else if constexpr (std::is_same_v<T, acc>) {
        out[t * k + j] = kernels::dot_row<acc, acc>(g, y + r * H, H);
      } else {
        const T* yr = y + r * H;
        MOE_EXT_IVDEP
        for (int64_t h = 0; h < H; ++h) y_wide[h] = static_cast<acc>(yr[h]);
        out[t * k + j] = kernels::dot_row<acc, acc>(g_wide, y_wide, H);
      }
    }
  }
}

#define MOE_EXT_PERMUTE_ROWS(T, name)                                                                                \
  MOE_EXT_CPU_CLONES __attribute__((flatten)) void weighted_row_sums_##name(                                         \
      const T* src, const int64_t* rows, const kernels::acc_t<T>* weights, int64_t k, int64_t H, int64_t t0,         \
      int64_t t1, kernels::acc_t<T>* sum, T* out) {                                                                  \
    weighted_row_sums<T>(src, rows, weights, k, H, t0, t1, sum, out);                                                \
  }                                                                                                                  \
  MOE_EXT_CPU_CLONES __attribute__((flatten)) void scaled_rows_##name(                                               \
      const T* grad, const int64_t* tokens, const int64_t* rows, const kernels::acc_t<T>* weights, int64_t k,        \
      int64_t H, int64_t r0, int64_t r1, T* out) {                                                                   \
    scaled_rows<T>(grad, tokens, rows, weights, k, H, r0, r1, out);                                                  \
  }                                                                                                                  \
  MOE_EXT_CPU_CLONES __attribute__((flatten)) void row_dots_##name(                                                  \
      const T* grad, const T* y, const int64_t* rows, int64_t k, int64_t H, int64_t t0, int64_t t1,                  \
      kernels::acc_t<T>* scratch, kernels::acc_t<T>* out) {                                                          \
    row_dots<T>(grad, y, rows, k, H, t0, t1, scratch, out);                                                          \
  }                                                                                                                  \
  void call_weighted_row_sums(const T* src, const int64_t* rows, const kernels::acc_t<T>* weights, int64_t k,        \
                              int64_t H, int64_t t0, int64_t t1, kernels::acc_t<T>* sum, T* out) {                   \
    weighted_row_sums_##name(src, rows, weights, k, H, t0, t1, sum, out);                                            \
  }                                                                                                                  \
  void call_scaled_rows(const T* grad, const int64_t* tokens, const int64_t* rows, const kernels::acc_t<T>* weights, \
                        int64_t k, int64_t H, int64_t r0, int64_t r1, T* out) {                                      \
    scaled_rows_##name(grad, tokens, rows, weights, k, H, r0, r1, out);                                              \
  }                                                                                                                  \
  void call_row_dots(const T* grad, const T* y, const int64_t* rows, int64_t k, int64_t H, int64_t t0, int64_t t1,   \
                     kernels::acc_t<T>* scratch, kernels::acc_t<T>* out) {                                           \
    row_dots_##name(grad, y, rows, k, H, t0, t1, scratch, out);                                                      \
  }

MOE_EXT_FOR_EACH_CPU_DTYPE(MOE_EXT_PERMUTE_ROWS)
#undef MOE_EXT_PERMUTE_ROWS

const char* plan_error_text(PlanError error) {
  switch (error) {
    case PlanError::kRowOutOfRange:
      return "row_of holds a row outside [-1, N)";
    case PlanError::kRowNotOwned:
      return "row_of[t, j] = r but token_of[r] != t";
    case PlanError::kDuplicateRow:
      return "row_of lists the same row twice for one token";
    case PlanError::kTokenOutOfRange:
      return "token_of holds a token outside [-1, T)";
    case PlanError::kRowNotListed:
      return "token_of[r] = t but row_of[t] does not list r";
    default:
      return "ok";
  }
}

// Validates a plan (row_of [T, k], token_of [N]) in O(T*k + N*k) before use.
void validate_plan(const at::Tensor& row_of, const at::Tensor& token_of) {
  const int64_t T = row_of.size(0), k = row_of.size(1), N = token_of.size(0);
  const int64_t* rows = row_of.const_data_ptr<int64_t>();
  const int64_t* tokens = token_of.const_data_ptr<int64_t>();
  cpu::FirstFailure bad_token, bad_row;
  at::parallel_for(0, T, 2048, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (kernels::check_token_rows(rows + t * k, k, t, tokens, N) != PlanError::kOk) bad_token.record(t);
    }
  });
  if (const int64_t t = bad_token.get(); t >= 0) {
    // Re-check the first failing token alone so the message names its own problem.
    TORCH_CHECK(false, "moe_ext: inconsistent routing plan at token ", t, ": ",
                plan_error_text(kernels::check_token_rows(rows + t * k, k, t, tokens, N)), " (N = ", N,
                "); pass a plan made by make_plan");
  }
  at::parallel_for(0, N, 2048, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (kernels::check_row_token(r, tokens, rows, T, k) != PlanError::kOk) bad_row.record(r);
    }
  });
  if (const int64_t r = bad_row.get(); r >= 0) {
    TORCH_CHECK(false, "moe_ext: inconsistent routing plan at row ", r, ": ",
                plan_error_text(kernels::check_row_token(r, tokens, rows, T, k)), " (T = ", T,
                "); pass a plan made by make_plan");
  }
}

at::Tensor dispatch_cpu(const at::Tensor& x_in, const at::Tensor& token_of_in, const at::Tensor& row_of_in) {
  check_dispatch(x_in, token_of_in, row_of_in);
  const at::Tensor x = x_in.contiguous(), token_of = token_of_in.contiguous(), row_of = row_of_in.contiguous();
  validate_plan(row_of, token_of);
  const int64_t N = token_of.size(0), H = x.size(1);
  at::Tensor out = cpu::empty_output({N, H}, x.options());
  const int64_t* tokens = token_of.const_data_ptr<int64_t>();
  const size_t row_bytes = static_cast<size_t>(H) * x.element_size();
  // H = 0: nothing to copy, and memcpy/memset must not be given the null data pointer of an empty tensor.
  if (row_bytes == 0) return out;
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, N, row_grain(H), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = tokens[r];
      if (t >= 0) {
        std::memcpy(dst + r * row_bytes, src + t * row_bytes, row_bytes);
      } else {
        std::memset(dst + r * row_bytes, 0, row_bytes);
      }
    }
  });
  return out;
}

at::Tensor dispatch_backward_cpu(const at::Tensor& grad_in, const at::Tensor& token_of_in,
                                 const at::Tensor& row_of_in) {
  check_floating(grad_in, "grad_x_sorted");
  check_dim(grad_in, 2, "grad_x_sorted", "[N, H]");
  check_plan_tensors(token_of_in, row_of_in, grad_in, "grad_x_sorted");
  TORCH_CHECK(grad_in.size(0) == token_of_in.size(0), "moe_ext: grad_x_sorted must have N = ", token_of_in.size(0),
              " rows, got ", grad_in.size(0));
  const at::Tensor grad = grad_in.contiguous(), token_of = token_of_in.contiguous(), row_of = row_of_in.contiguous();
  validate_plan(row_of, token_of);
  const int64_t T = row_of.size(0), k = row_of.size(1), H = grad.size(1);
  at::Tensor grad_x = cpu::empty_output({T, H}, grad.options());
  const int64_t* rows = row_of.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "dispatch_backward_cpu", [&] {
    using acc = kernels::acc_t<scalar_t>;
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* out = grad_x.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, T, row_grain(H * k), [&](int64_t t0, int64_t t1) {
      std::vector<acc> sum(H);
      call_weighted_row_sums(g, rows, static_cast<const acc*>(nullptr), k, H, t0, t1, sum.data(), out);
    });
  });
  return grad_x;
}

at::Tensor combine_cpu(const at::Tensor& y_in, const at::Tensor& weights_in, const at::Tensor& row_of_in,
                       const at::Tensor& token_of_in) {
  check_combine(y_in, weights_in, row_of_in, token_of_in);
  const at::Tensor y = y_in.contiguous(), row_of = row_of_in.contiguous(), token_of = token_of_in.contiguous();
  validate_plan(row_of, token_of);
  const int64_t T = row_of.size(0), k = row_of.size(1), H = y.size(1);
  at::Tensor out = cpu::empty_output({T, H}, y.options());
  const int64_t* rows = row_of.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "combine_cpu", [&] {
    using acc = kernels::acc_t<scalar_t>;
    const at::Tensor w = weights_in.to(c10::CppTypeToScalarType<acc>::value).contiguous();
    const acc* w_ptr = w.const_data_ptr<acc>();
    const scalar_t* src = y.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, T, row_grain(H * k), [&](int64_t t0, int64_t t1) {
      std::vector<acc> sum(H);
      call_weighted_row_sums(src, rows, w_ptr, k, H, t0, t1, sum.data(), dst);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> combine_backward_cpu(const at::Tensor& grad_in, const at::Tensor& y_in,
                                                        const at::Tensor& weights_in, const at::Tensor& row_of_in,
                                                        const at::Tensor& token_of_in) {
  check_combine(y_in, weights_in, row_of_in, token_of_in);
  check_floating(grad_in, "grad_y");
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == row_of_in.size(0) && grad_in.size(1) == y_in.size(1),
              "moe_ext: grad_y must have shape [T, H] = [", row_of_in.size(0), ", ", y_in.size(1), "], got ",
              grad_in.sizes());
  const at::Tensor y = y_in.contiguous(), row_of = row_of_in.contiguous(), token_of = token_of_in.contiguous();
  const at::Tensor grad = grad_in.to(y.scalar_type()).contiguous();
  validate_plan(row_of, token_of);
  const int64_t T = row_of.size(0), k = row_of.size(1), N = y.size(0), H = y.size(1);
  at::Tensor grad_y_sorted = cpu::empty_output({N, H}, y.options());
  at::Tensor grad_weights;
  const int64_t* rows = row_of.const_data_ptr<int64_t>();
  const int64_t* tokens = token_of.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "combine_backward_cpu", [&] {
    using acc = kernels::acc_t<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc>::value;
    const at::Tensor w = weights_in.to(acc_dtype).contiguous();
    const acc* w_ptr = w.const_data_ptr<acc>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* src = y.const_data_ptr<scalar_t>();
    scalar_t* gy = grad_y_sorted.mutable_data_ptr<scalar_t>();
    // Each row is written by the one (t, j) that owns it: no accumulation races.
    at::parallel_for(0, N, row_grain(H),
                     [&](int64_t r0, int64_t r1) { call_scaled_rows(g, tokens, rows, w_ptr, k, H, r0, r1, gy); });
    at::Tensor gw = at::empty({T, k}, w.options());
    acc* gw_ptr = gw.mutable_data_ptr<acc>();
    at::parallel_for(0, T, row_grain(H * k), [&](int64_t t0, int64_t t1) {
      std::vector<acc> scratch(2 * H);
      call_row_dots(g, src, rows, k, H, t0, t1, scratch.data(), gw_ptr);
    });
    grad_weights = gw.to(weights_in.scalar_type());
  });
  return {grad_y_sorted, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ext, CPU, m) {
  m.impl("dispatch", &dispatch_cpu);
  m.impl("dispatch_backward", &dispatch_backward_cpu);
  m.impl("combine", &combine_cpu);
  m.impl("combine_backward", &combine_backward_cpu);
}

}  // namespace moe_ext
