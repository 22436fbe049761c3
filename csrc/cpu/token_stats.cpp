// CPU kernel of the token_stats op (definitions: python/lethe/ops/token_stats_reference.py):
// the LM-head driver (lethe/lm_head.h) holds one fp32 [chunk, V] block of logits; per row, two
// vector passes (lethe/token_stats.h): the blocked online max / sum-exp / sum-exp-times-logit with
// the argmax, then the centred variance. All arithmetic in fp32 (8 lanes, vec.h's exp). Labels are
// checked before any work and raise at once.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

#include "gemm.h"
#include "lethe/token_stats.h"
#include "lethe/token_stats_checks.h"
#include "vec.h"

namespace lethe {
namespace {

constexpr float kExpLow = -87.33654475f;  // vexp8(x) = 0 below it

struct RowMoments {
  float m, s, t;  // m: the max over the non-NaN logits (+inf included)
  int64_t argmax;
  bool nan;
};

// The vector state of pass 1: the block's max, the argmax per lane (value, id), a NaN flag per lane.
struct ScanState {
  F8v mv, bv;
  I8v bi, nanv;
};

LETHE_INLINE void scan_vec(ScanState& st, F8v x, I8v ids) {
  st.mv = x > st.mv ? x : st.mv;
  st.nanv |= x != x;
  const I8v gt = x > st.bv;  // strictly larger only: each lane keeps its first maximum
  st.bv = gt ? x : st.bv;
  st.bi = gt ? ids : st.bi;
}

// s += exp(z - m), t += exp(z - m) (z - m); where exp gives 0 (z = -inf included) the term is 0,
// not 0 * -inf.
LETHE_INLINE void moments_vec(F8v& sv, F8v& tv, F8v x, F8v mm) {
  F8v d = x - mm;
  const F8v e = vexp8(d);
  sv += e;
  d = d < kExpLow ? F8v{} + kExpLow : d;
  tv += e * d;
}

// Pass 1 over a row z[0..V): per block of kBlock logits (in L1), the block's max first, then, with
// the row's running max m, s += exp(z - m) and t += exp(z - m) (z - m) per lane (all lanes share
// m; a larger max rescales both, lethe/token_stats.h); meanwhile the argmax per lane and a NaN
// flag. 8-lane vectors (vec.h F8v): the selects stay vector instructions on AVX2 too.
LETHE_CLONES void row_moments(const float* z, int64_t V, RowMoments* out) {
  float m = -kInf;
  F8v sv = {}, tv = {};
  I8v lane;
  for (int j = 0; j < kLanes8; ++j) lane[j] = j;
  ScanState st{F8v{} - kInf, F8v{} - kInf, lane, I8v{}};
  for (int64_t i = 0; i < V; i += kBlock) {
    const int64_t n = std::min(kBlock, V - i), nv = n / kLanes8 * kLanes8;
    const float* zb = z + i;
    F8v tail = F8v{} - kInf;
    st.mv = F8v{} - kInf;
    const I8v base = lane + static_cast<int32_t>(i);
    for (int64_t j = 0; j < nv; j += kLanes8) scan_vec(st, loadu8(zb + j), base + static_cast<int32_t>(j));
    if (nv < n) {
      tail = load_part8(zb + nv, n - nv, -kInf);  // -inf lanes never win nor add
      scan_vec(st, tail, base + static_cast<int32_t>(nv));
    }
    const float bm = hmax(st.mv);
    if (bm > m) {
      if (m > -kInf && bm < kInf) {
        const float d = m - bm, f = std::exp(d);
        tv = (tv + d * sv) * f;
        sv *= f;
      }
      m = bm;
    }
    if (!(m > -kInf && m < kInf)) continue;  // all -inf so far, or a +inf: lse says which
    const F8v mm = F8v{} + m;
    for (int64_t j = 0; j < nv; j += kLanes8) moments_vec(sv, tv, loadu8(zb + j), mm);
    if (nv < n) moments_vec(sv, tv, tail, mm);
  }
  out->m = m;
  out->s = hsum(sv);
  out->t = hsum(tv);
  bool nan = false;
  for (int j = 0; j < kLanes8; ++j) nan |= st.nanv[j] != 0;
  out->nan = nan;
  if (nan) {  // rare: the first NaN is the argmax
    int64_t i = 0;
    while (!std::isnan(z[i])) ++i;
    out->argmax = i;
    return;
  }
  int best = 0;
  for (int j = 1; j < kLanes8; ++j)
    if (token_stats::argmax_before(st.bv[j], st.bi[j], st.bv[best], st.bi[best])) best = j;
  out->argmax = st.bi[best];
}

LETHE_INLINE void var_vec(F8v& acc, F8v x, F8v L, F8v M) {
  F8v lp = x - L;
  const F8v p = vexp8(lp);
  lp = lp < kExpLow ? F8v{} + kExpLow : lp;  // where p = 0 (z = -inf included): 0, not NaN
  const F8v d = lp - M;
  acc += p * d * d;
}

// Pass 2: sum_v p_v (log p_v - mu)^2 with log p_v = z_v - lse (lse finite).
LETHE_CLONES float row_var(const float* z, int64_t V, float lse, float mu) {
  const F8v L = F8v{} + lse, M = F8v{} + mu;
  F8v acc = {};
  const int64_t nv = V / kLanes8 * kLanes8;
  for (int64_t i = 0; i < nv; i += kLanes8) var_vec(acc, loadu8(z + i), L, M);
  if (nv < V) var_vec(acc, load_part8(z + nv, V - nv, -kInf), L, M);
  return hsum(acc);
}

TokenStatsResult token_stats_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& labels,
                                 int64_t ignore_index, int64_t chunk_size) {
  check_token_stats_args(hidden, weight, bias, labels, ignore_index, chunk_size);
  const int64_t N = hidden.size(0), V = weight.size(0);
  TORCH_CHECK_VALUE(V < (int64_t(1) << 31), "weight has too many rows for the CPU kernel: ", V);  // int32 lane ids
  const at::Tensor lab = labels.contiguous();
  const int64_t* lab_p = lab.const_data_ptr<int64_t>();
  check_label_values(lab, V, ignore_index);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor label_lp = at::empty({N}, f32), lse = at::empty({N}, f32), mu = at::empty({N}, f32),
             var = at::empty({N}, f32), argmax = at::empty({N}, hidden.options().dtype(at::kLong));
  if (N == 0) return {label_lp, lse, mu, var, argmax};

  float *llp_p = label_lp.mutable_data_ptr<float>(), *lse_p = lse.mutable_data_ptr<float>(),
        *mu_p = mu.mutable_data_ptr<float>(), *var_p = var.mutable_data_ptr<float>();
  int64_t* am_p = argmax.mutable_data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / V);
  // the chunked LM-head driver holds one [chunk, V] block of logits (lethe/lm_head.h)
  cpu::LmHead(hidden, weight, chunk_size, bias).run([&](int64_t c0, int64_t n, at::Tensor& z) {
    const float* z_p = z.const_data_ptr<float>();
    at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t row = c0 + r;
        const float* zr = z_p + r * V;
        RowMoments rm;
        row_moments(zr, V, &rm);
        float l, u;
        token_stats::finish_row(rm.m, rm.s, rm.t, rm.nan, false, &l, &u);
        lse_p[row] = l;
        mu_p[row] = u;
        var_p[row] = std::isfinite(l) ? row_var(zr, V, l, u) : std::numeric_limits<float>::quiet_NaN();
        am_p[row] = rm.argmax;
        const int64_t y = lab_p[row];
        llp_p[row] = y == ignore_index ? 0.0f : zr[y] - l;
      }
    });
  });
  return {label_lp, lse, mu, var, argmax};
}

}  // namespace

TORCH_LIBRARY_IMPL(lethe, CPU, m) { m.impl("token_stats", &token_stats_cpu); }

}  // namespace lethe
