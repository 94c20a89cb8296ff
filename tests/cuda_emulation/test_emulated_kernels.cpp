// The CUDA kernels of csrc/cuda/*_kernels.cuh run through the CUDA execution model (emulation.h) on the CPU,
// with the launch geometry the CUDA glue picks (the same functions), and compared with moe_ext's CPU
// kernels called through the dispatcher: bitwise where both devices promise the same bits, else within a
// stated tolerance. Every launch sequence below is the one of the glue function named in its comment.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <iostream>
#include <limits>
#include <optional>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "checks.h"
#include "moe_ext.h"
// After ATen: the model's CUDA spellings must not leak into torch's headers.
#include "emulation.h"
// The shipped kernels.
#include "cuda/activation_kernels.cuh"
#include "cuda/gating_kernels.cuh"
#include "cuda/grouped_mm_kernels.cuh"
#include "cuda/losses_kernels.cuh"
#include "cuda/permute_kernels.cuh"
// make_plan's launch sequence, with the CUB stand-ins in place of CUB.
#include "cub_standin.h"
#include "cuda/plan_launches.cuh"
// grouped_mm's per-expert GEMMs, with the checked reference in place of cuBLAS.
#include "cuda/grouped_mm_launches.cuh"
#include "gemm_reference.h"

namespace {

using at::Tensor;
namespace mc = moe_ext::cuda;

// The largest token count of the cases.
constexpr int64_t kLargeT = 5000;

const std::vector<at::ScalarType> kDtypes = {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf};

Tensor randn(at::IntArrayRef sizes, at::ScalarType dtype, double scale = 1.0) {
  return (at::randn(sizes, at::kDouble) * scale).to(dtype);
}

std::string describe(const std::string& what, at::ScalarType dtype) {
  return what + " [" + std::string(c10::toString(dtype)) + "]";
}

// Same shape, dtype and bits (NaNs of any payload count as equal).
void expect_same_bits(const Tensor& emulated, const Tensor& cpu, const std::string& what) {
  ASSERT_EQ(emulated.sizes(), cpu.sizes()) << what;
  ASSERT_EQ(emulated.scalar_type(), cpu.scalar_type()) << what;
  if (cpu.numel() == 0) return;
  const Tensor a = emulated.contiguous(), b = cpu.contiguous();
  if (at::isFloatingType(cpu.scalar_type())) {
    const Tensor both_nan = at::isnan(a) & at::isnan(b);
    const Tensor differ = (a != b) & ~both_nan;
    const int64_t count = differ.sum().item<int64_t>();
    if (count > 0) {
      const Tensor flat = differ.reshape(-1).nonzero().reshape(-1);
      const int64_t i = flat[0].item<int64_t>();
      ADD_FAILURE() << what << ": " << count << " of " << cpu.numel() << " elements differ; first at flat " << i
                    << ": emulated " << a.reshape(-1)[i].item<double>() << ", CPU " << b.reshape(-1)[i].item<double>();
    }
  } else {
    EXPECT_TRUE(at::equal(a, b)) << what;
  }
}

void expect_close(const Tensor& emulated, const Tensor& cpu, double rtol, double atol, const std::string& what) {
  ASSERT_EQ(emulated.sizes(), cpu.sizes()) << what;
  if (cpu.numel() == 0) return;
  const Tensor a = emulated.to(at::kDouble), b = cpu.to(at::kDouble);
  EXPECT_TRUE(at::allclose(a, b, rtol, atol))
      << what << ": max |emulated - CPU| = " << (a - b).abs().max().item<double>();
}

// The CPU element-wise kernels are compiled per ISA (csrc/cpu/cpu_utils.h) and their AVX2/AVX-512 copies
// contract a * b + c into FMAs, which this build does not: the last bits of a chain of product-sums may
// differ from them. float and double: within 16 units in the last place (SwiGLU's backward chains five
// rounded steps, some cancelling); bfloat16 and half, rounded from float: within 2 of theirs.
void expect_within_contraction(const Tensor& emulated, const Tensor& cpu, const std::string& what) {
  const auto type = cpu.scalar_type();
  const double rtol = type == at::kDouble     ? 16 * 0x1p-52
                      : type == at::kFloat    ? 16 * 0x1p-23
                      : type == at::kBFloat16 ? 2 * 0x1p-7
                                              : 2 * 0x1p-10;
  expect_close(emulated, cpu, rtol, type == at::kDouble ? 1e-14 : 1e-6, what + " vs the CPU op");
}

// An error-slot array as the glue's DeviceChecks holds it (kNoError = passed).
struct Slots {
  explicit Slots(int n) : values(static_cast<size_t>(n), mc::kNoError) {}
  mc::ErrorSink sink() { return mc::ErrorSink{reinterpret_cast<long long*>(values.data())}; }
  std::vector<int64_t> values;
};

// A grid-stride kernel's grid, also at most `cap` blocks: the stride loop then runs several times per thread
// (the glue's grids reach that only past 2^20 blocks).
std::vector<unsigned int> grids(unsigned int glue_grid, unsigned int cap = 3) {
  std::vector<unsigned int> out = {glue_grid};
  if (glue_grid > cap) out.push_back(cap);
  return out;
}

// -----------------------------------------------------------------------------------------------------------
// swiglu / swiglu_backward (activation_kernel.cu: swiglu_cuda, swiglu_backward_cuda)

// The element-wise reference: kernels/activation.h's math on every (row, column), in the test's own loop.
template <typename scalar_t>
std::pair<Tensor, Tensor> swiglu_reference(const Tensor& h, const Tensor& grad) {
  using acc = moe_ext::kernels::acc_t<scalar_t>;
  const int64_t rows = h.size(0), width = h.size(1) / 2;
  Tensor out = at::empty({rows, width}, h.options()), grad_h = at::empty_like(h);
  const scalar_t* hp = h.const_data_ptr<scalar_t>();
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  scalar_t* ghp = grad_h.mutable_data_ptr<scalar_t>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < width; ++c) {
      const acc gate = static_cast<acc>(hp[r * 2 * width + c]), up = static_cast<acc>(hp[r * 2 * width + width + c]);
      op[r * width + c] = static_cast<scalar_t>(moe_ext::kernels::swiglu_forward<acc>(gate, up));
      acc dg, du;
      moe_ext::kernels::swiglu_backward<acc>(gate, up, static_cast<acc>(gp[r * width + c]), dg, du);
      ghp[r * 2 * width + c] = static_cast<scalar_t>(dg);
      ghp[r * 2 * width + width + c] = static_cast<scalar_t>(du);
    }
  }
  return {out, grad_h};
}

TEST(EmulatedSwiglu, ForwardAndBackwardMatchTheElementMathAndTheCpuKernels) {
  at::manual_seed(13);
  for (const auto dtype : kDtypes) {
    for (const auto& [rows, width] :
         std::vector<std::pair<int64_t, int64_t>>{{0, 8}, {1, 1}, {7, 5}, {300, 64}, {kLargeT, 24}}) {
      const Tensor h = randn({rows, 2 * width}, dtype, 4.0);
      const Tensor grad = randn({rows, width}, dtype);
      const Tensor cpu_out = moe_ext::swiglu(h);
      const Tensor cpu_grad = moe_ext::detail::swiglu_backward_op().call(grad, h);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "emulated_swiglu", [&] {
        const auto [ref_out, ref_grad] = swiglu_reference<scalar_t>(h, grad);
        for (const unsigned int grid : grids(mc::blocks_for(rows * width))) {
          Tensor out = at::empty({rows, width}, h.options());
          Tensor grad_h = at::empty({rows, 2 * width}, h.options());
          if (out.numel() > 0) {
            emu::launch<mc::swiglu_kernel<scalar_t>>(grid, mc::kThreads, 0, h.const_data_ptr<scalar_t>(), rows, width,
                                                     out.mutable_data_ptr<scalar_t>());
            emu::launch<mc::swiglu_backward_kernel<scalar_t>>(grid, mc::kThreads, 0, grad.const_data_ptr<scalar_t>(),
                                                              h.const_data_ptr<scalar_t>(), rows, width,
                                                              grad_h.mutable_data_ptr<scalar_t>());
          }
          const std::string what = describe(
              "swiglu " + std::to_string(rows) + "x" + std::to_string(width) + " grid " + std::to_string(grid), dtype);
          expect_same_bits(out, ref_out, what);
          expect_same_bits(grad_h, ref_grad, what + " backward");
          expect_within_contraction(out, cpu_out, what);
          expect_within_contraction(grad_h, cpu_grad, what + " backward");
        }
      });
    }
  }
}

