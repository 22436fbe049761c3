// CPU kernels of the demoted top-K KL: topk_kl, topk_kl_backward and fused_linear_topk_kl
// (definitions: python/lethe/ops/shred_reference.py, topk_kl_reference).
//
// Per row t with logits z, target ids (K) and target probs q (K):
//   lse  = logsumexp(z) over the full vocabulary, or over z[ids] (full_normalize = false)
//   loss = row_weight * sum_k q_k (log q_k - (z[ids_k] - lse))       (terms with q_k = 0 are 0)
//   dloss/dz = row_weight * (softmax * sum(q) - scatter(q))          (softmax over V, or over ids)
//
// Row passes work on fp32 rows with a vector exp (GCC vector extensions, cloned per ISA): the
// log-normaliser is one read pass (blocked online max / exp-sum, each 1 KiB block re-read from L1),
// the gradient one write pass. The fused op runs the chunked LM-head driver (lethe/lm_head.h):
// chunk_size rows of logits at a time by MKL, turned in place into gradient rows by fused_rows and
// fed to two more matmuls, so the extra memory is one [chunk_size, V] fp32 buffer (+ a 16 MiB
// block buffer for a low-precision weight, and the fp32 gradient accumulator).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "gemm.h"
#include "lethe/cpu_alloc.h"
#include "lethe/shred.h"
#include "lethe/shred_checks.h"
#include "vec.h"

namespace lethe {
namespace {

// out = a * exp(z (+ b) - shift). out may alias z.
template <bool kBias>
LETHE_INLINE void exp_write_impl(float* out, const float* z, const float* b, int64_t V,
                                 float shift, float a) {
  const F16v sh = splat(shift), av = splat(a);
  const int64_t nv = V / kLanes * kLanes;
  for (int64_t i = 0; i < nv; i += kLanes) {
    F16v x = loadu(z + i);
    if constexpr (kBias) x += loadu(b + i);
    storeu(out + i, av * vexp(x - sh));
  }
  if (nv < V) {
    const int64_t n = V - nv;
    F16v x = load_part(z + nv, n, -kInf);
    if constexpr (kBias) x += load_part(b + nv, n, 0.0f);
    const F16v y = av * vexp(x - sh);
    for (int64_t i = 0; i < n; ++i) out[nv + i] = y[i];
  }
}

// Entry point, one clone per vector ISA (row_max_sumexp, row_lse: vec.h).
LETHE_CLONES void row_exp_write(float* out, const float* z, const float* b, int64_t V, float shift,
                                float a) {
  if (b)
    exp_write_impl<true>(out, z, b, V, shift, a);
  else
    exp_write_impl<false>(out, z, b, V, shift, a);
}

// ---------------------------------------------------------------------------------------------
// Scalar per-row pieces
// ---------------------------------------------------------------------------------------------

inline float lse_small(const float* zk, int64_t K) {
  float m = -kInf;
  for (int64_t k = 0; k < K; ++k) m = zk[k] > m ? zk[k] : m;
  if (m == -kInf) return -kInf;
  float s = 0.0f;
  for (int64_t k = 0; k < K; ++k) s += std::exp(zk[k] - m);
  return m + std::log(s);
}

// sum_k q_k (log q_k - (zk_k - lse)), terms with q_k = 0 being 0.
inline float kl_row(const float* zk, const float* q, int64_t K, float lse) {
  float kl = 0.0f;
  for (int64_t k = 0; k < K; ++k) kl += shred::kl_term(q[k], zk[k], lse);
  return kl;
}

inline float sum_of(const float* q, int64_t K) {
  float s = 0.0f;
  for (int64_t k = 0; k < K; ++k) s += q[k];
  return s;
}

inline int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

// ---------------------------------------------------------------------------------------------
// Values of the targets: ids in [0, V), and (with probs) probs >= 0 with each row summing to 1 (or
// exactly 0). The first bad row of each kind, in that order, raises (lethe/checks.h words it).
// ---------------------------------------------------------------------------------------------

void first_bad_target(const int64_t* ids, const float* q, int64_t N, int64_t K, int64_t V, float tol, bool probs) {
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  std::atomic<int64_t> bad_id{kNone}, bad_neg{kNone}, bad_sum{kNone};
  auto lower = [](std::atomic<int64_t>& a, int64_t v) {
    int64_t cur = a.load();
    while (v < cur && !a.compare_exchange_weak(cur, v)) {
    }
  };
  at::parallel_for(0, N, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t* ir = ids + r * K;
      const float* qr = q + r * K;
      bool id_ok = true, neg_ok = true;
      double s = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        id_ok &= ir[k] >= 0 && ir[k] < V;
        neg_ok &= qr[k] >= 0.0f;  // false for NaN too
        s += qr[k];
      }
      if (!id_ok) lower(bad_id, r);
      if (!probs) continue;
      if (!neg_ok) lower(bad_neg, r);
      if (neg_ok && s != 0.0 && !(std::abs(s - 1.0) <= tol)) lower(bad_sum, r);
    }
  });
  BadValueRecord rec{};
  rec.bound = V;
  rec.tol = tol;
  if ((rec.row = bad_id.load()) != kNone) {
    rec.code = static_cast<int32_t>(BadValue::kTargetId);
    for (int64_t k = 0; k < K; ++k)
      if (ids[rec.row * K + k] < 0 || ids[rec.row * K + k] >= V) {
        rec.value = ids[rec.row * K + k];
        break;
      }
    raise_bad_value(rec);
  }
  if ((rec.row = bad_neg.load()) != kNone) {
    rec.code = static_cast<int32_t>(BadValue::kTargetNegative);
    for (int64_t k = 0; k < K; ++k)
      if (!(q[rec.row * K + k] >= 0.0f)) {
        rec.fvalue = q[rec.row * K + k];
        break;
      }
    raise_bad_value(rec);
  }
  if ((rec.row = bad_sum.load()) != kNone) {
    rec.code = static_cast<int32_t>(BadValue::kTargetSum);
    for (int64_t k = 0; k < K; ++k) rec.fvalue += q[rec.row * K + k];
    raise_bad_value(rec);
  }
}

