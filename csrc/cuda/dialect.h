// The device dialect: everything a convops CUDA kernel or launcher needs from CUDA that is not
// plain C++, in one place, with two implementations:
//   - nvcc (the real build): the CUDA runtime, c10's stream and guard, ATen's atomics;
//   - CONVOPS_EMULATE_CUDA (the emulator build, a host C++ compiler): emu/runtime.h, which runs
//     each block's threads as fibers on the CPU (see its header for what it models).
// Kernels use, and only use:
//   __global__ / __device__ / __forceinline__ / __launch_bounds__ / __restrict__
//   threadIdx, blockIdx, blockDim, gridDim, __syncthreads()
//   __shfl_sync, __shfl_down_sync, __shfl_up_sync, __shfl_xor_sync, __ballot_sync,
//   __all_sync, __any_sync, __syncwarp
//   CONVOPS_SHARED_ARRAY(type, name, count)   static shared memory
//   CONVOPS_DYNAMIC_SHARED(type, name)        the launch's dynamic shared memory
//   atomic_add(ptr, value)
// Launchers use launch_kernel(), allow_dynamic_shared(), DeviceGuard and
// CONVOPS_CUDA_LIBRARY_IMPL. Raw <<<>>> launches, __shared__ and inline PTX are not allowed:
// the emulator could not run them.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <map>
#include <mutex>

#ifdef CONVOPS_EMULATE_CUDA
#include "emu/runtime.h"
#else
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

