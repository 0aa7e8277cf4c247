// The CUDA emulator's scheduler: fibers, barriers, warp collectives, shared memory, orders.
// What it models and what it does not: emu/runtime.h.
//
// Fibers switch with a few lines of assembly on x86-64 (glibc's swapcontext makes a
// signal-mask system call per switch, ~1.5 us, which would dominate the emulated kernels), and
// with ucontext elsewhere. AddressSanitizer is told about every switch, so the ASan build sees
// each fiber's stack as a stack.
#include "emu/runtime.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CONVOPS_EMU_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define CONVOPS_EMU_ASAN 1
#endif
#ifdef CONVOPS_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if defined(__x86_64__)
// convops_emu_switch(save_sp, load_sp): saves the callee-saved registers, the x87 control word
// and MXCSR on the current stack, stores the stack pointer to *save_sp, and resumes the context
// whose stack pointer is load_sp.
extern "C" void convops_emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .p2align 4
    .type convops_emu_switch, @function
convops_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $16, %rsp
    fnstcw (%rsp)
    stmxcsr 8(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    fldcw (%rsp)
    ldmxcsr 8(%rsp)
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size convops_emu_switch, .-convops_emu_switch
)");
#endif

namespace convops {
namespace emu {

thread_local const Builtins* current_builtins = nullptr;

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;
constexpr int kWarpSize = 32;
constexpr size_t kArenaBytes = 227 * 1024;  // the opt-in limit (cuda/dialect.h)
constexpr size_t kStaticSharedLimit = 48 * 1024;

enum class State { Runnable, AtBarrier, AtWarp, Exited, Aborted };

struct Fiber {
  char* stack = nullptr;  // lowest address; the first kGuardBytes are a guard page
  void* sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t context;
#endif
  bool dirty = false;  // left mid-run by an aborted launch: its stack may hold ASan poison
};

struct EmuThread {
  Builtins builtins;
  int linear = 0, warp = 0, lane = 0;
  State state = State::Runnable;
  const char* file = nullptr;  // where it waits
  int line = 0;
  // The collective it waits in.
  WarpOp op = WarpOp::Sync;
  unsigned mask = 0;
  int arg = 0, width = kWarpSize;
  size_t bytes = 0;
  alignas(16) unsigned char value[16];
  alignas(16) unsigned char result[16];
  WarpMatrixFn matrix_fn = nullptr;  // WarpOp::Matrix
  void* matrix_arg = nullptr;
  Fiber* fiber = nullptr;
};

struct StaticAllocation {
  const void* site;
  size_t offset;
};

// One per host thread: launches on different host threads never share anything.
struct Scheduler {
  std::vector<Fiber> fibers;
  std::vector<EmuThread> threads;
  EmuThread* current = nullptr;
  void* scheduler_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t scheduler_context;
#endif
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
  KernelBody body = nullptr;
  void* closure = nullptr;
  const char* kernel = "";
  std::string error;
  bool running = false;
  // Shared memory: [0, dynamic) dynamic, then static allocations in first-use order.
  unsigned char* arena = nullptr;
  size_t dynamic_bytes = 0, shared_top = 0, shared_limit = kArenaBytes;
  std::vector<StaticAllocation> statics;

