// The launch engine of the CUDA execution model (emulation.h). The threads of a block are fibers on the
// calling OS thread: each runs until it finishes or reaches a __syncthreads or a warp function, the
// engine then completes every barrier and warp exchange whose threads have all arrived and runs the threads
// that can go on, each round in a seeded random order. One OS thread, no locks and no timeouts: a launch is
// reproducible from its seed, and a barrier that can never complete is known at once.
#include "emulation.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <bit>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define MOE_EXT_EMULATION_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MOE_EXT_EMULATION_ASAN 1
#endif
#endif
#if defined(MOE_EXT_EMULATION_ASAN)
#include <sanitizer/common_interface_defs.h>
#endif

// Switching fibers: on x86-64 a dozen instructions that save the callee-saved registers and the SSE/x87
// control words on the old stack and load them from the new one (what the SysV ABI asks a call to keep);
// elsewhere, and with MOE_EXT_EMULATION_UCONTEXT, swapcontext, which also saves the signal mask with a
// system call per switch (the suite here runs 3x slower with it).
extern "C" void moe_ext_emu_fiber_entry(void* launch);
#if defined(__x86_64__) && !defined(MOE_EXT_EMULATION_UCONTEXT)
#define MOE_EXT_EMULATION_ASM_SWITCH 1
extern "C" {
void moe_ext_emu_switch(void** save_sp, void* load_sp);
void moe_ext_emu_trampoline();
}
asm(R"(
  .text
  .p2align 4
  .globl moe_ext_emu_switch
  .hidden moe_ext_emu_switch
  .type moe_ext_emu_switch, @function
moe_ext_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size moe_ext_emu_switch, .-moe_ext_emu_switch

  .p2align 4
  .globl moe_ext_emu_trampoline
  .hidden moe_ext_emu_trampoline
  .type moe_ext_emu_trampoline, @function
moe_ext_emu_trampoline:
  movq %r12, %rdi
  call moe_ext_emu_fiber_entry
  ud2
  .size moe_ext_emu_trampoline, .-moe_ext_emu_trampoline
)");
#endif

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace emu {
namespace {

constexpr size_t kDefaultSharedLimit = 48 * 1024;  // without cudaFuncAttributeMaxDynamicSharedMemorySize
constexpr unsigned kMaxThreadsPerBlock = 1024;

// Thrown inside the threads of a launch that has already failed, to unwind them.
struct Aborted {};

std::string where_text(const std::source_location& where) {
  std::string file = where.file_name();
  const size_t slash = file.find_last_of('/');
  if (slash != std::string::npos) file = file.substr(slash + 1);
  return file + ":" + std::to_string(where.line());
}

bool same_site(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() &&
         (a.file_name() == b.file_name() || std::strcmp(a.file_name(), b.file_name()) == 0);
}

uint64_t env_seed() {
  const char* text = std::getenv("MOE_EXT_EMULATION_SEED");
  return text != nullptr ? std::strtoull(text, nullptr, 10) : 0;
}

// A fiber's stack: mapped lazily (untouched pages cost nothing), with a guard page below it so that an
// overflow faults instead of writing over a neighbour.
class Stack {
 public:
  static constexpr size_t kBytes = size_t{256} * 1024;
  static constexpr size_t kGuard = 4096;

  Stack() {
    void* mapped =
        mmap(nullptr, kBytes + kGuard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mapped == MAP_FAILED) throw LaunchError("emulation: could not map a fiber stack");
    base_ = static_cast<char*>(mapped);
    mprotect(base_, kGuard, PROT_NONE);
  }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  ~Stack() { munmap(base_, kBytes + kGuard); }

  char* bottom() const { return base_ + kGuard; }

 private:
  char* base_ = nullptr;
};

// Stacks outlive launches: a launch of 1024 threads maps them once per process, not once per block.
std::vector<std::unique_ptr<Stack>>& stacks(size_t count) {
  static std::vector<std::unique_ptr<Stack>> pool;
  while (pool.size() < count) pool.push_back(std::make_unique<Stack>());
  return pool;
}

// A suspended fiber (or the engine) as a switch left it.
struct Context {
#if defined(MOE_EXT_EMULATION_ASM_SWITCH)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

#if !defined(MOE_EXT_EMULATION_ASM_SWITCH)
void ucontext_entry(unsigned high, unsigned low) {
  moe_ext_emu_fiber_entry(reinterpret_cast<void*>((static_cast<uintptr_t>(high) << 32) | low));
}
#endif

// A context that, switched to, calls moe_ext_emu_fiber_entry(launch) on `stack`.
void start_context(Context& context, char* stack, size_t bytes, void* launch) {
#if defined(MOE_EXT_EMULATION_ASM_SWITCH)
  // moe_ext_emu_switch's frame: control words, r15, r14, r13, r12 (= launch), rbx, rbp, return address; the
  // trampoline then calls with the stack 16-byte aligned, as the ABI wants.
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t{15});
  uint64_t* frame = top - 8;
  uint32_t mxcsr = 0;
  uint16_t fpu_control = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpu_control));
  frame[0] = mxcsr | (uint64_t{fpu_control} << 32);
  frame[1] = frame[2] = frame[3] = 0;             // r15, r14, r13
  frame[4] = reinterpret_cast<uint64_t>(launch);  // r12
  frame[5] = frame[6] = 0;                        // rbx, rbp
  frame[7] = reinterpret_cast<uint64_t>(&moe_ext_emu_trampoline);
  context.sp = frame;
#else
  getcontext(&context.uc);
  context.uc.uc_stack.ss_sp = stack;
  context.uc.uc_stack.ss_size = bytes;
  context.uc.uc_link = nullptr;
  const auto bits = reinterpret_cast<uintptr_t>(launch);
  makecontext(&context.uc, reinterpret_cast<void (*)()>(&ucontext_entry), 2, static_cast<unsigned>(bits >> 32),
              static_cast<unsigned>(bits & 0xffffffffu));
#endif
}