// -----------------------------------------------------------------------------------------------------------
// Plans for the permute kernels: the CPU make_plan, dropless and with capacity.

struct Plan {
  Tensor row_of, token_of;
  int64_t T, k, N;
};

Plan make_plan(int64_t T, int64_t E, int64_t k, int64_t capacity, uint64_t seed) {
  at::manual_seed(static_cast<int64_t>(seed));
  const Tensor indices =
      T > 0 ? at::rand({T, E}).argsort(int64_t{1}, false).narrow(1, 0, k).contiguous() : at::empty({0, k}, at::kLong);
  const auto [row_of, token_of, counts, offsets] =
      moe_ext::make_plan(indices, E, capacity < 0 ? std::nullopt : std::optional<int64_t>(capacity));
  return {row_of, token_of, T, k, token_of.size(0)};
}

std::vector<Plan> plans() {
  return {make_plan(0, 4, 2, -1, 1),    make_plan(1, 4, 2, -1, 2),    make_plan(7, 8, 3, -1, 3),
          make_plan(300, 16, 4, -1, 4), make_plan(300, 16, 4, 40, 5), make_plan(kLargeT, 512, 2, -1, 6)};
}

// validate_plan_kernel as permute_kernel.cu's launch_plan_validation starts it.
std::vector<int64_t> validate(const Plan& plan) {
  Slots slots(mc::kPlanCheckSlots);
  if (plan.T > 0 || plan.N > 0) {
    emu::launch<mc::validate_plan_kernel>(
        mc::blocks_for(std::max(plan.T, plan.N)), mc::kThreads, 0, plan.row_of.const_data_ptr<int64_t>(),
        plan.token_of.const_data_ptr<int64_t>(), plan.T, plan.k, plan.N, slots.sink());
  }
  return slots.values;
}

TEST(EmulatedPermute, PlanValidationPassesMadePlansAndNamesTheCpuKernelsFirstError) {
  for (const Plan& plan : plans()) {
    const auto passed = validate(plan);
    EXPECT_EQ(passed[mc::kTokenSide], mc::kNoError) << "T = " << plan.T;
    EXPECT_EQ(passed[mc::kRowSide], mc::kNoError) << "T = " << plan.T;
    if (plan.T < 7) continue;
    // Two corruptions; the CPU kernel reports the smallest bad token, the device sink must hold the same.
    Plan bad{plan.row_of.clone(), plan.token_of.clone(), plan.T, plan.k, plan.N};
    const int64_t t1 = plan.T / 2, t2 = plan.T - 1;
    bad.row_of.index_put_({t2, 0}, plan.N + 5);
    bad.row_of.index_put_({t1, 0}, bad.row_of.index({t1, plan.k > 1 ? 1 : 0}).item<int64_t>());
    const auto failed = validate(bad);
    const int64_t key = failed[mc::kTokenSide];
    ASSERT_NE(key, mc::kNoError) << "T = " << plan.T;
    const Tensor x = at::zeros({plan.T, 4});
    std::string cpu_message;
    try {
      moe_ext::dispatch(x, bad.token_of, bad.row_of);
    } catch (const c10::Error& error) {
      cpu_message = error.what_without_backtrace();
    }
    EXPECT_NE(cpu_message.find("at token " + std::to_string(key / mc::kCodeBits) + ":"), std::string::npos)
        << "device slot names token " << key / mc::kCodeBits << ", the CPU kernel says: " << cpu_message;
  }
}

TEST(EmulatedPermute, DispatchGathersTheCpuKernelsRowsBitwiseForEveryCopyWidth) {
  for (const Plan& plan : plans()) {
    for (const auto dtype : kDtypes) {
      for (const int64_t H : {1, 3, 8, 64}) {
        // A view one element in: rows that start misaligned force narrower copies.
        for (const int64_t shift : {0, 1}) {
          const Tensor base = randn({plan.T * H + shift}, dtype);
          const Tensor x = base.narrow(0, shift, plan.T * H).view({plan.T, H});
          const Tensor cpu = moe_ext::dispatch(x, plan.token_of, plan.row_of);
          Tensor out_base = at::empty({plan.N * H + shift}, x.options());
          Tensor out = out_base.narrow(0, shift, plan.N * H).view({plan.N, H});
          // dispatch_cuda: the widest unit dividing the row bytes and both buffers' alignment.
          const int64_t row_bytes = H * static_cast<int64_t>(x.element_size());
          const void* src = x.const_data_ptr();
          void* dst = out.mutable_data_ptr();
          int64_t unit = 16;
          while (unit > 1 && (row_bytes % unit != 0 || !mc::aligned_to(src, unit) || !mc::aligned_to(dst, unit))) {
            unit /= 2;
          }
          const int64_t units = row_bytes / unit;
          const int64_t* tokens = plan.token_of.const_data_ptr<int64_t>();
          if (plan.N > 0) {
            for (const unsigned int grid : grids(mc::blocks_for(plan.N * units))) {
              switch (unit) {
                case 16:
                  emu::launch<mc::gather_rows_kernel<uint4>>(grid, mc::kThreads, 0, static_cast<const uint4*>(src),
                                                             tokens, plan.T, plan.N, units, static_cast<uint4*>(dst));
                  break;
                case 8:
                  emu::launch<mc::gather_rows_kernel<uint2>>(grid, mc::kThreads, 0, static_cast<const uint2*>(src),
                                                             tokens, plan.T, plan.N, units, static_cast<uint2*>(dst));
                  break;
                case 4:
                  emu::launch<mc::gather_rows_kernel<uint32_t>>(grid, mc::kThreads, 0,
                                                                static_cast<const uint32_t*>(src), tokens, plan.T,
                                                                plan.N, units, static_cast<uint32_t*>(dst));
                  break;
                case 2:
                  emu::launch<mc::gather_rows_kernel<uint16_t>>(grid, mc::kThreads, 0,
                                                                static_cast<const uint16_t*>(src), tokens, plan.T,
                                                                plan.N, units, static_cast<uint16_t*>(dst));
                  break;
                default:
                  emu::launch<mc::gather_rows_kernel<uint8_t>>(grid, mc::kThreads, 0, static_cast<const uint8_t*>(src),
                                                               tokens, plan.T, plan.N, units,
                                                               static_cast<uint8_t*>(dst));
                  break;
              }
              expect_same_bits(out, cpu,
                               describe("dispatch T=" + std::to_string(plan.T) + " H=" + std::to_string(H) + " unit " +
                                            std::to_string(unit) + " grid " + std::to_string(grid),
                                        dtype));
            }
          } else {
            expect_same_bits(out, cpu, describe("dispatch of an empty plan", dtype));
          }
        }
      }
    }
  }
}

// permute_kernel.cu: launch_weighted_row_sum, for combine (weights) and dispatch_backward (no weights).
template <typename scalar_t, typename acc>
void weighted_row_sum(const scalar_t* rows, const acc* weights, const Plan& plan, int64_t H, scalar_t* out,
                      bool capped) {
  if (plan.T == 0 || H == 0) return;
  mc::with_vector_width<scalar_t>(mc::vector_elems(H, sizeof(scalar_t), {rows, out}), [&](auto width) {
    constexpr int kVec = decltype(width)::value;
    const unsigned int grid = mc::blocks_for(plan.T * (H / kVec));
    emu::launch<mc::weighted_row_sum_kernel<scalar_t, acc, kVec>>(capped ? std::min(grid, 3u) : grid, mc::kThreads, 0,
                                                                  rows, weights, plan.row_of.const_data_ptr<int64_t>(),
                                                                  plan.T, plan.k, plan.N, H, out);
  });
}