  ~Scheduler() {
    for (Fiber& f : fibers) {
#ifdef CONVOPS_EMU_ASAN
      ASAN_UNPOISON_MEMORY_REGION(f.stack, kStackBytes);
#endif
      munmap(f.stack, kStackBytes);
    }
    if (arena != nullptr) {
#ifdef CONVOPS_EMU_ASAN
      ASAN_UNPOISON_MEMORY_REGION(arena, kArenaBytes);
#endif
      std::free(arena);
    }
  }
};

thread_local Scheduler scheduler;

std::mutex launch_count_mutex;
std::map<std::string, int64_t> launch_count_by_kernel;

void count_launch(const char* name) {
  std::lock_guard<std::mutex> lock(launch_count_mutex);
  ++launch_count_by_kernel[name];
}

[[noreturn]] void fail(const std::string& message) {
  TORCH_CHECK(false, "convops emulator: kernel ", scheduler.kernel, ": ", message);
}

std::string where(const EmuThread& t) {
  std::ostringstream s;
  s << "thread (" << t.builtins.thread_idx.x << ", " << t.builtins.thread_idx.y << ", "
    << t.builtins.thread_idx.z << ") of block (" << t.builtins.block_idx.x << ", "
    << t.builtins.block_idx.y << ", " << t.builtins.block_idx.z << ")";
  return s.str();
}

std::string site(const char* file, int line) {
  std::string f = file != nullptr ? file : "?";
  const auto slash = f.find_last_of('/');
  if (slash != std::string::npos) f = f.substr(slash + 1);
  return f + ":" + std::to_string(line);
}

// --- fiber switching ------------------------------------------------------------------------

void asan_start_switch(void** fake_stack, const void* bottom, size_t size) {
#ifdef CONVOPS_EMU_ASAN
  __sanitizer_start_switch_fiber(fake_stack, bottom, size);
#else
  (void)fake_stack, (void)bottom, (void)size;
#endif
}

void asan_finish_switch(void* fake_stack, const void** bottom, size_t* size) {
#ifdef CONVOPS_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, bottom, size);
#else
  (void)fake_stack, (void)bottom, (void)size;
#endif
}

void switch_raw(void** save_sp, void* load_sp, Fiber* from, Fiber* to) {
#if defined(__x86_64__)
  (void)from, (void)to;
  convops_emu_switch(save_sp, load_sp);
#else
  (void)save_sp, (void)load_sp;
  swapcontext(from != nullptr ? &from->context : &scheduler.scheduler_context,
              to != nullptr ? &to->context : &scheduler.scheduler_context);
#endif
}

// From a fiber back to the scheduler; returns when the scheduler resumes this fiber.
void yield_to_scheduler() {
  Scheduler& s = scheduler;
  Fiber* f = s.current->fiber;
  void* fake_stack = nullptr;
  asan_start_switch(&fake_stack, s.scheduler_stack_bottom, s.scheduler_stack_size);
  switch_raw(&f->sp, s.scheduler_sp, f, nullptr);
  asan_finish_switch(fake_stack, nullptr, nullptr);
}

[[noreturn]] void abort_from_fiber(const std::string& message);

void fiber_main() {
  Scheduler& s = scheduler;
  asan_finish_switch(nullptr, &s.scheduler_stack_bottom, &s.scheduler_stack_size);
  try {
    s.body(s.closure);
  } catch (const std::exception& e) {  // unwinding must not run off the fiber's first frame
    abort_from_fiber(std::string("threw: ") + e.what());
  }
  s.current->state = State::Exited;
  // Leave for good: a null fake-stack pointer lets ASan free this fiber's fake frames.
  asan_start_switch(nullptr, s.scheduler_stack_bottom, s.scheduler_stack_size);
  switch_raw(&s.current->fiber->sp, s.scheduler_sp, s.current->fiber, nullptr);
  __builtin_unreachable();
}

#if !defined(__x86_64__)
void fiber_main_ucontext() { fiber_main(); }
#endif

void prepare_fiber(Fiber& f) {
  if (f.stack == nullptr) {
    void* mem = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    TORCH_CHECK(mem != MAP_FAILED, "convops emulator: cannot map a fiber stack");
    f.stack = static_cast<char*>(mem);
    mprotect(f.stack, kGuardBytes, PROT_NONE);  // an overflow faults instead of corrupting
  }
#ifdef CONVOPS_EMU_ASAN
  // A fiber that ran to its end never unwinds fiber_main's frame, whose redzones stay
  // poisoned at the top of the stack; one aborted mid-kernel leaves poison anywhere.
  if (f.dirty) ASAN_UNPOISON_MEMORY_REGION(f.stack + kGuardBytes, kStackBytes - kGuardBytes);
  else ASAN_UNPOISON_MEMORY_REGION(f.stack + kStackBytes - 8192, 8192);
#endif
  f.dirty = false;
#if defined(__x86_64__)
  // The frame convops_emu_switch pops: x87 control word, MXCSR, six registers, then
  // fiber_main as its return address and a null return address for fiber_main itself.
  uintptr_t top = reinterpret_cast<uintptr_t>(f.stack + kStackBytes) & ~uintptr_t(15);
  auto* frame = reinterpret_cast<uint64_t*>(top - 80);
  uint16_t fpu_cw;
  uint32_t mxcsr;
  asm volatile("fnstcw %0" : "=m"(fpu_cw));
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  std::memset(frame, 0, 80);
  std::memcpy(&frame[0], &fpu_cw, sizeof(fpu_cw));
  std::memcpy(&frame[1], &mxcsr, sizeof(mxcsr));
  frame[8] = reinterpret_cast<uint64_t>(&fiber_main);
  frame[9] = 0;
  f.sp = frame;
#else
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack + kGuardBytes;
  f.context.uc_stack.ss_size = kStackBytes - kGuardBytes;
  f.context.uc_link = nullptr;
  makecontext(&f.context, fiber_main_ucontext, 0);
#endif
}

void resume(EmuThread& t) {
  Scheduler& s = scheduler;
  s.current = &t;
  current_builtins = &t.builtins;
  void* fake_stack = nullptr;
  asan_start_switch(&fake_stack, t.fiber->stack + kGuardBytes, kStackBytes - kGuardBytes);
  switch_raw(&s.scheduler_sp, t.fiber->sp, nullptr, t.fiber);
  asan_finish_switch(fake_stack, nullptr, nullptr);
  current_builtins = nullptr;
  s.current = nullptr;
}

// A fiber found an error: record it and never come back.
[[noreturn]] void abort_from_fiber(const std::string& message) {
  Scheduler& s = scheduler;
  if (s.error.empty()) s.error = message;
  s.current->state = State::Aborted;
  yield_to_scheduler();
  std::abort();  // the scheduler never resumes an aborted fiber
}

EmuThread& running_thread(const char* what) {
  Scheduler& s = scheduler;
  if (s.current == nullptr) {
    TORCH_CHECK(false, "convops emulator: ", what, " called outside an emulated kernel");
  }
  return *s.current;
}

// --- order ----------------------------------------------------------------------------------

struct Order {
  enum Kind { Forward, Reverse, Random } kind = Forward;
  uint64_t seed = 0;
};

Order read_order() {
  Order o;
  const char* v = std::getenv("CONVOPS_EMU_ORDER");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "forward") == 0) return o;
  if (std::strcmp(v, "reverse") == 0) {
    o.kind = Order::Reverse;
    return o;
  }
  if (std::strncmp(v, "random:", 7) == 0) {
    char* end = nullptr;
    const unsigned long long seed = std::strtoull(v + 7, &end, 10);
    if (end != v + 7 && *end == '\0') {
      o.kind = Order::Random;
      o.seed = seed;
      return o;
    }
  }
  TORCH_CHECK(false, "CONVOPS_EMU_ORDER must be forward, reverse or random:<seed>, got '", v,
              "'");
}

