// Test hook: how many times each CPU kernel path has run in this process, so that the tests
// can assert which path a case took (an ISA or engine switch that silently falls back to
// another path would otherwise pass unnoticed). Read from Python as _C.cpu_path_counts().
// One increment per call or per chunk, never per element: the cost is a mutex per call.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>

namespace convops {
namespace cpu {

struct PathCounts {
  std::mutex lock;
  std::map<std::string, int64_t> counts;
};

inline PathCounts& path_counts() {
  static PathCounts instance;  // inline function: one instance across the library's TUs
  return instance;
}

inline void count_path(const std::string& name, int64_t times = 1) {
  PathCounts& pc = path_counts();
  std::lock_guard<std::mutex> guard(pc.lock);
  pc.counts[name] += times;
}

inline std::map<std::string, int64_t> path_counts_snapshot() {
  PathCounts& pc = path_counts();
  std::lock_guard<std::mutex> guard(pc.lock);
  return pc.counts;
}

}  // namespace cpu
}  // namespace convops
