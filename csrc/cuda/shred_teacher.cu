// CUDA kernels of the shred family's teacher side (definitions: python/lethe/ops/shred_reference.py;
// same semantics as csrc/cpu/shred_teacher.cpp):
//   teacher_topk             per chunk of rows: logits by cuBLAS (fp32 output), candidates by
//                            at::topk, then one block per row fixes the order exactly (value desc,
//                            NaN first, -0 == +0, ties by ascending id) and writes the log-probs;
//   select_forget_positions  one block per sequence: a bitonic sort of (value, position) keys;
//   demote_targets           one thread per row, the shared row function of lethe/shred.h.
// Orderings use 32-bit keys whose unsigned order is torch.sort's order on floats.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/topk.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "gemm.cuh"
#include "lethe/checks.h"
#include "lethe/shred.h"
#include "reduce.cuh"

namespace lethe {
namespace {

using shred::kIgnoreIndex;
constexpr int kThreads = 256;
constexpr int64_t kSharedSortMax = 4096;  // entries (uint64) sorted in static-size shared memory

// Unsigned key in ascending float order: -inf < ... < -0 == +0 < ... < +inf < NaN.
__device__ __forceinline__ uint32_t float_key(float v) {
  if (v != v) return 0xffffffffu;
  if (v == 0.0f) v = 0.0f;  // -0 sorts as +0, as torch.sort's comparisons do
  const uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

int64_t next_pow2(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Sort s[0..P) (P a power of two) descending; whole block, ends with a barrier.
__device__ void bitonic_desc(uint64_t* s, int64_t P) {
  for (int64_t size = 2; size <= P; size <<= 1) {
    for (int64_t stride = size >> 1; stride > 0; stride >>= 1) {
      __syncthreads();
      for (int64_t i = threadIdx.x; i < P; i += blockDim.x) {
        const int64_t j = i ^ stride;
        if (j > i) {
          const uint64_t a = s[i], b = s[j];
          const bool desc = (i & size) == 0;
          if (desc ? a < b : a > b) {
            s[i] = b;
            s[j] = a;
          }
        }
      }
    }
  }
  __syncthreads();
}

// Exclusive prefix count of `flag` over the block in thread order; *total gets the block's count.
__device__ int64_t block_prefix_count(bool flag, int64_t* total) {
  __shared__ int warp_counts[32];
  const unsigned ballot = __ballot_sync(cuda::kFull, flag);
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) warp_counts[w] = __popc(ballot);
  __syncthreads();
  int before = 0, all = 0;
  for (int i = 0; i < nw; ++i) {
    before += i < w ? warp_counts[i] : 0;
    all += warp_counts[i];
  }
  *total = all;
  return before + __popc(ballot & ((1u << lane) - 1u));
}

// ---------------------------------------------------------------------------------------------
// teacher_topk

// Row r of a chunk: z [V] fp32 logits, cand [K] the ids of at::topk (the top-K values, order and
// ties unspecified). The exact top-K: every candidate above the K-th value's key, then the
// lowest-id elements equal to it, sorted by (key desc, id asc) as one 64-bit key per entry.
__global__ void teacher_rows_kernel(const float* __restrict__ z, int64_t V,
                                    const int64_t* __restrict__ cand, int64_t K, int64_t P,
                                    uint64_t* __restrict__ scratch, const int64_t* __restrict__ labels,
                                    int64_t* __restrict__ out_ids, float* __restrict__ out_lp,
                                    float* __restrict__ out_label_lp) {
  __shared__ uint64_t sh[kSharedSortMax];
  __shared__ int count_gt;
  const int64_t r = blockIdx.x;
  const float* zr = z + r * V;
  const int64_t* cr = cand + r * K;
  uint64_t* s = scratch ? scratch + r * P : sh;

  // the K-th largest key is the smallest candidate key
  uint32_t kmin = 0xffffffffu;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) kmin = min(kmin, float_key(zr[cr[k]]));
  for (int o = 16; o > 0; o >>= 1) kmin = min(kmin, __shfl_xor_sync(cuda::kFull, kmin, o));
  __shared__ uint32_t wmin[32];
  __shared__ int count_tied;
  if (threadIdx.x == 0) count_gt = count_tied = 0;
  if ((threadIdx.x & 31) == 0) wmin[threadIdx.x >> 5] = kmin;
  __syncthreads();
  uint32_t tk = 0xffffffffu;
  for (int i = 0; i < (int)(blockDim.x >> 5); ++i) tk = min(tk, wmin[i]);

  // one pass over the row: log-sum-exp, and how many entries tie with the K-th value
  cuda::MaxSum acc = cuda::ms_init();
  int64_t tied = 0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    const float x = zr[i];
    cuda::ms_add(acc, x);
    tied += float_key(x) == tk;
  }
  const float lse = cuda::ms_lse(cuda::block_maxsum(acc));
  const int64_t row_tied = cuda::block_sum(tied);