void arrange(std::vector<int64_t>& items, const Order& order, std::mt19937_64& rng) {
  if (order.kind == Order::Reverse) std::reverse(items.begin(), items.end());
  if (order.kind == Order::Random) std::shuffle(items.begin(), items.end(), rng);
}

// --- shared memory --------------------------------------------------------------------------

void reset_shared(size_t dynamic_bytes) {
  Scheduler& s = scheduler;
  if (s.arena == nullptr) {
    s.arena = static_cast<unsigned char*>(std::aligned_alloc(64, kArenaBytes));
    TORCH_CHECK(s.arena != nullptr, "convops emulator: cannot allocate shared memory");
  }
  s.statics.clear();
  s.dynamic_bytes = dynamic_bytes;
  s.shared_top = (dynamic_bytes + 15) & ~size_t(15);
#ifdef CONVOPS_EMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(s.arena, kArenaBytes);
#endif
  std::memset(s.arena, 0xFF, dynamic_bytes);
#ifdef CONVOPS_EMU_ASAN
  ASAN_POISON_MEMORY_REGION(s.arena + dynamic_bytes, kArenaBytes - dynamic_bytes);
#endif
}

// --- collectives ----------------------------------------------------------------------------

bool same_collective(const EmuThread& a, const EmuThread& b) {
  return a.op == b.op && a.mask == b.mask && a.line == b.line &&
         std::strcmp(a.file, b.file) == 0;
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::Shfl: return "__shfl_sync";
    case WarpOp::ShflUp: return "__shfl_up_sync";
    case WarpOp::ShflDown: return "__shfl_down_sync";
    case WarpOp::ShflXor: return "__shfl_xor_sync";
    case WarpOp::Ballot: return "__ballot_sync";
    case WarpOp::All: return "__all_sync";
    case WarpOp::Any: return "__any_sync";
    case WarpOp::Sync: return "__syncwarp";
    case WarpOp::Matrix: return "a tensor-core fragment operation (mma_*)";
  }
  return "?";
}

