// CUDA kernels of the demoted top-K KL: topk_kl, topk_kl_backward and fused_linear_topk_kl (same
// semantics as csrc/cpu/shred_kl.cpp; definitions: python/lethe/ops/shred_reference.py).
//
// One block per row: a read pass for the log-normaliser (online max / exp-sum), the K target
// terms, and, for gradients, a write pass of row_weight * (sum(q) softmax - scatter(q)). Repeated
// target ids are summed by the first occurrence of each id, in k order (as the CPU kernel does),
// so results are deterministic; that costs O(K^2 / threads) per row, nothing at SHRED's K.
//
// fused_linear_topk_kl works chunk_size rows at a time with three cuBLAS GEMMs per chunk (fp32
// output; fp16/bf16 inputs run on tensor cores with fp32 accumulation): z = h W^T into an fp32
// chunk buffer, which the row kernel turns into gradient rows in place, then dh = G W and
// dW += G^T h into an fp32 accumulator. For fp16/bf16 inputs G is rounded to the input dtype for
// those two GEMMs, as an fp16/bf16 autograd graph would hold it.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "gemm.cuh"
#include "lethe/checks.h"
#include "lethe/shred.h"
#include "reduce.cuh"

namespace lethe {
namespace {

constexpr int kThreads = 256;

// True when ids[k] does not occur in ids[0..k): k is the owner of its id.
__device__ __forceinline__ bool first_occurrence(const int64_t* ids, int64_t k) {
  const int64_t id = ids[k];
  for (int64_t j = 0; j < k; ++j)
    if (ids[j] == id) return false;
  return true;
}

// sum_k q_k over the block
__device__ __forceinline__ float row_qsum(const float* q, int64_t K) {
  float s = 0.0f;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) s += q[k];
  return cuda::block_sum(s);
}

// Log-normaliser of row z (+ bias): over all V entries, or over the K target ids.
template <typename scalar_t>
__device__ __forceinline__ float row_lse(const scalar_t* z, const float* b, int64_t V,
                                         const int64_t* ids, int64_t K, bool full) {
  cuda::MaxSum a = cuda::ms_init();
  if (full) {
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
      cuda::ms_add(a, static_cast<float>(z[i]) + (b ? b[i] : 0.0f));
  } else {
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const int64_t i = ids[k];
      cuda::ms_add(a, static_cast<float>(z[i]) + (b ? b[i] : 0.0f));
    }
  }
  return cuda::ms_lse(cuda::block_maxsum(a));
}

// sum_k q_k (log q_k - (z[ids_k] (+ b) - lse)) over the block
template <typename scalar_t>
__device__ __forceinline__ float row_kl(const scalar_t* z, const float* b, const int64_t* ids,
                                        const float* q, int64_t K, float lse) {
  float s = 0.0f;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const int64_t i = ids[k];
    s += shred::kl_term(q[k], static_cast<float>(z[i]) + (b ? b[i] : 0.0f), lse);
  }
  return cuda::block_sum(s);
}

// ---------------------------------------------------------------------------------------------
// topk_kl, topk_kl_backward

template <typename scalar_t>
__global__ void topk_kl_kernel(const scalar_t* __restrict__ z, int64_t V, const int64_t* __restrict__ ids,
                               const float* __restrict__ q, const float* __restrict__ w, int64_t K,
                               bool full, float* __restrict__ loss, float* __restrict__ lse_out) {
  const int64_t r = blockIdx.x;
  const scalar_t* zr = z + r * V;
  const int64_t* ir = ids + r * K;
  const float* qr = q + r * K;
  const float lse = row_lse(zr, (const float*)nullptr, V, ir, K, full);
  const float kl = row_kl(zr, (const float*)nullptr, ir, qr, K, lse);
  if (threadIdx.x == 0) {
    loss[r] = w ? w[r] * kl : kl;
    lse_out[r] = lse;
  }
}

template <typename scalar_t>
__global__ void topk_kl_backward_kernel(const float* __restrict__ g, const scalar_t* __restrict__ z,
                                        int64_t V, const int64_t* __restrict__ ids,
                                        const float* __restrict__ q, const float* __restrict__ lse,
                                        const float* __restrict__ w, int64_t K, bool full,
                                        scalar_t* __restrict__ out) {
  const int64_t r = blockIdx.x;
  const scalar_t* zr = z + r * V;
  scalar_t* orow = out + r * V;
  const int64_t* ir = ids + r * K;
  const float* qr = q + r * K;
  const float coef = w ? g[r] * w[r] : g[r];
  const float a = coef * row_qsum(qr, K);
  const float l = lse[r];
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
    orow[i] = static_cast<scalar_t>(full && a != 0.0f ? a * expf(static_cast<float>(zr[i]) - l) : 0.0f);
  __syncthreads();
  // target ids: recomputed in fp32 from z, then rounded once
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    if (!first_occurrence(ir, k)) continue;
    const int64_t id = ir[k];
    const float e = a != 0.0f ? a * expf(static_cast<float>(zr[id]) - l) : 0.0f;
    float v = full ? e : 0.0f;
    for (int64_t j = k; j < K; ++j) {
      if (ir[j] != id) continue;
      v = full ? v - coef * qr[j] : v + (e - coef * qr[j]);
    }
    orow[id] = static_cast<scalar_t>(v);
  }
}