namespace convops {
namespace cuda {

// Launch geometry in int64, so that an oversized grid is rejected instead of wrapping around.
struct Dim3 {
  int64_t x = 1, y = 1, z = 1;
  Dim3(int64_t x_ = 1, int64_t y_ = 1, int64_t z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct LaunchConfig {
  Dim3 grid, block;
  int64_t dynamic_smem = 0;
  int64_t max_threads;  // the kernel's __launch_bounds__ (the emulator cannot read it)
};

// Device limits of the GPUs convops targets (sm_70 .. sm_90), as the driver checks them.
constexpr int64_t kMaxThreadsPerBlock = 1024;
constexpr int64_t kMaxGridX = 2147483647, kMaxGridYZ = 65535;
constexpr int64_t kDefaultSharedLimit = 48 * 1024;
constexpr int64_t kOptInSharedLimit = 227 * 1024;

// Dynamic shared memory above 48 KiB that a kernel has been allowed (allow_dynamic_shared).
inline int64_t dynamic_shared_allowance(const void* kernel, int64_t set_to = -1) {
  static std::mutex mutex;
  static std::map<const void*, int64_t> allowed;
  std::lock_guard<std::mutex> lock(mutex);
  if (set_to >= 0) allowed[kernel] = set_to;
  const auto it = allowed.find(kernel);
  return it == allowed.end() ? kDefaultSharedLimit : it->second;
}

// The checks the driver makes at launch, made before launching on both builds so that a bad
// geometry is a RuntimeError naming the kernel, never a silent wrap or a sticky CUDA error.
inline void validate_launch(const char* name, const void* kernel, const LaunchConfig& c) {
  const Dim3& g = c.grid;
  const Dim3& b = c.block;
  TORCH_CHECK(g.x >= 1 && g.y >= 1 && g.z >= 1 && b.x >= 1 && b.y >= 1 && b.z >= 1,
              "convops: illegal launch of ", name, ": empty grid (", g.x, ", ", g.y, ", ", g.z,
              ") or block (", b.x, ", ", b.y, ", ", b.z, ")");
  TORCH_CHECK(g.x <= kMaxGridX && g.y <= kMaxGridYZ && g.z <= kMaxGridYZ,
              "convops: illegal launch of ", name, ": grid (", g.x, ", ", g.y, ", ", g.z,
              ") exceeds the limits (", kMaxGridX, ", ", kMaxGridYZ, ", ", kMaxGridYZ, ")");
  const int64_t threads = b.x * b.y * b.z;
  TORCH_CHECK(b.x <= 1024 && b.y <= 1024 && b.z <= 64 && threads <= kMaxThreadsPerBlock,
              "convops: illegal launch of ", name, ": block (", b.x, ", ", b.y, ", ", b.z,
              ") has ", threads, " threads; the limit is ", kMaxThreadsPerBlock);
  TORCH_CHECK(threads <= c.max_threads, "convops: illegal launch of ", name, ": ", threads,
              " threads per block exceed its __launch_bounds__ of ", c.max_threads);
  const int64_t allowed = dynamic_shared_allowance(kernel);
  TORCH_CHECK(c.dynamic_smem >= 0 && c.dynamic_smem <= allowed, "convops: illegal launch of ",
              name, ": ", c.dynamic_smem, " bytes of dynamic shared memory exceed the ",
              allowed, " allowed",
              allowed == kDefaultSharedLimit ? " (allow_dynamic_shared opts in to more)" : "");
}

// Lets `kernel` use up to `bytes` (<= 227 KiB) of dynamic shared memory.
template <typename... KArgs>
void allow_dynamic_shared(void (*kernel)(KArgs...), int64_t bytes) {
  TORCH_CHECK(bytes <= kOptInSharedLimit, "convops: ", bytes,
              " bytes of shared memory exceed the device's ", kOptInSharedLimit);
#ifndef CONVOPS_EMULATE_CUDA
  C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                      cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
#endif
  dynamic_shared_allowance(reinterpret_cast<const void*>(kernel),
                           bytes > kDefaultSharedLimit ? bytes : kDefaultSharedLimit);
}

// Launches kernel(args...) on the current stream (the emulator: runs it now, on this thread).
template <typename... KArgs, typename... Args>
void launch_kernel(const char* name, void (*kernel)(KArgs...), const LaunchConfig& c,
                   Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "launch_kernel: wrong argument count");
  validate_launch(name, reinterpret_cast<const void*>(kernel), c);
#ifdef CONVOPS_EMULATE_CUDA
  const bool opted_in = dynamic_shared_allowance(reinterpret_cast<const void*>(kernel)) >
                       kDefaultSharedLimit;
  emu::run_grid(name, c.grid.x, c.grid.y, c.grid.z, c.block.x, c.block.y, c.block.z,
                c.dynamic_smem, opted_in ? kOptInSharedLimit : kDefaultSharedLimit, kernel,
                KArgs(std::forward<Args>(args))...);
#else
  const dim3 grid(static_cast<unsigned>(c.grid.x), static_cast<unsigned>(c.grid.y),
                  static_cast<unsigned>(c.grid.z));
  const dim3 block(static_cast<unsigned>(c.block.x), static_cast<unsigned>(c.block.y),
                   static_cast<unsigned>(c.block.z));
  kernel<<<grid, block, static_cast<size_t>(c.dynamic_smem),
           c10::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

inline int64_t blocks_for(int64_t total, int64_t threads) {
  return (total + threads - 1) / threads;
}

#ifdef CONVOPS_EMULATE_CUDA
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};
template <typename T>
inline void atomic_add(T* address, T value) {
  emu::atomic_add(address, value);
}
#else
using DeviceGuard = c10::cuda::CUDAGuard;
template <typename T>
__device__ __forceinline__ void atomic_add(T* address, T value) {
  gpuAtomicAdd(address, value);
}
#endif

}  // namespace cuda
}  // namespace convops

#ifdef CONVOPS_EMULATE_CUDA
// One schema set (csrc/schemas.h), registered a second time as convops_emu on CPU tensors.
#define CONVOPS_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(convops_emu, CPU, m)
#define CONVOPS_SHARED_ARRAY(type, name, count)                                       \
  static const char name##_site = 0;                                                  \
  type* const name = ::convops::emu::static_shared<type>(&name##_site, (count))
#define CONVOPS_DYNAMIC_SHARED(type, name) \
  type* const name = ::convops::emu::dynamic_shared<type>()
#else
#define CONVOPS_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(convops, CUDA, m)
#define CONVOPS_SHARED_ARRAY(type, name, count) __shared__ type name[count]
#define CONVOPS_DYNAMIC_SHARED(type, name)                   \
  extern __shared__ __align__(16) unsigned char name##_raw[]; \
  type* const name = reinterpret_cast<type*>(name##_raw)
#endif