// out[t] = sum over j in order of w[t, j] * rows[row_of[t, j]], in acc, slots without a row skipped.
template <typename scalar_t, typename acc>
Tensor weighted_row_sum_reference(const Tensor& rows, const Tensor& weights, const Plan& plan) {
  const int64_t H = rows.size(1);
  Tensor out = at::empty({plan.T, H}, rows.options());
  const scalar_t* in = rows.const_data_ptr<scalar_t>();
  const acc* w_of = weights.defined() ? weights.const_data_ptr<acc>() : nullptr;
  const int64_t* row_of = plan.row_of.const_data_ptr<int64_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  for (int64_t t = 0; t < plan.T; ++t) {
    for (int64_t c = 0; c < H; ++c) {
      acc sum = acc(0);
      for (int64_t j = 0; j < plan.k; ++j) {
        const int64_t r = row_of[t * plan.k + j];
        if (r < 0) continue;
        const acc w = w_of != nullptr ? w_of[t * plan.k + j] : acc(1);
        sum += w * static_cast<acc>(in[r * H + c]);
      }
      o[t * H + c] = static_cast<scalar_t>(sum);
    }
  }
  return out;
}

TEST(EmulatedPermute, CombineAndDispatchBackwardMatchTheSlotOrderSumAndTheCpuKernels) {
  at::manual_seed(14);
  for (const Plan& plan : plans()) {
    for (const auto dtype : kDtypes) {
      for (const int64_t H : {1, 6, 64}) {
        for (const bool capped : {false, true}) {
          // The capped runs read y one element into its buffer: rows that start misaligned for any vector.
          const int64_t shift = capped ? 1 : 0;
          const Tensor y = randn({plan.N * H + shift}, dtype).narrow(0, shift, plan.N * H).view({plan.N, H});
          const Tensor weights = at::rand({plan.T, plan.k}, at::kFloat);
          const Tensor cpu_combine = moe_ext::combine(y, weights, plan.row_of, plan.token_of);
          const Tensor cpu_backward = moe_ext::detail::dispatch_backward_op().call(y, plan.token_of, plan.row_of);
          Tensor out = at::empty({plan.T, H}, y.options());
          Tensor grad_x = at::empty({plan.T, H}, y.options());
          Tensor ref_combine, ref_backward;
          AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "emulated_combine", [&] {
            using acc = at::opmath_type<scalar_t>;
            const Tensor w = weights.to(c10::CppTypeToScalarType<acc>::value).contiguous();
            weighted_row_sum<scalar_t, acc>(y.const_data_ptr<scalar_t>(), w.const_data_ptr<acc>(), plan, H,
                                            out.mutable_data_ptr<scalar_t>(), capped);
            weighted_row_sum<scalar_t, acc>(y.const_data_ptr<scalar_t>(), nullptr, plan, H,
                                            grad_x.mutable_data_ptr<scalar_t>(), capped);
            ref_combine = weighted_row_sum_reference<scalar_t, acc>(y, w, plan);
            ref_backward = weighted_row_sum_reference<scalar_t, acc>(y, Tensor(), plan);
          });
          const std::string what =
              "T=" + std::to_string(plan.T) + " H=" + std::to_string(H) + (capped ? " capped" : "");
          expect_same_bits(out, ref_combine, describe("combine " + what, dtype));
          expect_within_contraction(out, cpu_combine, describe("combine " + what, dtype));
          // A sum of unweighted rows has no product to contract: the CPU kernel's bits.
          expect_same_bits(grad_x, ref_backward, describe("dispatch_backward " + what, dtype));
          expect_same_bits(grad_x, cpu_backward, describe("dispatch_backward " + what, dtype));
        }
      }
    }
  }
}

TEST(EmulatedPermute, CombineBackwardMatchesTheCpuKernel) {
  for (const Plan& plan : plans()) {
    for (const auto dtype : kDtypes) {
      for (const int64_t H : {1, 6, 64, 100}) {
        // row_dot_kernel runs a warp per slot and ends in five shuffles, the costliest launch to emulate: the
        // largest plan once (float, H = 64); the smaller ones cover every element type and width.
        if (plan.T == kLargeT && (dtype != at::kFloat || H != 64)) continue;
        const Tensor y = randn({plan.N, H}, dtype);
        const Tensor grad = randn({plan.T, H}, dtype);
        const Tensor weights = at::rand({plan.T, plan.k}, at::kFloat);
        const auto [cpu_grad_y, cpu_grad_w] =
            moe_ext::detail::combine_backward_op().call(grad, y, weights, plan.row_of, plan.token_of);
        Tensor grad_y = at::empty({plan.N, H}, y.options());
        Tensor grad_w;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "emulated_combine_backward", [&] {
          using acc = at::opmath_type<scalar_t>;
          const Tensor w = weights.to(c10::CppTypeToScalarType<acc>::value).contiguous();
          const scalar_t* g = grad.const_data_ptr<scalar_t>();
          scalar_t* gy = grad_y.mutable_data_ptr<scalar_t>();
          const int64_t* rows = plan.row_of.const_data_ptr<int64_t>();
          if (plan.N > 0 && H > 0) {
            mc::with_vector_width<scalar_t>(mc::vector_elems(H, sizeof(scalar_t), {g, gy}), [&](auto width) {
              constexpr int kVec = decltype(width)::value;
              emu::launch<mc::scale_owned_rows_kernel<scalar_t, acc, kVec>>(
                  mc::blocks_for(plan.N * (H / kVec)), mc::kThreads, 0, g, w.const_data_ptr<acc>(), rows,
                  plan.token_of.const_data_ptr<int64_t>(), plan.T, plan.k, plan.N, H, gy);
            });
          }
          Tensor gw = at::empty({plan.T, plan.k}, w.options());
          if (plan.T * plan.k > 0) {
            for (const unsigned int grid : grids(mc::blocks_for(plan.T * plan.k * 32))) {
              emu::launch<mc::row_dot_kernel<scalar_t, acc>>(grid, mc::kThreads, 0, g, y.const_data_ptr<scalar_t>(),
                                                             rows, plan.T, plan.k, plan.N, H,
                                                             gw.mutable_data_ptr<acc>());
            }
          }
          grad_w = gw.to(weights.scalar_type());
        });
        const std::string what = "T=" + std::to_string(plan.T) + " H=" + std::to_string(H);
        expect_same_bits(grad_y, cpu_grad_y, describe("combine_backward grad_y_sorted " + what, dtype));
        // grad_weights: a warp's 32 strided partial sums and a butterfly on the device, kernels::dot_row's 16
        // lanes on the CPU: the same products added in another order.
        const double tol = dtype == at::kDouble ? 1e-12 : 1e-5;
        expect_close(grad_w, cpu_grad_w, tol, tol * std::sqrt(static_cast<double>(H)),
                     describe("combine_backward grad_weights " + what, dtype));
      }
    }
  }
}

// -----------------------------------------------------------------------------------------------------------
// topk_gating and its backward (gating_kernel.cu: topk_gating_cuda, topk_gating_backward_cuda)

struct GatingCase {
  int64_t T, E, k;
  const char* score_func;
  bool normalize;
  bool with_bias;
  int64_t n_group, topk_group;
  int mask;  // 0: none, 1: [E], 2: [T, E]
  bool ties;
};

std::vector<GatingCase> gating_cases() {
  return {
      {0, 8, 2, "softmax", true, false, 1, 1, 0, false},    {1, 8, 2, "softmax", true, false, 1, 1, 0, false},
      {7, 8, 8, "softmax", false, false, 1, 1, 0, false},   {300, 64, 8, "softmax", true, false, 1, 1, 0, false},
      {300, 64, 8, "sigmoid", true, true, 8, 4, 0, false},  {300, 64, 6, "softmax", false, false, 1, 1, 1, true},
      {300, 16, 4, "sigmoid", false, false, 1, 1, 2, true}, {kLargeT, 32, 4, "softmax", true, false, 1, 1, 0, true},
      {130, 512, 8, "sigmoid", true, true, 8, 2, 0, false}, {70, 512, 8, "softmax", true, false, 1, 1, 2, false},
  };
}

