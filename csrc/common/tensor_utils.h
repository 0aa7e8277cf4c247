// Host-side helpers shared by the CPU and CUDA entry points.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdlib>
#include <cstring>
#include <limits>

namespace convops {

// Kernels exist for NCHW and NHWC; anything else (a strided view) is made dense in the layout
// the caller used, never silently converted to the other layout.
inline bool prefers_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

inline at::MemoryFormat layout_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// True when every listed tensor can be indexed with int32 arithmetic.
inline bool fits_int32(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors)
    if (t->defined() && t->numel() >= std::numeric_limits<int32_t>::max()) return false;
  return true;
}

inline bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

// With CONVOPS_POISON_OUTPUTS=1 (set by the test suite) freshly allocated outputs are filled
// with NaN before the kernels run, so an element a kernel forgets to write cannot pass as a
// lucky zero.
inline void poison_for_tests(at::Tensor& t) {
  if (t.numel() > 0 && env_is("CONVOPS_POISON_OUTPUTS", "1"))
    t.fill_(std::numeric_limits<double>::quiet_NaN());
}

// The gather engines' column-buffer size in elements: `fallback`, or CONVOPS_COLUMN_BUDGET
// when set (the tests shrink it to force chunks that start and end mid-row).
inline int64_t column_budget(int64_t fallback) {
  const char* v = std::getenv("CONVOPS_COLUMN_BUDGET");
  if (v == nullptr) return fallback;
  const long long parsed = std::atoll(v);
  return parsed > 0 ? static_cast<int64_t>(parsed) : fallback;
}

// Placeholder returned for a gradient the output mask did not ask for.
inline at::Tensor not_requested(const at::Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace convops
