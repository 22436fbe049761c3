// CUDA kernels of the gu family (the retain subspace of Geometric-Disentanglement Unlearning):
// subspace_dots (inner products, or the Gram matrix), subspace_axpy, subspace_transform.
// Definitions: python/lethe/ops/gu_reference.py; same semantics and per-element arithmetic as
// csrc/cpu/gu.cpp (lethe/gu.h).
//
// Why it is built this way:
//  * The ops stream over a whole parameter list (hundreds of tensors, up to billions of elements)
//    with a tiny amount of arithmetic per byte: they are bandwidth-bound, so each op is one launch
//    for the whole list (two when the list mixes fp32 and fp64 bases: the kernels are templates
//    on the compute type, so that an fp32 list never pays the fp64 kernel's registers), never one
//    per tensor or per direction.
//  * The list is described by a table (per tensor: addresses, row length, K_t, scope, dtype codes;
//    the CUDA blocks' start indices; the scopes' partials ranges), built on the host and copied to
//    the device on the current stream from pinned memory (one copy; kernel parameters are too
//    small for 200 tensors). A CUDA block finds its tensor by a binary search over the starts.
//  * Data of any float dtype (mixed within a list) is converted on load by a switch on a code
//    that is uniform over the block (one kernel per compute type, not one per dtype combination).
//  * Determinism without float atomics: as on the CPU, the sums run in the compute type within each
//    block of gu::kBlock elements of a tensor (a fixed partition), then in fp64. A CUDA block takes
//    G consecutive kBlocks of one tensor (G from the list's size only, so that the partials stay
//    under ~2 MB (~10 MB for the Gram) whatever the model size) and writes one fp64 partial per
//    output; a second small kernel sums each scope's partials (contiguous: blocks are numbered
//    scope by scope, tensors in list order) in a fixed order, one warp per output.
//  * dots: K_t + 1 register accumulators per thread. The Gram (up to 17 x 17, in the Adam
//    projection's hot path) would need 153 accumulators per thread: instead each chunk of 256
//    elements (all rows, and u) is staged in shared memory once, and 4 groups of 64 threads split
//    the upper triangle by rows ({0,1}, {2..4}, {5..8}, {9..16}: 33, 42, 42, 36 entries), each
//    with at most 42 accumulators, so every value is read from DRAM once and u computed once.
//  * Loops over rows are unrolled to kMaxRows with a uniform early exit at K_t, so that the
//    accumulators and row values stay in registers (static indices) and the work follows K_t.
//  * transform: each thread reads an element's K_t rows into registers, then writes the K_t new
//    ones (in place, elements owned by one thread); the K_t x K_t coefficients stay in shared
//    memory, read 16 bytes at a time (held in registers, 256 of them would spill).
//  * Indices are int64 throughout (rows of more than 2^31 elements).
// Nothing here syncs with the host; the ops read no value that could be out of range. The table
// copy makes them unsuitable for CUDA-graph capture (as the Triton twins' table).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "errors.cuh"
#include "lethe/gu.h"
#include "lethe/gu_checks.h"
#include "reduce.cuh"

