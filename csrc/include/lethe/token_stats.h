#pragma once
// Per-row arithmetic of the token_stats op shared by the CPU and CUDA kernels (and mirrored by
// triton_kernels/token_stats.py), so that the CPU tests cover the formulas the GPU runs
// (definitions: python/lethe/ops/token_stats_reference.py).
//
// A row of fp32 logits z[0..V) takes two passes:
//   1. the max m, s = sum_v exp(z_v - m) and t = sum_v exp(z_v - m) (z_v - m), online (when the max
//      grows from m to m', s' = s e^(m - m') and t' = e^(m - m') (t + (m - m') s)), with the
//      argmax and whether a NaN or +inf occurs. Then lse = m + log s and
//      mu = sum_v p_v log p_v = t / s - log s: no sum of large terms cancels (every z_v - m <= 0);
//   2. sigma^2 = sum_v p_v (z_v - lse - mu)^2, centred (not E[(log p)^2] - mu^2, which cancels
//      for a near-uniform row).
// Entries z_v = -inf add 0 to every sum (0 log 0 = 0). Where lse is not finite (a NaN, a +inf, or
// every logit -inf) mu and sigma^2 are NaN, and lse is torch.logsumexp's: NaN, +inf, -inf.
#include <cmath>
#include <cstdint>

#include "lethe/common.h"

namespace lethe {
namespace token_stats {

// Online (max, sum exp, sum exp * (z - max)) over the finite logits and -inf ones (NaN and +inf
// are flagged by the caller and left out).
struct Moments {
  float m, s, t;
};

LETHE_HD Moments moments_init() { return {-INFINITY, 0.0f, 0.0f}; }

// a, rescaled to the larger finite max m2 (a.m < m2): s e^(m - m2), e^(m - m2) (t + (m - m2) s).
LETHE_HD Moments moments_rescale(Moments a, float m2) {
  if (a.m == -INFINITY) return {m2, 0.0f, 0.0f};
  const float d = a.m - m2, f = expf(d);
  return {m2, a.s * f, f * (a.t + d * a.s)};
}

// One logit x (finite or -inf).
LETHE_HD void moments_add(Moments& a, float x) {
  if (x == -INFINITY) return;
  if (x > a.m) {
    a = moments_rescale(a, x);
    a.s += 1.0f;  // exp(0), times (x - m) = 0
  } else {
    const float d = x - a.m, e = expf(d);
    a.s += e;
    a.t += e * d;
  }
}

LETHE_HD Moments moments_merge(Moments a, Moments b) {
  if (b.m > a.m) {
    const Moments c = a;
    a = b;
    b = c;
  }
  if (b.m == -INFINITY) return a;
  b = moments_rescale(b, a.m);
  return {a.m, a.s + b.s, a.t + b.t};
}

// lse and mu from the row's moments. m: the max over the non-NaN logits (+inf included: the CPU
// and Triton kernels' max) or over the finite ones (pinf then says whether a +inf occurred).
LETHE_HD void finish_row(float m, float s, float t, bool nan, bool pinf, float* lse, float* mu) {
  if (nan) {
    *lse = NAN;
  } else if (pinf || m == INFINITY) {
    *lse = INFINITY;
  } else if (m == -INFINITY) {
    *lse = -INFINITY;
  } else {
    const float ls = logf(s);
    *lse = m + ls;
    *mu = t / s - ls;
    return;
  }
  *mu = NAN;
}

// One entry of the centred second pass: p (log p - mu)^2, with log p = x - lse (lse finite); 0
// for x = -inf.
LETHE_HD float var_term(float x, float lse, float mu) {
  if (x == -INFINITY) return 0.0f;
  const float lp = x - lse, d = lp - mu;
  return expf(lp) * d * d;
}

// The argmax order: a comes before b when it is NaN and b is not, or larger, or equal (or both
// NaN) with a lower index: torch.argmax's first maximal id, a NaN counting as the maximum.
LETHE_HD bool argmax_before(float a, int64_t ia, float b, int64_t ib) {
  const bool na = a != a, nb = b != b;
  if (na || nb) return na != nb ? na : ia < ib;
  if (a != b) return a > b;
  return ia < ib;
}

}  // namespace token_stats
}  // namespace lethe
