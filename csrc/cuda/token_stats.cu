// CUDA kernel of the token_stats op (definitions: python/lethe/ops/token_stats_reference.py;
// same semantics as csrc/cpu/token_stats.cpp): the chunked LM-head driver (lethe/lm_head.h, cuBLAS
// with an fp32 [chunk, V] output); per chunk, one block per row, two passes over the row
// (lethe/token_stats.h): the online max / sum-exp / sum-exp-times-logit with the argmax and the
// NaN / +inf flags, merged over the block; then the centred variance. Labels out of range are
// recorded without a host sync (errors.cuh) and never read.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "errors.cuh"
#include "gemm.cuh"
#include "lethe/token_stats.h"
#include "lethe/token_stats_checks.h"
#include "reduce.cuh"

namespace lethe {
namespace {

using token_stats::Moments;
constexpr int kThreads = 512;  // a chunk of 512 rows fills an H100/H200 at 4 blocks per SM

// Everything pass 1 finds, per thread and then per block.
struct RowScan {
  Moments mo;
  float best;     // the argmax's value (lethe/token_stats.h argmax_before order)
  int64_t where;  // its id (V: none yet)
  bool nan, pinf;
};

__device__ __forceinline__ RowScan scan_merge(RowScan a, const RowScan& b) {
  a.mo = token_stats::moments_merge(a.mo, b.mo);
  if (token_stats::argmax_before(b.best, b.where, a.best, a.where)) {
    a.best = b.best;
    a.where = b.where;
  }
  a.nan |= b.nan;
  a.pinf |= b.pinf;
  return a;
}

__device__ __forceinline__ RowScan shfl_scan(const RowScan& a, int o) {
  RowScan b;
  b.mo.m = __shfl_xor_sync(cuda::kFull, a.mo.m, o);
  b.mo.s = __shfl_xor_sync(cuda::kFull, a.mo.s, o);
  b.mo.t = __shfl_xor_sync(cuda::kFull, a.mo.t, o);
  b.best = __shfl_xor_sync(cuda::kFull, a.best, o);
  b.where = __shfl_xor_sync(cuda::kFull, static_cast<long long>(a.where), o);
  b.nan = __shfl_xor_sync(cuda::kFull, static_cast<int>(a.nan), o) != 0;
  b.pinf = __shfl_xor_sync(cuda::kFull, static_cast<int>(a.pinf), o) != 0;
  return b;
}

// The block's merge of every thread's scan; every thread gets it (ends with a barrier).
__device__ RowScan block_scan(RowScan v) {
  __shared__ RowScan sh[32];
  for (int o = 16; o > 0; o >>= 1) v = scan_merge(v, shfl_scan(v, o));
  const int w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if ((threadIdx.x & 31) == 0) sh[w] = v;
  __syncthreads();
  RowScan r = sh[0];
  for (int i = 1; i < nw; ++i) r = scan_merge(r, sh[i]);
  __syncthreads();
  return r;
}

// One block per row r of a chunk of logits z [c, V]; labels and the outputs are offset to the chunk.
__global__ void __launch_bounds__(kThreads) token_stats_kernel(
    const float* __restrict__ z, int64_t V, const int64_t* __restrict__ labels, int64_t ignore,
    float* __restrict__ label_lp, float* __restrict__ lse_out, float* __restrict__ mu_out,
    float* __restrict__ var_out, int64_t* __restrict__ argmax_out, int64_t row0, BadValueRecord* bad) {
  const int64_t r = blockIdx.x;
  const float* zr = z + r * V;
  RowScan sc{token_stats::moments_init(), -INFINITY, V, false, false};
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    const float x = zr[i];
    if (token_stats::argmax_before(x, i, sc.best, sc.where)) {
      sc.best = x;
      sc.where = i;
    }
    if (x != x)
      sc.nan = true;
    else if (x == INFINITY)
      sc.pinf = true;
    else
      token_stats::moments_add(sc.mo, x);
  }
  sc = block_scan(sc);
  float lse, mu;
  token_stats::finish_row(sc.mo.m, sc.mo.s, sc.mo.t, sc.nan, sc.pinf, &lse, &mu);
  float var = NAN;
  if (isfinite(lse)) {  // the same on every thread: the block reduction stays uniform
    float acc = 0.0f;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) acc += token_stats::var_term(zr[i], lse, mu);
    var = cuda::block_sum(acc);
  }
  if (threadIdx.x == 0) {
    lse_out[r] = lse;
    mu_out[r] = mu;
    var_out[r] = var;
    argmax_out[r] = sc.where;
    const int64_t l = labels[r];
    const bool ok = l >= 0 && l < V;
    float lp = 0.0f;
    if (l != ignore) {
      if (ok)
        lp = zr[l] - lse;
      else
        cuda::report_bad_value(bad, BadValue::kLabel, row0 + r, l, V, 0.0, 0.0, ignore);
    }
    label_lp[r] = lp;
  }
}

TokenStatsResult token_stats_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& labels,
                                  int64_t ignore_index, int64_t chunk_size) {
  check_token_stats_args(hidden, weight, bias, labels, ignore_index, chunk_size);
  const int64_t N = hidden.size(0), V = weight.size(0);
  const c10::cuda::CUDAGuard guard(hidden.device());
  BadValueRecord* bad = cuda::bad_value_record(hidden.get_device());  // raises one recorded earlier
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor label_lp = at::empty({N}, f32), lse = at::empty({N}, f32), mu = at::empty({N}, f32),
             var = at::empty({N}, f32), argmax = at::empty({N}, hidden.options().dtype(at::kLong));
  if (N == 0) return {label_lp, lse, mu, var, argmax};

  const at::Tensor lab = labels.contiguous();
  const at::Tensor b32 = present(bias) ? bias->to(at::kFloat).contiguous() : at::Tensor();
  cuda::LmHead head(hidden, weight, chunk_size);
  head.run([&](int64_t s, int64_t c, at::Tensor& z) {
    if (b32.defined()) z.add_(b32);  // as the reference: (h @ w^T) + b, rounded separately
    token_stats_kernel<<<static_cast<unsigned>(c), kThreads, 0, stream>>>(
        z.const_data_ptr<float>(), V, lab.const_data_ptr<int64_t>() + s, ignore_index,
        label_lp.mutable_data_ptr<float>() + s, lse.mutable_data_ptr<float>() + s, mu.mutable_data_ptr<float>() + s,
        var.mutable_data_ptr<float>() + s, argmax.mutable_data_ptr<int64_t>() + s, s, bad);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  cuda::raise_found(hidden.get_device(), stream, [&] { check_label_values(lab.cpu(), V, ignore_index); });
  return {label_lp, lse, mu, var, argmax};
}

}  // namespace

TORCH_LIBRARY_IMPL(lethe, CUDA, m) { m.impl("token_stats", &token_stats_cuda); }

}  // namespace lethe