void switch_context(Context& from, Context& to) {
#if defined(MOE_EXT_EMULATION_ASM_SWITCH)
  moe_ext_emu_switch(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
}

enum class State { kReady, kAtBarrier, kAtWarp, kDone };

struct Fiber {
  Context context;
  State state = State::kReady;
  bool started = false;
  std::source_location site;  // of the barrier or warp function it waits at
  unsigned mask = 0;
  uint64_t value = 0;
  std::array<uint64_t, 32> result{};
  void* fake_stack = nullptr;  // AddressSanitizer's per-fiber state
};

class Launch {
 public:
  Launch(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body)
      : grid_(grid), block_(block), shared_bytes_(shared_bytes), body_(body) {
    threads_ = static_cast<int>(block.x * block.y * block.z);
    const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
    order_.resize(blocks);
    std::iota(order_.begin(), order_.end(), uint64_t{0});
    static uint64_t launches = 0;
    rng_.seed(env_seed() * 1000003u + launches++);
    std::shuffle(order_.begin(), order_.end(), rng_);
    fibers_ = std::vector<Fiber>(static_cast<size_t>(threads_));
    stacks(static_cast<size_t>(threads_));
  }

  void run() {
    Launch* const outer = current_;
    current_ = this;
    blockDim = block_;
    gridDim = grid_;
    for (position_ = 0; position_ < order_.size() && !failed_; ++position_) run_block();
    current_ = outer;
    if (failed_) throw LaunchError(error_);
  }

  [[noreturn]] void fail(const std::string& what) {
    record_failure(what);
    throw Aborted{};
  }

  void syncthreads(const std::source_location& where) {
    Fiber& self = fibers_[static_cast<size_t>(running_)];
    for (int t = 0; t < threads_; ++t) {
      if (fibers_[static_cast<size_t>(t)].state == State::kDone) {
        fail("divergent barrier: thread " + std::to_string(running_) + " waits at __syncthreads (" + where_text(where) +
             ") but thread " + std::to_string(t) + " has exited");
      }
      const Fiber& other = fibers_[static_cast<size_t>(t)];
      if (other.state == State::kAtBarrier && !same_site(other.site, where)) {
        fail("divergent barrier: thread " + std::to_string(running_) + " is at __syncthreads (" + where_text(where) +
             ") while thread " + std::to_string(t) + " waits at " + where_text(other.site));
      }
    }
    self.state = State::kAtBarrier;
    self.site = where;
    suspend();
  }

  std::array<uint64_t, 32> warp_exchange(unsigned mask, uint64_t value, const std::source_location& where) {
    const int tid = running_, lane = tid % 32, first = tid - lane;
    const int lanes = std::min(32, threads_ - first);
    const auto site = [&] { return where_text(where); };  // only for an error: this runs on every shuffle
    if (((mask >> lane) & 1u) == 0) {
      fail("warp function at " + site() + ": the mask does not hold the calling lane " + std::to_string(lane) +
           " (thread " + std::to_string(tid) + ")");
    }
    for (int l = 0; l < 32; ++l) {
      if (((mask >> l) & 1u) == 0) continue;
      if (l >= lanes) {
        fail("warp function at " + site() + ": the mask names lane " + std::to_string(l) + ", which this block of " +
             std::to_string(threads_) + " threads does not have");
      }
      const Fiber& other = fibers_[static_cast<size_t>(first + l)];
      if (other.state == State::kDone) {
        fail("warp function at " + site() + ": the mask names lane " + std::to_string(l) + ", which has exited");
      }
      if (other.state == State::kAtWarp && (other.mask != mask || !same_site(other.site, where))) {
        fail("divergent warp: lane " + std::to_string(lane) + " is at " + site() + " with mask " +
             std::to_string(mask) + " while lane " + std::to_string(l) + " waits at " + where_text(other.site) +
             " with mask " + std::to_string(other.mask));
      }
    }
    Fiber& self = fibers_[static_cast<size_t>(tid)];
    self.state = State::kAtWarp;
    self.site = where;
    self.mask = mask;
    self.value = value;
    suspend();
    return self.result;
  }

  void* shared_base(size_t alignment) {
    if (alignment > 16)
      fail("dynamic shared memory aligned to " + std::to_string(alignment) + " bytes (the model: 16)");
    return shared_.get();
  }

  int lane() const { return running_ % 32; }

  // The first code of every fiber (moe_ext_emu_fiber_entry): runs the kernel body as thread running_.
  void thread_main() {
#if defined(MOE_EXT_EMULATION_ASAN)
    __sanitizer_finish_switch_fiber(nullptr, &scheduler_stack_, &scheduler_stack_bytes_);
#endif
    const int t = running_;
    try {
      body_();
    } catch (const Aborted&) {
    } catch (const std::exception& error) {
      record_failure(std::string("exception in a kernel thread: ") + error.what());
    } catch (...) {
      record_failure("a kernel thread threw a non-standard exception");
    }
    Fiber& fiber = fibers_[static_cast<size_t>(t)];
    fiber.state = State::kDone;
#if defined(MOE_EXT_EMULATION_ASAN)
    __sanitizer_start_switch_fiber(nullptr, scheduler_stack_, scheduler_stack_bytes_);
#endif
    switch_context(fiber.context, scheduler_);  // never resumed
  }

  static Launch* current_;

 private:
  struct AlignedDelete {
    void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t(16)); }
  };

  void run_block() {
    const uint64_t b = order_[position_];
    blockIdx = uint3(static_cast<unsigned>(b % grid_.x), static_cast<unsigned>(b / grid_.x % grid_.y),
                     static_cast<unsigned>(b / (uint64_t{grid_.x} * grid_.y)));
    // A fresh allocation per block, of exactly the launch's size: no state survives from block to block.
    const size_t bytes = std::max<size_t>(shared_bytes_, 1);
    shared_.reset(static_cast<unsigned char*>(::operator new[](bytes, std::align_val_t(16))));
    std::memset(shared_.get(), 0xA5, bytes);  // not zero: a missing initialisation shows
    for (Fiber& fiber : fibers_) fiber = Fiber{};
    std::vector<int> ready(static_cast<size_t>(threads_));
    std::iota(ready.begin(), ready.end(), 0);
    while (!ready.empty() && !failed_) {
      std::shuffle(ready.begin(), ready.end(), rng_);
      for (const int t : ready) {
        resume(t);
        if (failed_) break;
      }
      if (!failed_) ready = advance();
    }
    if (failed_) unwind();
  }

  // After a round: the threads whose barrier or warp exchange completes, or a failure when none can go on.
  std::vector<int> advance() {
    std::vector<int> ready;
    int done = 0, at_barrier = 0, first_done = -1, first_at_barrier = -1;
    for (int t = 0; t < threads_; ++t) {
      const State state = fibers_[static_cast<size_t>(t)].state;
      if (state == State::kDone && done++ == 0) first_done = t;
      if (state == State::kAtBarrier && at_barrier++ == 0) first_at_barrier = t;
    }
    if (done == threads_) return ready;
    if (at_barrier > 0 && done > 0) {
      record_failure("divergent barrier: thread " + std::to_string(first_done) +
                     " exited while others wait at __syncthreads (" +
                     where_text(fibers_[static_cast<size_t>(first_at_barrier)].site) + ")");
      return ready;
    }
    for (int first = 0; first < threads_; first += 32) {
      unsigned seen = 0;  // lanes of the masks already looked at (disjoint groups of one warp complete apart)
      for (int lane = 0; lane < 32 && first + lane < threads_; ++lane) {
        const Fiber& fiber = fibers_[static_cast<size_t>(first + lane)];
        if (fiber.state != State::kAtWarp || ((seen >> lane) & 1u)) continue;
        const unsigned mask = fiber.mask;
        seen |= mask;
        if (!complete_warp_exchange(first, mask)) return {};
        if (fiber.state != State::kReady) continue;
        for (int l = 0; l < 32; ++l) {
          if ((mask >> l) & 1u) ready.push_back(first + l);
        }
      }
    }
    if (!ready.empty() || failed_) return ready;
    if (at_barrier == threads_ - done) {
      for (int t = 0; t < threads_; ++t) {
        fibers_[static_cast<size_t>(t)].state = State::kReady;
        ready.push_back(t);
      }
      return ready;
    }
    // Some threads wait at the barrier, others at a warp function whose lanes never all arrive.
    for (int t = 0; t < threads_; ++t) {
      const Fiber& fiber = fibers_[static_cast<size_t>(t)];
      if (fiber.state == State::kAtWarp) {
        record_failure("deadlock: thread " + std::to_string(t) + " waits at the warp function at " +
                       where_text(fiber.site) + ", which some lane of its mask never reaches");
        return ready;
      }
    }
    record_failure("deadlock: no thread of the block can go on");
    return ready;
  }

  // Completes the exchange of the warp starting at thread `first` on `mask` when every lane of the mask has
  // arrived (its lanes become ready); false, with the launch failed, when a lane of the mask has exited.
  bool complete_warp_exchange(int first, unsigned mask) {
    std::array<uint64_t, 32> values{};
    for (int l = 0; l < 32; ++l) {
      if (((mask >> l) & 1u) == 0) continue;
      const Fiber& lane = fibers_[static_cast<size_t>(first + l)];
      if (lane.state == State::kDone) {
        record_failure("divergent warp: lane " + std::to_string(l) + " exited while its warp waits at " +
                       where_text(fibers_[static_cast<size_t>(first + std::countr_zero(mask))].site));
        return false;
      }
      if (lane.state != State::kAtWarp) return true;
      values[static_cast<size_t>(l)] = lane.value;
    }
    for (int l = 0; l < 32; ++l) {
      if (((mask >> l) & 1u) == 0) continue;
      Fiber& lane = fibers_[static_cast<size_t>(first + l)];
      lane.result = values;
      lane.state = State::kReady;
    }
    return true;
  }

  void resume(int t) {
    Fiber& fiber = fibers_[static_cast<size_t>(t)];
    if (fiber.state == State::kDone) return;
    running_ = t;
    threadIdx = uint3(static_cast<unsigned>(t) % block_.x, static_cast<unsigned>(t) / block_.x % block_.y,
                      static_cast<unsigned>(t) / (block_.x * block_.y));
    if (!fiber.started) {
      fiber.started = true;
      char* const stack = stacks(0)[static_cast<size_t>(t)]->bottom();
      start_context(fiber.context, stack, Stack::kBytes, this);
    }
    fiber.state = State::kReady;
#if defined(MOE_EXT_EMULATION_ASAN)
    void* fake_stack = nullptr;
    __sanitizer_start_switch_fiber(&fake_stack, stacks(0)[static_cast<size_t>(t)]->bottom(), Stack::kBytes);
    switch_context(scheduler_, fiber.context);
    __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#else
    switch_context(scheduler_, fiber.context);
#endif
    running_ = -1;
  }

  // From a thread to the engine; throws Aborted in the thread when the launch failed meanwhile.
  void suspend() {
    Fiber& fiber = fibers_[static_cast<size_t>(running_)];
#if defined(MOE_EXT_EMULATION_ASAN)
    __sanitizer_start_switch_fiber(&fiber.fake_stack, scheduler_stack_, scheduler_stack_bytes_);
    switch_context(fiber.context, scheduler_);
    __sanitizer_finish_switch_fiber(fiber.fake_stack, &scheduler_stack_, &scheduler_stack_bytes_);
#else
    switch_context(fiber.context, scheduler_);
#endif
    if (failed_) throw Aborted{};
  }

  // A failed launch: every thread suspended at a barrier or warp function unwinds (Aborted) and finishes.
  void unwind() {
    for (int t = 0; t < threads_; ++t) {
      Fiber& fiber = fibers_[static_cast<size_t>(t)];
      if (fiber.started && fiber.state != State::kDone) resume(t);
    }
  }

  void record_failure(const std::string& what) {
    if (failed_) return;
    failed_ = true;
    error_ = what + " [block " + std::to_string(order_[position_]) + " of " + std::to_string(order_.size()) + ", " +
             std::to_string(threads_) + " threads per block, " + std::to_string(shared_bytes_) +
             " bytes of dynamic shared memory]";
  }

  dim3 grid_, block_;
  size_t shared_bytes_;
  const std::function<void()>& body_;
  int threads_ = 0;
  std::vector<uint64_t> order_;
  std::mt19937_64 rng_;
  size_t position_ = 0;
  std::vector<Fiber> fibers_;
  int running_ = -1;
  Context scheduler_;
  const void* scheduler_stack_ = nullptr;
  size_t scheduler_stack_bytes_ = 0;
  std::unique_ptr<unsigned char[], AlignedDelete> shared_;
  bool failed_ = false;
  std::string error_;
};