// Source lane of a shuffle, or -1 when the lane keeps its own value.
int shuffle_source(const EmuThread& t) {
  const int lane = t.lane, w = t.width, base = lane - lane % w;
  switch (t.op) {
    case WarpOp::Shfl: return base + ((t.arg % w) + w) % w;
    case WarpOp::ShflUp: return lane % w >= t.arg ? lane - t.arg : -1;
    case WarpOp::ShflDown: return lane % w + t.arg < w ? lane + t.arg : -1;
    case WarpOp::ShflXor: {
      const int src = lane ^ t.arg;
      return src < base + w ? src : -1;
    }
    default: return -1;
  }
}

// Completes the collective lane `t` waits in, if every lane it names is there.
// Returns true when it released the lanes; errors when it can never complete.
bool try_complete_collective(EmuThread& t, int warp_base, int block_threads) {
  Scheduler& s = scheduler;
  std::vector<EmuThread*> lanes;
  for (int lane = 0; lane < kWarpSize; ++lane) {
    if (!(t.mask >> lane & 1u)) continue;
    const int linear = warp_base + lane;
    if (linear >= block_threads) {
      fail(std::string(op_name(t.op)) + " at " + site(t.file, t.line) + " by " + where(t) +
           " names lane " + std::to_string(lane) + ", which does not exist in this block");
    }
    EmuThread& other = s.threads[linear];
    if (other.state == State::Exited) {
      fail(std::string(op_name(t.op)) + " at " + site(t.file, t.line) + " by " + where(t) +
           " names lane " + std::to_string(lane) + ", which has exited");
    }
    if (other.state != State::AtWarp || !same_collective(t, other)) {
      const std::string elsewhere =
          other.state == State::AtBarrier
              ? "waits at __syncthreads() at " + site(other.file, other.line)
              : other.state == State::AtWarp
                    ? std::string("waits in ") + op_name(other.op) + " at " +
                          site(other.file, other.line)
                    : "has not arrived";
      fail(std::string(op_name(t.op)) + " at " + site(t.file, t.line) + " by " + where(t) +
           " names lane " + std::to_string(lane) + ", which " + elsewhere);
    }
    lanes.push_back(&other);
  }
  if (t.op == WarpOp::Matrix) {
    void* args[kWarpSize];
    for (EmuThread* l : lanes) {
      if (l->matrix_fn != t.matrix_fn) {
        fail(std::string(op_name(t.op)) + " at " + site(t.file, t.line) +
             ": the lanes of a warp call different operations");
      }
      args[l->lane] = l->matrix_arg;
    }
    try {
      t.matrix_fn(args);
    } catch (const std::exception& e) {
      fail(std::string(op_name(t.op)) + " at " + site(t.file, t.line) + " by " + where(t) +
           ": " + e.what());
    }
    for (EmuThread* l : lanes) l->state = State::Runnable;
    return true;
  }
  const bool is_vote = t.op == WarpOp::Ballot || t.op == WarpOp::All || t.op == WarpOp::Any ||
                       t.op == WarpOp::Sync;
  if (is_vote) {
    unsigned ballot = 0;
    for (EmuThread* l : lanes)
      if (l->arg) ballot |= 1u << l->lane;
    const unsigned all = ballot == t.mask, any = ballot != 0;
    for (EmuThread* l : lanes) {
      const unsigned r = t.op == WarpOp::Ballot ? ballot : t.op == WarpOp::All ? all : any;
      std::memcpy(l->result, &r, sizeof(r));
    }
  } else {
    for (EmuThread* l : lanes) {
      const int src = shuffle_source(*l);
      if (src < 0) {
        std::memcpy(l->result, l->value, l->bytes);
        continue;
      }
      if (!(t.mask >> src & 1u)) {
        fail(std::string(op_name(t.op)) + " at " + site(t.file, t.line) + " by " + where(*l) +
             " reads lane " + std::to_string(src) + ", which is not in the mask");
      }
      std::memcpy(l->result, s.threads[warp_base + src].value, l->bytes);
    }
  }
  for (EmuThread* l : lanes) l->state = State::Runnable;
  return true;
}

std::string describe_waiters() {
  std::ostringstream out;
  int shown = 0;
  for (const EmuThread& t : scheduler.threads) {
    if (t.state == State::Exited || shown >= 4) continue;
    out << "; " << where(t) << " waits "
        << (t.state == State::AtBarrier ? "at __syncthreads() at "
                                        : std::string("in ") + op_name(t.op) + " at ")
        << site(t.file, t.line);
    ++shown;
  }
  return out.str();
}