// ---------------------------------------------------------------------------------------------
// fused_linear_topk_kl: the row kernel on one chunk

// z [c, V] fp32 logits without bias. Writes loss; with srs (grad_row_scale), z becomes the
// gradient rows in place. gk [c, K] is scratch for the top-K-normalised gradient.
__global__ void fused_rows_kernel(float* __restrict__ z, int64_t V, const float* __restrict__ b,
                                  const int64_t* __restrict__ ids, const float* __restrict__ q,
                                  const float* __restrict__ w, const float* __restrict__ srs,
                                  int64_t K, bool full, float* __restrict__ loss,
                                  float* __restrict__ gk) {
  const int64_t r = blockIdx.x;
  float* zr = z + r * V;
  const int64_t* ir = ids + r * K;
  const float* qr = q + r * K;
  const float sq = row_qsum(qr, K);
  if (sq == 0.0f) {  // no target: no loss, no gradient (uniform over the block)
    if (threadIdx.x == 0) loss[r] = 0.0f;
    if (srs)
      for (int64_t i = threadIdx.x; i < V; i += blockDim.x) zr[i] = 0.0f;
    return;
  }
  const float lse = row_lse(zr, b, V, ir, K, full);
  const float kl = row_kl(zr, b, ir, qr, K, lse);  // ends with a barrier: z is read
  if (threadIdx.x == 0) loss[r] = w ? w[r] * kl : kl;
  if (!srs) return;
  const float coef = w ? srs[r] * w[r] : srs[r];
  const float a = coef * sq;
  if (full) {
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
      zr[i] = a != 0.0f ? a * expf(zr[i] + (b ? b[i] : 0.0f) - lse) : 0.0f;
    __syncthreads();
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      if (!first_occurrence(ir, k)) continue;
      const int64_t id = ir[k];
      float v = zr[id];
      for (int64_t j = k; j < K; ++j)
        if (ir[j] == id) v -= coef * qr[j];
      zr[id] = v;
    }
  } else {
    float* gr = gk + r * K;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      if (!first_occurrence(ir, k)) continue;
      const int64_t id = ir[k];
      const float e = a * expf(zr[id] + (b ? b[id] : 0.0f) - lse);
      float v = 0.0f;
      for (int64_t j = k; j < K; ++j)
        if (ir[j] == id) v += e - coef * qr[j];
      gr[k] = v;
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) zr[i] = 0.0f;
    __syncthreads();
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
      if (first_occurrence(ir, k)) zr[ir[k]] = gr[k];
  }
}

// ---------------------------------------------------------------------------------------------
// Argument checks (the CPU kernel's, for CUDA tensors); target values by one check kernel

// Per row: ids in [0, V), probs >= 0, sum 1 within tol or 0. bad[0..3) get the first bad row of
// each kind (atomicMin; N when none).
__global__ void check_targets_kernel(const int64_t* __restrict__ ids, const float* __restrict__ q,
                                     int64_t N, int64_t K, int64_t V, float tol,
                                     unsigned long long* __restrict__ bad) {
  for (int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < N;
       r += (int64_t)gridDim.x * blockDim.x) {
    bool id_ok = true, neg_ok = true;
    double s = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = ids[r * K + k];
      const float v = q[r * K + k];
      id_ok &= i >= 0 && i < V;
      neg_ok &= v >= 0.0f;  // false for NaN too
      s += v;
    }
    if (!id_ok) atomicMin(bad + 0, (unsigned long long)r);
    if (!neg_ok) atomicMin(bad + 1, (unsigned long long)r);
    if (neg_ok && s != 0.0 && !(fabs(s - 1.0) <= tol)) atomicMin(bad + 2, (unsigned long long)r);
  }
}

at::Tensor to_f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

struct Targets {
  at::Tensor ids, q, w;  // int64 [N,K], fp32 [N,K], fp32 [N] (undefined when none)
  int64_t K;
};

