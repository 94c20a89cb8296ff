// Portability macros for the torch-free kernel headers (host C++ and CUDA).
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MOE_HOST_DEVICE __host__ __device__
#define MOE_INLINE __host__ __device__ __forceinline__
#else
#define MOE_HOST_DEVICE
#define MOE_INLINE inline
#endif

namespace moe_ext {
namespace kernels {

// Float accumulation type for an element type: double stays double, every
// other floating type (float, bf16, fp16) accumulates in float.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

template <typename T>
MOE_INLINE T neg_infinity() {
  return -__builtin_huge_valf();
}
template <>
MOE_INLINE double neg_infinity<double>() {
  return -__builtin_huge_val();
}

}  // namespace kernels
}  // namespace moe_ext
