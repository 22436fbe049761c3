// CUDA kernels of the demoted top-K KL: topk_kl, topk_kl_backward and fused_linear_topk_kl (same
// semantics as csrc/cpu/shred_kl.cpp; definitions: python/lethe/ops/shred_reference.py).
//
// One block per row: a read pass for the log-normaliser (online max / exp-sum), the K target
// terms, and, for gradients, a write pass of row_weight * (sum(q) softmax - scatter(q)). For
// gradients the host sorts each row's ids (with their q), so that repeated ids are adjacent: the
// first entry of each run sums the run and writes its id once. Deterministic, no atomics, O(K) per
// row for any K.
//
// The target values are checked inside the row kernels, without a host sync: an id out of [0, V)
// is skipped (never read out of bounds), and every bad value is recorded for the host to raise
// (errors.cuh). check_values = false (autograd's backward, whose forward checked) skips the
// recording, never the bounds.
//
// fused_linear_topk_kl runs the chunked LM-head driver (lethe/lm_head.h) with three cuBLAS GEMMs per
// chunk (gemm.cuh: fp32 output; fp16/bf16 inputs on tensor cores with fp32 accumulation); the row
// kernel turns the fp32 logits into gradient rows in place.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gather.h>
#include <ATen/ops/sort.h>
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

constexpr int kThreads = 256;

// What a row kernel knows of the targets: the row's ids, q, and how to report bad values.
struct TargetRows {
  const int64_t* ids;  // [rows, K], sorted per row when `sorted`
  const float* q;
  int64_t K, V;
  BadValueRecord* bad;  // null: do not check the values
  float tol;
  int64_t row0;  // global index of the launch's first row (for the reports)
};

__device__ __forceinline__ bool in_vocab(int64_t id, int64_t V) { return id >= 0 && id < V; }

// sum_k q_k over the block; with t.bad, also checks the row's ids and q (a bad id is recorded and
// skipped by every pass; a negative or NaN q, or a row summing away from 1 and 0, recorded).
__device__ __forceinline__ float row_qsum(const TargetRows& t, int64_t r) {
  const int64_t* ir = t.ids + r * t.K;
  const float* qr = t.q + r * t.K;
  float s = 0.0f;
  double sd = 0.0;
  for (int64_t k = threadIdx.x; k < t.K; k += blockDim.x) {
    s += qr[k];
    if (t.bad) {
      sd += qr[k];
      if (!in_vocab(ir[k], t.V))
        cuda::report_bad_value(t.bad, BadValue::kTargetId, t.row0 + r, ir[k], t.V, 0.0, 0.0);
      if (!(qr[k] >= 0.0f))
        cuda::report_bad_value(t.bad, BadValue::kTargetNegative, t.row0 + r, 0, t.V, qr[k], 0.0);
    }
  }
  if (t.bad) {
    sd = cuda::block_sum(sd);
    if (threadIdx.x == 0 && sd >= 0.0 && sd != 0.0 && !(fabs(sd - 1.0) <= t.tol))
      cuda::report_bad_value(t.bad, BadValue::kTargetSum, t.row0 + r, 0, t.V, sd, t.tol);
  }
  return cuda::block_sum(s);
}

// Log-normaliser of row z (+ bias): over all V entries, or over the K target ids.
template <typename scalar_t>
__device__ __forceinline__ float row_lse(const scalar_t* z, const float* b, const TargetRows& t, int64_t r,
                                         bool full) {
  cuda::MaxSum a = cuda::ms_init();
  if (full) {
    for (int64_t i = threadIdx.x; i < t.V; i += blockDim.x)
      cuda::ms_add(a, static_cast<float>(z[i]) + (b ? b[i] : 0.0f));
  } else {
    const int64_t* ir = t.ids + r * t.K;
    for (int64_t k = threadIdx.x; k < t.K; k += blockDim.x) {
      const int64_t i = ir[k];
      if (in_vocab(i, t.V)) cuda::ms_add(a, static_cast<float>(z[i]) + (b ? b[i] : 0.0f));
    }
  }
  return cuda::ms_lse(cuda::block_maxsum(a));
}