// After a round in which every thread stopped: release a collective or the barrier, or fail.
void release_waiters(int block_threads) {
  Scheduler& s = scheduler;
  bool released = false;
  for (EmuThread& t : s.threads) {
    if (t.state != State::AtWarp) continue;
    released |= try_complete_collective(t, t.warp * kWarpSize, block_threads);
  }
  if (released) return;
  const EmuThread* first = nullptr;
  const EmuThread* exited = nullptr;
  for (const EmuThread& t : s.threads) {
    if (t.state == State::Exited) {
      if (exited == nullptr) exited = &t;
      continue;
    }
    if (first == nullptr) {
      first = &t;
      continue;
    }
    if (t.line != first->line || std::strcmp(t.file, first->file) != 0) {
      fail(where(*first) + " waits at __syncthreads() at " + site(first->file, first->line) +
           " while " + where(t) + " waits at __syncthreads() at " + site(t.file, t.line) +
           " (a barrier in divergent code)");
    }
  }
  if (exited != nullptr) {
    fail(where(*exited) + " exited while " + where(*first) +
         " waits at __syncthreads() at " + site(first->file, first->line) +
         " (every thread of the block must reach the barrier)" + describe_waiters());
  }
  for (EmuThread& t : s.threads) t.state = State::Runnable;
}

void run_block(const Builtins& proto, int block_threads, size_t dynamic_smem,
               const Order& order, std::mt19937_64& rng) {
  Scheduler& s = scheduler;
  reset_shared(dynamic_smem);
  if (s.fibers.size() < static_cast<size_t>(block_threads)) s.fibers.resize(block_threads);
  s.threads.assign(block_threads, EmuThread());
  std::vector<int64_t> order_of_threads(block_threads);
  const unsigned bx = proto.block_dim.x, by = proto.block_dim.y;
  for (int i = 0; i < block_threads; ++i) {
    EmuThread& t = s.threads[i];
    t.builtins = proto;
    t.builtins.thread_idx = {static_cast<unsigned>(i % bx), static_cast<unsigned>(i / bx % by),
                             static_cast<unsigned>(i / (bx * by))};
    t.linear = i;
    t.warp = i / kWarpSize;
    t.lane = i % kWarpSize;
    t.fiber = &s.fibers[i];
    prepare_fiber(*t.fiber);
    order_of_threads[i] = i;
  }
  for (;;) {
    arrange(order_of_threads, order, rng);
    for (const int64_t i : order_of_threads) {
      EmuThread& t = s.threads[i];
      if (t.state != State::Runnable) continue;
      resume(t);
      if (!s.error.empty()) fail(s.error);
    }
    bool all_exited = true;
    for (const EmuThread& t : s.threads) all_exited &= t.state == State::Exited;
    if (all_exited) return;
    release_waiters(block_threads);
  }
}

}  // namespace

// --- the kernel-side API --------------------------------------------------------------------

void syncthreads(const char* file, int line) {
  EmuThread& t = running_thread("__syncthreads");
  t.state = State::AtBarrier;
  t.file = file;
  t.line = line;
  yield_to_scheduler();
}

void warp_collective(WarpOp op, unsigned mask, const void* value, size_t bytes, int arg,
                     int width, const char* file, int line, void* result) {
  EmuThread& t = running_thread(op_name(op));
  if (!(mask >> t.lane & 1u)) {
    abort_from_fiber(std::string(op_name(op)) + " at " + site(file, line) + " by " + where(t) +
                     " with mask 0x" + [&] {
                       std::ostringstream h;
                       h << std::hex << mask;
                       return h.str();
                     }() + " that does not name the calling lane " + std::to_string(t.lane));
  }
  if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0) {
    abort_from_fiber(std::string(op_name(op)) + " at " + site(file, line) + ": width " +
                     std::to_string(width) + " is not a power of two <= 32");
  }
  t.state = State::AtWarp;
  t.op = op;
  t.mask = mask;
  t.arg = arg;
  t.width = width;
  t.file = file;
  t.line = line;
  t.bytes = bytes;
  if (bytes > 0) std::memcpy(t.value, value, bytes);
  yield_to_scheduler();
  std::memcpy(result, t.result, op == WarpOp::Shfl || op == WarpOp::ShflUp ||
                                        op == WarpOp::ShflDown || op == WarpOp::ShflXor
                                    ? bytes
                                    : sizeof(unsigned));
}