  // slots [0, gt): candidates above tk; [gt, K): the candidates equal to tk
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const int64_t id = cr[k];
    const uint32_t key = float_key(zr[id]);
    const int slot = key > tk ? atomicAdd(&count_gt, 1) : static_cast<int>(K) - 1 - atomicAdd(&count_tied, 1);
    s[slot] = (static_cast<uint64_t>(key) << 32) | (0xffffffffu - static_cast<uint32_t>(id));
  }
  __syncthreads();
  const int64_t gt = count_gt;
  const int64_t need = K - gt;
  // more ties in the row than among the candidates: the tied slots take the lowest ids instead
  // (an ordered scan, stopping once they are filled)
  if (row_tied > need) {
    int64_t taken = 0;
    for (int64_t base = 0; base < V && taken < need; base += blockDim.x) {
      const int64_t i = base + threadIdx.x;
      const bool eq = i < V && float_key(zr[i]) == tk;
      int64_t total;
      const int64_t pos = taken + block_prefix_count(eq, &total);
      if (eq && pos < need)
        s[gt + pos] = (static_cast<uint64_t>(tk) << 32) | (0xffffffffu - static_cast<uint32_t>(i));
      taken += total;  // the same on every thread: the loop condition stays uniform
    }
  }
  for (int64_t k = K + threadIdx.x; k < P; k += blockDim.x) s[k] = 0;  // padding sorts last
  bitonic_desc(s, P);

  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const int64_t id = 0xffffffffu - static_cast<uint32_t>(s[k] & 0xffffffffu);
    out_ids[r * K + k] = id;
    out_lp[r * K + k] = zr[id] - lse;
  }
  if (threadIdx.x == 0) {
    const int64_t l = labels[r];
    out_label_lp[r] = l == kIgnoreIndex ? 0.0f : zr[l] - lse;
  }
}

// First index with a label outside [0, V) and != -100 (N when none), by atomicMin.
__global__ void check_labels_kernel(const int64_t* __restrict__ labels, int64_t N, int64_t V,
                                    unsigned long long* __restrict__ first_bad) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t l = labels[i];
    if (l != kIgnoreIndex && (l < 0 || l >= V)) atomicMin(first_bad, (unsigned long long)i);
  }
}

