// Kernels of the fused SwiGLU activation (launched by activation_kernel.cu): one thread per (row, column)
// element of the output, the per-element math of kernels/activation.h.
#pragma once

#include "../kernels/activation.h"
#include "device.cuh"

namespace moe_ext {
namespace cuda {
namespace {

template <typename scalar_t>
__global__ void swiglu_kernel(const scalar_t* __restrict__ h, int64_t rows, int64_t width, scalar_t* __restrict__ out) {
  using acc = kernels::acc_t<scalar_t>;
  MOE_EXT_GRID_STRIDE_LOOP(i, rows * width) {
    const int64_t r = i / width, c = i - r * width;
    const scalar_t* row = h + r * 2 * width;
    out[i] =
        static_cast<scalar_t>(kernels::swiglu_forward<acc>(static_cast<acc>(row[c]), static_cast<acc>(row[width + c])));
  }
}

template <typename scalar_t>
__global__ void swiglu_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ h, int64_t rows,
                                       int64_t width, scalar_t* __restrict__ grad_h) {
  using acc = kernels::acc_t<scalar_t>;
  MOE_EXT_GRID_STRIDE_LOOP(i, rows * width) {
    const int64_t r = i / width, c = i - r * width;
    const int64_t at = r * 2 * width + c;
    acc dg, du;
    kernels::swiglu_backward<acc>(static_cast<acc>(h[at]), static_cast<acc>(h[at + width]), static_cast<acc>(grad[i]),
                                  dg, du);
    grad_h[at] = static_cast<scalar_t>(dg);
    grad_h[at + width] = static_cast<scalar_t>(du);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace moe_ext