TEST(EmulatedGating, ForwardAndBackwardMatchTheCpuKernelsBitwiseOnBothPaths) {
  std::set<std::string> paths;
  for (const GatingCase& c : gating_cases()) {
    for (const auto dtype : kDtypes) {
      Tensor logits = randn({c.T, c.E}, dtype, 2.0);
      if (c.ties && c.T > 0) logits = logits.mul(2).round().div(2).to(dtype);  // many equal logits per token
      const auto acc_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
      std::optional<Tensor> bias;
      if (c.with_bias) bias = at::randn({c.E}, at::kDouble).mul(0.1).to(acc_dtype);
      std::optional<Tensor> mask;
      if (c.mask == 1) mask = at::arange(c.E) % 5 != 3;
      if (c.mask == 2) mask = at::rand({c.T, c.E}) > 0.2;
      if (c.mask == 2 && c.T > 0) mask->narrow(1, 0, c.k).fill_(true);  // every token keeps k candidates
      const double scale = 1.5;
      const auto [cpu_w, cpu_i, cpu_s] =
          moe_ext::topk_gating(logits, c.k, c.score_func, c.normalize, bias, scale, c.n_group, c.topk_group, mask);
      const Tensor grad_w = randn({c.T, c.k}, acc_dtype), grad_s = randn({c.T, c.E}, acc_dtype);
      const Tensor cpu_grad = moe_ext::detail::topk_gating_backward_op().call(grad_w, grad_s, cpu_s, cpu_i,
                                                                              c.score_func, c.normalize, scale, dtype);

      Tensor weights = at::empty({c.T, c.k}, logits.options().dtype(acc_dtype));
      Tensor indices = at::empty({c.T, c.k}, at::kLong);
      Tensor scores = at::empty({c.T, c.E}, logits.options().dtype(acc_dtype));
      Tensor grad_logits = at::empty({c.T, c.E}, logits.options());
      const auto func = std::string(c.score_func) == "softmax" ? moe_ext::kernels::ScoreFunc::kSoftmax
                                                               : moe_ext::kernels::ScoreFunc::kSigmoid;
      const moe_ext::kernels::GatingConfig cfg{c.E, c.k, func, c.normalize, scale, c.n_group, c.topk_group};
      Slots slots(mc::kGatingSlots);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "emulated_gating", [&] {
        using acc = at::opmath_type<scalar_t>;
        const Tensor bias_acc = bias.has_value() ? bias->contiguous() : Tensor();
        const bool* mask_ptr = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
        const int64_t mask_stride = mask.has_value() && mask->dim() == 2 ? c.E : 0;
        const acc* bias_ptr = bias_acc.defined() ? bias_acc.const_data_ptr<acc>() : nullptr;
        const int tokens_per_block = mc::gating_tokens_per_block<acc>(c.E, c.n_group);
        if (tokens_per_block > 0) {
          paths.insert("forward shared");
          emu::launch<mc::topk_gating_shared_kernel<scalar_t, acc>>(
              mc::blocks_for(c.T, tokens_per_block), tokens_per_block,
              mc::gating_shared_bytes<acc>(c.E, c.n_group, tokens_per_block), logits.const_data_ptr<scalar_t>(),
              mask_ptr, mask_stride, bias_ptr, cfg, c.T, scores.mutable_data_ptr<acc>(),
              indices.mutable_data_ptr<int64_t>(), weights.mutable_data_ptr<acc>(), slots.sink());
        } else {
          paths.insert("forward global");
          Tensor scratch = at::empty({c.T, c.E + c.n_group}, scores.options());
          emu::launch<mc::topk_gating_global_kernel<scalar_t, acc>>(
              mc::blocks_for(c.T, mc::kGlobalGatingThreads), mc::kGlobalGatingThreads, 0,
              logits.const_data_ptr<scalar_t>(), mask_ptr, mask_stride, bias_ptr, cfg, c.T,
              scores.mutable_data_ptr<acc>(), indices.mutable_data_ptr<int64_t>(), weights.mutable_data_ptr<acc>(),
              scratch.mutable_data_ptr<acc>(), slots.sink());
        }
        // Backward: acc is the scores' type, scalar_t the logits'.
        Slots backward_slots(1);
        const int threads = mc::gating_backward_threads<acc>(c.E);
        const moe_ext::kernels::GatingConfig bcfg{c.E, c.k, func, c.normalize, scale, 1, 1};
        const Tensor gw = grad_w.contiguous(), gs = grad_s.contiguous(), s = cpu_s.contiguous(), i = cpu_i.contiguous();
        if (threads > 0) {
          paths.insert("backward shared");
          emu::launch<mc::topk_gating_backward_kernel<acc, scalar_t, true>>(
              mc::blocks_for(c.T, threads), threads, mc::gating_backward_shared_bytes<acc>(c.E, threads),
              gw.const_data_ptr<acc>(), gs.const_data_ptr<acc>(), s.const_data_ptr<acc>(), i.const_data_ptr<int64_t>(),
              bcfg, c.T, nullptr, grad_logits.mutable_data_ptr<scalar_t>(), backward_slots.sink());
        } else {
          paths.insert("backward global");
          Tensor scratch = at::empty({c.T, c.E}, s.options());
          emu::launch<mc::topk_gating_backward_kernel<acc, scalar_t, false>>(
              mc::blocks_for(c.T, mc::kGlobalGatingThreads), mc::kGlobalGatingThreads, 0, gw.const_data_ptr<acc>(),
              gs.const_data_ptr<acc>(), s.const_data_ptr<acc>(), i.const_data_ptr<int64_t>(), bcfg, c.T,
              scratch.mutable_data_ptr<acc>(), grad_logits.mutable_data_ptr<scalar_t>(), backward_slots.sink());
        }
        EXPECT_EQ(backward_slots.values[0], mc::kNoError);
      });
      for (int slot = 0; slot < mc::kGatingSlots; ++slot) EXPECT_EQ(slots.values[slot], mc::kNoError) << slot;
      const std::string what = describe("topk_gating T=" + std::to_string(c.T) + " E=" + std::to_string(c.E) +
                                            " k=" + std::to_string(c.k) + " " + c.score_func,
                                        dtype);
      expect_same_bits(indices, cpu_i, what + " indices");
      expect_same_bits(weights, cpu_w, what + " weights");
      expect_same_bits(scores, cpu_s, what + " scores");
      expect_same_bits(grad_logits, cpu_grad, what + " backward");
    }
  }
  EXPECT_EQ(paths, (std::set<std::string>{"forward shared", "forward global", "backward shared", "backward global"}));
}

TEST(EmulatedGating, BadInputsReportTheCpuKernelsItems) {
  // A NaN logit in token 5 and token 9: the slot must name token 5, as the CPU kernel's message does.
  Tensor logits = at::randn({12, 16});
  logits.index_put_({9, 3}, std::nan(""));
  logits.index_put_({5, 1}, std::nan(""));
  const moe_ext::kernels::GatingConfig cfg{16, 2, moe_ext::kernels::ScoreFunc::kSoftmax, true, 1.0, 1, 1};
  Tensor weights = at::empty({12, 2}), scores = at::empty({12, 16});
  Tensor indices = at::empty({12, 2}, at::kLong);
  Slots slots(mc::kGatingSlots);
  const int tokens = mc::gating_tokens_per_block<float>(16, 1);
  emu::launch<mc::topk_gating_shared_kernel<float, float>>(
      mc::blocks_for(12, tokens), tokens, mc::gating_shared_bytes<float>(16, 1, tokens), logits.const_data_ptr<float>(),
      nullptr, 0, nullptr, cfg, 12, scores.mutable_data_ptr<float>(), indices.mutable_data_ptr<int64_t>(),
      weights.mutable_data_ptr<float>(), slots.sink());
  EXPECT_EQ(slots.values[mc::kNonFinite], 5);
  try {
    moe_ext::topk_gating(logits, 2);
    ADD_FAILURE() << "the CPU kernel accepted a NaN logit";
  } catch (const c10::Error& error) {
    EXPECT_NE(std::string(error.what_without_backtrace()).find("token 5 "), std::string::npos);
  }
}

// -----------------------------------------------------------------------------------------------------------
// load_balancing_loss and router_z_loss (losses_kernel.cu)

