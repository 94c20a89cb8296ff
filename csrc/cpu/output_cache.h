// Large CPU outputs of moe_ext kernels: reused memory instead of fresh, page-faulting allocations.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace moe_ext {
namespace cpu {

// Outputs of at least this many bytes come from the cache below; smaller ones
// from at::empty (glibc keeps those in its heap, already mapped).
constexpr int64_t kCachedOutputBytes = int64_t(1) << 20;

// An uninitialized CPU tensor like at::empty(sizes, options). A large one
// reuses a block that an earlier moe_ext output freed (the weight gradients
// and activations of the last step) or, failing that, takes fresh memory
// aligned and advised for transparent huge pages. glibc returns every block
// over 32 MB to the kernel on free, so without this each step's [E, H, 2F]
// weight gradient page-faults on first touch at 4 KB a time, which costs
// more than the GEMM that fills it when experts are small.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

struct OutputCacheInfo {
  int64_t limit_bytes;    // most bytes kept in free blocks
  int64_t cached_bytes;   // bytes now held in free blocks
  int64_t cached_blocks;  // free blocks now held
  int64_t in_use_bytes;   // bytes of live tensors from this cache
  int64_t hits;           // allocations served from a free block
  int64_t misses;         // allocations that took fresh memory
};

OutputCacheInfo output_cache_info();
// Frees every block not in use; live tensors are untouched.
void empty_output_cache();
// 0 disables keeping freed blocks (outputs still get huge-page-advised memory).
void set_output_cache_limit(int64_t bytes);

}  // namespace cpu
}  // namespace moe_ext