namespace lethe {
namespace {

using gu::kBlock;
constexpr int kMaxRows = static_cast<int>(gu::kMaxRows);  // 16
constexpr int kRows = kMaxRows + 1;                         // basis rows and x
constexpr int kTri = kRows * (kRows + 1) / 2;               // 153: the Gram's upper triangle
constexpr int kThreads = 256;                               // every kernel but the final sums
constexpr int kWarps = kThreads / 32;
static_assert(kBlock % kThreads == 0, "a kBlock is a whole number of block-wide steps");
constexpr int64_t kMaxGrid = 16384;     // most CUDA blocks of dots / axpy / transform (then G grows)
constexpr int64_t kMaxGridGram = 8192;  // of the Gram (153 partials per block)

// Gram: 4 groups of 64 threads, each owning the triangle's entries of a range of rows.
constexpr int kParts = 4;
constexpr int kPartThreads = kThreads / kParts;
constexpr int kSub = kThreads;  // elements staged per step
static_assert(kPartThreads % 32 == 0 && kSub % kPartThreads == 0, "whole warps per part");
__host__ __device__ constexpr int part_row(int p) { return p == 0 ? 0 : p == 1 ? 2 : p == 2 ? 5 : p == 3 ? 9 : kRows; }
// The packed upper triangle of the kRows x kRows Gram (gu::tri_index with n = kRows).
__host__ __device__ constexpr int tri17(int i, int j) { return i * kRows - i * (i - 1) / 2 + (j - i); }
constexpr int kPartMax = 42;
static_assert(tri17(part_row(1), part_row(1)) - tri17(0, 0) <= kPartMax &&
                  tri17(part_row(2), part_row(2)) - tri17(part_row(1), part_row(1)) <= kPartMax &&
                  tri17(part_row(3), part_row(3)) - tri17(part_row(2), part_row(2)) <= kPartMax &&
                  kTri - tri17(part_row(3), part_row(3)) <= kPartMax,
              "part sizes");

// dtype codes of the data tensors
enum : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

int32_t dtype_code(at::ScalarType s) {
  switch (s) {
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    default: return kF32;  // the checks allow float32 only besides
  }
}

// One tensor of the list, as the kernels see it.
struct Entry {
  const void* basis;  // [kt, numel] of the compute type
  const void* x;      // dots: x (nullptr: none); axpy: the source (x, or out in place)
  const void* v;      // dots: exp_avg_sq (nullptr: none)
  void* out;          // axpy: out
  int64_t numel;      // elements of a row
  int64_t out0;       // the index of its first CUDA block among the partials
  int32_t kt, scope;
  int32_t xcode, vcode, ocode, pad;
};

// ---- device helpers

template <typename acc_t>
__device__ __forceinline__ acc_t load_any(const void* p, int32_t code, int64_t i) {
  switch (code) {
    case kF16: return gu::load<acc_t>(static_cast<const c10::Half*>(p), i);
    case kBF16: return gu::load<acc_t>(static_cast<const c10::BFloat16*>(p), i);
    case kF64: return gu::load<acc_t>(static_cast<const double*>(p), i);
    default: return gu::load<acc_t>(static_cast<const float*>(p), i);
  }
}

template <typename acc_t>
__device__ __forceinline__ void store_any(void* p, int32_t code, int64_t i, acc_t v) {
  switch (code) {
    case kF16: static_cast<c10::Half*>(p)[i] = gu::store_cast<c10::Half>(v); break;
    case kBF16: static_cast<c10::BFloat16*>(p)[i] = gu::store_cast<c10::BFloat16>(v); break;
    case kF64: static_cast<double*>(p)[i] = gu::store_cast<double>(v); break;
    default: static_cast<float*>(p)[i] = gu::store_cast<float>(v); break;
  }
}

// The entry of CUDA block b: the last i with starts[i] <= b (starts strictly increasing, starts[0] = 0).
__device__ __forceinline__ int find_entry(const int64_t* __restrict__ starts, int n, int64_t b) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (starts[mid] <= b)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// What a CUDA block works on: its entry, its kBlocks [kb0, kb1) and its partials column.
struct Work {
  Entry e;
  int64_t kb0, kb1, col;
};

__device__ __forceinline__ Work find_work(const Entry* __restrict__ tab, const int64_t* __restrict__ starts, int n,
                                          int64_t G) {
  const int64_t b = blockIdx.x;
  const int t = find_entry(starts, n, b);
  Work w;
  w.e = tab[t];
  const int64_t lb = b - starts[t];
  w.kb0 = lb * G;
  w.kb1 = min(w.kb0 + G, gu::num_blocks(w.e.numel));
  w.col = w.e.out0 + lb;
  return w;
}

// ---- subspace_dots, gram = False: per kBlock, acc[i] = sum q_i w and ax = sum x w (w = u x);
// partial slots 0..kt-1 and kt (x).

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    gu_dots_kernel(const Entry* __restrict__ tab, const int64_t* __restrict__ starts, int ntab, int64_t G, acc_t eps,
                   double* __restrict__ part, int64_t nparts) {
  __shared__ acc_t sh[kWarps][kRows];
  const Work w = find_work(tab, starts, ntab, G);
  const int kt = w.e.kt;
  const int64_t n = w.e.numel;
  const acc_t* __restrict__ q = static_cast<const acc_t*>(w.e.basis);
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  double run = 0.0;  // thread j <= kt: the fp64 sum of slot j over this block's kBlocks
  for (int64_t kb = w.kb0; kb < w.kb1; ++kb) {
    acc_t acc[kMaxRows];
    LETHE_UNROLL
    for (int j = 0; j < kMaxRows; ++j) acc[j] = acc_t(0);
    acc_t ax = 0;
    const int64_t end = min((kb + 1) * kBlock, n);
    for (int64_t i = kb * kBlock + threadIdx.x; i < end; i += kThreads) {
      const acc_t xv = load_any<acc_t>(w.e.x, w.e.xcode, i);
      const acc_t wv = w.e.v ? xv * gu::metric_weight<acc_t>(load_any<acc_t>(w.e.v, w.e.vcode, i), eps) : xv;
      LETHE_UNROLL
      for (int j = 0; j < kMaxRows; ++j) {
        if (j >= kt) break;
        acc[j] += __ldg(q + j * n + i) * wv;
      }
      ax += xv * wv;
    }
    LETHE_UNROLL
    for (int j = 0; j < kMaxRows; ++j) {
      if (j >= kt) break;
      const acc_t s = cuda::warp_sum(acc[j]);
      if (lane == 0) sh[wid][j] = s;
    }
    ax = cuda::warp_sum(ax);
    if (lane == 0) sh[wid][kt] = ax;
    __syncthreads();
    if (threadIdx.x <= kt) {
      acc_t s = sh[0][threadIdx.x];
      for (int k = 1; k < kWarps; ++k) s += sh[k][threadIdx.x];
      run += static_cast<double>(s);
    }
    __syncthreads();
  }
  if (threadIdx.x < kRows) part[threadIdx.x * nparts + w.col] = run;  // 0 past kt
}

// ---- subspace_dots, gram = True: rows z_0..z_{kt-1} = basis, z_kt = x (when given), n = kt + has_x;
// per kBlock sum_e (u z_i) z_j for i <= j < n, packed as tri17 (partial slots 0..kTri).

template <int P, typename acc_t>
__device__ __forceinline__ void gram_part(acc_t (&acc)[kPartMax], const acc_t (*zs)[kSub], int nr, int ptid) {
  constexpr int R0 = part_row(P), R1 = part_row(P + 1), A0 = tri17(R0, R0);
#pragma unroll 1
  for (int m = 0; m < kSub / kPartThreads; ++m) {
    const int e = ptid + m * kPartThreads;
    const acc_t u = zs[kRows][e];
    acc_t z[kRows - R0];
    LETHE_UNROLL
    for (int j = R0; j < kRows; ++j) {
      if (j >= nr) break;
      z[j - R0] = zs[j][e];
    }
    LETHE_UNROLL
    for (int i = R0; i < R1; ++i) {
      if (i >= nr) break;
      const acc_t wi = u * z[i - R0];
      LETHE_UNROLL
      for (int j = i; j < kRows; ++j) {
        if (j >= nr) break;
        acc[tri17(i, j) - A0] += wi * z[j - R0];
      }
    }
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    gu_gram_kernel(const Entry* __restrict__ tab, const int64_t* __restrict__ starts, int ntab, int64_t G, acc_t eps,
                   double* __restrict__ part, int64_t nparts) {
  __shared__ acc_t zs[kRows + 1][kSub];  // rows, then u
  __shared__ acc_t red[kWarps][kPartMax];
  const Work w = find_work(tab, starts, ntab, G);
  const int kt = w.e.kt;
  const bool has_x = w.e.x != nullptr, has_v = w.e.v != nullptr;
  const int nr = kt + (has_x ? 1 : 0);
  const int64_t n = w.e.numel;
  const acc_t* __restrict__ q = static_cast<const acc_t*>(w.e.basis);
  const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
  const int p = tid / kPartThreads, ptid = tid % kPartThreads;
  const int cnt = tri17(part_row(p + 1), part_row(p + 1)) - tri17(part_row(p), part_row(p));  // entries of part p
  // the part and its entry of the triangle slot this thread sums (tid < kTri)
  const int sp = tid < tri17(part_row(1), part_row(1))   ? 0
                 : tid < tri17(part_row(2), part_row(2)) ? 1
                 : tid < tri17(part_row(3), part_row(3)) ? 2
                                                         : 3;
  const int sa = tid - tri17(part_row(sp), part_row(sp));
  double run = 0.0;  // thread t < kTri: the fp64 sum of triangle slot t
  for (int64_t kb = w.kb0; kb < w.kb1; ++kb) {
    acc_t acc[kPartMax];
    LETHE_UNROLL
    for (int a = 0; a < kPartMax; ++a) acc[a] = acc_t(0);
    const int64_t end = min((kb + 1) * kBlock, n);
    for (int64_t s0 = kb * kBlock; s0 < end; s0 += kSub) {
      const int64_t i = s0 + tid;
      if (i < end) {
        const acc_t* qj = q + i;
        LETHE_UNROLL
        for (int j = 0; j < kMaxRows; ++j, qj += n) {
          if (j >= kt) break;
          zs[j][tid] = __ldg(qj);
        }
        if (has_x) zs[kt][tid] = load_any<acc_t>(w.e.x, w.e.xcode, i);
        zs[kRows][tid] = has_v ? gu::metric_weight<acc_t>(load_any<acc_t>(w.e.v, w.e.vcode, i), eps) : acc_t(1);
      } else {  // past the end: zeros, which add nothing
        for (int j = 0; j < nr; ++j) zs[j][tid] = acc_t(0);
        zs[kRows][tid] = acc_t(0);
      }
      __syncthreads();
      switch (p) {  // uniform per warp
        case 0: gram_part<0>(acc, zs, nr, ptid); break;
        case 1: gram_part<1>(acc, zs, nr, ptid); break;
        case 2: gram_part<2>(acc, zs, nr, ptid); break;
        default: gram_part<3>(acc, zs, nr, ptid); break;
      }
      __syncthreads();
    }
    LETHE_UNROLL
    for (int a = 0; a < kPartMax; ++a) {
      if (a >= cnt) break;
      const acc_t s = cuda::warp_sum(acc[a]);
      if (lane == 0) red[wid][a] = s;
    }
    __syncthreads();
    if (tid < kTri) {
      constexpr int kWarpsPerPart = kPartThreads / 32;
      acc_t s = red[sp * kWarpsPerPart][sa];
      for (int k = 1; k < kWarpsPerPart; ++k) s += red[sp * kWarpsPerPart + k][sa];
      run += static_cast<double>(s);
    }
    __syncthreads();
  }
  if (tid < kTri) part[tid * nparts + w.col] = run;  // 0 for entries past nr
}

// ---- subspace_axpy: y = scale (src - sum_i c_i q_i) (gu::axpy_value) into out; per kBlock
// acc[i] = sum q_i y (dots) and ay = sum y^2; partial slots 0..kt-1 and kt.

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    gu_axpy_kernel(const Entry* __restrict__ tab, const int64_t* __restrict__ starts, int ntab, int64_t G,
                   const double* __restrict__ coeff, int64_t cs0, int64_t cs1, const double* __restrict__ scale,
                   int64_t ss0, bool dots, double* __restrict__ part, int64_t nparts) {
  __shared__ acc_t c[kMaxRows];
  __shared__ acc_t sh[kWarps][kRows];
  const Work w = find_work(tab, starts, ntab, G);
  const int kt = w.e.kt;
  const int64_t n = w.e.numel;
  const acc_t* __restrict__ q = static_cast<const acc_t*>(w.e.basis);
  if (threadIdx.x < kt) c[threadIdx.x] = static_cast<acc_t>(coeff[w.e.scope * cs0 + threadIdx.x * cs1]);
  const acc_t sc = static_cast<acc_t>(scale[w.e.scope * ss0]);
  __syncthreads();
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  double run = 0.0;
  for (int64_t kb = w.kb0; kb < w.kb1; ++kb) {
    acc_t acc[kMaxRows];
    LETHE_UNROLL
    for (int j = 0; j < kMaxRows; ++j) acc[j] = acc_t(0);
    acc_t ay = 0;
    const int64_t end = min((kb + 1) * kBlock, n);
    for (int64_t i = kb * kBlock + threadIdx.x; i < end; i += kThreads) {
      acc_t qv[kMaxRows];
      LETHE_UNROLL
      for (int j = 0; j < kMaxRows; ++j) {
        if (j >= kt) break;
        qv[j] = __ldg(q + j * n + i);
      }
      acc_t s = load_any<acc_t>(w.e.x, w.e.xcode, i);  // may be out itself: read before the store
      LETHE_UNROLL
      for (int j = 0; j < kMaxRows; ++j) {
        if (j >= kt) break;
        s -= c[j] * qv[j];
      }
      const acc_t y = sc * s;
      store_any<acc_t>(w.e.out, w.e.ocode, i, y);
      ay += y * y;
      if (dots) {
        LETHE_UNROLL
        for (int j = 0; j < kMaxRows; ++j) {
          if (j >= kt) break;
          acc[j] += qv[j] * y;
        }
      }
    }
    if (dots) {
      LETHE_UNROLL
      for (int j = 0; j < kMaxRows; ++j) {
        if (j >= kt) break;
        const acc_t r = cuda::warp_sum(acc[j]);
        if (lane == 0) sh[wid][j] = r;
      }
    }
    ay = cuda::warp_sum(ay);
    if (lane == 0) sh[wid][kt] = ay;
    __syncthreads();
    if (threadIdx.x == kt || (dots && threadIdx.x < kt)) {
      acc_t r = sh[0][threadIdx.x];
      for (int k = 1; k < kWarps; ++k) r += sh[k][threadIdx.x];
      run += static_cast<double>(r);
    }
    __syncthreads();
  }
  if (threadIdx.x < kRows) part[threadIdx.x * nparts + w.col] = run;
}

// ---- subspace_transform: in place, per element q'_a = sum_j c_aj q_j (all kt old values read first).

// Coefficients read from shared memory 16 bytes at a time by volatile loads: plain loads would be
// hoisted out of the element loop, all K^2 of them, into registers (and spill).
__device__ __forceinline__ void lds16(const float* p, float (&v)[4]) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(v[0]), "=f"(v[1]), "=f"(v[2]), "=f"(v[3]) : "r"(a));
}
__device__ __forceinline__ void lds16(const double* p, double (&v)[2]) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ld.shared.v2.f64 {%0, %1}, [%2];" : "=d"(v[0]), "=d"(v[1]) : "r"(a));
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    gu_transform_kernel(const Entry* __restrict__ tab, const int64_t* __restrict__ starts, int ntab, int64_t G,
                        const double* __restrict__ coeff, int64_t cs0, int64_t cs1, int64_t cs2) {
  constexpr int V = 16 / sizeof(acc_t);  // coefficients per 16-byte load
  __shared__ __align__(16) acc_t c[kMaxRows][kMaxRows];
  const Work w = find_work(tab, starts, ntab, G);
  const int kt = w.e.kt;
  const int64_t n = w.e.numel;
  for (int k = threadIdx.x; k < kMaxRows * kMaxRows; k += kThreads) {
    const int a = k / kMaxRows, j = k % kMaxRows;
    c[a][j] = a < kt && j < kt ? static_cast<acc_t>(coeff[w.e.scope * cs0 + a * cs1 + j * cs2]) : acc_t(0);
  }
  __syncthreads();
  acc_t* q = static_cast<acc_t*>(const_cast<void*>(w.e.basis));
  const int64_t end = min(w.kb1 * kBlock, n);
  for (int64_t i = w.kb0 * kBlock + threadIdx.x; i < end; i += kThreads) {
    acc_t r[kMaxRows];
    LETHE_UNROLL
    for (int j = 0; j < kMaxRows; ++j) {
      if (j >= kt) break;
      r[j] = q[j * n + i];
    }
#pragma unroll 1
    for (int a = 0; a < kt; ++a) {
      acc_t s = 0;
      LETHE_UNROLL
      for (int j0 = 0; j0 < kMaxRows; j0 += V) {
        if (j0 >= kt) break;
        acc_t cv[V];
        lds16(&c[a][j0], cv);
        LETHE_UNROLL
        for (int l = 0; l < V; ++l) {
          const int j = j0 + l;
          if (j >= kt) break;
          s = j == 0 ? cv[l] * r[0] : s + cv[l] * r[j];  // c_a0 q_0 + c_a1 q_1 + ..., as the CPU
        }
      }
      q[a * n + i] = s;
    }
  }
}

// ---- the per-scope sums of the partials: one warp per output entry, lanes over the scope's
// blocks in a fixed order, then the warp's tree.

enum : int32_t { kModeDots = 0, kModeGram = 1, kModeAxpy = 2 };

__global__ void __launch_bounds__(kThreads)
    gu_scope_sums_kernel(const double* __restrict__ part, int64_t nparts, const int64_t* __restrict__ scope_b,
                         const int32_t* __restrict__ scope_k, int64_t S, int K, int32_t mode, bool flag,
                         double* __restrict__ out) {
  const int64_t K1 = K + 1, E = mode == kModeGram ? K1 * K1 : K1;
  const int lane = threadIdx.x & 31;
  const int64_t nw = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); o < S * E; o += nw) {
    const int64_t s = o / E, r = o % E;
    const int ks = scope_k[s];
    int64_t slot = -1;
    if (mode == kModeGram) {  // flag: x given (row K)
      const int64_t gi = r / K1, gj = r % K1;
      const int64_t li = gi < ks ? gi : (gi == K && flag ? ks : -1);
      const int64_t lj = gj < ks ? gj : (gj == K && flag ? ks : -1);
      if (li >= 0 && lj >= 0) slot = li <= lj ? tri17(li, lj) : tri17(lj, li);
    } else {  // axpy's flag: dots (columns < K)
      slot = r < ks ? r : (r == K ? ks : -1);
      if (mode == kModeAxpy && !flag && r < K) slot = -1;
    }
    double sum = 0.0;
    if (slot >= 0) {
      const double* p = part + slot * nparts;
      for (int64_t b = scope_b[s] + lane; b < scope_b[s + 1]; b += 32) sum += p[b];
    }
    sum = cuda::warp_sum(sum);
    if (lane == 0) out[o] = sum;
  }
}