// losses_kernel.cu: expert_counts, then blocked_column_sums and load_balancing_finish_kernel.
template <typename scalar_t, typename acc>
Tensor emulated_load_balancing_loss(const Tensor& scores, const Tensor& indices, int64_t E, Slots& slots) {
  // GCC 12 does not instantiate a function template specialization whose only use is a non-dependent template
  // argument (emu::launch<kernel<true>>): an odr-use here does.
  [[maybe_unused]] static const auto instantiated =
      std::make_pair(&mc::expert_counts_kernel<true>, &mc::expert_counts_kernel<false>);
  const int64_t T = scores.size(0), n = indices.numel();
  Tensor counts = at::zeros({E}, at::kLong);
  if (n > 0) {
    const unsigned int grid = mc::expert_counts_grid(n, E);
    auto* count_ptr = reinterpret_cast<unsigned long long*>(counts.mutable_data_ptr<int64_t>());
    if (E <= mc::kSharedHistogram) {
      emu::launch<mc::expert_counts_kernel<true>>(grid, mc::kThreads, mc::expert_counts_shared_bytes(E),
                                                  indices.const_data_ptr<int64_t>(), n, E, count_ptr, slots.sink());
    } else {
      emu::launch<mc::expert_counts_kernel<false>>(grid, mc::kThreads, 0, indices.const_data_ptr<int64_t>(), n, E,
                                                   count_ptr, slots.sink());
    }
  }
  const auto acc_opts = scores.options().dtype(c10::CppTypeToScalarType<acc>::value);
  const int64_t blocks = (T + mc::kReduceBlock - 1) / mc::kReduceBlock;
  Tensor partial = at::empty({blocks, E}, acc_opts), totals = at::empty({E}, acc_opts);
  if (blocks * E > 0) {
    emu::launch<mc::block_column_sums_kernel<scalar_t, acc>>(mc::blocks_for(blocks * E), mc::kThreads, 0,
                                                             scores.const_data_ptr<scalar_t>(), T, E,
                                                             partial.mutable_data_ptr<acc>());
  }
  emu::launch<mc::sum_blocks_kernel<acc>>(mc::blocks_for(E), mc::kThreads, 0, partial.const_data_ptr<acc>(), blocks, E,
                                          totals.mutable_data_ptr<acc>());
  Tensor loss = at::empty({}, scores.options());
  emu::launch<mc::load_balancing_finish_kernel<scalar_t, acc>>(
      1, 1, 0, totals.const_data_ptr<acc>(), counts.const_data_ptr<int64_t>(), T, E, loss.mutable_data_ptr<scalar_t>());
  return loss;
}

TEST(EmulatedLosses, LoadBalancingLossMatchesTheCpuKernelBitwiseOnBothHistogramPaths) {
  for (const auto dtype : kDtypes) {
    for (const auto& [T, E, k] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
             {0, 8, 2}, {1, 8, 2}, {7, 8, 3}, {300, 64, 8}, {kLargeT, 16, 4}, {40, 7000, 2}}) {
      const Tensor scores = at::rand({T, E}, at::kDouble).to(dtype);
      const Tensor indices = T > 0 ? at::rand({T, E}).argsort(int64_t{1}, false).narrow(1, 0, k).contiguous()
                                   : at::empty({0, k}, at::kLong);
      const Tensor cpu = moe_ext::load_balancing_loss(scores, indices, E);
      Slots slots(1);
      Tensor loss;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "emulated_lb", [&] {
        loss =
            emulated_load_balancing_loss<scalar_t, at::opmath_type<scalar_t>>(scores.contiguous(), indices, E, slots);
      });
      EXPECT_EQ(slots.values[0], mc::kNoError);
      expect_same_bits(loss, cpu,
                       describe("load_balancing_loss T=" + std::to_string(T) + " E=" + std::to_string(E), dtype));
    }
  }
  // An index out of range: the slot holds the first bad flat position on both histogram paths.
  for (const int64_t E : {8, 7000}) {
    Tensor indices = at::zeros({50, 2}, at::kLong);
    indices.index_put_({30, 1}, E);
    indices.index_put_({12, 0}, -1);
    Slots slots(1);
    emulated_load_balancing_loss<float, float>(at::rand({50, E}), indices, E, slots);
    EXPECT_EQ(slots.values[0], 24) << "E = " << E;
  }
}

TEST(EmulatedLosses, RouterZLossForwardAndBackwardMatchTheCpuKernelsBitwise) {
  for (const auto dtype : kDtypes) {
    for (const auto& [T, E] :
         std::vector<std::pair<int64_t, int64_t>>{{0, 8}, {1, 8}, {7, 3}, {300, 64}, {kLargeT, 16}}) {
      const Tensor logits = randn({T, E}, dtype, 3.0);
      const Tensor cpu = moe_ext::router_z_loss(logits);
      const auto acc_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
      const Tensor grad = at::full({}, 0.75, acc_dtype);
      const Tensor cpu_grad = moe_ext::detail::router_z_loss_backward_op().call(grad, logits);
      Tensor loss = at::empty({}, logits.options().dtype(acc_dtype));
      Tensor grad_logits = at::empty({T, E}, logits.options());
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "emulated_z", [&] {
        using acc = at::opmath_type<scalar_t>;
        const auto acc_opts = logits.options().dtype(acc_dtype);
        Tensor squared = at::empty({T}, acc_opts);
        if (T > 0) {
          emu::launch<mc::squared_logsumexp_kernel<scalar_t, acc>>(mc::blocks_for(T), mc::kThreads, 0,
                                                                   logits.const_data_ptr<scalar_t>(), T, E,
                                                                   squared.mutable_data_ptr<acc>());
        }
        const int64_t blocks = (T + mc::kReduceBlock - 1) / mc::kReduceBlock;
        Tensor partial = at::empty({blocks, 1}, acc_opts), total = at::empty({1}, acc_opts);
        if (blocks > 0) {
          emu::launch<mc::block_column_sums_kernel<acc, acc>>(mc::blocks_for(blocks), mc::kThreads, 0,
                                                              squared.const_data_ptr<acc>(), T, 1,
                                                              partial.mutable_data_ptr<acc>());
        }
        emu::launch<mc::sum_blocks_kernel<acc>>(mc::blocks_for(1), mc::kThreads, 0, partial.const_data_ptr<acc>(),
                                                blocks, 1, total.mutable_data_ptr<acc>());
        emu::launch<mc::mean_finish_kernel<acc>>(1, 1, 0, total.const_data_ptr<acc>(), T, loss.mutable_data_ptr<acc>());
        if (T > 0 && E > 0) {
          emu::launch<mc::router_z_loss_backward_kernel<scalar_t, acc>>(
              mc::blocks_for(T), mc::kThreads, 0, grad.const_data_ptr<acc>(), logits.const_data_ptr<scalar_t>(), T, E,
              grad_logits.mutable_data_ptr<scalar_t>());
        }
      });
      const std::string what = describe("router_z_loss T=" + std::to_string(T) + " E=" + std::to_string(E), dtype);
      expect_same_bits(loss, cpu, what);
      expect_same_bits(grad_logits, cpu_grad, what + " backward");
    }
  }
}

// -----------------------------------------------------------------------------------------------------------
// grouped_mm's device check of the offsets (grouped_mm_kernel.cu: device_group_ends)

TEST(EmulatedGroupedMm, OffsetsCheckAcceptsValidOffsetsOnly) {
  const std::vector<std::pair<std::vector<int64_t>, int64_t>> cases = {
      {{0, 0}, 0}, {{0, 3, 3, 7}, 7}, {{1, 3, 7}, 7}, {{0, 5, 3, 7}, 7}, {{0, 3, 6}, 7}};
  const std::vector<bool> valid = {true, true, false, false, false};
  for (size_t c = 0; c < cases.size(); ++c) {
    const auto& [offsets, rows] = cases[c];
    Slots slots(1);
    emu::launch<mc::check_offsets_kernel>(1, 1, 0, offsets.data(), static_cast<int64_t>(offsets.size()) - 1, rows,
                                          slots.sink());
    EXPECT_EQ(slots.values[0] == mc::kNoError, valid[c]) << "case " << c;
  }
}

