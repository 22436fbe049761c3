// The CPU output cache (see lethe/cpu_alloc.h).
#include "lethe/cpu_alloc.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <map>
#include <mutex>

namespace lethe {
namespace {

constexpr size_t kMinCached = size_t(1) << 20;
constexpr size_t kAlign = 64;

class OutputCache {
 public:
  OutputCache() {
    // a value that is not a whole number of MiB >= 0 keeps the default (lethe._lib warns about it)
    const char* env = std::getenv("LETHE_CPU_CACHE_MB");
    long long mb = 1024;
    if (env != nullptr && *env != '\0') {
      char* end = nullptr;
      const long long v = std::strtoll(env, &end, 10);
      if (*end == '\0' && v >= 0) mb = v;
    }
    limit_ = mb > 0 ? size_t(mb) << 20 : 0;
  }

  void* take(size_t nbytes) {
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = free_.find(nbytes);  // exact size: repeated calls on one shape reuse one buffer
      if (it != free_.end()) {
        void* p = it->second;
        free_.erase(it);
        cached_ -= nbytes;
        ++hits_;
        return p;
      }
      ++misses_;
    }
    void* p = std::aligned_alloc(kAlign, (nbytes + kAlign - 1) / kAlign * kAlign);
    TORCH_CHECK(p != nullptr, "lethe: out of memory allocating ", nbytes, " bytes");
    return p;
  }

  void give(void* p, size_t nbytes) {
    std::lock_guard<std::mutex> g(mu_);
    if (nbytes > limit_) {
      std::free(p);
      return;
    }
    while (cached_ + nbytes > limit_ && !free_.empty()) {  // evict the largest first
      auto last = std::prev(free_.end());
      cached_ -= last->first;
      std::free(last->second);
      free_.erase(last);
    }
    free_.emplace(nbytes, p);
    cached_ += nbytes;
  }

  void release() {
    std::lock_guard<std::mutex> g(mu_);
    for (auto& kv : free_) std::free(kv.second);
    free_.clear();
    cached_ = 0;
  }

  CpuCacheStats stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {int64_t(cached_), int64_t(free_.size()), hits_, misses_, int64_t(limit_)};
  }

  size_t limit() const { return limit_; }

 private:
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
  size_t limit_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

OutputCache& cache() {
  static OutputCache* c = new OutputCache();  // never destroyed: tensors may die after exit
  return *c;
}

}  // namespace

at::Tensor cached_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t nbytes = size_t(numel) * c10::elementSize(dtype);
  auto& c = cache();
  if (nbytes < kMinCached || c.limit() == 0) return at::empty(sizes, at::TensorOptions().dtype(dtype));
  void* p = c.take(nbytes);
  return at::from_blob(
      p, sizes, [nbytes](void* q) { cache().give(q, nbytes); }, at::TensorOptions().dtype(dtype));
}

CpuCacheStats cpu_cache_stats() { return cache().stats(); }

void cpu_cache_release() { cache().release(); }

}  // namespace lethe