// ---- host side

int64_t row_numel(const at::Tensor& b) {
  int64_t n = 1;
  for (int64_t d = 1; d < b.dim(); ++d) n *= b.size(d);
  return n;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
size_t align16(size_t n) { return (n + 15) & ~size_t(15); }

enum class Op { kDots, kGram, kAxpy, kTransform };

// The table of one op on the device, and how to launch over it: group 0 holds the tensors with an
// fp32 basis, group 1 those with an fp64 one (tensors with no work get no entry).
struct Plan {
  at::Tensor dev;  // the table (kept alive until the kernels are queued; stream-ordered reuse)
  const Entry* tab[2] = {nullptr, nullptr};
  const int64_t* starts[2] = {nullptr, nullptr};
  int n[2] = {0, 0};
  int64_t blocks[2] = {0, 0};
  int64_t G = 1, nparts = 0;
  const int64_t* scope_b = nullptr;  // [S + 1]: the scopes' ranges of partials
  const int32_t* scope_k = nullptr;  // [S]: K_t of each scope (0 when it has no tensor)
};

// src: the data read per tensor (dots: x; axpy: x or out), v: exp_avg_sq, out: axpy's out.
Plan make_plan(Op op, at::TensorList basis, const at::TensorList* src, const at::TensorList* v,
               const at::TensorList* out, at::IntArrayRef scope, int64_t S) {
  const size_t T = basis.size();
  std::vector<Entry> ent(T);
  std::vector<int64_t> nkb(T, 0);
  std::vector<char> active(T, 0);
  int64_t total_kb = 0;
  for (size_t t = 0; t < T; ++t) {
    const at::Tensor& b = basis[t];
    Entry& e = ent[t];
    std::memset(&e, 0, sizeof(e));
    e.basis = b.const_data_ptr();
    e.numel = row_numel(b);
    e.kt = static_cast<int32_t>(b.size(0));
    e.scope = static_cast<int32_t>(scope[t]);
    if (src) {
      e.x = (*src)[t].const_data_ptr();
      e.xcode = dtype_code((*src)[t].scalar_type());
    }
    if (v) {
      e.v = (*v)[t].const_data_ptr();
      e.vcode = dtype_code((*v)[t].scalar_type());
    }
    if (out) {
      e.out = (*out)[t].mutable_data_ptr();
      e.ocode = dtype_code((*out)[t].scalar_type());
    }
    bool work = e.numel > 0;
    if (op == Op::kGram) work = work && e.kt + (src ? 1 : 0) > 0;
    if (op == Op::kTransform) work = work && e.kt > 0;
    active[t] = work;
    if (work) {
      nkb[t] = gu::num_blocks(e.numel);
      total_kb += nkb[t];
    }
  }
  Plan plan;
  plan.G = std::max<int64_t>(1, ceil_div(total_kb, op == Op::kGram ? kMaxGridGram : kMaxGrid));
  // partials: scope by scope, tensors in list order
  const bool scoped = op != Op::kTransform;
  std::vector<int64_t> scope_b(scoped ? S + 1 : 0, 0);
  std::vector<int32_t> scope_k(scoped ? S : 0, 0);
  std::vector<int64_t> cb(T, 0);
  for (size_t t = 0; t < T; ++t) {
    cb[t] = active[t] ? ceil_div(nkb[t], plan.G) : 0;
    if (scoped) {
      scope_b[ent[t].scope + 1] += cb[t];
      scope_k[ent[t].scope] = ent[t].kt;
    }
  }
  if (scoped) {
    for (int64_t s = 0; s < S; ++s) scope_b[s + 1] += scope_b[s];
    plan.nparts = scope_b[S];
    std::vector<int64_t> used(scope_b.begin(), scope_b.end() - 1);
    for (size_t t = 0; t < T; ++t) {
      ent[t].out0 = used[ent[t].scope];
      used[ent[t].scope] += cb[t];
    }
  }
  std::vector<Entry> tab[2];
  std::vector<int64_t> starts[2];
  for (size_t t = 0; t < T; ++t) {
    if (!cb[t]) continue;
    const int g = basis[t].scalar_type() == at::kDouble ? 1 : 0;
    starts[g].push_back(plan.blocks[g]);
    tab[g].push_back(ent[t]);
    plan.blocks[g] += cb[t];
  }
  // one buffer: entries (group 0, group 1), starts 0, starts 1, scope_b, scope_k
  size_t off = 0;
  const size_t o_tab = off;
  off = align16(off + sizeof(Entry) * (tab[0].size() + tab[1].size()));
  const size_t o_st0 = off;
  off = align16(off + sizeof(int64_t) * starts[0].size());
  const size_t o_st1 = off;
  off = align16(off + sizeof(int64_t) * starts[1].size());
  const size_t o_sb = off;
  off = align16(off + sizeof(int64_t) * scope_b.size());
  const size_t o_sk = off;
  off = align16(off + sizeof(int32_t) * scope_k.size());
  const int64_t bytes = static_cast<int64_t>(std::max<size_t>(off, 16));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  char* h = static_cast<char*>(host.mutable_data_ptr());
  std::memset(h, 0, static_cast<size_t>(bytes));
  if (!tab[0].empty()) std::memcpy(h + o_tab, tab[0].data(), sizeof(Entry) * tab[0].size());
  if (!tab[1].empty()) std::memcpy(h + o_tab + sizeof(Entry) * tab[0].size(), tab[1].data(), sizeof(Entry) * tab[1].size());
  if (!starts[0].empty()) std::memcpy(h + o_st0, starts[0].data(), sizeof(int64_t) * starts[0].size());
  if (!starts[1].empty()) std::memcpy(h + o_st1, starts[1].data(), sizeof(int64_t) * starts[1].size());
  if (!scope_b.empty()) std::memcpy(h + o_sb, scope_b.data(), sizeof(int64_t) * scope_b.size());
  if (!scope_k.empty()) std::memcpy(h + o_sk, scope_k.data(), sizeof(int32_t) * scope_k.size());
  plan.dev = at::empty({bytes}, basis[0].options().dtype(at::kByte));
  plan.dev.copy_(host, /*non_blocking=*/true);  // on the current stream; the pinned block is reused after it
  const char* d = static_cast<const char*>(plan.dev.const_data_ptr());
  plan.tab[0] = reinterpret_cast<const Entry*>(d + o_tab);
  plan.tab[1] = plan.tab[0] + tab[0].size();
  plan.starts[0] = reinterpret_cast<const int64_t*>(d + o_st0);
  plan.starts[1] = reinterpret_cast<const int64_t*>(d + o_st1);
  plan.n[0] = static_cast<int>(tab[0].size());
  plan.n[1] = static_cast<int>(tab[1].size());
  plan.scope_b = reinterpret_cast<const int64_t*>(d + o_sb);
  plan.scope_k = reinterpret_cast<const int32_t*>(d + o_sk);
  return plan;
}

unsigned grid_of(int64_t blocks) { return static_cast<unsigned>(blocks); }  // <= kMaxGrid + T

void scope_sums(const Plan& plan, const at::Tensor& part, int64_t S, int64_t K, int32_t mode, bool flag,
                at::Tensor& out, cudaStream_t stream) {
  const int64_t E = mode == kModeGram ? (K + 1) * (K + 1) : K + 1;
  const int64_t blocks = std::min<int64_t>(ceil_div(S * E, kWarps), 4096);
  gu_scope_sums_kernel<<<grid_of(blocks), kThreads, 0, stream>>>(
      plan.nparts ? part.const_data_ptr<double>() : nullptr, plan.nparts, plan.scope_b, plan.scope_k, S,
      static_cast<int>(K), mode, flag, out.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor subspace_dots_cuda(at::TensorList basis, const std::optional<at::TensorList>& x,
                              const std::optional<at::TensorList>& exp_avg_sq, double eps, at::IntArrayRef scope,
                              int64_t num_scopes, bool gram) {
  check_subspace_dots(basis, x, exp_avg_sq, eps, scope, num_scopes, gram);
  const c10::cuda::CUDAGuard guard(basis[0].device());
  cuda::bad_value_record(basis[0].get_device());  // raises one recorded by an earlier call
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  int64_t K = 0;
  for (const at::Tensor& b : basis) K = std::max<int64_t>(K, b.size(0));
  const int64_t S = num_scopes, K1 = K + 1;
  const auto f64 = basis[0].options().dtype(at::kDouble);
  at::Tensor out = gram ? at::empty({S, K1, K1}, f64) : at::empty({S, K1}, f64);
  const at::TensorList xs = x.has_value() ? *x : at::TensorList();
  const at::TensorList vs = exp_avg_sq.has_value() ? *exp_avg_sq : at::TensorList();
  const Plan plan = make_plan(gram ? Op::kGram : Op::kDots, basis, x.has_value() ? &xs : nullptr,
                              exp_avg_sq.has_value() ? &vs : nullptr, nullptr, scope, S);
  const int64_t slots = gram ? kTri : kRows;
  at::Tensor part = at::empty({slots * plan.nparts}, f64);
  double* pp = part.mutable_data_ptr<double>();
  for (int g = 0; g < 2; ++g) {
    if (!plan.blocks[g]) continue;
    if (g == 0) {
      const float e32 = static_cast<float>(eps);
      if (gram)
        gu_gram_kernel<float><<<grid_of(plan.blocks[g]), kThreads, 0, stream>>>(plan.tab[g], plan.starts[g], plan.n[g],
                                                                                plan.G, e32, pp, plan.nparts);
      else
        gu_dots_kernel<float><<<grid_of(plan.blocks[g]), kThreads, 0, stream>>>(plan.tab[g], plan.starts[g], plan.n[g],
                                                                                plan.G, e32, pp, plan.nparts);
    } else {
      if (gram)
        gu_gram_kernel<double><<<grid_of(plan.blocks[g]), kThreads, 0, stream>>>(
            plan.tab[g], plan.starts[g], plan.n[g], plan.G, eps, pp, plan.nparts);
      else
        gu_dots_kernel<double><<<grid_of(plan.blocks[g]), kThreads, 0, stream>>>(
            plan.tab[g], plan.starts[g], plan.n[g], plan.G, eps, pp, plan.nparts);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  scope_sums(plan, part, S, K, gram ? kModeGram : kModeDots, x.has_value(), out, stream);
  return out;
}

at::Tensor subspace_axpy_cuda(at::TensorList out, const std::optional<at::TensorList>& x, at::TensorList basis,
                              const at::Tensor& coeff, const at::Tensor& scale, at::IntArrayRef scope, bool dots) {
  check_subspace_axpy(out, x, basis, coeff, scale, scope, dots);
  const c10::cuda::CUDAGuard guard(basis[0].device());
  cuda::bad_value_record(basis[0].get_device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t K = coeff.size(1), S = coeff.size(0), K1 = K + 1;  // coeff [S, K] (checked)
  const auto f64 = basis[0].options().dtype(at::kDouble);
  at::Tensor stats = at::empty({S, K1}, f64);
  const at::TensorList src = x.has_value() ? *x : out;
  const Plan plan = make_plan(Op::kAxpy, basis, &src, nullptr, &out, scope, S);
  at::Tensor part = at::empty({kRows * plan.nparts}, f64);
  double* pp = part.mutable_data_ptr<double>();
  const double* cp = coeff.const_data_ptr<double>();
  const double* sp = scale.const_data_ptr<double>();
  for (int g = 0; g < 2; ++g) {
    if (!plan.blocks[g]) continue;
    if (g == 0)
      gu_axpy_kernel<float><<<grid_of(plan.blocks[g]), kThreads, 0, stream>>>(
          plan.tab[g], plan.starts[g], plan.n[g], plan.G, cp, coeff.stride(0), coeff.stride(1), sp, scale.stride(0),
          dots, pp, plan.nparts);
    else
      gu_axpy_kernel<double><<<grid_of(plan.blocks[g]), kThreads, 0, stream>>>(
          plan.tab[g], plan.starts[g], plan.n[g], plan.G, cp, coeff.stride(0), coeff.stride(1), sp, scale.stride(0),
          dots, pp, plan.nparts);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  scope_sums(plan, part, S, K, kModeAxpy, dots, stats, stream);
  return stats;
}

void subspace_transform_cuda(at::TensorList basis, const at::Tensor& coeff, at::IntArrayRef scope) {
  check_subspace_transform(basis, coeff, scope);
  const c10::cuda::CUDAGuard guard(basis[0].device());
  cuda::bad_value_record(basis[0].get_device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const Plan plan = make_plan(Op::kTransform, basis, nullptr, nullptr, nullptr, scope, coeff.size(0));
  const double* cp = coeff.const_data_ptr<double>();
  for (int g = 0; g < 2; ++g) {
    if (!plan.blocks[g]) continue;
    if (g == 0)
      gu_transform_kernel<float><<<grid_of(plan.blocks[g]), kThreads, 0, stream>>>(
          plan.tab[g], plan.starts[g], plan.n[g], plan.G, cp, coeff.stride(0), coeff.stride(1), coeff.stride(2));
    else
      gu_transform_kernel<double><<<grid_of(plan.blocks[g]), kThreads, 0, stream>>>(
          plan.tab[g], plan.starts[g], plan.n[g], plan.G, cp, coeff.stride(0), coeff.stride(1), coeff.stride(2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lethe, CUDA, m) {
  m.impl("subspace_dots", &subspace_dots_cuda);
  m.impl("subspace_axpy", &subspace_axpy_cuda);
  m.impl("subspace_transform", &subspace_transform_cuda);
}

}  // namespace lethe