// The per-expert path (grouped_mm_cuda, grouped_mm_backward_cuda) through the checked reference GEMM: every
// element type, contiguous and transposed w, empty experts first, between and last.
TEST(EmulatedGroupedMm, PerExpertGemmsMatchTheCpuKernelWithCublasReadableSlices) {
  struct Case {
    std::vector<int64_t> offsets;
    int64_t in, out;
  };
  const std::vector<Case> cases = {
      {{0, 0}, 8, 8},    {{0, 1}, 1, 5}, {{0, 0, 7, 7}, 6, 3}, {{0, 2, 2, 5, 7}, 16, 24}, {{0, 100, 100, 300}, 64, 40},
      {{0, 7, 7}, 33, 1}};
  at::manual_seed(17);
  for (const auto dtype : kDtypes) {
    for (const Case& c : cases) {
      for (const bool transposed : {false, true}) {
        const int64_t E = static_cast<int64_t>(c.offsets.size()) - 1, N = c.offsets.back();
        const Tensor offsets = at::tensor(c.offsets, at::kLong);
        const Tensor x = randn({N, c.in}, dtype), grad = randn({N, c.out}, dtype);
        const Tensor w = transposed ? randn({E, c.out, c.in}, dtype).transpose(1, 2) : randn({E, c.in, c.out}, dtype);
        ASSERT_EQ(moe_ext::is_transposed_weight(w), transposed && c.in > 1 && c.out > 1);
        const std::string what =
            describe("grouped_mm N=" + std::to_string(N) + " E=" + std::to_string(E) + " " + std::to_string(c.in) +
                         "x" + std::to_string(c.out) + (transposed ? " transposed w" : ""),
                     dtype);
        const bool as_is = moe_ext::is_transposed_weight(w);
        const Tensor wk = as_is ? w : w.contiguous();  // what the glue passes on
        int64_t nonempty = 0;
        for (int64_t e = 0; e < E; ++e) nonempty += c.offsets[e + 1] > c.offsets[e] ? 1 : 0;

        emu::gemm_calls() = 0;
        const Tensor y = mc::per_expert_grouped_mm(x, wk, c.offsets, emu::reference_mm_out);
        EXPECT_EQ(emu::gemm_calls(), nonempty) << what;
        const auto [grad_x, grad_w] =
            mc::per_expert_grouped_mm_backward(grad, x, wk, as_is, c.offsets, emu::reference_mm_out);
        EXPECT_EQ(emu::gemm_calls(), 3 * nonempty) << what;

        const Tensor cpu_y = moe_ext::grouped_mm(x, w, offsets);
        const auto [cpu_grad_x, cpu_grad_w] = moe_ext::detail::grouped_mm_backward_op().call(grad, x, w, offsets);
        // float64 products rounded once against the CPU kernel's accumulation in the element type's acc.
        const double tol = dtype == at::kDouble ? 1e-12 : dtype == at::kFloat ? 2e-5 : 2e-2;
        expect_close(y, cpu_y, tol, tol, what + " y");
        expect_close(grad_x, cpu_grad_x, tol, tol, what + " grad_x");
        expect_close(grad_w, cpu_grad_w, tol, tol, what + " grad_w");
        EXPECT_EQ(grad_w.strides(), cpu_grad_w.strides()) << what << ": grad_w must come back in w's layout";
        if (N > 0) {
          // Empty experts' gradients are exact zeros.
          for (int64_t e = 0; e < E; ++e) {
            if (c.offsets[e + 1] == c.offsets[e]) {
              EXPECT_EQ(grad_w[e].abs().max().item<double>(), 0.0) << what;
            }
          }
        }
      }
    }
  }
  // The reference refuses what cuBLAS cannot read as it is.
  const Tensor a = at::randn({6, 8}), b = at::randn({8, 4});
  Tensor out = at::empty({6, 4});
  EXPECT_NO_THROW(emu::reference_mm_out(out, a, b));
  EXPECT_THROW(emu::reference_mm_out(out, at::randn({6, 16}).slice(1, 0, 16, 2), b), emu::LaunchError);
  EXPECT_THROW(emu::reference_mm_out(out, a, at::randn({1, 4}).expand({8, 4})), emu::LaunchError);
  Tensor strided = at::empty({6, 8}).slice(1, 0, 8, 2);
  EXPECT_THROW(emu::reference_mm_out(strided, a, b), emu::LaunchError);
  Tensor wrong_shape = at::empty({4, 6});
  EXPECT_THROW(emu::reference_mm_out(wrong_shape, a, b), emu::LaunchError);
  Tensor both = at::empty({6, 8});
  Tensor aliased = both.narrow(1, 0, 4);
  EXPECT_THROW(emu::reference_mm_out(aliased, both, at::randn({8, 4})), emu::LaunchError);
}

// -----------------------------------------------------------------------------------------------------------
// make_plan and expert_choice_plan (plan_kernel.cu: make_plan_cuda, expert_choice_plan_cuda): the shipped
// launch sequence of plan_launches.cuh, with its CUB calls served by cub_standin.h.

// Values with many ties (multiples of 1/4 in [-2, 2]), both zeros, and +-inf.
Tensor tied_values(at::IntArrayRef sizes, at::ScalarType dtype, uint64_t seed) {
  at::manual_seed(static_cast<int64_t>(seed));
  Tensor v = at::randint(-8, 9, sizes, at::kLong).to(at::kDouble) / 4;
  Tensor flat = v.view(-1);
  const int64_t n = flat.numel();
  if (n > 4) {
    flat.index_put_({n / 5}, -0.0);
    flat.index_put_({n / 3}, std::numeric_limits<double>::infinity());
    flat.index_put_({n / 2}, -std::numeric_limits<double>::infinity());
  }
  return v.to(dtype);
}

void expect_same_plan(const std::tuple<Tensor, Tensor, Tensor, Tensor>& emulated,
                      const std::tuple<Tensor, Tensor, Tensor, Tensor>& cpu, const std::string& what) {
  const char* names[] = {"row_of", "token_of", "counts", "offsets"};
  const Tensor e[] = {std::get<0>(emulated), std::get<1>(emulated), std::get<2>(emulated), std::get<3>(emulated)};
  const Tensor c[] = {std::get<0>(cpu), std::get<1>(cpu), std::get<2>(cpu), std::get<3>(cpu)};
  for (int i = 0; i < 4; ++i) expect_same_bits(e[i], c[i], what + " " + names[i]);
}

struct PlanCase {
  int64_t T, E, k;
  std::optional<int64_t> capacity;
  int priority;  // 0: none, 1: random (distinct), 2: tied with +-0 and +-inf
  bool skewed;   // every token's first choice is expert 0 (capacity drops)
};

TEST(EmulatedPlan, MakePlanMatchesTheCpuKernelBitwise) {
  const std::vector<PlanCase> cases = {{0, 4, 2, std::nullopt, 0, false},
                                       {0, 4, 2, 3, 1, false},
                                       {1, 4, 2, std::nullopt, 0, false},
                                       {1, 1, 1, 0, 0, false},
                                       {7, 8, 3, std::nullopt, 0, true},
                                       {7, 8, 3, 2, 2, true},
                                       {300, 16, 4, std::nullopt, 0, false},
                                       {300, 16, 4, 40, 0, true},
                                       {300, 16, 4, 40, 1, false},
                                       {300, 16, 4, 70, 2, true},
                                       {300, 512, 1, 1, 2, false},
                                       {kLargeT, 512, 2, std::nullopt, 0, false},
                                       {kLargeT, 64, 4, kLargeT / 40, 2, true},
                                       {kLargeT, 8, 2, kLargeT, 1, false}};
  uint64_t seed = 100;
  for (const PlanCase& c : cases) {
    at::manual_seed(static_cast<int64_t>(++seed));
    Tensor indices = at::randint(0, c.E, {c.T, c.k}, at::kLong);  // repeats within a token included
    if (c.skewed && c.T > 0) indices.select(1, 0).fill_(0);
    Tensor priority;
    if (c.priority == 1) priority = at::rand({c.T, c.k}, at::kDouble);
    if (c.priority == 2) priority = tied_values({c.T, c.k}, at::kFloat, seed);
    const std::string what = "make_plan T=" + std::to_string(c.T) + " E=" + std::to_string(c.E) +
                             " k=" + std::to_string(c.k) +
                             " C=" + (c.capacity ? std::to_string(*c.capacity) : std::string("none")) +
                             " priority=" + std::to_string(c.priority);
    const auto cpu = moe_ext::make_plan(indices, c.E, c.capacity,
                                        priority.defined() ? std::optional<Tensor>(priority) : std::nullopt);
    Slots slots(mc::kPlanSlots);
    const auto emulated = mc::make_plan_launches(
        indices, c.E, c.capacity, priority.defined() ? priority.to(at::kDouble) : Tensor(), slots.sink(), nullptr);
    expect_same_plan(emulated, cpu, what);
    EXPECT_EQ(slots.values[mc::kBadIndex], mc::kNoError) << what;
    EXPECT_EQ(slots.values[mc::kPriorityNaN], mc::kNoError) << what;
  }
}