// sum_k q_k (log q_k - (z[ids_k] (+ b) - lse)) over the block
template <typename scalar_t>
__device__ __forceinline__ float row_kl(const scalar_t* z, const float* b, const TargetRows& t, int64_t r,
                                        float lse) {
  const int64_t* ir = t.ids + r * t.K;
  const float* qr = t.q + r * t.K;
  float s = 0.0f;
  for (int64_t k = threadIdx.x; k < t.K; k += blockDim.x) {
    const int64_t i = ir[k];
    if (in_vocab(i, t.V)) s += shred::kl_term(qr[k], static_cast<float>(z[i]) + (b ? b[i] : 0.0f), lse);
  }
  return cuda::block_sum(s);
}

// The gradient at the ids of a sorted row: for the first entry of each run of equal ids, the sum
// over the run of (softmax part (top-K normaliser only) - coef q), plus the softmax part at the id
// itself with the full normaliser. zr: the row's logits (read before the row is overwritten).
template <typename scalar_t>
__device__ __forceinline__ float id_total(const scalar_t* zr, const float* b, const int64_t* ir, const float* qr,
                                          int64_t k, int64_t K, float a, float coef, float lse, bool full) {
  const int64_t id = ir[k];
  const float e = shred::softmax_part(a, static_cast<float>(zr[id]) + (b ? b[id] : 0.0f), lse);
  float v = full ? e : 0.0f;
  for (int64_t j = k; j < K && ir[j] == id; ++j) v += (full ? 0.0f : e) - coef * qr[j];
  return v;
}

__device__ __forceinline__ bool run_head(const int64_t* ir, int64_t k, int64_t V) {
  return in_vocab(ir[k], V) && (k == 0 || ir[k - 1] != ir[k]);
}

// ---------------------------------------------------------------------------------------------
// topk_kl, topk_kl_backward

template <typename scalar_t>
__global__ void topk_kl_kernel(const scalar_t* __restrict__ z, TargetRows t, const float* __restrict__ w,
                               bool full, float* __restrict__ loss, float* __restrict__ lse_out) {
  const int64_t r = blockIdx.x;
  const scalar_t* zr = z + r * t.V;
  row_qsum(t, r);  // the value checks
  const float lse = row_lse(zr, (const float*)nullptr, t, r, full);
  const float kl = row_kl(zr, (const float*)nullptr, t, r, lse);
  if (threadIdx.x == 0) {
    loss[r] = w ? w[r] * kl : kl;
    lse_out[r] = lse;
  }
}

template <typename scalar_t>
__global__ void topk_kl_backward_kernel(const float* __restrict__ g, const scalar_t* __restrict__ z, TargetRows t,
                                        const float* __restrict__ lse, const float* __restrict__ w, bool full,
                                        scalar_t* __restrict__ out) {
  const int64_t r = blockIdx.x;
  const int64_t V = t.V, K = t.K;
  const scalar_t* zr = z + r * V;
  scalar_t* orow = out + r * V;
  const int64_t* ir = t.ids + r * K;
  const float* qr = t.q + r * K;
  const float coef = w ? g[r] * w[r] : g[r];
  const float a = coef * row_qsum(t, r);
  const float l = lse[r];
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
    orow[i] = static_cast<scalar_t>(full ? shred::softmax_part(a, static_cast<float>(zr[i]), l) : 0.0f);
  __syncthreads();
  // the ids' slots: recomputed in fp32 from z (a different array from out), then rounded once
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
    if (run_head(ir, k, V))
      orow[ir[k]] = static_cast<scalar_t>(id_total(zr, (const float*)nullptr, ir, qr, k, K, a, coef, l, full));
}

// ---------------------------------------------------------------------------------------------
// fused_linear_topk_kl: the row kernel on one chunk

