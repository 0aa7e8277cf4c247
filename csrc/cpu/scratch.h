// Per-thread scratch buffers for the CPU kernels.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

namespace convops {
namespace cpu {

// Per-thread scratch that survives between calls (grow-only, at most the column budget per
// slot plus one image of input gradient), so steady-state calls neither allocate nor
// page-fault fresh memory. Contents are uninitialized.
constexpr int kScratchSlots = 8;

// 64-byte aligned (one cache line, one AVX-512 vector): a vector load from a 16-byte aligned
// malloc block straddles two lines every time.
template <typename T>
struct AlignedArray {
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data;
  int64_t size = 0;
  // Grows to at least `count` elements (contents are not kept); true if it reallocated.
  bool reserve(int64_t count) {
    if (size >= count) return false;
    const size_t bytes = (static_cast<size_t>(count) * sizeof(T) + 63) / 64 * 64;
    T* p = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (p == nullptr) throw std::bad_alloc();
    data.reset(p);
    size = count;
    return true;
  }
};

template <typename T>
T* scratch(int slot, int64_t count) {
  thread_local AlignedArray<T> buffers[kScratchSlots];
  buffers[slot].reserve(count);
  return buffers[slot].data.get();
}

}  // namespace cpu
}  // namespace convops