TEST(EmulatedPlan, MakePlanReportsTheCpuKernelsFirstBadIndexAndNanPriority) {
  at::manual_seed(7);
  const int64_t T = 300, E = 16, k = 2;
  Tensor indices = at::randint(0, E, {T, k}, at::kLong);
  indices.index_put_({250, 1}, -1);
  indices.index_put_({40, 1}, E);
  indices.index_put_({41, 0}, E + 7);
  std::string cpu_message;
  try {
    moe_ext::make_plan(indices, E);
  } catch (const c10::Error& error) {
    cpu_message = error.what_without_backtrace();
  }
  for (const std::optional<int64_t> capacity : {std::optional<int64_t>(), std::optional<int64_t>(30)}) {
    Slots slots(mc::kPlanSlots);
    mc::make_plan_launches(indices, E, capacity, Tensor(), slots.sink(), nullptr);
    const int64_t bad = slots.values[mc::kBadIndex];
    ASSERT_EQ(bad, 40 * k + 1);
    // make_plan_cuda's message names indices[bad / k, bad % k]; the CPU kernel names the same entry.
    EXPECT_NE(cpu_message.find("indices[40, 1] = 16"), std::string::npos) << cpu_message;
  }
  Tensor priority = at::rand({T, k}, at::kDouble);
  priority.index_put_({5, 0}, std::nan(""));
  Slots slots(mc::kPlanSlots);
  mc::make_plan_launches(at::randint(0, E, {T, k}, at::kLong), E, 20, priority, slots.sink(), nullptr);
  EXPECT_EQ(slots.values[mc::kPriorityNaN], 5 * k);
  EXPECT_EQ(slots.values[mc::kBadIndex], mc::kNoError);
}

TEST(EmulatedPlan, ExpertChoicePlanMatchesTheCpuKernelBitwise) {
  struct Case {
    int64_t T, E, C;
  };
  const std::vector<Case> cases = {{0, 4, 3},
                                   {1, 1, 1},
                                   {1, 8, 0},
                                   {7, 8, 3},
                                   {7, 4, 20},
                                   {300, 16, 40},
                                   {300, 512, 2},
                                   {kLargeT, 64, kLargeT / 20},
                                   {kLargeT, 8, kLargeT + 1}};
  uint64_t seed = 200;
  for (const auto dtype : {at::kFloat, at::kDouble}) {
    for (const Case& c : cases) {
      for (const bool tied : {false, true}) {
        const Tensor scores = tied ? tied_values({c.T, c.E}, dtype, ++seed) : at::rand({c.T, c.E}).to(dtype);
        const std::string what = describe("expert_choice_plan T=" + std::to_string(c.T) + " E=" + std::to_string(c.E) +
                                              " C=" + std::to_string(c.C) + (tied ? " tied" : ""),
                                          dtype);
        Slots slots(1);
        expect_same_plan(mc::expert_choice_plan_launches(scores, c.C, slots.sink(), nullptr),
                         moe_ext::expert_choice_plan(scores, c.C), what);
        EXPECT_EQ(slots.values[0], mc::kNoError) << what;
      }
    }
  }
  Tensor scores = at::rand({30, 8});
  scores.index_put_({20, 3}, std::nanf(""));
  scores.index_put_({21, 0}, std::nanf(""));
  Slots slots(1);
  mc::expert_choice_plan_launches(scores, 4, slots.sink(), nullptr);
  EXPECT_EQ(slots.values[0], 20 * 8 + 3);
}

TEST(EmulatedPlan, CubStandInsKeepCubsContracts) {
  // Two phases; a buffer smaller than the query's answer is refused, as CUB's AliasTemporaries refuses it.
  const std::vector<int32_t> keys = {5, -3, 5, 0, -3, 7, 5}, values = {0, 1, 2, 3, 4, 5, 6};
  std::vector<int32_t> keys_out(7), values_out(7);
  size_t bytes = 0;
  ASSERT_EQ(cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys.data(), keys_out.data(), values.data(),
                                            values_out.data(), 7),
            cudaSuccess);
  ASSERT_GT(bytes, 0u);
  std::vector<unsigned char> storage(bytes);
  size_t short_bytes = bytes - 1;
  EXPECT_EQ(cub::DeviceRadixSort::SortPairs(storage.data(), short_bytes, keys.data(), keys_out.data(), values.data(),
                                            values_out.data(), 7),
            cudaErrorInvalidValue);
  ASSERT_EQ(cub::DeviceRadixSort::SortPairs(storage.data(), bytes, keys.data(), keys_out.data(), values.data(),
                                            values_out.data(), 7),
            cudaSuccess);
  EXPECT_EQ(keys_out, (std::vector<int32_t>{-3, -3, 0, 5, 5, 5, 7}));
  EXPECT_EQ(values_out, (std::vector<int32_t>{1, 4, 3, 0, 2, 6, 5}));  // stable
  ASSERT_EQ(cub::DeviceRadixSort::SortPairsDescending(storage.data(), bytes, keys.data(), keys_out.data(),
                                                      values.data(), values_out.data(), 7),
            cudaSuccess);
  EXPECT_EQ(values_out, (std::vector<int32_t>{5, 0, 2, 6, 3, 1, 4}));  // stable among equal keys
  // Only bits [0, 2) compared: 5 -> 1, -3 -> 1, 0 -> 0, 7 -> 3.
  ASSERT_EQ(cub::DeviceRadixSort::SortPairs(storage.data(), bytes, keys.data(), keys_out.data(), values.data(),
                                            values_out.data(), 7, 0, 2),
            cudaSuccess);
  EXPECT_EQ(values_out, (std::vector<int32_t>{3, 0, 1, 2, 4, 6, 5}));
  // Floats: -0.0 equals +0.0 (input order kept), negatives before positives, +-inf at the ends.
  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<double> fkeys = {0.0, -1.5, inf, -0.0, -inf, 2.0};
  std::vector<double> fkeys_out(6);
  size_t fbytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, fbytes, fkeys.data(), fkeys_out.data(), values.data(), values_out.data(), 6,
                                  0, 64);
  std::vector<unsigned char> fstorage(fbytes);
  ASSERT_EQ(cub::DeviceRadixSort::SortPairs(fstorage.data(), fbytes, fkeys.data(), fkeys_out.data(), values.data(),
                                            values_out.data(), 6, 0, 64),
            cudaSuccess);
  EXPECT_EQ(std::vector<int32_t>(values_out.begin(), values_out.begin() + 6), (std::vector<int32_t>{4, 1, 0, 3, 5, 2}));
  // Scan, in place.
  std::vector<int32_t> flags = {1, 0, 1, 1, 0, 1};
  size_t sbytes = 0;
  cub::DeviceScan::ExclusiveSum(nullptr, sbytes, flags.data(), flags.data(), 6);
  std::vector<unsigned char> sstorage(sbytes);
  ASSERT_EQ(cub::DeviceScan::ExclusiveSum(sstorage.data(), sbytes, flags.data(), flags.data(), 6), cudaSuccess);
  EXPECT_EQ(flags, (std::vector<int32_t>{0, 1, 1, 2, 3, 3}));
  // Misuse CUB would silently misread fails the test instead.
  EXPECT_THROW(cub::DeviceRadixSort::SortPairs(storage.data(), bytes, keys.data(), const_cast<int32_t*>(keys.data()),
                                               values.data(), values_out.data(), 7),
               emu::LaunchError);
  EXPECT_THROW(cub::DeviceRadixSort::SortPairs(storage.data(), bytes, keys.data(), keys_out.data(), values.data(),
                                               values_out.data(), 7, 0, 33),
               emu::LaunchError);
  // The same inside the shipped wrapper: a 40-bit int32 key fails the launch sequence.
  EXPECT_THROW(mc::sort_pairs<int32_t>(keys.data(), keys_out.data(), values.data(), values_out.data(), 7, 40, false,
                                       at::empty({1}), nullptr),
               emu::LaunchError);
}

// -----------------------------------------------------------------------------------------------------------
// The model itself: kernels with the defects it exists to catch.

__global__ void reversed_copy(const int* in, int n, int* out, bool with_barrier) {
  MOE_EXT_DYNAMIC_SHARED(int, staged, 16);
  const int t = static_cast<int>(threadIdx.x);
  if (t < n) staged[t] = in[t] * 2;
  if (with_barrier) __syncthreads();
  if (t < n) out[t] = staged[n - 1 - t];
}

