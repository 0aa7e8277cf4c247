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
//   atomic_add(ptr, value), atomic_add_u64(ptr, value)
//   MmaFragA/B/Acc<scalar_t>, mma_zero, mma_load_a, mma_load_b, mma_run, mma_store:
//   tensor-core tiles (nvcuda::wmma on sm_80+; modelled by the emulator), see the end of
//   this file
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
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
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

// Dynamic shared memory a kernel has been allowed (allow_dynamic_shared), or -1 if it has not
// asked: then the driver's default applies (48 KiB for static plus dynamic).
inline int64_t dynamic_shared_allowance(const void* kernel, int64_t set_to = -1) {
  static std::mutex mutex;
  static std::map<const void*, int64_t> allowed;
  std::lock_guard<std::mutex> lock(mutex);
  if (set_to >= 0) allowed[kernel] = set_to;
  const auto it = allowed.find(kernel);
  return it == allowed.end() ? -1 : it->second;
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
  const int64_t asked = dynamic_shared_allowance(kernel);
  const int64_t allowed = asked >= 0 ? asked : kDefaultSharedLimit;
  TORCH_CHECK(c.dynamic_smem >= 0 && c.dynamic_smem <= allowed, "convops: illegal launch of ",
              name, ": ", c.dynamic_smem, " bytes of dynamic shared memory exceed the ",
              allowed, " allowed",
              asked < 0 ? " (allow_dynamic_shared opts in to more)" : "");
}

// Lets `kernel` use up to `bytes` (<= 227 KiB) of dynamic shared memory, with static plus
// dynamic up to the device's opt-in limit instead of 48 KiB.
template <typename... KArgs>
void allow_dynamic_shared(void (*kernel)(KArgs...), int64_t bytes) {
  TORCH_CHECK(bytes <= kOptInSharedLimit, "convops: ", bytes,
              " bytes of shared memory exceed the device's ", kOptInSharedLimit);
#ifndef CONVOPS_EMULATE_CUDA
  C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                      cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
#endif
  dynamic_shared_allowance(reinterpret_cast<const void*>(kernel), bytes);
}

// Launches kernel(args...) on the current stream (the emulator: runs it now, on this thread).
template <typename... KArgs, typename... Args>
void launch_kernel(const char* name, void (*kernel)(KArgs...), const LaunchConfig& c,
                   Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "launch_kernel: wrong argument count");
  validate_launch(name, reinterpret_cast<const void*>(kernel), c);
#ifdef CONVOPS_EMULATE_CUDA
  const bool opted_in = dynamic_shared_allowance(reinterpret_cast<const void*>(kernel)) >= 0;
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

// The high 64 bits of a * b (a 64-bit division by a launch constant, as a multiply: see
// PixelCursor in cuda/implicit_gemm.cuh).
__device__ __forceinline__ uint64_t mul_high_u64(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#endif
}

#ifdef CONVOPS_EMULATE_CUDA
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};
template <typename T>
inline void atomic_add(T* address, T value) {
  emu::atomic_add(address, value);
}
inline void atomic_add_u64(unsigned long long* address, unsigned long long value) {
  emu::atomic_add(address, value);  // wraps modulo 2^64, as on the GPU
}
inline bool device_has_tensor_cores() { return true; }  // the emulator models sm_90
#else
using DeviceGuard = c10::cuda::CUDAGuard;
template <typename T>
__device__ __forceinline__ void atomic_add(T* address, T value) {
  gpuAtomicAdd(address, value);
}
__device__ __forceinline__ void atomic_add_u64(unsigned long long* address,
                                               unsigned long long value) {
  atomicAdd(address, value);
}
// bf16 and TF32 tensor cores (mma_* below) need compute capability 8.0.
inline bool device_has_tensor_cores() {
  int device = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 8;
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

// --- Tensor-core tiles --------------------------------------------------------------------------
// One warp computes D (16 x 16, fp32) = A (16 x kK) * B (kK x 16) + C. A is read row-major
// (element (r, k) at p[r * ldm + k]) and B column-major (element (k, n) at p[n * ldm + k]) from
// shared memory; pointers must be 32-byte aligned and ldm a multiple of 16 bytes. scalar_t is
// c10::Half or c10::BFloat16 (kK = 16), or float, computed as TF32 (kK = 8). Which elements a
// lane holds is unspecified: kernels only load, multiply, store and zero whole fragments.
// All of it needs sm_80 (bf16, tf32): CONVOPS_TENSOR_CORES says whether this compilation pass
// has them; the host picks these kernels only on such devices.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace convops {
namespace cuda {

template <typename scalar_t>
struct MmaK;
template <>
struct MmaK<c10::Half> { static constexpr int value = 16; };
template <>
struct MmaK<c10::BFloat16> { static constexpr int value = 16; };
template <>
struct MmaK<float> { static constexpr int value = 8; };

}  // namespace cuda
}  // namespace convops

#ifdef CONVOPS_EMULATE_CUDA
#define CONVOPS_TENSOR_CORES 1
#include <cmath>
#include <stdexcept>

