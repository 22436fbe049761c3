#pragma once
// The per-element arithmetic of the gu family (the retain subspace of Geometric-Disentanglement
// Unlearning), written once for the CPU and CUDA kernels; the definitions are
// python/lethe/ops/gu_reference.py. Per tensor t the compute type acc_t is float, or double when
// basis[t] is float64; data (x, exp_avg_sq, out) of any float dtype is converted to acc_t on load.
//   dots:      u = 1 / (sqrt(v) + eps) (1 without exp_avg_sq); per scope sum_e u z_i z_j
//   axpy:      y = scale * (x - sum_{i<K_t} coeff_i q_i); stats sum_e y^2 (and sum_e q_i y)
//   transform: q'_i = sum_{j<K_t} coeff_ij q_j
// The sums run in acc_t within a block of kBlock elements of one tensor (a fixed partition,
// independent of the thread count and the launch), then in fp64 over the blocks of a scope in
// block order, so that every result is deterministic.
#include <cmath>
#include <cstdint>

#include "lethe/common.h"

namespace lethe {
namespace gu {

constexpr int64_t kMaxRows = 16;   // MAX_ROWS of python/lethe/ops/gu.py
constexpr int64_t kBlock = 4096;   // elements per block of the fixed partition (a multiple of 8)

// Number of blocks of a tensor of n elements (0 for n = 0).
LETHE_HD int64_t num_blocks(int64_t n) { return (n + kBlock - 1) / kBlock; }

// Outputs per scope: K + 1 (dots, axpy) or (K + 1)^2 (gram).
LETHE_HD int64_t num_outputs(int64_t k, bool gram) { return gram ? (k + 1) * (k + 1) : k + 1; }

// The upper triangle (i <= j) of an n x n Gram matrix, packed row by row: the index of (i, j), and
// the number of entries n (n + 1) / 2.
LETHE_HD int64_t tri_size(int64_t n) { return n * (n + 1) / 2; }
LETHE_HD int64_t tri_index(int64_t i, int64_t j, int64_t n) { return i * n - i * (i - 1) / 2 + (j - i); }

// acc_t of a value of any float dtype (float, double, c10::Half, c10::BFloat16: their conversion
// operators work on host and device).
template <typename acc_t, typename scalar_t>
LETHE_HD acc_t load(const scalar_t* p, int64_t i) {
  return static_cast<acc_t>(static_cast<float>(p[i]));
}
template <>
LETHE_HD double load<double, double>(const double* p, int64_t i) { return p[i]; }
template <>
LETHE_HD float load<float, double>(const double* p, int64_t i) { return static_cast<float>(p[i]); }

// A value of acc_t stored in scalar_t (round to nearest even).
template <typename scalar_t, typename acc_t>
LETHE_HD scalar_t store_cast(acc_t v) {
  return static_cast<scalar_t>(v);
}

LETHE_HD float gu_sqrt(float v) { return sqrtf(v); }
LETHE_HD double gu_sqrt(double v) { return sqrt(v); }

// The Adam metric's weight u = 1 / (sqrt(v) + eps) in acc_t (eps rounded to acc_t once by the
// caller: eps_acc = static_cast<acc_t>(eps)).
template <typename acc_t>
LETHE_HD acc_t metric_weight(acc_t v, acc_t eps) {
  return acc_t(1) / (gu_sqrt(v) + eps);
}

// y = scale * (x - sum_{i<kt} coeff_i q_i) for one element (q: its kt basis values, in acc_t).
template <typename acc_t>
LETHE_HD acc_t axpy_value(acc_t x, const acc_t* coeff, const acc_t* q, int64_t kt, acc_t scale) {
  acc_t s = x;
  for (int64_t i = 0; i < kt; ++i) s -= coeff[i] * q[i];
  return scale * s;
}

}  // namespace gu
}  // namespace lethe