TEST(EmulationModel, AMissingBarrierGivesWrongValuesAndABarrierFixesThem) {
  const int n = 256;
  std::vector<int> in(n), out(n);
  for (int i = 0; i < n; ++i) in[i] = i;
  auto expected_ok = [&] {
    for (int i = 0; i < n; ++i) {
      if (out[i] != 2 * (n - 1 - i)) return false;
    }
    return true;
  };
  emu::launch<reversed_copy>(1, n, n * sizeof(int), in.data(), n, out.data(), true);
  EXPECT_TRUE(expected_ok());
  // Shared memory starts as garbage and the threads run in a random order: without the barrier about half
  // of them read a slot before its writer has written it, in every launch (each draws its own order).
  for (int attempt = 0; attempt < 3; ++attempt) {
    std::fill(out.begin(), out.end(), 0);
    emu::launch<reversed_copy>(1, n, n * sizeof(int), in.data(), n, out.data(), false);
    int wrong = 0;
    for (int i = 0; i < n; ++i) wrong += out[i] != 2 * (n - 1 - i);
    EXPECT_GT(wrong, n / 4) << "launch " << attempt << " without the barrier";
    EXPECT_LT(wrong, 3 * n / 4) << "launch " << attempt << " without the barrier";
  }
}

__global__ void divergent_barrier(int* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void early_exit_then_barrier(int* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void shuffle_sum(const float* in, int width, unsigned mask, float* out) {
  float v = in[threadIdx.x];
  for (int offset = width / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(mask, v, offset, width);
  out[threadIdx.x] = v;
}

__global__ void shuffle_family(const int* in, int* up, int* down, int* broadcast, unsigned* ballot) {
  const int v = in[threadIdx.x];
  up[threadIdx.x] = __shfl_up_sync(0xffffffffu, v, 3, 16);
  down[threadIdx.x] = __shfl_down_sync(0xffffffffu, v, 2, 8);
  broadcast[threadIdx.x] = __shfl_sync(0xffffffffu, v, 33, 32);
  ballot[threadIdx.x] = __ballot_sync(0xffffffffu, v % 3 == 0);
}

template <typename Fn>
std::string launch_error(Fn&& fn) {
  try {
    fn();
  } catch (const emu::LaunchError& error) {
    return error.what();
  }
  return "";
}

TEST(EmulationModel, BrokenBarriersAndWarpCallsFailTheLaunchWithTheReason) {
  std::vector<int> out(64);
  EXPECT_NE(launch_error([&] { emu::launch<divergent_barrier>(2, 64, 0, out.data()); }).find("divergent barrier"),
            std::string::npos);
  EXPECT_NE(launch_error([&] { emu::launch<early_exit_then_barrier>(1, 64, 0, out.data()); }).find("has exited"),
            std::string::npos);
  std::vector<float> in(64, 1.0f), sums(64);
  emu::launch<shuffle_sum>(1, 64, 0, in.data(), 32, 0xffffffffu, sums.data());
  EXPECT_EQ(sums, std::vector<float>(64, 32.0f));
  emu::launch<shuffle_sum>(1, 64, 0, in.data(), 8, 0xffffffffu, sums.data());
  EXPECT_EQ(sums, std::vector<float>(64, 8.0f));
  EXPECT_NE(launch_error([&] {
              emu::launch<shuffle_sum>(1, 64, 0, in.data(), 12, 0xffffffffu, sums.data());
            }).find("not a power of two"),
            std::string::npos);
  EXPECT_NE(launch_error([&] {
              emu::launch<shuffle_sum>(1, 64, 0, in.data(), 32, 0x0000ffffu, sums.data());
            }).find("does not hold the calling lane"),
            std::string::npos);
  EXPECT_NE(launch_error([&] {
              emu::launch<shuffle_sum>(1, 40, 0, in.data(), 32, 0xffffffffu, sums.data());
            }).find("does not have"),
            std::string::npos);
  std::vector<int> values(32), up(32), down(32), broadcast(32);
  std::vector<unsigned> ballot(32);
  for (int i = 0; i < 32; ++i) values[i] = 100 + i;
  emu::launch<shuffle_family>(1, 32, 0, values.data(), up.data(), down.data(), broadcast.data(), ballot.data());
  unsigned expected_ballot = 0;
  for (int i = 0; i < 32; ++i) expected_ballot |= (values[i] % 3 == 0) ? 1u << i : 0u;
  for (int i = 0; i < 32; ++i) {
    EXPECT_EQ(up[i], i % 16 < 3 ? values[i] : values[i - 3]) << i;
    EXPECT_EQ(down[i], i % 8 + 2 >= 8 ? values[i] : values[i + 2]) << i;
    EXPECT_EQ(broadcast[i], values[1]) << i;
    EXPECT_EQ(ballot[i], expected_ballot) << i;
  }
  EXPECT_NE(launch_error([&] {
              emu::launch<reversed_copy>(1, 4, 49 * 1024, values.data(), 4, up.data(), true);
            }).find("48 KiB"),
            std::string::npos);
  EXPECT_NE(launch_error([&] { emu::launch<divergent_barrier>(1, 1025, 0, out.data()); }).find("1 to 1024"),
            std::string::npos);
}

// -----------------------------------------------------------------------------------------------------------
// Coverage: every __global__ kernel of the emulated headers ran, for every element type the glue
// instantiates it with. Runs last (the suite is one ctest: see CMakeLists.txt).

std::set<std::string> kernels_declared_in(const std::string& header) {
  std::ifstream in(std::string(MOE_EXT_SOURCE_DIR) + "/csrc/cuda/" + header);
  std::stringstream text;
  text << in.rdbuf();
  const std::string s = text.str();
  EXPECT_FALSE(s.empty()) << header;
  std::set<std::string> names;
  const std::regex kernel(R"(__global__\s+void\s+(\w+))");
  for (auto it = std::sregex_iterator(s.begin(), s.end(), kernel); it != std::sregex_iterator(); ++it) {
    names.insert((*it)[1]);
  }
  return names;
}

TEST(EmulationCoverage, EveryKernelOfTheEmulatedHeadersRan) {
  const auto launched = emu::launched_kernels();
  std::cout << "kernels launched through the emulation (" << launched.size() << " instantiations):\n";
  for (const auto& name : launched) std::cout << "  " << name << "\n";
  std::set<std::string> ran;
  for (const auto& name : launched) {
    std::string base = name.substr(0, name.find('<'));
    base = base.substr(base.rfind(':') == std::string::npos ? 0 : base.rfind(':') + 1);
    ran.insert(base);
  }
  for (const char* header : {"activation_kernels.cuh", "gating_kernels.cuh", "grouped_mm_kernels.cuh",
                             "losses_kernels.cuh", "permute_kernels.cuh", "plan_kernels.cuh"}) {
    for (const auto& kernel : kernels_declared_in(header)) {
      EXPECT_TRUE(ran.count(kernel)) << kernel << " (" << header << ") never ran through the emulation";
    }
  }
  // Per element type: the float/double/bfloat16/half kernels of the element-wise and row ops.
  for (const char* type : {"float", "double", "c10::BFloat16", "c10::Half"}) {
    for (const char* kernel :
         {"swiglu_kernel<", "swiglu_backward_kernel<", "weighted_row_sum_kernel<", "scale_owned_rows_kernel<",
          "row_dot_kernel<", "topk_gating_shared_kernel<", "block_column_sums_kernel<", "squared_logsumexp_kernel<",
          "router_z_loss_backward_kernel<"}) {
      const bool found = std::any_of(launched.begin(), launched.end(), [&](const std::string& name) {
        return name.find(std::string(kernel) + type) != std::string::npos;
      });
      EXPECT_TRUE(found) << kernel << type << "...> never ran";
    }
  }
  // expert_choice_plan's keys, for the routing dtypes (float for half/bfloat16 scores, and double).
  for (const char* name : {"expert_choice_keys_kernel<float>", "expert_choice_keys_kernel<double>"}) {
    EXPECT_TRUE(std::any_of(launched.begin(), launched.end(),
                            [&](const std::string& n) { return n.find(name) != std::string::npos; }))
        << name << " never ran";
  }
}

}  // namespace