at::Tensor to_f32(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? t.contiguous() : t.to(at::kFloat).contiguous();
}

struct Targets {
  at::Tensor ids, q, w;  // contiguous int64 [N,K], fp32 [N,K], fp32 [N] (undefined when none)
  int64_t K;
};

// The shapes were checked by the op's check; here the values. ids are checked even without
// check_values: on the CPU that costs no sync, and a bad id would be read out of bounds.
Targets prepare_targets(const at::Tensor& target_ids, const at::Tensor& target_probs,
                        const std::optional<at::Tensor>& row_weight, int64_t N, int64_t V,
                        bool check_values = true) {
  Targets t;
  t.K = target_ids.size(1);
  t.ids = target_ids.contiguous();
  t.q = to_f32(target_probs);
  if (present(row_weight)) t.w = to_f32(*row_weight);
  check_target_values(t.ids, t.q, V, target_sum_tol(target_probs.scalar_type()), check_values);
  return t;
}

// ---------------------------------------------------------------------------------------------
// topk_kl
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
void topk_kl_rows(const scalar_t* z, const int64_t* ids, const float* q, const float* w, int64_t N,
                  int64_t V, int64_t K, bool full, float* loss, float* lse) {
  at::parallel_for(0, N, row_grain(V), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf, zk(K);
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* zr = z + r * V;
      const int64_t* ir = ids + r * K;
      const float* qr = q + r * K;
      for (int64_t k = 0; k < K; ++k) zk[k] = static_cast<float>(zr[ir[k]]);
      float l;
      if (full) {
        l = row_lse(f32_view(zr, V, buf), nullptr, V);
      } else {
        l = lse_small(zk.data(), K);
      }
      lse[r] = l;
      const float kl = kl_row(zk.data(), qr, K, l);
      loss[r] = w ? w[r] * kl : kl;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> topk_kl_cpu(const at::Tensor& logits,
                                               const at::Tensor& target_ids,
                                               const at::Tensor& target_probs,
                                               const std::optional<at::Tensor>& row_weight,
                                               bool full_normalize) {
  check_topk_kl_args(logits, target_ids, target_probs, row_weight);
  const int64_t N = logits.size(0), V = logits.size(1);
  const Targets t = prepare_targets(target_ids, target_probs, row_weight, N, V);
  at::Tensor loss = at::empty({N}, at::TensorOptions().dtype(at::kFloat));
  at::Tensor lse = at::empty({N}, at::TensorOptions().dtype(at::kFloat));
  if (N == 0) return {loss, lse};
  const at::Tensor zc = logits.contiguous();
  LETHE_DISPATCH_FLOATS(zc.scalar_type(), "topk_kl_cpu", [&] {
    topk_kl_rows<scalar_t>(zc.const_data_ptr<scalar_t>(), t.ids.const_data_ptr<int64_t>(),
                           t.q.const_data_ptr<float>(),
                           t.w.defined() ? t.w.const_data_ptr<float>() : nullptr, N, V, t.K,
                           full_normalize, loss.mutable_data_ptr<float>(),
                           lse.mutable_data_ptr<float>());
  });
  return {loss, lse};
}

// ---------------------------------------------------------------------------------------------
// topk_kl_backward
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
void topk_kl_backward_rows(const float* g, const scalar_t* z, const int64_t* ids, const float* q,
                           const float* lse, const float* w, int64_t N, int64_t V, int64_t K,
                           bool full, scalar_t* out) {
  constexpr bool kF32 = std::is_same_v<scalar_t, float>;
  at::parallel_for(0, N, row_grain(V), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf;
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* zr = z + r * V;
      scalar_t* orow = out + r * V;
      const int64_t* ir = ids + r * K;
      const float* qr = q + r * K;
      const float coef = w ? g[r] * w[r] : g[r];
      const float a = coef * sum_of(qr, K);
      if (full) {
        // fp32 row: the output itself, or a buffer converted at the end
        float* o;
        if constexpr (kF32) {
          o = orow;
        } else {
          buf.resize(V);
          o = buf.data();
        }
        if (a != 0.0f) {
          row_exp_write(o, f32_view(zr, V, buf), nullptr, V, lse[r], a);
        } else {
          std::memset(o, 0, sizeof(float) * V);
        }
        for (int64_t k = 0; k < K; ++k) o[ir[k]] -= coef * qr[k];
        if constexpr (!kF32)
          for (int64_t i = 0; i < V; ++i) orow[i] = static_cast<scalar_t>(o[i]);
      } else {
        // zero row, contributions accumulated in fp32 at the ids (ids may repeat)
        buf.resize(V);
        for (int64_t k = 0; k < K; ++k) buf[ir[k]] = 0.0f;
        for (int64_t k = 0; k < K; ++k)
          buf[ir[k]] += shred::softmax_part(a, static_cast<float>(zr[ir[k]]), lse[r]) - coef * qr[k];
        std::memset(static_cast<void*>(orow), 0, sizeof(scalar_t) * V);
        for (int64_t k = 0; k < K; ++k) orow[ir[k]] = static_cast<scalar_t>(buf[ir[k]]);
      }
    }
  });
}

