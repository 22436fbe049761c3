// CUDA kernels of the shred family's teacher side (definitions: python/lethe/ops/shred_reference.py;
// same semantics as csrc/cpu/shred_teacher.cpp):
//   teacher_topk             the chunked LM-head driver (lethe/lm_head.h); per chunk, candidates by
//                            at::topk, then one block per row builds the exact top-K as 64-bit keys
//                            (value key, inverted id) and writes the log-sum-exp and the label's
//                            log-prob; at::sort (a segmented sort) orders the keys: value desc, NaN
//                            first, -0 == +0, ties by ascending id;
//   select_forget_positions  one block per sequence writes the keys (value key, position) of the
//                            eligible positions in coalesced tiles; at::sort ranks them;
//   demote_targets           one thread per row, the shared row function of lethe/shred.h.
// Keys: 64-bit integers whose signed order is torch.sort's order on floats. Labels out of range are
// recorded without a host sync (errors.cuh) and never read.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/topk.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "errors.cuh"
#include "gemm.cuh"
#include "lethe/shred.h"
#include "lethe/shred_checks.h"
#include "reduce.cuh"

namespace lethe {
namespace {

using shred::kIgnoreIndex;
constexpr int kThreads = 256;
constexpr uint64_t kSignFlip = uint64_t(1) << 63;  // unsigned order -> signed order (at::sort)

// Unsigned key in ascending float order: -inf < ... < -0 == +0 < ... < +inf < NaN.
__device__ __forceinline__ uint32_t float_key(float v) {
  if (v != v) return 0xffffffffu;
  if (v == 0.0f) v = 0.0f;  // -0 sorts as +0, as torch.sort's comparisons do
  const uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// (value key, low): descending order of the int64 = value desc, then low desc
__device__ __forceinline__ int64_t sort_key(uint32_t key, uint32_t low) {
  return static_cast<int64_t>(((static_cast<uint64_t>(key) << 32) | low) ^ kSignFlip);
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
// ties unspecified). keys [K]: the exact top-K, every candidate above the K-th value's key and then
// the lowest-id entries equal to it.
__global__ void teacher_keys_kernel(const float* __restrict__ z, int64_t V, const int64_t* __restrict__ cand,
                                    int64_t K, int64_t* __restrict__ keys, float* __restrict__ lse_out,
                                    const int64_t* __restrict__ labels, float* __restrict__ label_lp,
                                    int64_t row0, BadValueRecord* bad) {
  __shared__ int count_gt, count_tied;
  __shared__ uint32_t wmin[32];
  const int64_t r = blockIdx.x;
  const float* zr = z + r * V;
  const int64_t* cr = cand + r * K;
  int64_t* kr = keys + r * K;

  // the K-th largest key is the smallest candidate key
  uint32_t kmin = 0xffffffffu;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) kmin = min(kmin, float_key(zr[cr[k]]));
  for (int o = 16; o > 0; o >>= 1) kmin = min(kmin, __shfl_xor_sync(cuda::kFull, kmin, o));
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

  // slots [0, gt): candidates above tk; [gt, K): the candidates equal to tk (any order: sorted next)
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const int64_t id = cr[k];
    const uint32_t key = float_key(zr[id]);
    const int slot = key > tk ? atomicAdd(&count_gt, 1) : static_cast<int>(K) - 1 - atomicAdd(&count_tied, 1);
    kr[slot] = sort_key(key, 0xffffffffu - static_cast<uint32_t>(id));
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
      if (eq && pos < need) kr[gt + pos] = sort_key(tk, 0xffffffffu - static_cast<uint32_t>(i));
      taken += total;  // the same on every thread: the loop condition stays uniform
    }
  }
  if (threadIdx.x == 0) {
    lse_out[r] = lse;
    const int64_t l = labels[r];
    const bool ok = l >= 0 && l < V;
    if (!ok && l != kIgnoreIndex) cuda::report_bad_value(bad, BadValue::kLabel, row0 + r, l, V, 0.0, 0.0);
    label_lp[r] = ok ? zr[l] - lse : 0.0f;
  }
}

// The sorted keys of a chunk to ids and log-probs.
__global__ void teacher_order_kernel(const int64_t* __restrict__ sorted, const float* __restrict__ z, int64_t V,
                                     int64_t K, const float* __restrict__ lse, int64_t n, int64_t* __restrict__ ids,
                                     float* __restrict__ lp) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / K;
    const int64_t id = 0xffffffffu - static_cast<uint32_t>(static_cast<uint64_t>(sorted[e]) & 0xffffffffu);
    ids[e] = id;
    lp[e] = z[r * V + id] - lse[r];
  }
}

