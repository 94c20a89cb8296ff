// A size-bucketed cache of large freed CPU blocks behind the outputs of moe_ext's CPU kernels.
#include "output_cache.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace moe_ext {
namespace cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kSmallGranule = size_t(64) << 10;
constexpr int64_t kDefaultLimitMiB = 1024;

// Blocks are rounded up so that outputs whose row count varies a little from
// step to step (dropless routing) land in the same size and reuse each other.
size_t block_capacity(size_t nbytes) {
  const size_t granule = nbytes >= kHugePage ? kHugePage : kSmallGranule;
  return (nbytes + granule - 1) / granule * granule;
}

struct Block {
  void* base;
  size_t capacity;
  size_t nbytes;  // what the tensor asked for (what the profiler is told)
};

struct FreeBlock {
  void* base;
  size_t capacity;
  uint64_t last_used;
};

int64_t limit_from_environment() {
  const char* text = std::getenv("MOE_EXT_CPU_CACHE_MB");
  if (text == nullptr || *text == '\0') return kDefaultLimitMiB << 20;
  char* end = nullptr;
  const long long mib = std::strtoll(text, &end, 10);
  TORCH_CHECK(end != text && *end == '\0' && mib >= 0,
              "moe_ext: MOE_EXT_CPU_CACHE_MB must be a non-negative whole number of MiB, got '", text, "'");
  return static_cast<int64_t>(mib) << 20;
}

void* fresh_block(size_t capacity) {
  void* base = nullptr;
  const size_t alignment = capacity >= kHugePage ? kHugePage : 64;
  if (posix_memalign(&base, alignment, capacity) != 0) return nullptr;
#ifdef __linux__
  // Faults 2 MB at a time where the kernel allows it (THP "madvise" or "always").
  if (capacity >= kHugePage) madvise(base, capacity, MADV_HUGEPAGE);
#endif
  return base;
}

class OutputCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    if (static_cast<int64_t>(nbytes) < kCachedOutputBytes) return c10::GetCPUAllocator()->allocate(nbytes);
    size_t capacity = block_capacity(nbytes);
    void* base = take(capacity);  // may raise capacity to the reused block's
    if (base == nullptr) {
      base = fresh_block(capacity);
      if (base == nullptr) {
        empty();  // give the cached blocks back, then try once more
        base = fresh_block(capacity);
      }
      TORCH_CHECK_WITH(OutOfMemoryError, base != nullptr, "moe_ext: out of CPU memory allocating ", nbytes,
                       " bytes for an operator output");
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_ += capacity;
    }
    auto* block = new Block{base, capacity, nbytes};
    report(base, static_cast<int64_t>(nbytes));
    return {base, block, &OutputCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  OutputCacheInfo info() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {
        limit_, static_cast<int64_t>(cached_), static_cast<int64_t>(free_.size()), static_cast<int64_t>(in_use_), hits_,
        misses_};
  }

  void empty() {
    std::vector<FreeBlock> dropped;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      dropped.swap(free_);
      cached_ = 0;
    }
    for (const FreeBlock& b : dropped) std::free(b.base);
  }

  void set_limit(int64_t bytes) {
    TORCH_CHECK(bytes >= 0, "moe_ext: the CPU output cache limit must be >= 0 bytes, got ", bytes);
    std::vector<FreeBlock> dropped;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_ = bytes;
      evict_until_fits(0, dropped);
    }
    for (const FreeBlock& b : dropped) std::free(b.base);
  }

 private:
  // The smallest free block that fits without wasting more than a quarter;
  // `capacity` becomes that block's.
  void* take(size_t& capacity) {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t best = free_.size();
    for (size_t i = 0; i < free_.size(); ++i) {
      const size_t c = free_[i].capacity;
      if (c >= capacity && c <= capacity + capacity / 4 && (best == free_.size() || c < free_[best].capacity)) best = i;
    }
    if (best == free_.size()) {
      ++misses_;
      return nullptr;
    }
    void* base = free_[best].base;
    capacity = free_[best].capacity;
    free_[best] = free_.back();
    free_.pop_back();
    cached_ -= capacity;
    ++hits_;
    return base;
  }

  // Oldest free blocks go first until `incoming` more bytes fit under the limit.
  void evict_until_fits(size_t incoming, std::vector<FreeBlock>& dropped) {
    while (!free_.empty() && cached_ + incoming > static_cast<size_t>(limit_)) {
      size_t oldest = 0;
      for (size_t i = 1; i < free_.size(); ++i) {
        if (free_[i].last_used < free_[oldest].last_used) oldest = i;
      }
      cached_ -= free_[oldest].capacity;
      dropped.push_back(free_[oldest]);
      free_[oldest] = free_.back();
      free_.pop_back();
    }
  }

  static void release(void* context);

  void give_back(Block* block) {
    report(block->base, -static_cast<int64_t>(block->nbytes));
    std::vector<FreeBlock> dropped;
    bool keep = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_ -= block->capacity;
      if (block->capacity <= static_cast<size_t>(limit_)) {
        evict_until_fits(block->capacity, dropped);
        free_.push_back({block->base, block->capacity, ++clock_});
        cached_ += block->capacity;
        keep = true;
      }
    }
    if (!keep) std::free(block->base);
    for (const FreeBlock& b : dropped) std::free(b.base);
    delete block;
  }

  void report(void* ptr, int64_t delta) {
    size_t in_use = 0, reserved = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use = in_use_;
      reserved = in_use_ + cached_;
    }
    c10::reportMemoryUsageToProfiler(ptr, delta, in_use, reserved, c10::Device(c10::DeviceType::CPU));
  }

  std::mutex mutex_;
  std::vector<FreeBlock> free_;
  size_t cached_ = 0, in_use_ = 0;
  uint64_t clock_ = 0;
  int64_t limit_ = limit_from_environment();
  int64_t hits_ = 0, misses_ = 0;
};

// Never destroyed: tensors freed during interpreter shutdown still find it.
OutputCache& cache() {
  static OutputCache* instance = new OutputCache();
  return *instance;
}

void OutputCache::release(void* context) { cache().give_back(static_cast<Block*>(context)); }

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  if (numel * static_cast<int64_t>(c10::elementSize(options.dtype().toScalarType())) < kCachedOutputBytes) {
    return at::empty(sizes, options);
  }
  return at::detail::empty_generic(sizes, &cache(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), std::nullopt);
}

OutputCacheInfo output_cache_info() { return cache().info(); }
void empty_output_cache() { cache().empty(); }
void set_output_cache_limit(int64_t bytes) { cache().set_limit(bytes); }

}  // namespace cpu
}  // namespace moe_ext