int grid_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> teacher_topk_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t k, int64_t chunk_size) {
  const at::Device dev = hidden.device();
  TORCH_CHECK(hidden.is_cuda(), "hidden must be a CUDA tensor for the CUDA kernel, got ", dev);
  check_teacher_topk_args(hidden, weight, bias, labels, k, chunk_size);
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0), K = k;
  TORCH_CHECK(V < (int64_t(1) << 32) - 1, "weight has too many rows for the CUDA kernel: ", V);
  const bool has_bias = bias.has_value() && bias->defined();

  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto opt = hidden.options();
  at::Tensor ids = at::empty({N, K}, opt.dtype(at::kLong));
  at::Tensor lp = at::empty({N, K}, opt.dtype(at::kFloat));
  at::Tensor label_lp = at::empty({N}, opt.dtype(at::kFloat));
  if (N == 0) return {ids, lp, label_lp};

  const at::Tensor lab = labels.contiguous();
  {
    at::Tensor bad = at::full({1}, N, opt.dtype(at::kLong));
    check_labels_kernel<<<grid_for(N), kThreads, 0, stream>>>(
        lab.const_data_ptr<int64_t>(), N, V,
        reinterpret_cast<unsigned long long*>(bad.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t i = bad.item<int64_t>();  // one sync: bad labels must fail, not read out of bounds
    TORCH_CHECK(i >= N, "labels must be in [0, V) = [0, ", V, ") or -100, got ",
                lab[i].item<int64_t>(), " at index ", i);
  }

  // GEMM in the inputs' dtype when they agree (tensor cores, fp32 accumulation and output),
  // otherwise in fp32
  const at::ScalarType gt = hidden.scalar_type() == weight.scalar_type() ? hidden.scalar_type()
                                                                           : at::kFloat;
  const at::Tensor h = hidden.to(gt).contiguous();
  const at::Tensor W = weight.to(gt).contiguous();
  const at::Tensor b32 = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();

  const int64_t C = std::min(chunk_size, N);
  at::Tensor z = at::empty({C, V}, opt.dtype(at::kFloat));
  const int64_t P = next_pow2(K);
  at::Tensor scratch = P > kSharedSortMax ? at::empty({C, P}, opt.dtype(at::kLong)) : at::Tensor();
  const size_t esz = at::elementSize(gt);
  for (int64_t s = 0; s < N; s += C) {
    const int64_t c = std::min(C, N - s);
    at::Tensor zc = z.narrow(0, 0, c);
    cuda::gemm_f32out(false, true, c, V, H, 1.0f, static_cast<const char*>(h.const_data_ptr()) + s * H * esz,
                      H, W.const_data_ptr(), H, gt, 0.0f, zc.mutable_data_ptr<float>(), V);
    if (has_bias) zc.add_(b32);  // as the reference: (h @ w^T) + b, rounded separately
    const at::Tensor cand = std::get<1>(at::topk(zc, K, 1, true, false)).contiguous();
    teacher_rows_kernel<<<static_cast<unsigned>(c), kThreads, 0, stream>>>(
        zc.const_data_ptr<float>(), V, cand.const_data_ptr<int64_t>(), K, P,
        scratch.defined() ? reinterpret_cast<uint64_t*>(scratch.mutable_data_ptr<int64_t>()) : nullptr,
        lab.const_data_ptr<int64_t>() + s, ids.mutable_data_ptr<int64_t>() + s * K,
        lp.mutable_data_ptr<float>() + s * K, label_lp.mutable_data_ptr<float>() + s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {ids, lp, label_lp};
}

// ---------------------------------------------------------------------------------------------
// select_forget_positions

// One block per row of [B, T]: eligible positions (valid, after the first `skip` valid ones) get
// the key (value key, position), the rest sort last; the first m = forget_count(fraction, n)
// of the ascending order are the forget positions.
template <typename scalar_t>
__global__ void select_kernel(const scalar_t* __restrict__ vals, const int64_t* __restrict__ labels,
                              int64_t T, int64_t P, double fraction, int64_t skip,
                              uint64_t* __restrict__ scratch, bool* __restrict__ out) {
  __shared__ uint64_t sh[kSharedSortMax];
  __shared__ int64_t seg_count[kThreads];
  const int64_t b = blockIdx.x;
  const scalar_t* v = vals + b * T;
  const int64_t* l = labels + b * T;
  uint64_t* s = scratch ? scratch + b * P : sh;

  // valid positions before each thread's contiguous segment: a scan over the thread counts
  const int64_t seg = (T + blockDim.x - 1) / blockDim.x;
  const int64_t t0 = threadIdx.x * seg, t1 = min(T, t0 + seg);
  int64_t mine = 0;
  for (int64_t t = t0; t < t1; ++t) mine += l[t] != kIgnoreIndex;
  seg_count[threadIdx.x] = mine;
  __syncthreads();
  int64_t before = 0;
  for (int i = 0; i < (int)threadIdx.x; ++i) before += seg_count[i];
  int64_t eligible = 0;
  for (int64_t t = t0; t < t1; ++t) {
    const bool valid = l[t] != kIgnoreIndex;
    before += valid;
    const bool e = valid && before > skip;
    eligible += e;
    // ascending (value key, position); the sort below is descending, so store the complement
    const uint64_t key = e ? (static_cast<uint64_t>(float_key(static_cast<float>(v[t]))) << 32) |
                                 static_cast<uint64_t>(t)
                           : ~uint64_t(0);
    s[t] = ~key;
  }
  for (int64_t t = T + threadIdx.x; t < P; t += blockDim.x) s[t] = 0;  // ~all-ones: last
  const int64_t n = cuda::block_sum(eligible);
  const int64_t m = shred::forget_count(fraction, n);
  bitonic_desc(s, P);
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) out[b * T + (~s[j] & 0xffffffffu)] = true;
}

at::Tensor select_forget_positions_cuda(const at::Tensor& label_logprob, const at::Tensor& labels,
                                        double fraction, int64_t skip) {
  const at::Device dev = label_logprob.device();
  TORCH_CHECK(label_logprob.is_cuda(), "label_logprob must be a CUDA tensor for the CUDA kernel, got ", dev);
  check_select_forget_positions_args(label_logprob, labels, fraction, skip);
  const int64_t B = label_logprob.size(0), T = label_logprob.size(1);
  // positions are the low 32 bits of the sort keys
  TORCH_CHECK(T < (int64_t(1) << 32), "label_logprob has too many positions per row: ", T);
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor out = at::zeros({B, T}, label_logprob.options().dtype(at::kBool));
  if (B == 0 || T == 0) return out;
  const at::Tensor vals = label_logprob.contiguous();
  const at::Tensor lab = labels.contiguous();
  const int64_t P = next_pow2(T);
  at::Tensor scratch =
      P > kSharedSortMax ? at::empty({B, P}, label_logprob.options().dtype(at::kLong)) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  LETHE_DISPATCH_FLOATS(vals.scalar_type(), "select_forget_positions_cuda", [&] {
    select_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        vals.const_data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(), T, P, fraction, skip,
        scratch.defined() ? reinterpret_cast<uint64_t*>(scratch.mutable_data_ptr<int64_t>()) : nullptr,
        out.mutable_data_ptr<bool>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---------------------------------------------------------------------------------------------
// demote_targets

template <typename scalar_t>
__global__ void demote_kernel(const int64_t* __restrict__ ids, const scalar_t* __restrict__ lps,
                              const int64_t* __restrict__ labels, const bool* __restrict__ forget,
                              int64_t N, int64_t K, bool nucleus, float top_p, float* __restrict__ q) {
  for (int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < N;
       r += (int64_t)gridDim.x * blockDim.x)
    shred::demote_row(ids + r * K, lps + r * K, K, labels[r], forget[r], nucleus, top_p, q + r * K);
}

at::Tensor demote_targets_cuda(const at::Tensor& topk_ids, const at::Tensor& topk_logprobs,
                               const at::Tensor& labels, const at::Tensor& forget_mask,
                               int64_t variant, double top_p) {
  const at::Device dev = topk_ids.device();
  TORCH_CHECK(topk_ids.is_cuda(), "topk_ids must be a CUDA tensor for the CUDA kernel, got ", dev);
  check_demote_targets_args(topk_ids, topk_logprobs, labels, forget_mask, variant, top_p);
  const int64_t N = topk_ids.size(0), K = topk_ids.size(1);
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor q = at::empty({N, K}, topk_logprobs.options().dtype(at::kFloat));
  if (N == 0 || K == 0) return q;
  const at::Tensor ids = topk_ids.contiguous(), lps = topk_logprobs.contiguous();
  const at::Tensor lab = labels.contiguous(), fm = forget_mask.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  LETHE_DISPATCH_FLOATS(lps.scalar_type(), "demote_targets_cuda", [&] {
    demote_kernel<scalar_t><<<grid_for(N), kThreads, 0, stream>>>(
        ids.const_data_ptr<int64_t>(), lps.const_data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(),
        fm.const_data_ptr<bool>(), N, K, variant == 1, static_cast<float>(top_p),
        q.mutable_data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return q;
}

}  // namespace

TORCH_LIBRARY_IMPL(lethe, CUDA, m) {
  m.impl("teacher_topk", &teacher_topk_cuda);
  m.impl("select_forget_positions", &select_forget_positions_cuda);
  m.impl("demote_targets", &demote_targets_cuda);
}

}  // namespace lethe
