#pragma once
// Per-row arithmetic of the shred family shared by the CPU and CUDA kernels, so that the CPU tests
// cover the formulas the GPU runs (definitions: python/lethe/ops/shred_reference.py).
#include <cmath>
#include <cstdint>

#include "lethe/common.h"

namespace lethe {
namespace shred {

constexpr int64_t kIgnoreIndex = -100;

// One term of KL(q || p) with log p = zk - lse; 0 where q == 0 (0 log 0 = 0).
LETHE_HD float kl_term(float q, float zk, float lse) {
  return q > 0.0f ? q * logf(q) - q * (zk - lse) : 0.0f;
}

// The softmax part a * exp(z - lse) of a gradient entry, with a = coefficient * sum(q): exactly 0
// when the coefficient is (a masked row, a zero weight or upstream gradient), whatever the logits,
// so that such a row never carries a NaN or inf of its logits into the gradient. Every backend
// follows this rule, for both normalisations.
LETHE_HD float softmax_part(float a, float z, float lse) { return a != 0.0f ? a * expf(z - lse) : 0.0f; }

// Number of forget positions among n eligible ones: ceil(fraction * n) in double (1e-9 below, so
// that fraction * n that should be an integer is not pushed up by rounding), within [0, n].
LETHE_HD int64_t forget_count(double fraction, int64_t n) {
  int64_t m = static_cast<int64_t>(ceil(fraction * static_cast<double>(n) - 1e-9));
  return m < 0 ? 0 : (m > n ? n : m);
}

// One row of demote_targets: q over the K teacher entries (ids, log-probs lp). At a forget
// position the label's entry (and, with nucleus, every entry whose preceding cumulative
// probability is below top_p) is zeroed; the rest are renormalised, and a row with nothing left
// is all zeros. The probabilities exp(lp) and the nucleus decision are computed in double, so
// that the CPU's and the GPU's exp (0.5 and 2 ulp in fp32) cannot flip the decision when the
// cumulative probability lands next to top_p; q is the kept probabilities rounded to fp32 over
// their double sum. lp may be fp32, fp16 or bf16.
template <typename lp_t>
LETHE_HD void demote_row(const int64_t* ids, const lp_t* lp, int64_t K, int64_t label,
                         bool forget, bool nucleus, double top_p, float* q) {
  double cum = 0.0, s = 0.0;
  for (int64_t j = 0; j < K; ++j) {
    const double p = exp(static_cast<double>(static_cast<float>(lp[j])));
    bool demote = false;
    if (forget) demote = ids[j] == label || (nucleus && cum < top_p);  // cum: the mass before j
    cum += p;
    const float v = demote ? 0.0f : static_cast<float>(p);
    q[j] = v;
    s += static_cast<double>(v);
  }
  for (int64_t j = 0; j < K; ++j) q[j] = s > 0.0 ? static_cast<float>(q[j] / s) : 0.0f;
}

}  // namespace shred
}  // namespace lethe
