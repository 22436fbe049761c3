#pragma once
// The per-element arithmetic of the ssd family (Selective Synaptic Dampening), written once for
// the CPU and CUDA kernels; the definitions are python/lethe/ops/ssd_reference.py (the authors'
// rule, op for op, in fp32). No FMA anywhere (-ffp-contract=off, --fmad=false): the products
// round as torch's separate operations do.
//   fisher_accumulate:  v = I + (g * g) * s; a bf16 I stored by stochastic rounding
//   ssd_dampen:         selected = f > d * alpha; w = min_b(((d * lambd) / f) ^ e); p * w
// Every list is cut into blocks of kBlock elements of one tensor (a fixed partition, independent
// of the thread count and the launch); ssd_dampen's counts and factor sums are per block, then
// summed per tensor in block order (fp64), so that they are deterministic.
#include <cmath>
#include <cstdint>

#include "lethe/common.h"

namespace lethe {
namespace ssd {

constexpr int64_t kBlock = 16384;  // elements per block of the fixed partition

LETHE_HD int64_t num_blocks(int64_t n) { return (n + kBlock - 1) / kBlock; }

// ---- the random bits of stochastic rounding: a counter-based hash of (seed, tensor, element)

// lowbias32 (C. Wellons): a 32-bit integer hash of xor-shifts and multiplications; U is uint32_t,
// or a vector of them (the CPU kernel's 8 lanes).
template <typename U>
LETHE_HD U hash32(U x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The key of tensor t of a call with this seed.
LETHE_HD uint32_t tensor_key(int64_t seed, int64_t t) {
  uint32_t k = hash32<uint32_t>(static_cast<uint32_t>(t) ^ 0x9e3779b9u);
  k = hash32<uint32_t>(static_cast<uint32_t>(static_cast<uint64_t>(seed)) ^ k);
  return hash32<uint32_t>(static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32) ^ k);
}

// 32 random bits of element e of the tensor with this key.
LETHE_HD uint32_t random_bits(uint32_t key, int64_t e) {
  const uint64_t u = static_cast<uint64_t>(e);
  return hash32<uint32_t>(static_cast<uint32_t>(u) ^ hash32<uint32_t>(static_cast<uint32_t>(u >> 32) ^ key));
}

// The bf16 bits of fp32 v (given as its bits u) rounded stochastically: u plus the low 16 random
// bits, truncated (an exact bf16 value stays as it is; NaN -> 0x7FC0, torch's NaN).
LETHE_HD uint16_t bf16_stochastic(uint32_t u, uint32_t r) {
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + (r & 0xffffu)) >> 16);
}

// ---- fisher_accumulate

// The new importance of one element (s: the scale rounded to fp32).
LETHE_HD float fisher_value(float imp, float g, float s) { return imp + (g * g) * s; }

// ---- ssd_dampen

// The exponents torch's pow computes by multiplications and a division (1, 2, 3, -1; 0 is 1): the
// same here, so that the dampened weights equal the authors' bit for bit. Any other exponent is
// 2^(e log2 |x|) in fp64, rounded to fp32 (signed as pow: negative for an odd integer e and x < 0,
// NaN for a non-integer e and x < 0), the same formula as the Triton kernel's: the correctly
// rounded power in all but rare cases, while torch's fp32 pow (0.5 included, whose CPU sqrt is not
// correctly rounded) may be a few ulp off it. (Not pow itself: CUDA's fp64 pow is a call that
// spills registers in the dampen kernel.)
enum Power : int { kPowZero = 0, kPowOne = 1, kPowTwo = 2, kPowThree = 3, kPowNegOne = 4, kPowGeneral = 5 };

inline int power_kind(double e) {
  if (e == 0.0) return kPowZero;
  if (e == 1.0) return kPowOne;
  if (e == 2.0) return kPowTwo;
  if (e == 3.0) return kPowThree;
  if (e == -1.0) return kPowNegOne;
  return kPowGeneral;
}

LETHE_HD float general_power(float x, double e) {
  const double a = static_cast<double>(x);
  double r = exp2(e * log2(fabs(a)));
  if (a < 0) {
    const bool integer = floor(e) == e;
    r = !integer ? NAN : (floor(e * 0.5) * 2.0 != e ? -r : r);
  }
  return static_cast<float>(r);
}

LETHE_HD float power(float x, int kind, double e) {
  switch (kind) {
    case kPowZero: return 1.0f;
    case kPowOne: return x;
    case kPowTwo: return x * x;
    case kPowThree: return x * x * x;
    case kPowNegOne: return 1.0f / x;
    default: return general_power(x, e);
  }
}

LETHE_HD bool selected(float d, float f, float alpha) { return f > d * alpha; }

// The dampening factor of a selected element: ((d * lambd) / f) ^ e, clamped at bound (a NaN, which
// only an Inf importance can give, stays NaN as in the authors' rule).
LETHE_HD float factor(float d, float f, float lambd, int kind, double e, float bound) {
  const float w = power((d * lambd) / f, kind, e);
  return w > bound ? bound : w;
}

}  // namespace ssd
}  // namespace lethe