void warp_matrix(WarpMatrixFn fn, void* lane_arg, const char* file, int line) {
  EmuThread& t = running_thread(op_name(WarpOp::Matrix));
  t.state = State::AtWarp;
  t.op = WarpOp::Matrix;
  t.mask = 0xffffffffu;  // wmma operations are warp-wide: every lane must take part
  t.arg = 0;
  t.width = kWarpSize;
  t.file = file;
  t.line = line;
  t.bytes = 0;
  t.matrix_fn = fn;
  t.matrix_arg = lane_arg;
  yield_to_scheduler();
}

void* shared_alloc(const void* site_key, size_t bytes) {
  Scheduler& s = scheduler;
  running_thread("static shared memory");
  for (const StaticAllocation& a : s.statics)
    if (a.site == site_key) return s.arena + a.offset;
  const size_t offset = s.shared_top;
  const size_t static_bytes = offset + bytes - ((s.dynamic_bytes + 15) & ~size_t(15));
  if (static_bytes > kStaticSharedLimit || offset + bytes > s.shared_limit) {
    abort_from_fiber("static shared memory of " + std::to_string(static_bytes) +
                     " bytes with " + std::to_string(s.dynamic_bytes) +
                     " dynamic exceeds the block's limit of " +
                     std::to_string(offset + bytes > s.shared_limit ? s.shared_limit
                                                                    : kStaticSharedLimit));
  }
#ifdef CONVOPS_EMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(s.arena + offset, bytes);
#endif
  std::memset(s.arena + offset, 0xFF, bytes);
  s.statics.push_back({site_key, offset});
  s.shared_top = (offset + bytes + 15) & ~size_t(15);
  return s.arena + offset;
}

void* dynamic_shared_base() {
  running_thread("dynamic shared memory");
  return scheduler.arena;
}

std::vector<std::pair<std::string, int64_t>> launch_counts() {
  std::lock_guard<std::mutex> lock(launch_count_mutex);
  return {launch_count_by_kernel.begin(), launch_count_by_kernel.end()};
}

void run_grid_impl(const char* name, int64_t gx, int64_t gy, int64_t gz, int64_t bx, int64_t by,
                   int64_t bz, int64_t dynamic_smem, int64_t shared_limit, KernelBody body,
                   void* closure) {
  Scheduler& s = scheduler;
  count_launch(name);
  TORCH_CHECK(!s.running, "convops emulator: kernel ", name,
              " launched from inside an emulated kernel");
  const Order order = read_order();
  std::mt19937_64 rng(order.seed ^ std::hash<std::string>()(name));
  s.running = true;
  s.kernel = name;
  s.shared_limit = std::min<size_t>(static_cast<size_t>(shared_limit), kArenaBytes);
  s.body = body;
  s.closure = closure;
  s.error.clear();
  Builtins proto;
  proto.block_dim = {static_cast<unsigned>(bx), static_cast<unsigned>(by),
                     static_cast<unsigned>(bz)};
  proto.grid_dim = {static_cast<unsigned>(gx), static_cast<unsigned>(gy),
                    static_cast<unsigned>(gz)};
  const int block_threads = static_cast<int>(bx * by * bz);
  TORCH_CHECK(gx * gy * gz <= (int64_t(1) << 24), "convops emulator: kernel ", name, ": ",
              gx * gy * gz, " blocks are more than the emulator runs (2^24)");
  std::vector<int64_t> blocks(static_cast<size_t>(gx * gy * gz));
  for (size_t i = 0; i < blocks.size(); ++i) blocks[i] = static_cast<int64_t>(i);
  arrange(blocks, order, rng);
  try {
    for (const int64_t b : blocks) {
      proto.block_idx = {static_cast<unsigned>(b % gx), static_cast<unsigned>(b / gx % gy),
                         static_cast<unsigned>(b / (gx * gy))};
      run_block(proto, block_threads, static_cast<size_t>(dynamic_smem), order, rng);
    }
  } catch (...) {
    // Fibers left mid-run are never resumed; their stacks are reset before reuse.
    for (EmuThread& t : s.threads)
      if (t.state != State::Exited) t.fiber->dirty = true;
    s.running = false;
    throw;
  }
  s.running = false;
}

}  // namespace emu
}  // namespace convops