namespace convops {
namespace cuda {

// A lane's share of a kRows x kCols tile: element e of lane l is tile entry
// (e * 32 + l) * 37 + 11 mod (kRows * kCols), row-major - a deliberately odd mapping.
template <int kRows, int kCols>
struct EmuFragment {
  static constexpr int num_elements = kRows * kCols / 32;
  float x[num_elements];
  static int entry(int e, int lane) { return ((e * 32 + lane) * 37 + 11) % (kRows * kCols); }
};
template <typename scalar_t>
using MmaFragA = EmuFragment<16, MmaK<scalar_t>::value>;
template <typename scalar_t>
using MmaFragB = EmuFragment<MmaK<scalar_t>::value, 16>;
template <typename scalar_t>
using MmaFragAcc = EmuFragment<16, 16>;

namespace emu_mma {

// fp32 to TF32 as cvt.rna.tf32.f32 does: 10 mantissa bits, to nearest, ties away from zero.
inline float to_tf32(float v) {
  if (!std::isfinite(v)) return v;
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits = (bits + 0x1000u) & ~0x1fffu;
  std::memcpy(&v, &bits, 4);
  return v;
}
template <typename T>
float operand(T v) { return static_cast<float>(v); }
inline float operand(float v) { return to_tf32(v); }

struct TileArg {
  float* frag;
  const void* ptr;
  void* out;
  int ldm;
};

inline void check_same_tile(void* const* lanes, size_t elem_bytes) {
  const TileArg* first = static_cast<const TileArg*>(lanes[0]);
  for (int l = 1; l < 32; ++l) {
    const TileArg* a = static_cast<const TileArg*>(lanes[l]);
    if (a->ptr != first->ptr || a->out != first->out || a->ldm != first->ldm)
      throw std::runtime_error("lanes of one warp pass different pointers or leading dimensions");
  }
  const void* p = first->ptr != nullptr ? first->ptr : first->out;
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    throw std::runtime_error("tile pointer is not 32-byte aligned");
  if ((static_cast<size_t>(first->ldm) * elem_bytes) % 16 != 0)
    throw std::runtime_error("leading dimension " + std::to_string(first->ldm) +
                             " is not a multiple of 16 bytes");
}

// kColMajor: entry (i, j) of the kRows x kCols tile is at p[j * ldm + i], else p[i * ldm + j].
template <typename Frag, typename T, int kRows, int kCols, bool kColMajor>
void load_tile(void* const* lanes) {
  check_same_tile(lanes, sizeof(T));
  for (int l = 0; l < 32; ++l) {
    const TileArg* a = static_cast<const TileArg*>(lanes[l]);
    const T* p = static_cast<const T*>(a->ptr);
    for (int e = 0; e < Frag::num_elements; ++e) {
      const int t = Frag::entry(e, l), i = t / kCols, j = t % kCols;
      a->frag[e] = operand(p[kColMajor ? j * a->ldm + i : i * a->ldm + j]);
    }
  }
}

inline void store_tile(void* const* lanes) {
  check_same_tile(lanes, sizeof(float));
  using Frag = EmuFragment<16, 16>;
  for (int l = 0; l < 32; ++l) {
    const TileArg* a = static_cast<const TileArg*>(lanes[l]);
    float* p = static_cast<float*>(a->out);
    for (int e = 0; e < Frag::num_elements; ++e) {
      const int t = Frag::entry(e, l);
      p[(t / 16) * a->ldm + t % 16] = a->frag[e];
    }
  }
}

struct MmaArg {
  float *d;
  const float *a, *b, *c;
};

template <int kK>
void multiply(void* const* lanes) {
  using FA = EmuFragment<16, kK>;
  using FB = EmuFragment<kK, 16>;
  using FC = EmuFragment<16, 16>;
  float A[16][kK], B[kK][16], C[16][16];
  for (int l = 0; l < 32; ++l) {  // gather every lane's share before any lane's D is written
    const MmaArg* m = static_cast<const MmaArg*>(lanes[l]);
    for (int e = 0; e < FA::num_elements; ++e) {
      const int t = FA::entry(e, l);
      A[t / kK][t % kK] = m->a[e];
    }
    for (int e = 0; e < FB::num_elements; ++e) {
      const int t = FB::entry(e, l);
      B[t / 16][t % 16] = m->b[e];
    }
    for (int e = 0; e < FC::num_elements; ++e) {
      const int t = FC::entry(e, l);
      C[t / 16][t % 16] = m->c[e];
    }
  }
  for (int l = 0; l < 32; ++l) {
    const MmaArg* m = static_cast<const MmaArg*>(lanes[l]);
    for (int e = 0; e < FC::num_elements; ++e) {
      const int t = FC::entry(e, l), i = t / 16, j = t % 16;
      float acc = C[i][j];
      for (int k = 0; k < kK; ++k) acc += A[i][k] * B[k][j];  // exact products, fp32 sums
      m->d[e] = acc;
    }
  }
}

}  // namespace emu_mma

template <typename scalar_t>
inline void mma_zero(MmaFragAcc<scalar_t>& f) {
  for (float& v : f.x) v = 0.f;
}
template <typename scalar_t>
void mma_load_a(MmaFragA<scalar_t>& f, const scalar_t* p, int ldm,
                const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  emu_mma::TileArg arg{f.x, p, nullptr, ldm};
  emu::warp_matrix(emu_mma::load_tile<MmaFragA<scalar_t>, scalar_t, 16, MmaK<scalar_t>::value,
                                      false>, &arg, file, line);
}
template <typename scalar_t>
void mma_load_b(MmaFragB<scalar_t>& f, const scalar_t* p, int ldm,
                const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  emu_mma::TileArg arg{f.x, p, nullptr, ldm};
  emu::warp_matrix(emu_mma::load_tile<MmaFragB<scalar_t>, scalar_t, MmaK<scalar_t>::value, 16,
                                      true>, &arg, file, line);
}
template <typename scalar_t>
void mma_run(MmaFragAcc<scalar_t>& d, const MmaFragA<scalar_t>& a, const MmaFragB<scalar_t>& b,
             const MmaFragAcc<scalar_t>& c, const char* file = __builtin_FILE(),
             int line = __builtin_LINE()) {
  emu_mma::MmaArg arg{d.x, a.x, b.x, c.x};
  emu::warp_matrix(emu_mma::multiply<MmaK<scalar_t>::value>, &arg, file, line);
}
template <typename scalar_t>
void mma_store(float* p, const MmaFragAcc<scalar_t>& f, int ldm,
               const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  emu_mma::TileArg arg{const_cast<float*>(f.x), nullptr, p, ldm};
  emu::warp_matrix(emu_mma::store_tile, &arg, file, line);
}

}  // namespace cuda
}  // namespace convops

