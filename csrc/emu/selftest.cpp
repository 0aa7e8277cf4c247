// The emulator's own test kernels, written in the device dialect like convops's kernels: each
// either computes something checkable or makes one of the mistakes the emulator must catch
// (tests/test_emulator.py says which). Emulator build only.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <string>

#include "cuda/dialect.h"

namespace convops {
namespace cuda {
namespace {

constexpr int kThreads = 64;

// out[i] = in[i] + in[i + 1] through shared memory, with or without the barrier between the
// writes and the reads. Without it the first threads read slots nobody wrote yet (NaN).
template <bool kBarrier>
__global__ void __launch_bounds__(kThreads)
neighbour_sum(const float* __restrict__ in, float* __restrict__ out, int n) {
  CONVOPS_SHARED_ARRAY(float, tile, kThreads + 1);
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  tile[threadIdx.x] = i < n ? in[i] : 0.f;
  if (threadIdx.x == 0) tile[kThreads] = i + kThreads < n ? in[i + kThreads] : 0.f;
  if (kBarrier) __syncthreads();
  if (i < n) out[i] = tile[threadIdx.x] + tile[threadIdx.x + 1];
}

// Reads one slot past what the block wrote (the last thread reads tile[kThreads]).
__global__ void __launch_bounds__(kThreads)
unwritten_shared(const float* __restrict__ in, float* __restrict__ out, int n) {
  CONVOPS_SHARED_ARRAY(float, tile, kThreads + 1);
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  tile[threadIdx.x] = i < n ? in[i] : 0.f;
  __syncthreads();
  if (i < n) out[i] = tile[threadIdx.x] + tile[threadIdx.x + 1];
}

// Warp-shuffle sum of each warp's 32 values, then one value per block through shared memory.
__global__ void __launch_bounds__(kThreads)
block_sum(const float* __restrict__ in, float* __restrict__ out, int n) {
  CONVOPS_SHARED_ARRAY(float, partial, kThreads / 32);
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = i < n ? in[i] : 0.f;
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) s += partial[w];
    out[blockIdx.x] = s;
  }
}

// Every lane gets lane 0's value (__shfl_sync), and the ballot of positive inputs.
__global__ void __launch_bounds__(kThreads)
broadcast_and_ballot(const float* __restrict__ in, float* __restrict__ out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const float v = i < n ? in[i] : 0.f;
  const float first = __shfl_sync(0xffffffffu, v, 0);
  const unsigned positive = __ballot_sync(0xffffffffu, v > 0.f);
  const int all = __all_sync(0xffffffffu, v > 0.f), any = __any_sync(0xffffffffu, v > 0.f);
  __syncwarp();
  if (i < n) out[i] = first + static_cast<float>(__builtin_popcount(positive)) + 100.f * all + 1000.f * any;
}

// Lanes past n return before the shuffle that names them: a GPU hangs or reads garbage.
__global__ void __launch_bounds__(kThreads)
shuffle_after_return(const float* __restrict__ in, float* __restrict__ out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float v = in[i];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  out[i] = v;
}

// Threads past n return before a barrier the others wait at.
__global__ void __launch_bounds__(kThreads)
barrier_after_return(const float* __restrict__ in, float* __restrict__ out, int n) {
  CONVOPS_SHARED_ARRAY(float, tile, kThreads);
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  tile[threadIdx.x] = in[i];
  __syncthreads();
  out[i] = tile[(threadIdx.x + 1) % kThreads];
}

// Even and odd threads wait at two different barriers.
__global__ void __launch_bounds__(kThreads)
divergent_barriers(const float* __restrict__ in, float* __restrict__ out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  if (i < n) out[i] = in[i];
}

// Reads one element past the end of the input (ASan reports it; nothing else can).
__global__ void __launch_bounds__(kThreads)
out_of_bounds_read(const float* __restrict__ in, float* __restrict__ out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = in[i + 1];
}

// Every thread adds 1 to out[0] and its value to out[1]: exact counts.
__global__ void __launch_bounds__(kThreads)
atomic_count(const float* __restrict__ in, float* __restrict__ out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  atomic_add(out, 1.f);
  atomic_add(out + 1, in[i]);
}

// Dynamic shared memory: reverses each block's slice. (kInstance: the opt-in test gets its own
// kernel, since an opt-in lasts for the process.)
template <int kInstance>
__global__ void __launch_bounds__(kThreads)
reverse_block(const float* __restrict__ in, float* __restrict__ out, int n) {
  CONVOPS_DYNAMIC_SHARED(float, tile);
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  tile[threadIdx.x] = i < n ? in[i] : 0.f;
  __syncthreads();
  const int j = blockIdx.x * blockDim.x + (blockDim.x - 1 - threadIdx.x);
  if (j < n) out[j] = tile[threadIdx.x];
}

// 8 KiB of static shared memory next to the launch's dynamic shared memory.
__global__ void __launch_bounds__(kThreads)
static_and_dynamic(const float* __restrict__ in, float* __restrict__ out, int n) {
  CONVOPS_SHARED_ARRAY(float, fixed, 2048);
  CONVOPS_DYNAMIC_SHARED(float, dynamic);
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  fixed[threadIdx.x] = i < n ? in[i] : 0.f;
  dynamic[threadIdx.x] = fixed[threadIdx.x];
  __syncthreads();
  if (i < n) out[i] = dynamic[threadIdx.x];
}

// One warp: out (16 x 16) = A (in[0:256], row-major) * B (in[256:512], row-major) on tensor
// cores in scalar_t. kMistake 1: lanes 16-31 skip the multiply; 2: B's pointer is off by one
// element (not 32-byte aligned); 3: the result is read straight out of the fragments as if
// lane l held entries l*8 .. l*8+7 (the mapping is unspecified).
template <typename scalar_t, int kMistake>
__global__ void __launch_bounds__(32)
mma_product(const float* __restrict__ in, float* __restrict__ out, int n) {
  CONVOPS_DYNAMIC_SHARED(unsigned char, smem);
  scalar_t* a = reinterpret_cast<scalar_t*>(smem);           // 16 x 16, row-major
  scalar_t* b = reinterpret_cast<scalar_t*>(smem + 1088);    // 16 x 16, column-major
  float* c = reinterpret_cast<float*>(smem + 2176);           // 16 x 16, row-major
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) {
    a[i] = static_cast<scalar_t>(in[i]);
    b[(i % 16) * 16 + i / 16] = static_cast<scalar_t>(in[256 + i]);
  }
  __syncthreads();
  constexpr int kK = MmaK<scalar_t>::value;
  MmaFragAcc<scalar_t> acc;
  mma_zero<scalar_t>(acc);
  if (kMistake != 1 || lane < 16) {
    for (int k0 = 0; k0 < 16; k0 += kK) {
      MmaFragA<scalar_t> fa;
      MmaFragB<scalar_t> fb;
      mma_load_a<scalar_t>(fa, a + k0, 16);
      mma_load_b<scalar_t>(fb, b + k0 + (kMistake == 2 ? 1 : 0), 16);
      mma_run<scalar_t>(acc, fa, fb, acc);
    }
  }
  if (kMistake == 3) {
    for (int e = 0; e < acc.num_elements && lane * acc.num_elements + e < n; ++e)
      out[lane * acc.num_elements + e] = acc.x[e];
    return;
  }
  mma_store<scalar_t>(c, acc, 16);
  __syncthreads();
  for (int i = lane; i < 256 && i < n; i += 32) out[i] = c[i];
}

