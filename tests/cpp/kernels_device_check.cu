// Compile-only check (CMake MOE_EXT_CUDA_COMPILE_CHECK): every torch-free routing function of csrc/kernels/*.h
// and csrc/cuda/plan_steps.cuh instantiated in __global__ kernels for every element type, so nvcc proves
// the headers are valid device code without torch on the include path. Nothing here is ever launched.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/plan_steps.cuh"
#include "kernels/gating.h"
#include "kernels/permute.h"
#include "kernels/plan.h"

namespace moe_ext {
namespace kernels {
namespace device_check {

template <typename in_t, typename acc>
__global__ void gating_functions(const in_t* logits, const bool* enabled, GatingConfig cfg, acc* scores, acc* select,
                                 acc* groups, int64_t* indices, acc* weights, acc* grad_buf, in_t* grad_logits,
                                 int* status) {
  GateStatus result = token_scores(logits, enabled, cfg, scores);
  if (result == GateStatus::kOk) result = token_select(select, enabled, cfg, groups, indices);
  token_weights(scores, indices, cfg, weights);
  token_gating_backward(weights, scores, scores, indices, cfg, grad_buf, grad_logits);
  *status = static_cast<int>(result) + (outranks(scores[0], 0, scores[1], 1) ? 1 : 0);
}

template <typename T, typename acc>
__global__ void permute_functions(const T* in, const int64_t* row_of, int64_t hidden, T* out, acc* sum, acc* dot) {
  copy_row(in, hidden, out);
  copy_row<T>(nullptr, hidden, out);
  axpy_row(acc(2), in, hidden, sum);
  *dot = dot_row<T, acc>(in, out, hidden) + static_cast<acc>(slot_of_row(row_of, 2, 1));
}

template <typename prio_t>
__global__ void plan_functions(const int64_t* indices, const prio_t* priority, int64_t* counts, int64_t* positions,
                               const int64_t* row_of, const int64_t* token_of, int* result) {
  const int64_t bad = count_experts(indices, 0, 8, 4, counts);
  place_stable(indices, 0, 8, counts, positions);
  *result = static_cast<int>(bad) + (kept_before(0, 1, 2, priority) ? 1 : 0) +
            static_cast<int>(check_token_rows(row_of, 2, 0, token_of, 4)) +
            static_cast<int>(check_row_token(0, token_of, row_of, 2, 2));
}

__global__ void plan_step_functions(const int32_t* sorted_keys, const double* priority, int64_t* offsets,
                                    int64_t* result) {
  cuda::steps::write_boundaries(threadIdx.x, sorted_keys, 8, 4, offsets);
  *result = cuda::steps::expert_key(3, 4) + cuda::steps::key_bits(4) + cuda::steps::choice_major_assignment(5, 4, 2) +
            (cuda::steps::capacity_keeps(1, 2, priority, 0) ? 1 : 0) + cuda::steps::capacity_row(1, 2, 5, 3) +
            static_cast<int64_t>(cuda::steps::value_key(-0.0) + cuda::steps::value_key(-0.0f));
}

#define MOE_GATING(in_t, acc)                                                                                    \
  template __global__ void gating_functions<in_t, acc>(const in_t*, const bool*, GatingConfig, acc*, acc*, acc*, \
                                                       int64_t*, acc*, acc*, in_t*, int*)
MOE_GATING(float, float);
MOE_GATING(double, double);
MOE_GATING(__half, float);
MOE_GATING(__nv_bfloat16, float);
#undef MOE_GATING

#define MOE_PERMUTE(T, acc) \
  template __global__ void permute_functions<T, acc>(const T*, const int64_t*, int64_t, T*, acc*, acc*)
MOE_PERMUTE(float, float);
MOE_PERMUTE(double, double);
MOE_PERMUTE(__half, float);
MOE_PERMUTE(__nv_bfloat16, float);
#undef MOE_PERMUTE

template __global__ void plan_functions<double>(const int64_t*, const double*, int64_t*, int64_t*, const int64_t*,
                                                const int64_t*, int*);
template __global__ void plan_functions<float>(const int64_t*, const float*, int64_t*, int64_t*, const int64_t*,
                                               const int64_t*, int*);

}  // namespace device_check
}  // namespace kernels
}  // namespace moe_ext
