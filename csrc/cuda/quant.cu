// CUDA kernels of the quant family: fake_quantize (quantise-dequantise, optional clipped-STE mask).
// Same semantics as csrc/cpu/quant.cpp; the arithmetic is lethe/quant.h, shared with the CPU.
// Groups are contiguous runs of group_size elements of the row-major tensor.
//
//  * group_size <= kFusedMax: one fused kernel. A team of W lanes (W a power of two <= 32, chosen
//    so each lane holds a few elements) owns a group: the lanes accumulate Stats over a strided
//    loop, reduce them with warp shuffles, build the Params and then re-read the (L1/L2-hot) group
//    to write y and the mask. Grid-stride over groups.
//  * group_size > kFusedMax: two kernels. chunk_stats writes partial Stats of every (group, chunk)
//    to a float buffer; chunk_apply merges its group's partials (block reduction), builds the
//    Params and writes its chunk.
// Both use 16-byte vector loads/stores when the group size and the pointers allow it.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>

#include "lethe/quant.h"
#include "lethe/quant_checks.h"

namespace lethe {
namespace {

using quant::Params;
using quant::Stats;

constexpr int kThreads = 256;                 // threads per block, every kernel
constexpr int kWarps = kThreads / 32;
constexpr int64_t kFusedMax = 4096;           // largest group handled by the fused kernel
constexpr int64_t kChunk = 8192;              // elements per (group, chunk) task, large groups
constexpr int64_t kMaxChunks = 1024;          // most chunks per group (the chunk grows instead)
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T, int N>
struct alignas(sizeof(T) * N) VecT {
  T v[N];
};

template <int N>
struct alignas(N) MaskVecT {
  bool v[N];
};

// One VEC-element load. A 16-byte vector is read as one uint4 (a single 128-bit load; copying the
// struct, or reading its elements through a reference, gets split into scalar loads).
template <typename scalar_t, int VEC>
__device__ __forceinline__ VecT<scalar_t, VEC> load_vec(const VecT<scalar_t, VEC>* p) {
  VecT<scalar_t, VEC> r;
  if constexpr (sizeof(VecT<scalar_t, VEC>) == 16) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    memcpy(&r, &u, 16);
  } else {
    r = *p;
  }
  return r;
}

// Merge the Stats of the lanes of each aligned team of `width` lanes (width a power of two <= 32).
// Every lane of the warp must call it (full-mask shuffles); afterwards all lanes of a team hold
// the team's Stats.
__device__ __forceinline__ Stats team_reduce(Stats s, int width) {
  for (int off = width >> 1; off > 0; off >>= 1) {
    Stats o;
    o.lo = __shfl_xor_sync(kFullMask, s.lo, off);
    o.hi = __shfl_xor_sync(kFullMask, s.hi, off);
    o.finite = __shfl_xor_sync(kFullMask, s.finite ? 1 : 0, off) != 0;
    s = quant::stats_merge(s, o);
  }
  return s;
}

// Merge the Stats of all threads of the block (blockDim.x == kThreads); every thread gets the
// result. Ends with a barrier, so the shared scratch may be reused right after.
__device__ __forceinline__ Stats block_reduce(Stats s) {
  __shared__ float sh_lo[kWarps];
  __shared__ float sh_hi[kWarps];
  __shared__ int sh_fin[kWarps];
  s = team_reduce(s, 32);
  const int warp = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) {
    sh_lo[warp] = s.lo;
    sh_hi[warp] = s.hi;
    sh_fin[warp] = s.finite ? 1 : 0;
  }
  __syncthreads();
  Stats r = quant::stats_init();
#pragma unroll
  for (int w = 0; w < kWarps; ++w) r = quant::stats_merge(r, Stats{sh_lo[w], sh_hi[w], sh_fin[w] != 0});
  __syncthreads();
  return r;
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ void add_vec(Stats& s, const VecT<scalar_t, VEC>& v) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) quant::stats_add(s, static_cast<float>(v.v[k]));
}