int grid_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65536)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> teacher_topk_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t k, int64_t chunk_size) {
  check_teacher_topk_args(hidden, weight, bias, labels, k, chunk_size);
  const int64_t N = hidden.size(0), V = weight.size(0), K = k;
  TORCH_CHECK_VALUE(V < (int64_t(1) << 31), "weight has too many rows for the CUDA kernel: ", V);
  const c10::cuda::CUDAGuard guard(hidden.device());
  BadValueRecord* bad = cuda::bad_value_record(hidden.get_device());  // raises one recorded earlier
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto opt = hidden.options();
  at::Tensor ids = at::empty({N, K}, opt.dtype(at::kLong));
  at::Tensor lp = at::empty({N, K}, opt.dtype(at::kFloat));
  at::Tensor label_lp = at::empty({N}, opt.dtype(at::kFloat));
  if (N == 0) return {ids, lp, label_lp};

  const at::Tensor lab = labels.contiguous();
  const at::Tensor b32 = present(bias) ? bias->to(at::kFloat).contiguous() : at::Tensor();
  cuda::LmHead head(hidden, weight, chunk_size);
  const at::Tensor keys = at::empty({head.chunk(), K}, opt.dtype(at::kLong));
  const at::Tensor lse = at::empty({head.chunk()}, opt.dtype(at::kFloat));
  head.run([&](int64_t s, int64_t c, at::Tensor& z) {
    if (b32.defined()) z.add_(b32);  // as the reference: (h @ w^T) + b, rounded separately
    const at::Tensor cand = std::get<1>(at::topk(z, K, 1, true, false)).contiguous();
    teacher_keys_kernel<<<static_cast<unsigned>(c), kThreads, 0, stream>>>(
        z.const_data_ptr<float>(), V, cand.const_data_ptr<int64_t>(), K, keys.mutable_data_ptr<int64_t>(),
        lse.mutable_data_ptr<float>(), lab.const_data_ptr<int64_t>() + s, label_lp.mutable_data_ptr<float>() + s, s,
        bad);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor sorted = std::get<0>(at::sort(keys.narrow(0, 0, c), 1, true)).contiguous();
    teacher_order_kernel<<<grid_for(c * K), kThreads, 0, stream>>>(
        sorted.const_data_ptr<int64_t>(), z.const_data_ptr<float>(), V, K, lse.const_data_ptr<float>(), c * K,
        ids.mutable_data_ptr<int64_t>() + s * K, lp.mutable_data_ptr<float>() + s * K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  cuda::raise_found(hidden.get_device(), stream, [&] { check_label_values(lab.cpu(), V); });
  return {ids, lp, label_lp};
}

// ---------------------------------------------------------------------------------------------
// select_forget_positions

// One block per row of [B, T], in coalesced tiles of blockDim positions: the eligible positions
// (valid, after the first `skip` valid ones) get the key (value key, position), the rest the largest
// key; n[b] is the number of eligible positions.
template <typename scalar_t>
__global__ void select_keys_kernel(const scalar_t* __restrict__ vals, const int64_t* __restrict__ labels,
                                   int64_t T, int64_t skip, int64_t* __restrict__ keys, int64_t* __restrict__ n) {
  const int64_t b = blockIdx.x;
  int64_t valid_before = 0, eligible = 0;
  for (int64_t base = 0; base < T; base += blockDim.x) {
    const int64_t t = base + threadIdx.x;
    const bool valid = t < T && labels[b * T + t] != kIgnoreIndex;
    int64_t total;
    const int64_t rank = valid_before + block_prefix_count(valid, &total) + 1;  // valid ones up to t
    const bool e = valid && rank > skip;
    eligible += e;
    if (t < T)
      keys[b * T + t] = e ? sort_key(float_key(static_cast<float>(vals[b * T + t])), static_cast<uint32_t>(t))
                          : INT64_MAX;
    valid_before += total;
  }
  eligible = cuda::block_sum(eligible);
  if (threadIdx.x == 0) n[b] = eligible;
}

// out[b, order[b, j]] = (j < forget_count(fraction, n[b])): order is a permutation of each row.
__global__ void select_rank_kernel(const int64_t* __restrict__ order, const int64_t* __restrict__ n, int64_t B,
                                   int64_t T, double fraction, bool* __restrict__ out) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < B * T;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = e / T, j = e - b * T;
    out[b * T + order[e]] = j < shred::forget_count(fraction, n[b]);
  }
}

at::Tensor select_forget_positions_cuda(const at::Tensor& label_logprob, const at::Tensor& labels, double fraction,
                                        int64_t skip) {
  check_select_forget_positions_args(label_logprob, labels, fraction, skip);
  const int64_t B = label_logprob.size(0), T = label_logprob.size(1);
  // positions are the low 32 bits of the sort keys
  TORCH_CHECK_VALUE(T < (int64_t(1) << 32), "label_logprob has too many positions per row for the CUDA kernel: ", T);
  TORCH_CHECK_VALUE(B < (int64_t(1) << 31), "label_logprob has too many rows for the CUDA kernel: ", B);
  const c10::cuda::CUDAGuard guard(label_logprob.device());
  at::Tensor out = at::empty({B, T}, label_logprob.options().dtype(at::kBool));
  if (B == 0 || T == 0) return out;
  const at::Tensor vals = label_logprob.contiguous();
  const at::Tensor lab = labels.contiguous();
  const auto lopt = label_logprob.options().dtype(at::kLong);
  at::Tensor keys = at::empty({B, T}, lopt);
  at::Tensor n = at::empty({B}, lopt);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  LETHE_DISPATCH_FLOATS(vals.scalar_type(), "select_forget_positions_cuda", [&] {
    select_keys_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        vals.const_data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(), T, skip, keys.mutable_data_ptr<int64_t>(),
        n.mutable_data_ptr<int64_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor order = std::get<1>(at::sort(keys, 1)).contiguous();
  select_rank_kernel<<<grid_for(B * T), kThreads, 0, stream>>>(order.const_data_ptr<int64_t>(),
                                                               n.const_data_ptr<int64_t>(), B, T, fraction,
                                                               out.mutable_data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---------------------------------------------------------------------------------------------
// demote_targets

template <typename scalar_t>
__global__ void demote_kernel(const int64_t* __restrict__ ids, const scalar_t* __restrict__ lps,
                              const int64_t* __restrict__ labels, const bool* __restrict__ forget,
                              int64_t N, int64_t K, bool nucleus, double top_p, float* __restrict__ q) {
  for (int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < N;
       r += (int64_t)gridDim.x * blockDim.x)
    shred::demote_row(ids + r * K, lps + r * K, K, labels[r], forget[r], nucleus, top_p, q + r * K);
}

at::Tensor demote_targets_cuda(const at::Tensor& topk_ids, const at::Tensor& topk_logprobs,
                               const at::Tensor& labels, const at::Tensor& forget_mask,
                               int64_t variant, double top_p) {
  check_demote_targets_args(topk_ids, topk_logprobs, labels, forget_mask, variant, top_p);
  const int64_t N = topk_ids.size(0), K = topk_ids.size(1);
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  at::Tensor q = at::empty({N, K}, topk_logprobs.options().dtype(at::kFloat));
  if (N == 0 || K == 0) return q;
  const at::Tensor ids = topk_ids.contiguous(), lps = topk_logprobs.contiguous();
  const at::Tensor lab = labels.contiguous(), fm = forget_mask.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  LETHE_DISPATCH_FLOATS(lps.scalar_type(), "demote_targets_cuda", [&] {
    demote_kernel<scalar_t><<<grid_for(N), kThreads, 0, stream>>>(
        ids.const_data_ptr<int64_t>(), lps.const_data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(),
        fm.const_data_ptr<bool>(), N, K, variant == 1, top_p, q.mutable_data_ptr<float>());
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
