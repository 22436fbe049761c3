#pragma once
// Per-row arithmetic of the shred family shared by the CPU and CUDA kernels, so that the CPU tests
// cover the formulas the GPU runs (definitions: python/lethe/ops/shred_reference.py).
#include <cmath>
#include <cstdint>

#include "lethe/common.h"

namespace lethe {
namespace shred {

constexpr int64_t kIgnoreIndex = -100;

// How far a row of target probabilities may sum from 1: 1e-3, or bfloat16's epsilon (as
// target_sum_tol in shred_reference.py).
inline float target_sum_tol(bool bfloat16) { return bfloat16 ? 7.8125e-3f : 1e-3f; }

// One term of KL(q || p) with log p = zk - lse; 0 where q == 0 (0 log 0 = 0).
LETHE_HD float kl_term(float q, float zk, float lse) {
  return q > 0.0f ? q * logf(q) - q * (zk - lse) : 0.0f;
}

// Number of forget positions among n eligible ones: ceil(fraction * n) in double (1e-9 below, so
// that fraction * n that should be an integer is not pushed up by rounding), within [0, n].
LETHE_HD int64_t forget_count(double fraction, int64_t n) {
  int64_t m = static_cast<int64_t>(ceil(fraction * static_cast<double>(n) - 1e-9));
  return m < 0 ? 0 : (m > n ? n : m);
}

// One row of demote_targets: q over the K teacher entries (ids, log-probs lp). At a forget
// position the label's entry (and, with nucleus, every entry whose preceding cumulative
// probability is below top_p) is zeroed; the rest are renormalised, and a row with nothing left
// is all zeros. Cumulative and total sums in double, as torch.cumsum / sum on the CPU. lp may be
// fp32, fp16 or bf16 (each log-prob is read as fp32).
template <typename lp_t>
LETHE_HD void demote_row(const int64_t* ids, const lp_t* lp, int64_t K, int64_t label,
                         bool forget, bool nucleus, float top_p, float* q) {
  double cum = 0.0, s = 0.0;
  for (int64_t j = 0; j < K; ++j) {
    const float p = expf(static_cast<float>(lp[j]));
    cum += static_cast<double>(p);
    bool demote = false;
    if (forget) {
      demote = ids[j] == label;
      if (nucleus) demote = demote || static_cast<float>(cum) - p < top_p;
    }
    const float v = demote ? 0.0f : p;
    q[j] = v;
    s += static_cast<double>(v);
  }
  const float sf = static_cast<float>(s);
  for (int64_t j = 0; j < K; ++j) q[j] = sf > 0.0f ? q[j] / sf : 0.0f;
}

}  // namespace shred
}  // namespace lethe