// Quantise-dequantise one vector of VEC elements: y[j] (and mask[j] when mask is not null).
template <typename scalar_t, int VEC>
__device__ __forceinline__ void apply_vec(const VecT<scalar_t, VEC>& v, const Params& p,
                                          int64_t codebook, VecT<scalar_t, VEC>* y,
                                          MaskVecT<VEC>* mask, int64_t j) {
  VecT<scalar_t, VEC> o;
  MaskVecT<VEC> m;
  // The codebook test stays outside the element loop: each branch inlines one code path.
  if (codebook == quant::kNF4) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      bool kept;
      o.v[k] = static_cast<scalar_t>(quant::fake_quant_value(static_cast<float>(v.v[k]), p, quant::kNF4, &kept));
      m.v[k] = kept;
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      bool kept;
      o.v[k] = static_cast<scalar_t>(quant::fake_quant_value(static_cast<float>(v.v[k]), p, quant::kInt, &kept));
      m.v[k] = kept;
    }
  }
  y[j] = o;
  if (mask != nullptr) mask[j] = m;
}

// Fused kernel, groups of L <= kFusedMax elements. The launch bound's 4 blocks per SM cap the
// registers at 64, which steers ptxas away from a small spill it otherwise makes at VEC = 1.
// A team of W = 2^log2w lanes per group;
// L % VEC == 0 and the pointers are aligned for VEC-element accesses.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads, 4)
    fake_quantize_fused_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                               bool* __restrict__ mask, int64_t G, int64_t L, int log2w,
                               int64_t bits, int64_t codebook, bool symmetric, float scale_div) {
  using V = VecT<scalar_t, VEC>;
  using M = MaskVecT<VEC>;
  const int W = 1 << log2w;
  const int64_t Lv = L / VEC;  // vectors per group
  const int lane = threadIdx.x & 31;
  const int tlane = lane & (W - 1);
  const int team = lane >> log2w;
  const int64_t teams_per_warp = 32 >> log2w;
  const int64_t warp_id = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps * teams_per_warp;
  // gbase is the same for all lanes of the warp, so the loop (and the shuffles inside) are
  // warp-uniform; teams past the last group idle through the reduction.
  for (int64_t gbase = warp_id * teams_per_warp; gbase < G; gbase += step) {
    const int64_t g = gbase + team;
    const bool active = g < G;
    const int64_t off = active ? g * Lv : 0;  // group start, in vectors
    const V* xg = reinterpret_cast<const V*>(x) + off;
    Stats s = quant::stats_init();
    if (active) {
#pragma unroll 4
      for (int64_t j = tlane; j < Lv; j += W) add_vec<scalar_t, VEC>(s, load_vec(xg + j));
    }
    s = team_reduce(s, W);
    if (active) {
      const Params p = quant::make_params(s, bits, codebook, symmetric, scale_div);
      V* yg = reinterpret_cast<V*>(y) + off;
      M* mg = mask != nullptr ? reinterpret_cast<M*>(mask) + off : nullptr;
#pragma unroll 2
      for (int64_t j = tlane; j < Lv; j += W) apply_vec<scalar_t, VEC>(load_vec(xg + j), p, codebook, yg, mg, j);
    }
  }
}

// Large groups, pass 1: partial Stats of each (group, chunk) task t = g * C + c, chunk c covering
// elements [c * CH, min(L, (c + 1) * CH)) of group g. part holds lo[T], hi[T], finite[T] (T = G*C).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    fake_quantize_chunk_stats_kernel(const scalar_t* __restrict__ x, float* __restrict__ part,
                                     int64_t G, int64_t L, int64_t CH, int64_t C) {
  using V = VecT<scalar_t, VEC>;
  const int64_t T = G * C;
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    const int64_t g = t / C;
    const int64_t c = t - g * C;
    const int64_t begin = c * CH;
    const int64_t nv = (std::min(CH, L - begin)) / VEC;
    const V* xc = reinterpret_cast<const V*>(x + g * L + begin);
    Stats s = quant::stats_init();
#pragma unroll 4
    for (int64_t j = threadIdx.x; j < nv; j += kThreads) add_vec<scalar_t, VEC>(s, load_vec(xc + j));
    s = block_reduce(s);
    if (threadIdx.x == 0) {
      part[t] = s.lo;
      part[T + t] = s.hi;
      part[2 * T + t] = s.finite ? 1.0f : 0.0f;
    }
  }
}