// z [c, V] fp32 logits without bias. Writes loss; with srs (grad_row_scale), z becomes the
// gradient rows in place. gk [c, K]: the ids' totals, computed before the row is overwritten.
__global__ void fused_rows_kernel(float* __restrict__ z, const float* __restrict__ b, TargetRows t,
                                  const float* __restrict__ w, const float* __restrict__ srs, bool full,
                                  float* __restrict__ loss, float* __restrict__ gk) {
  const int64_t r = blockIdx.x;
  const int64_t V = t.V, K = t.K;
  float* zr = z + r * V;
  const int64_t* ir = t.ids + r * K;
  const float* qr = t.q + r * K;
  const float sq = row_qsum(t, r);
  if (sq == 0.0f) {  // no target: no loss, no gradient (uniform over the block)
    if (threadIdx.x == 0) loss[r] = 0.0f;
    if (srs)
      for (int64_t i = threadIdx.x; i < V; i += blockDim.x) zr[i] = 0.0f;
    return;
  }
  const float lse = row_lse(zr, b, t, r, full);
  const float kl = row_kl(zr, b, t, r, lse);  // ends with a barrier
  if (threadIdx.x == 0) loss[r] = w ? w[r] * kl : kl;
  if (!srs) return;
  const float coef = w ? srs[r] * w[r] : srs[r];
  const float a = coef * sq;
  float* gr = gk + r * K;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
    if (run_head(ir, k, V)) gr[k] = id_total(zr, b, ir, qr, k, K, a, coef, lse, full);
  __syncthreads();  // every read of z is done before the row is overwritten
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
    zr[i] = full ? shred::softmax_part(a, zr[i] + (b ? b[i] : 0.0f), lse) : 0.0f;
  __syncthreads();
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
    if (run_head(ir, k, V)) zr[ir[k]] = gr[k];
}

// ---------------------------------------------------------------------------------------------
// Host functions

