// The GEMM of the CUDA execution model (emulation.h): the stand-in for at::mm_out on CUDA that
// csrc/cuda/grouped_mm_launches.cuh receives in the tests. It checks what the shipped code relies on, then
// computes the product in float64:
//  * out is exactly [a.rows, b.columns] (at::mm_out would resize anything else, which a slice of a larger
//    output cannot take) and shares no memory with a or b;
//  * a, b and out are each a matrix cuBLAS reads as it is, with ATen's rule (prepare_matrix_for_cublas):
//    row-major (unit column stride, leading dimension >= max(1, columns)) or column-major (unit row stride,
//    leading dimension >= max(1, rows)); anything else is copied by ATen first, which the glue promises
//    never happens, so it fails the test naming the operand, its sizes and strides;
//  * one element type throughout.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>

#include "emulation.h"

namespace emu {

inline bool cublas_reads_as_is(const at::Tensor& m) {
  const int64_t rows = m.size(0), cols = m.size(1), s0 = m.stride(0), s1 = m.stride(1);
  const bool column_major = s0 == 1 && s1 >= std::max<int64_t>(1, rows);
  const bool row_major = s1 == 1 && s0 >= std::max<int64_t>(1, cols);
  return column_major || row_major;
}

inline std::string layout(const char* name, const at::Tensor& m) {
  std::ostringstream s;
  s << name << " (sizes " << m.sizes() << ", strides " << m.strides() << ")";
  return s.str();
}

inline bool shares_memory(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.storage().is_alias_of(b.storage())) return false;
  auto extent = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    return std::pair<uintptr_t, uintptr_t>{begin, begin + static_cast<uintptr_t>((last + 1) * t.element_size())};
  };
  const auto [a0, a1] = extent(a);
  const auto [b0, b1] = extent(b);
  return a0 < b1 && b0 < a1;
}

inline int64_t& gemm_calls() {
  static int64_t calls = 0;
  return calls;
}

inline void reference_mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  auto require = [&](bool ok, const std::string& what) {
    if (!ok) {
      throw LaunchError("GEMM: " + what + "; " + layout("out", out) + " = " + layout("a", a) + " @ " + layout("b", b));
    }
  };
  require(a.dim() == 2 && b.dim() == 2 && out.dim() == 2, "operands must be matrices");
  require(a.scalar_type() == b.scalar_type() && out.scalar_type() == a.scalar_type(), "mixed element types");
  require(a.size(1) == b.size(0), "inner sizes differ");
  require(out.size(0) == a.size(0) && out.size(1) == b.size(1), "out is not [a.rows, b.columns]");
  require(cublas_reads_as_is(a), "a is neither row- nor column-major with a valid leading dimension");
  require(cublas_reads_as_is(b), "b is neither row- nor column-major with a valid leading dimension");
  require(cublas_reads_as_is(out), "out is neither row- nor column-major with a valid leading dimension");
  require(!shares_memory(out, a) && !shares_memory(out, b), "out overlaps an input");
  ++gemm_calls();
  out.copy_(at::mm(a.to(at::kDouble), b.to(at::kDouble)));
}

}  // namespace emu
