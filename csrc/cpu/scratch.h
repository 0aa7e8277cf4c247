// Per-thread scratch buffers for the CPU kernels.
#pragma once

#include <cstdint>
#include <memory>

namespace convops {
namespace cpu {

// Per-thread scratch that survives between calls (grow-only, at most the column budget per
// slot plus one image of input gradient), so steady-state calls neither allocate nor
// page-fault fresh memory. Contents are uninitialized.
constexpr int kScratchSlots = 8;

template <typename T>
T* scratch(int slot, int64_t count) {
  struct Buffer {
    std::unique_ptr<T[]> data;
    int64_t size = 0;
  };
  thread_local Buffer buffers[kScratchSlots];
  Buffer& b = buffers[slot];
  if (b.size < count) {
    b.data.reset(new T[count]);
    b.size = count;
  }
  return b.data.get();
}

}  // namespace cpu
}  // namespace convops
