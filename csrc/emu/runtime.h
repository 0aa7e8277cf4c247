// The CUDA emulator: runs convops's CUDA kernels, compiled from the same source by the host C++
// compiler (cuda/dialect.h with CONVOPS_EMULATE_CUDA), on CPU tensors.
//
// What it models, strictly enough that the bugs a GPU punishes fail here:
// - Every thread of a block is its own fiber with its own threadIdx. A launch runs its blocks
//   one after another on the calling thread, and a block's threads one after another until each
//   reaches a barrier, a warp collective or its end; the order of blocks and of threads between
//   barriers is set by CONVOPS_EMU_ORDER=forward|reverse|random:<seed> (read at every launch).
// - __syncthreads() is a real barrier. A thread that has exited, or waits at a different
//   barrier (another line), while others wait at one is an error naming the kernel, never a hang.
// - Warp collectives (__shfl*_sync, __ballot_sync, __all_sync, __any_sync, __syncwarp) exchange
//   values among the lanes named in the mask once all of them have arrived at the same call;
//   a named lane that has exited, does not exist, waits elsewhere, or a source lane outside the
//   mask is an error.
// - Shared memory (static and dynamic) is private to the block and filled with 0xFF bytes (NaN
//   for floating types) before the block starts, so reading what nobody wrote poisons results.
//   Under AddressSanitizer the unallocated part of the shared arena is poisoned too.
// - Tensor-core fragments (cuda/dialect.h mma_*): load, multiply-accumulate and store are
//   warp-wide operations that complete only when all 32 lanes of the warp have arrived at the
//   same call with the same pointer and leading dimension (checked, like the 32-byte pointer
//   and 16-byte ldm alignment wmma requires). Each lane holds a scrambled share of the tile, so
//   code that assumes an element-to-lane mapping reads the wrong values. Products are exact
//   and summed in fp32; fp32 inputs are rounded to TF32 first.
// - Atomics are exact (no update is lost; only one host thread runs a launch).
// - Launch geometry is validated as the driver does (cuda/dialect.h validate_launch); static
//   plus dynamic shared memory is checked against the kernel's allowance when allocated.
// What it does not model: timing, memory coalescing and bank conflicts, blocks running
// concurrently (a kernel that makes one block wait for another deadlocks on a GPU but not
// here), the memory model between blocks (fences, visibility), independent progress inside a
// warp between collectives, texture/constant memory, streams and events (launches run synchronously). Out-of-bounds global accesses are
// caught only by the AddressSanitizer build.
#pragma once

#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct uint3 {
  unsigned int x, y, z;
};

