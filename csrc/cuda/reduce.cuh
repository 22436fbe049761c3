#pragma once
// Block-wide reductions of the row kernels (blockDim.x a multiple of 32, at most 1024). Each ends
// with a barrier, so shared scratch may be reused right after and every thread gets the result.
#include <cuda_runtime.h>

#include <cmath>

namespace lethe {
namespace cuda {

constexpr unsigned kFull = 0xffffffffu;

template <typename T>  // float, double, or int64_t for exact counts
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T sh[32];
  v = warp_sum(v);
  const int w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if ((threadIdx.x & 31) == 0) sh[w] = v;
  __syncthreads();
  T r = 0;
  for (int i = 0; i < nw; ++i) r += sh[i];
  __syncthreads();
  return r;
}

// Online log-sum-exp: s = sum exp(x - m) over the elements seen. -inf adds nothing, NaN poisons
// s, +inf is kept as m = inf with finite s (so lse = inf, as torch.logsumexp).
struct MaxSum {
  float m, s;
};

__device__ __forceinline__ MaxSum ms_init() { return {-INFINITY, 0.0f}; }

__device__ __forceinline__ void ms_add(MaxSum& a, float x) {
  if (x > a.m) {
    a.s = a.s * expf(a.m - x) + 1.0f;
    a.m = x;
  } else if (x != -INFINITY) {
    a.s += x == a.m ? 1.0f : expf(x - a.m);
  }
}

__device__ __forceinline__ MaxSum ms_merge(MaxSum a, MaxSum b) {
  if (b.m > a.m) {
    const MaxSum t = a;
    a = b;
    b = t;
  }
  a.s += b.s * (b.m == a.m ? 1.0f : expf(b.m - a.m));
  return a;
}

__device__ __forceinline__ float ms_lse(MaxSum a) {
  if (a.s != a.s) return NAN;
  if (a.m == -INFINITY || a.m == INFINITY) return a.m;
  return a.m + logf(a.s);
}

__device__ __forceinline__ MaxSum block_maxsum(MaxSum v) {
  __shared__ float shm[32], shs[32];
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum u{__shfl_xor_sync(kFull, v.m, o), __shfl_xor_sync(kFull, v.s, o)};
    v = ms_merge(v, u);
  }
  const int w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if ((threadIdx.x & 31) == 0) {
    shm[w] = v.m;
    shs[w] = v.s;
  }
  __syncthreads();
  MaxSum r = ms_init();
  for (int i = 0; i < nw; ++i) r = ms_merge(r, MaxSum{shm[i], shs[i]});
  __syncthreads();
  return r;
}

}  // namespace cuda
}  // namespace lethe