#else  // nvcc

// (mma.h's own __CUDA_AMPERE_MMA__ is undefined again at its end.)
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define CONVOPS_TENSOR_CORES 1
#else
#define CONVOPS_TENSOR_CORES 0
#endif

namespace convops {
namespace cuda {

template <typename scalar_t>
struct WmmaType;
template <>
struct WmmaType<c10::Half> { using frag = __half; using mem = __half; };
template <>
struct WmmaType<c10::BFloat16> { using frag = __nv_bfloat16; using mem = __nv_bfloat16; };
template <>
struct WmmaType<float> { using frag = nvcuda::wmma::precision::tf32; using mem = float; };

#if CONVOPS_TENSOR_CORES
template <typename scalar_t>
using MmaFragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, MmaK<scalar_t>::value,
                                        typename WmmaType<scalar_t>::frag,
                                        nvcuda::wmma::row_major>;
template <typename scalar_t>
using MmaFragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, MmaK<scalar_t>::value,
                                        typename WmmaType<scalar_t>::frag,
                                        nvcuda::wmma::col_major>;
template <typename scalar_t>
using MmaFragAcc =
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, MmaK<scalar_t>::value, float>;

template <typename Frag>
__device__ __forceinline__ void round_to_tf32(Frag& f, float*) {
#pragma unroll
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = nvcuda::wmma::__float_to_tf32(f.x[i]);
}
template <typename Frag, typename T>
__device__ __forceinline__ void round_to_tf32(Frag&, T*) {}

template <typename scalar_t>
__device__ __forceinline__ void mma_zero(MmaFragAcc<scalar_t>& f) {
  nvcuda::wmma::fill_fragment(f, 0.f);
}
template <typename scalar_t>
__device__ __forceinline__ void mma_load_a(MmaFragA<scalar_t>& f, const scalar_t* p, int ldm) {
  using mem = typename WmmaType<scalar_t>::mem;
  nvcuda::wmma::load_matrix_sync(f, reinterpret_cast<const mem*>(p), ldm);
  round_to_tf32(f, static_cast<mem*>(nullptr));
}
template <typename scalar_t>
__device__ __forceinline__ void mma_load_b(MmaFragB<scalar_t>& f, const scalar_t* p, int ldm) {
  using mem = typename WmmaType<scalar_t>::mem;
  nvcuda::wmma::load_matrix_sync(f, reinterpret_cast<const mem*>(p), ldm);
  round_to_tf32(f, static_cast<mem*>(nullptr));
}
template <typename scalar_t>
__device__ __forceinline__ void mma_run(MmaFragAcc<scalar_t>& d, const MmaFragA<scalar_t>& a,
                                        const MmaFragB<scalar_t>& b,
                                        const MmaFragAcc<scalar_t>& c) {
  nvcuda::wmma::mma_sync(d, a, b, c);
}
template <typename scalar_t>
__device__ __forceinline__ void mma_store(float* p, const MmaFragAcc<scalar_t>& f, int ldm) {
  nvcuda::wmma::store_matrix_sync(p, f, ldm, nvcuda::wmma::mem_row_major);
}
#endif  // CONVOPS_TENSOR_CORES

}  // namespace cuda
}  // namespace convops
#endif