namespace convops {
namespace emu {

struct Builtins {
  uint3 thread_idx, block_idx, block_dim, grid_dim;
};

// The running emulated thread's builtins (set by the scheduler at every switch).
extern thread_local const Builtins* current_builtins;

using KernelBody = void (*)(void* closure);

// shared_limit: what static plus dynamic shared memory of one block may total (48 KiB, or the
// opted-in limit).
void run_grid_impl(const char* name, int64_t gx, int64_t gy, int64_t gz, int64_t bx, int64_t by,
                   int64_t bz, int64_t dynamic_smem, int64_t shared_limit, KernelBody body,
                   void* closure);

template <typename... KArgs>
void run_grid(const char* name, int64_t gx, int64_t gy, int64_t gz, int64_t bx, int64_t by,
              int64_t bz, int64_t dynamic_smem, int64_t shared_limit, void (*kernel)(KArgs...),
              KArgs... args) {
  struct Closure {
    void (*kernel)(KArgs...);
    std::tuple<KArgs...> args;
  };
  Closure closure{kernel, std::tuple<KArgs...>(args...)};
  run_grid_impl(name, gx, gy, gz, bx, by, bz, dynamic_smem, shared_limit,
                [](void* p) {
                  auto* c = static_cast<Closure*>(p);
                  std::apply(c->kernel, c->args);  // each thread gets its own copies
                },
                &closure);
}

// How often each kernel (by launch name) has been launched in this process, for the tests
// that check that every kernel and launcher branch runs.
std::vector<std::pair<std::string, int64_t>> launch_counts();

// Shared memory of the running block.
void* shared_alloc(const void* site, size_t bytes);  // static: once per block per site
void* dynamic_shared_base();

template <typename T>
T* static_shared(const void* site, size_t count) {
  return static_cast<T*>(shared_alloc(site, count * sizeof(T)));
}
template <typename T>
T* dynamic_shared() {
  return static_cast<T*>(dynamic_shared_base());
}

void syncthreads(const char* file, int line);

enum class WarpOp { Shfl, ShflUp, ShflDown, ShflXor, Ballot, All, Any, Sync, Matrix };

// A warp-wide matrix operation: once all 32 lanes of the warp wait in the same call, `fn` runs
// once with each lane's `lane_arg`, in lane order (it may throw std::runtime_error to report a
// misuse), and then all lanes go on.
using WarpMatrixFn = void (*)(void* const* lane_args);
void warp_matrix(WarpMatrixFn fn, void* lane_arg, const char* file, int line);

// Deposits `bytes` of `value` for the collective, waits for the named lanes, writes the
// result. `arg` is the lane, delta or lane mask of a shuffle, or the predicate of a vote.
void warp_collective(WarpOp op, unsigned mask, const void* value, size_t bytes, int arg,
                     int width, const char* file, int line, void* result);

template <typename T>
T shuffle(WarpOp op, unsigned mask, T var, int arg, int width, const char* file, int line) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 16,
                "emulated shuffles move trivially copyable values of at most 16 bytes");
  T result;
  warp_collective(op, mask, &var, sizeof(T), arg, width, file, line, &result);
  return result;
}

inline unsigned vote(WarpOp op, unsigned mask, int predicate, const char* file, int line) {
  unsigned result = 0;
  warp_collective(op, mask, nullptr, 0, predicate != 0, 32, file, line, &result);
  return result;
}

// Exact: fibers switch only at barriers and collectives, so this read-modify-write is atomic.
template <typename T>
inline void atomic_add(T* address, T value) {
  *address = static_cast<T>(*address + value);
}

}  // namespace emu
}  // namespace convops

#define threadIdx (::convops::emu::current_builtins->thread_idx)
#define blockIdx (::convops::emu::current_builtins->block_idx)
#define blockDim (::convops::emu::current_builtins->block_dim)
#define gridDim (::convops::emu::current_builtins->grid_dim)

// The CUDA intrinsics, by their CUDA names; the call site identifies the barrier/collective.
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::convops::emu::syncthreads(file, line);
}
template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32,
              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::convops::emu::shuffle(::convops::emu::WarpOp::Shfl, mask, var, src_lane, width, file,
                                 line);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                 const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::convops::emu::shuffle(::convops::emu::WarpOp::ShflUp, mask, var,
                                 static_cast<int>(delta), width, file, line);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                   const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::convops::emu::shuffle(::convops::emu::WarpOp::ShflDown, mask, var,
                                 static_cast<int>(delta), width, file, line);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                  const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::convops::emu::shuffle(::convops::emu::WarpOp::ShflXor, mask, var, lane_mask, width,
                                 file, line);
}
inline unsigned __ballot_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return ::convops::emu::vote(::convops::emu::WarpOp::Ballot, mask, predicate, file, line);
}
inline int __all_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return static_cast<int>(
      ::convops::emu::vote(::convops::emu::WarpOp::All, mask, predicate, file, line));
}
inline int __any_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return static_cast<int>(
      ::convops::emu::vote(::convops::emu::WarpOp::Any, mask, predicate, file, line));
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  ::convops::emu::vote(::convops::emu::WarpOp::Sync, mask, 1, file, line);
}