at::Tensor topk_kl_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                                const at::Tensor& target_ids, const at::Tensor& target_probs,
                                const at::Tensor& lse, const std::optional<at::Tensor>& row_weight,
                                bool full_normalize, bool check_values) {
  check_topk_kl_backward_args(grad_loss, logits, target_ids, target_probs, lse, row_weight);
  const int64_t N = logits.size(0), V = logits.size(1);
  const Targets t = prepare_targets(target_ids, target_probs, row_weight, N, V, check_values);
  at::Tensor out = cached_empty({N, V}, logits.scalar_type());
  if (N == 0) return out;
  const at::Tensor zc = logits.contiguous();
  const at::Tensor g = to_f32(grad_loss), l = to_f32(lse);
  LETHE_DISPATCH_FLOATS(zc.scalar_type(),
                                  "topk_kl_backward_cpu", [&] {
                                    topk_kl_backward_rows<scalar_t>(
                                        g.const_data_ptr<float>(), zc.const_data_ptr<scalar_t>(),
                                        t.ids.const_data_ptr<int64_t>(),
                                        t.q.const_data_ptr<float>(), l.const_data_ptr<float>(),
                                        t.w.defined() ? t.w.const_data_ptr<float>() : nullptr, N,
                                        V, t.K, full_normalize, out.mutable_data_ptr<scalar_t>());
                                  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// fused_linear_topk_kl
// ---------------------------------------------------------------------------------------------

// One chunk of rows: z [c, V] fp32 logits without bias -> loss; with grads, z becomes the
// gradient rows (incl. row_weight * grad_row_scale) in place.
void fused_rows(float* z, const float* b, const int64_t* ids, const float* q, const float* w,
                const float* srs, int64_t c, int64_t V, int64_t K, bool full, float* loss) {
  at::parallel_for(0, c, row_grain(V), [&](int64_t r0, int64_t r1) {
    std::vector<float> zk(K);
    for (int64_t r = r0; r < r1; ++r) {
      float* zr = z + r * V;
      const int64_t* ir = ids + r * K;
      const float* qr = q + r * K;
      const float sq = sum_of(qr, K);
      if (sq == 0.0f) {  // no target: no loss, no gradient
        loss[r] = 0.0f;
        if (srs) std::memset(zr, 0, sizeof(float) * V);
        continue;
      }
      for (int64_t k = 0; k < K; ++k) zk[k] = b ? zr[ir[k]] + b[ir[k]] : zr[ir[k]];
      const float l = full ? row_lse(zr, b, V) : lse_small(zk.data(), K);
      const float kl = kl_row(zk.data(), qr, K, l);
      loss[r] = w ? w[r] * kl : kl;
      if (!srs) continue;
      const float coef = w ? srs[r] * w[r] : srs[r];
      const float a = coef * sq;
      if (full && a != 0.0f) {
        row_exp_write(zr, zr, b, V, l, a);  // the softmax part, over the whole row
      } else {
        // with the top-K normaliser the softmax part lives on the target ids only
        if (!full)
          for (int64_t k = 0; k < K; ++k) zk[k] = shred::softmax_part(a, zk[k], l);
        std::memset(zr, 0, sizeof(float) * V);
      }
      for (int64_t k = 0; k < K; ++k) zr[ir[k]] += (full ? 0.0f : zk[k]) - coef * qr[k];
    }
  });
}

FusedResult fused_linear_topk_kl_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target_ids, const at::Tensor& target_probs,
    const std::optional<at::Tensor>& row_weight, const std::optional<at::Tensor>& grad_row_scale,
    bool full_normalize, int64_t chunk_size, bool grad_hidden, bool grad_weight, bool grad_bias,
    bool check_values) {
  const GradMask want = check_fused_linear_topk_kl_args(hidden, weight, bias, target_ids, target_probs, row_weight,
                                                        grad_row_scale, chunk_size, grad_hidden, grad_weight,
                                                        grad_bias);
  const int64_t N = hidden.size(0), V = weight.size(0);
  const Targets t = prepare_targets(target_ids, target_probs, row_weight, N, V, check_values);
  at::Tensor loss = at::empty({N}, at::TensorOptions().dtype(at::kFloat));
  if (N == 0) return fused_result(loss, want, hidden, weight, bias);

  const at::Tensor b = present(bias) ? to_f32(*bias) : at::Tensor();
  const at::Tensor srs = want.any() ? to_f32(*grad_row_scale) : at::Tensor();
  const int64_t* ids = t.ids.const_data_ptr<int64_t>();
  const float* q = t.q.const_data_ptr<float>();
  const float* w = t.w.defined() ? t.w.const_data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  float* lossp = loss.mutable_data_ptr<float>();
  const int64_t K = t.K;
  cpu::LmHead head(hidden, weight, chunk_size);
  HeadGrads g = head.run(
      [&](int64_t s, int64_t c, at::Tensor& z) {
        fused_rows(z.mutable_data_ptr<float>(), bp, ids + s * K, q + s * K, w ? w + s : nullptr,
                   want.any() ? srs.const_data_ptr<float>() + s : nullptr, c, V, K, full_normalize, lossp + s);
      },
      want);
  return fused_result(loss, want, hidden, weight, bias, g.hidden,
                      want.w ? grad_as(g.weight, weight) : at::Tensor(),
                      want.b ? grad_as(g.bias, *bias) : at::Tensor());
}

}  // namespace

void check_target_values(const at::Tensor& ids, const at::Tensor& q, int64_t V, float tol, bool probs) {
  first_bad_target(ids.const_data_ptr<int64_t>(), q.const_data_ptr<float>(), ids.size(0), ids.size(1), V, tol, probs);
}

TORCH_LIBRARY_IMPL(lethe, CPU, m) {
  m.impl("topk_kl", &topk_kl_cpu);
  m.impl("topk_kl_backward", &topk_kl_backward_cpu);
  m.impl("fused_linear_topk_kl", &fused_linear_topk_kl_cpu);
}

}  // namespace lethe