// Large groups, pass 2: merge the group's C partials, build the Params, write the chunk.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    fake_quantize_chunk_apply_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                     bool* __restrict__ mask, const float* __restrict__ part,
                                     int64_t G, int64_t L, int64_t CH, int64_t C, int64_t bits,
                                     int64_t codebook, bool symmetric, float scale_div) {
  using V = VecT<scalar_t, VEC>;
  using M = MaskVecT<VEC>;
  const int64_t T = G * C;
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    const int64_t g = t / C;
    const int64_t c = t - g * C;
    Stats s = quant::stats_init();
    for (int64_t i = threadIdx.x; i < C; i += kThreads) {
      const int64_t k = g * C + i;
      s = quant::stats_merge(s, Stats{part[k], part[T + k], part[2 * T + k] != 0.0f});
    }
    s = block_reduce(s);
    const Params p = quant::make_params(s, bits, codebook, symmetric, scale_div);
    const int64_t begin = c * CH;
    const int64_t nv = (std::min(CH, L - begin)) / VEC;
    const int64_t off = (g * L + begin) / VEC;  // chunk start, in vectors (exact: VEC | L, CH)
    const V* xc = reinterpret_cast<const V*>(x) + off;
    V* yc = reinterpret_cast<V*>(y) + off;
    M* mc = mask != nullptr ? reinterpret_cast<M*>(mask) + off : nullptr;
#pragma unroll 2
    for (int64_t j = threadIdx.x; j < nv; j += kThreads) apply_vec<scalar_t, VEC>(load_vec(xc + j), p, codebook, yc, mc, j);
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Number of SMs of device `dev`, cached (cudaDeviceGetAttribute is cheap, but this is per call).
int sm_count(int dev) {
  static std::array<std::atomic<int>, 64> cache{};
  if (dev >= 0 && dev < 64) {
    const int v = cache[dev].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
  v = std::max(v, 1);
  if (dev >= 0 && dev < 64) cache[dev].store(v, std::memory_order_relaxed);
  return v;
}

template <typename scalar_t, int VEC>
void launch(const scalar_t* x, scalar_t* y, bool* mask, int64_t numel, int64_t L, int64_t bits,
            int64_t codebook, bool symmetric, float scale_div, const at::Tensor& like) {
  const int dev = like.device().index();
  const int64_t max_blocks = static_cast<int64_t>(sm_count(dev)) * 32;  // grid-stride beyond
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  const int64_t G = numel / L;
  if (L <= kFusedMax) {
    // Team width: the smallest power of two >= ceil(vectors per group / 4), at most a warp.
    const int64_t Lv = L / VEC;
    const int64_t want = ceil_div(Lv, 4);
    int log2w = 0;
    while (log2w < 5 && (int64_t(1) << log2w) < want) ++log2w;
    const int64_t teams_per_block = static_cast<int64_t>(kThreads) >> log2w;
    const int64_t blocks = std::min(ceil_div(G, teams_per_block), max_blocks);
    fake_quantize_fused_kernel<scalar_t, VEC><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        x, y, mask, G, L, log2w, bits, codebook, symmetric, scale_div);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  int64_t CH = kChunk;
  int64_t C = ceil_div(L, CH);
  if (C > kMaxChunks) {
    CH = ceil_div(ceil_div(L, kMaxChunks), kChunk) * kChunk;  // a multiple of kChunk (so of VEC)
    C = ceil_div(L, CH);
  }
  const int64_t T = G * C;
  at::Tensor part = at::empty({3 * T}, like.options().dtype(at::kFloat));
  float* part_ptr = part.mutable_data_ptr<float>();
  const int64_t blocks = std::min(T, max_blocks);
  fake_quantize_chunk_stats_kernel<scalar_t, VEC>
      <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, part_ptr, G, L, CH, C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  fake_quantize_chunk_apply_kernel<scalar_t, VEC><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      x, y, mask, part_ptr, G, L, CH, C, bits, codebook, symmetric, scale_div);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

std::tuple<at::Tensor, at::Tensor> fake_quantize_cuda(const at::Tensor& x, int64_t group_size,
                                                      int64_t bits, int64_t codebook,
                                                      bool symmetric, double scale_div,
                                                      bool return_mask) {
  check_fake_quantize_args(x, group_size, bits, codebook, symmetric, scale_div);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc, at::MemoryFormat::Contiguous);
  at::Tensor mask = return_mask ? at::empty(x.sizes(), x.options().dtype(at::kBool))
                                : at::empty({0}, x.options().dtype(at::kBool));
  const int64_t numel = x.numel();
  if (numel == 0) return {y, mask};
  // float32, float16, bfloat16 only (check_fake_quantize_args rejects the rest).
  LETHE_DISPATCH_FLOATS(
      x.scalar_type(), "fake_quantize_cuda", [&] {
        const scalar_t* xp = xc.const_data_ptr<scalar_t>();
        scalar_t* yp = y.mutable_data_ptr<scalar_t>();
        bool* mp = return_mask ? mask.mutable_data_ptr<bool>() : nullptr;
        constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));
        const bool vec_ok = group_size % kVec == 0 && aligned(xp, 16) && aligned(yp, 16) &&
                            (mp == nullptr || aligned(mp, kVec));
        const float sd = static_cast<float>(scale_div);
        if (vec_ok) {
          launch<scalar_t, kVec>(xp, yp, mp, numel, group_size, bits, codebook, symmetric, sd, xc);
        } else {
          launch<scalar_t, 1>(xp, yp, mp, numel, group_size, bits, codebook, symmetric, sd, xc);
        }
      });
  return {y, mask};
}