using Kernel = void (*)(const float*, float*, int);

at::Tensor selftest(const std::string& name, const at::Tensor& input) {
  TORCH_CHECK(input.scalar_type() == at::kFloat && input.dim() == 1 && input.is_contiguous(),
              "selftest: input must be a contiguous 1-D float32 tensor");
  const int n = static_cast<int>(input.numel());
  at::Tensor out = at::empty({n}, input.options()).fill_(-1.f);
  const float* in = input.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  const int64_t blocks = blocks_for(n, kThreads);
  const LaunchConfig plain{Dim3(blocks), Dim3(kThreads), 0, kThreads};
  const auto run = [&](const char* kernel_name, Kernel kernel, const LaunchConfig& config) {
    launch_kernel(kernel_name, kernel, config, in, o, n);
  };
  if (name == "neighbour_sum") run("neighbour_sum", neighbour_sum<true>, plain);
  else if (name == "missing_syncthreads") run("neighbour_sum", neighbour_sum<false>, plain);
  else if (name == "unwritten_shared") run("unwritten_shared", unwritten_shared, plain);
  else if (name == "block_sum") run("block_sum", block_sum, plain);
  else if (name == "broadcast_and_ballot") run("broadcast_and_ballot", broadcast_and_ballot, plain);
  else if (name == "shuffle_after_return") run("shuffle_after_return", shuffle_after_return, plain);
  else if (name == "barrier_after_return") run("barrier_after_return", barrier_after_return, plain);
  else if (name == "divergent_barriers") run("divergent_barriers", divergent_barriers, plain);
  else if (name == "out_of_bounds_read") run("out_of_bounds_read", out_of_bounds_read, plain);
  else if (name == "reverse_block") {
    run("reverse_block", reverse_block<0>, {Dim3(blocks), Dim3(kThreads), kThreads * 4, kThreads});
  } else if (name == "atomic_count") {
    out.zero_();
    run("atomic_count", atomic_count, plain);
  }
  // Illegal launches: each breaks one rule the driver enforces.
  else if (name == "too_many_threads") run("block_sum", block_sum, {Dim3(1), Dim3(2048), 0, 2048});
  else if (name == "over_launch_bounds") run("block_sum", block_sum, {Dim3(1), Dim3(128), 0, kThreads});
  else if (name == "grid_y_too_large") run("block_sum", block_sum, {Dim3(1, 70000), Dim3(kThreads), 0, kThreads});
  else if (name == "grid_x_too_large") run("block_sum", block_sum, {Dim3(int64_t(1) << 31), Dim3(kThreads), 0, kThreads});
  else if (name == "too_much_dynamic_shared") {
    run("reverse_block", reverse_block<0>, {Dim3(blocks), Dim3(kThreads), 64 * 1024, kThreads});
  } else if (name == "static_plus_dynamic_over_48k") {
    run("static_and_dynamic", static_and_dynamic, {Dim3(blocks), Dim3(kThreads), 44 * 1024, kThreads});
  } else if (name == "opted_in_dynamic_shared") {
    allow_dynamic_shared(reverse_block<1>, 100 * 1024);
    run("reverse_block", reverse_block<1>, {Dim3(blocks), Dim3(kThreads), 100 * 1024, kThreads});
  } else if (name.rfind("mma_", 0) == 0) {
    TORCH_CHECK(n >= 512, "selftest: the mma kernels take 512 inputs");
    const LaunchConfig warp{Dim3(1), Dim3(32), 4096, 32};
    if (name == "mma_half") run("mma_product", mma_product<c10::Half, 0>, warp);
    else if (name == "mma_bfloat16") run("mma_product", mma_product<c10::BFloat16, 0>, warp);
    else if (name == "mma_tf32") run("mma_product", mma_product<float, 0>, warp);
    else if (name == "mma_half_warp") run("mma_product", mma_product<c10::Half, 1>, warp);
    else if (name == "mma_misaligned") run("mma_product", mma_product<c10::Half, 2>, warp);
    else if (name == "mma_lane_mapping") run("mma_product", mma_product<c10::Half, 3>, warp);
    else TORCH_CHECK(false, "selftest: unknown kernel '", name, "'");
  } else TORCH_CHECK(false, "selftest: unknown kernel '", name, "'");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(convops_emu, CPU, m) { m.impl("selftest", &selftest); }

}  // namespace cuda
}  // namespace convops