Launch* Launch::current_ = nullptr;

}  // namespace
}  // namespace emu

extern "C" void moe_ext_emu_fiber_entry(void* launch) { static_cast<emu::Launch*>(launch)->thread_main(); }

namespace emu {
namespace {

Launch& current() {
  if (Launch::current_ == nullptr) throw LaunchError("a device function was called outside emu::launch");
  return *Launch::current_;
}

std::mutex coverage_mutex;
std::set<std::string>& coverage() {
  static std::set<std::string> names;
  return names;
}

}  // namespace

void fail(const std::string& what) { current().fail(what); }

void syncthreads(std::source_location where) { current().syncthreads(where); }

std::array<uint64_t, 32> warp_exchange(unsigned mask, uint64_t value, std::source_location where) {
  return current().warp_exchange(mask, value, where);
}

int lane_id() { return current().lane(); }

void* dynamic_shared_base(size_t alignment) { return current().shared_base(alignment); }

void run(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || block.z > 64) {
    throw LaunchError("invalid launch: block (" + std::to_string(block.x) + ", " + std::to_string(block.y) + ", " +
                      std::to_string(block.z) + ") (CUDA: 1 to 1024 threads, z <= 64)");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu) {
    throw LaunchError("invalid launch: grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
                      std::to_string(grid.z) + ")");
  }
  if (shared_bytes > kDefaultSharedLimit) {
    throw LaunchError("invalid launch: " + std::to_string(shared_bytes) +
                      " bytes of dynamic shared memory, over the 48 KiB a kernel gets without opting in");
  }
  if (Launch::current_ != nullptr) throw LaunchError("invalid launch: a kernel launched from inside a kernel");
  Launch launch(grid, block, shared_bytes, body);
  launch.run();
}

void record_launch(std::string kernel_name) {
  std::lock_guard<std::mutex> lock(coverage_mutex);
  coverage().insert(std::move(kernel_name));
}

std::vector<std::string> launched_kernels() {
  std::lock_guard<std::mutex> lock(coverage_mutex);
  return {coverage().begin(), coverage().end()};
}

}  // namespace emu