// grad where mask, else +0, on the raw bits of each element
template <typename bits_t>
__global__ void __launch_bounds__(kThreads)
    fake_quantize_backward_kernel(const bits_t* __restrict__ g, const bool* __restrict__ m,
                                  bits_t* __restrict__ out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads)
    out[i] = m[i] ? g[i] : bits_t(0);
}

at::Tensor fake_quantize_backward_cuda(const at::Tensor& grad, const at::Tensor& mask) {
  check_fake_quantize_backward_args(grad, mask);
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor gc = grad.contiguous(), mc = mask.contiguous();
  at::Tensor out = at::empty_like(gc, at::MemoryFormat::Contiguous);
  const int64_t n = grad.numel();
  if (n == 0) return out;
  const int blocks = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65536));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (grad.element_size() == 4) {
    fake_quantize_backward_kernel<uint32_t><<<blocks, kThreads, 0, stream>>>(
        static_cast<const uint32_t*>(gc.const_data_ptr()), mc.const_data_ptr<bool>(),
        static_cast<uint32_t*>(out.mutable_data_ptr()), n);
  } else {
    fake_quantize_backward_kernel<uint16_t><<<blocks, kThreads, 0, stream>>>(
        static_cast<const uint16_t*>(gc.const_data_ptr()), mc.const_data_ptr<bool>(),
        static_cast<uint16_t*>(out.mutable_data_ptr()), n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lethe, CUDA, m) {
  m.impl("fake_quantize", &fake_quantize_cuda);
  m.impl("fake_quantize_backward", &fake_quantize_backward_cuda);
}

}  // namespace lethe
