#pragma once
// Outputs of CPU kernels come from a small cache of large buffers. A fresh multi-megabyte
// allocation is mmap'ed by malloc and its first write page-faults every 4 KiB page, which costs
// several times the kernel itself on a bandwidth-bound op; a cached buffer is already mapped.
// Buffers return to the cache when their tensor dies. Size limit: LETHE_CPU_CACHE_MB (default
// 1024; 0 disables). Buffers under 1 MiB use the ordinary allocator.
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace lethe {

at::Tensor cached_empty(at::IntArrayRef sizes, at::ScalarType dtype);

struct CpuCacheStats {
  int64_t cached_bytes;
  int64_t cached_buffers;
  int64_t hits;
  int64_t misses;
  int64_t limit_bytes;
};

CpuCacheStats cpu_cache_stats();
void cpu_cache_release();

}  // namespace lethe