Targets prepare_targets(const at::Tensor& target_ids, const at::Tensor& target_probs,
                        const std::optional<at::Tensor>& row_weight, int64_t N, int64_t V,
                        const at::Device& dev, const char* ref, bool check_values = true) {
  Targets t;
  t.K = check_target_shapes(target_ids, target_probs, N, V, dev, ref);
  check_row_vector(row_weight, "row_weight", N, dev, ref);
  t.ids = target_ids.contiguous();
  t.q = to_f32(target_probs);
  if (row_weight.has_value()) t.w = to_f32(*row_weight);
  if (N == 0 || t.K == 0 || !check_values) return t;
  // one sync per call: out-of-range ids must fail here, not read out of bounds in the kernels
  at::Tensor bad = at::full({3}, N, t.ids.options());
  const float tol = shred::target_sum_tol(target_probs.scalar_type() == at::kBFloat16);
  const int grid = static_cast<int>(std::min<int64_t>((N + kThreads - 1) / kThreads, 4096));
  check_targets_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream().stream()>>>(
      t.ids.const_data_ptr<int64_t>(), t.q.const_data_ptr<float>(), N, t.K, V, tol,
      reinterpret_cast<unsigned long long*>(bad.mutable_data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor b = bad.cpu();
  const int64_t* bp = b.const_data_ptr<int64_t>();
  if (bp[0] < N) {
    const at::Tensor row = t.ids[bp[0]].cpu();
    int64_t v = 0;
    for (int64_t k = 0; k < t.K; ++k)
      if (row[k].item<int64_t>() < 0 || row[k].item<int64_t>() >= V) {
        v = row[k].item<int64_t>();
        break;
      }
    TORCH_CHECK(false, "target_ids must be in [0, V) = [0, ", V, "), got ", v, " in row ", bp[0]);
  }
  TORCH_CHECK(bp[1] >= N, "target_probs must be non-negative, got ",
              t.q[bp[1]].min().item<float>(), " in row ", bp[1]);
  TORCH_CHECK(bp[2] >= N, "target_probs rows must sum to 1 (within ", tol, ") or be all zero, row ",
              bp[2], " sums to ", t.q[bp[2]].to(at::kDouble).sum().item<double>());
  return t;
}

void check_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.is_cuda(), "logits must be a CUDA tensor for the CUDA kernel, got ", logits.device());
  check_logits_shape(logits);
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

// ---------------------------------------------------------------------------------------------
// Host functions

std::tuple<at::Tensor, at::Tensor> topk_kl_cuda(const at::Tensor& logits, const at::Tensor& target_ids,
                                                const at::Tensor& target_probs,
                                                const std::optional<at::Tensor>& row_weight,
                                                bool full_normalize) {
  check_logits(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1);
  const Targets t = prepare_targets(target_ids, target_probs, row_weight, N, V, logits.device(), "logits");
  at::Tensor loss = at::empty({N}, logits.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({N}, logits.options().dtype(at::kFloat));
  if (N == 0) return {loss, lse};
  const at::Tensor zc = logits.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  LETHE_DISPATCH_FLOATS(zc.scalar_type(), "topk_kl_cuda", [&] {
    topk_kl_kernel<scalar_t><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
        zc.const_data_ptr<scalar_t>(), V, t.ids.const_data_ptr<int64_t>(), t.q.const_data_ptr<float>(),
        ptr_or_null(t.w), t.K, full_normalize, loss.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, lse};
}

at::Tensor topk_kl_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits,
                                 const at::Tensor& target_ids, const at::Tensor& target_probs,
                                 const at::Tensor& lse, const std::optional<at::Tensor>& row_weight,
                                 bool full_normalize, bool check_values) {
  check_logits(logits);
  const at::Device dev = logits.device();
  const c10::cuda::CUDAGuard guard(dev);
  const int64_t N = logits.size(0), V = logits.size(1);
  check_row_vector(grad_loss, "grad_loss", N, dev, "logits");
  check_row_vector(lse, "lse", N, dev, "logits");
  const Targets t = prepare_targets(target_ids, target_probs, row_weight, N, V, dev, "logits", check_values);
  at::Tensor out = at::empty({N, V}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return out;
  const at::Tensor zc = logits.contiguous();
  const at::Tensor g = to_f32(grad_loss), l = to_f32(lse);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  LETHE_DISPATCH_FLOATS(zc.scalar_type(), "topk_kl_backward_cuda", [&] {
    topk_kl_backward_kernel<scalar_t><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
        g.const_data_ptr<float>(), zc.const_data_ptr<scalar_t>(), V, t.ids.const_data_ptr<int64_t>(),
        t.q.const_data_ptr<float>(), l.const_data_ptr<float>(), ptr_or_null(t.w), t.K, full_normalize,
        out.mutable_data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_topk_kl_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target_ids, const at::Tensor& target_probs,
    const std::optional<at::Tensor>& row_weight, const std::optional<at::Tensor>& grad_row_scale,
    bool full_normalize, int64_t chunk_size, bool grad_hidden, bool grad_weight, bool grad_bias,
    bool check_values) {
  const at::Device dev = hidden.device();
  TORCH_CHECK(hidden.is_cuda(), "hidden must be a CUDA tensor for the CUDA kernel, got ", dev);
  const GradMask want = check_fused_linear_topk_kl_args(hidden, weight, bias, grad_row_scale, chunk_size,
                                                        grad_hidden, grad_weight, grad_bias);
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const c10::cuda::CUDAGuard guard(dev);
  const Targets t = prepare_targets(target_ids, target_probs, row_weight, N, V, dev, "hidden", check_values);
  const bool grads = want.any();
  const auto opt = hidden.options();
  at::Tensor loss = at::empty({N}, opt.dtype(at::kFloat));
  if (N == 0) return fused_result(loss, want, hidden, weight, bias);

  // GEMM dtype: the inputs' when they agree (tensor cores for fp16/bf16), otherwise fp32
  const at::ScalarType gt = hidden.scalar_type() == weight.scalar_type() ? hidden.scalar_type() : at::kFloat;
  const bool f32 = gt == at::kFloat;
  const at::Tensor h = hidden.to(gt).contiguous();
  const at::Tensor W = weight.to(gt).contiguous();
  const at::Tensor b = bias.has_value() ? to_f32(*bias) : at::Tensor();
  const at::Tensor srs = grads ? to_f32(*grad_row_scale) : at::Tensor();
  const size_t esz = at::elementSize(gt);

  const int64_t C = std::min(chunk_size, N);
  at::Tensor z = at::empty({C, V}, opt.dtype(at::kFloat));
  at::Tensor glow, gh, gh32, gW32, gb32, gk;
  if (grads) {
    // G rounded for the gradient GEMMs
    if (!f32 && (want.h || want.w)) glow = at::empty({C, V}, opt.dtype(gt));
    if (!full_normalize) gk = at::empty({C, t.K}, opt.dtype(at::kFloat));
  }
  if (want.h) {
    gh = at::empty({N, H}, opt);
    if (hidden.scalar_type() != at::kFloat) gh32 = at::empty({C, H}, opt.dtype(at::kFloat));
  }
  if (want.w) gW32 = at::empty({V, H}, opt.dtype(at::kFloat));  // the first chunk overwrites it (beta 0)
  if (want.b) gb32 = at::zeros({V}, opt.dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t K = t.K;
  for (int64_t s = 0; s < N; s += C) {
    const int64_t c = std::min(C, N - s);
    at::Tensor zc = z.narrow(0, 0, c);
    const char* hc = static_cast<const char*>(h.const_data_ptr()) + s * H * esz;
    cuda::gemm_f32out(false, true, c, V, H, 1.0f, hc, H, W.const_data_ptr(), H, gt, 0.0f,
                      zc.mutable_data_ptr<float>(), V);
    fused_rows_kernel<<<static_cast<unsigned>(c), kThreads, 0, stream>>>(
        zc.mutable_data_ptr<float>(), V, ptr_or_null(b), t.ids.const_data_ptr<int64_t>() + s * K,
        t.q.const_data_ptr<float>() + s * K, t.w.defined() ? t.w.const_data_ptr<float>() + s : nullptr,
        grads ? srs.const_data_ptr<float>() + s : nullptr, K, full_normalize,
        loss.mutable_data_ptr<float>() + s, gk.defined() ? gk.mutable_data_ptr<float>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!grads) continue;
    if (want.b) gb32.add_(zc.sum(0));
    if (!want.h && !want.w) continue;
    const void* G = zc.const_data_ptr();
    if (!f32) {
      at::Tensor gl = glow.narrow(0, 0, c);
      gl.copy_(zc);
      G = gl.const_data_ptr();
    }
    if (want.h) {
      float* dh = gh32.defined() ? gh32.mutable_data_ptr<float>() : gh.mutable_data_ptr<float>() + s * H;
      cuda::gemm_f32out(false, false, c, H, V, 1.0f, G, V, W.const_data_ptr(), H, gt, 0.0f, dh, H);
      if (gh32.defined()) gh.narrow(0, s, c).copy_(gh32.narrow(0, 0, c));
    }
    if (want.w)
      cuda::gemm_f32out(true, false, V, H, c, 1.0f, G, V, hc, H, gt, s == 0 ? 0.0f : 1.0f,
                        gW32.mutable_data_ptr<float>(), H);
  }
  return fused_result(loss, want, hidden, weight, bias, gh, want.w ? grad_as(gW32, weight) : at::Tensor(),
                      want.b ? grad_as(gb32, *bias) : at::Tensor());
}

}  // namespace

TORCH_LIBRARY_IMPL(lethe, CUDA, m) {
  m.impl("topk_kl", &topk_kl_cuda);
  m.impl("topk_kl_backward", &topk_kl_backward_cuda);
  m.impl("fused_linear_topk_kl", &fused_linear_topk_kl_cuda);
}

}  // namespace lethe