at::Tensor to_f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// One block per row: the grid's x dimension holds at most 2^31 - 1 blocks.
void check_grid(int64_t rows, const char* name) {
  TORCH_CHECK_VALUE(rows < (int64_t(1) << 31), name, " has too many rows for the CUDA kernel: ", rows);
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

struct Targets {
  at::Tensor ids, q, w;  // int64 [N,K], fp32 [N,K] (sorted per row when asked), fp32 [N] or undefined
  // the rows from row0 on
  TargetRows rows(int64_t row0 = 0) const {
    const int64_t K = ids.size(1);
    return {ids.const_data_ptr<int64_t>() + row0 * K, q.const_data_ptr<float>() + row0 * K, K, V, bad, tol, row0};
  }
  int64_t V;
  BadValueRecord* bad;
  float tol;
};

// The targets as the row kernels read them. sorted: each row's ids ascending, with their q (for
// the gradients, which sum over repeated ids).
Targets prepare_targets(const at::Tensor& target_ids, const at::Tensor& target_probs,
                        const std::optional<at::Tensor>& row_weight, int64_t V, bool check_values, bool sorted) {
  Targets t;
  t.ids = target_ids.contiguous();
  t.q = to_f32(target_probs);
  if (sorted && t.ids.size(1) > 1) {
    auto [ids, order] = at::sort(t.ids, /*stable=*/true, 1, false);  // deterministic order within a run
    t.ids = ids.contiguous();
    t.q = at::gather(t.q, 1, order).contiguous();
  }
  if (present(row_weight)) t.w = to_f32(*row_weight);
  t.V = V;
  t.bad = cuda::bad_value_record(target_ids.get_device());  // raises one recorded earlier
  if (!check_values) t.bad = nullptr;
  t.tol = target_sum_tol(target_probs.scalar_type());
  return t;
}

// Under LETHE_SYNC_CHECKS=1: wait, and raise the CPU kernels' message for bad target values.
void raise_if_bad(const at::Tensor& ids, const at::Tensor& probs, int64_t V, cudaStream_t stream) {
  cuda::raise_found(ids.get_device(), stream, [&] {
    check_target_values(ids.cpu().contiguous(), probs.cpu().to(at::kFloat).contiguous(), V,
                        target_sum_tol(probs.scalar_type()), true);
  });
}

std::tuple<at::Tensor, at::Tensor> topk_kl_cuda(const at::Tensor& logits, const at::Tensor& target_ids,
                                                const at::Tensor& target_probs,
                                                const std::optional<at::Tensor>& row_weight, bool full_normalize) {
  check_topk_kl_args(logits, target_ids, target_probs, row_weight);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1);
  check_grid(N, "logits");
  const Targets t = prepare_targets(target_ids, target_probs, row_weight, V, true, false);
  at::Tensor loss = at::empty({N}, logits.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({N}, logits.options().dtype(at::kFloat));
  if (N == 0) return {loss, lse};
  const at::Tensor zc = logits.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  LETHE_DISPATCH_FLOATS(zc.scalar_type(), "topk_kl_cuda", [&] {
    topk_kl_kernel<scalar_t><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
        zc.const_data_ptr<scalar_t>(), t.rows(), ptr_or_null(t.w), full_normalize, loss.mutable_data_ptr<float>(),
        lse.mutable_data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  raise_if_bad(target_ids, target_probs, V, stream);
  return {loss, lse};
}

at::Tensor topk_kl_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits,
                                 const at::Tensor& target_ids, const at::Tensor& target_probs,
                                 const at::Tensor& lse, const std::optional<at::Tensor>& row_weight,
                                 bool full_normalize, bool check_values) {
  check_topk_kl_backward_args(grad_loss, logits, target_ids, target_probs, lse, row_weight);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1);
  check_grid(N, "logits");
  const Targets t = prepare_targets(target_ids, target_probs, row_weight, V, check_values, true);
  at::Tensor out = at::empty({N, V}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return out;
  const at::Tensor zc = logits.contiguous();
  const at::Tensor g = to_f32(grad_loss), l = to_f32(lse);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  LETHE_DISPATCH_FLOATS(zc.scalar_type(), "topk_kl_backward_cuda", [&] {
    topk_kl_backward_kernel<scalar_t><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
        g.const_data_ptr<float>(), zc.const_data_ptr<scalar_t>(), t.rows(), l.const_data_ptr<float>(),
        ptr_or_null(t.w), full_normalize, out.mutable_data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (check_values) raise_if_bad(target_ids, target_probs, V, stream);
  return out;
}

FusedResult fused_linear_topk_kl_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, const at::Tensor& target_ids,
                                      const at::Tensor& target_probs, const std::optional<at::Tensor>& row_weight,
                                      const std::optional<at::Tensor>& grad_row_scale, bool full_normalize,
                                      int64_t chunk_size, bool grad_hidden, bool grad_weight, bool grad_bias,
                                      bool check_values) {
  const GradMask want = check_fused_linear_topk_kl_args(hidden, weight, bias, target_ids, target_probs, row_weight,
                                                        grad_row_scale, chunk_size, grad_hidden, grad_weight,
                                                        grad_bias);
  const int64_t N = hidden.size(0), V = weight.size(0);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const bool grads = want.any();
  // sorted also without gradients: the loss then sums in the same order as with them
  const Targets t = prepare_targets(target_ids, target_probs, row_weight, V, check_values, true);
  at::Tensor loss = at::empty({N}, hidden.options().dtype(at::kFloat));
  if (N == 0) return fused_result(loss, want, hidden, weight, bias);

  const at::Tensor b = present(bias) ? to_f32(*bias) : at::Tensor();
  const at::Tensor srs = grads ? to_f32(*grad_row_scale) : at::Tensor();
  const int64_t K = t.ids.size(1);
  cuda::LmHead head(hidden, weight, chunk_size);
  const at::Tensor gk = grads ? at::empty({head.chunk(), K}, hidden.options().dtype(at::kFloat)) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  HeadGrads g = head.run(
      [&](int64_t s, int64_t c, at::Tensor& z) {
        fused_rows_kernel<<<static_cast<unsigned>(c), kThreads, 0, stream>>>(
            z.mutable_data_ptr<float>(), ptr_or_null(b), t.rows(s), t.w.defined() ? t.w.const_data_ptr<float>() + s : nullptr,
            grads ? srs.const_data_ptr<float>() + s : nullptr, full_normalize, loss.mutable_data_ptr<float>() + s,
            gk.defined() ? gk.mutable_data_ptr<float>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      },
      want);
  if (check_values) raise_if_bad(target_ids, target_probs, V, stream);
  return fused_result(loss, want, hidden, weight, bias, g.hidden, want.w ? grad_as(g.weight, weight) : at::Tensor(),
                      want.b ? grad_as(g.bias, *bias) : at::Tensor());
}

}  // namespace

TORCH_LIBRARY_IMPL(lethe, CUDA, m) {
  m.impl("topk_kl", &topk_kl_cuda);
  m.impl("topk_kl_backward", &topk_kl_backward_cuda);
  m.impl("fused_linear_topk_kl", &fused_linear_topk_kl_cuda);
}

}  // namespace lethe
