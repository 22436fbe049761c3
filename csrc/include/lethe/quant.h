#pragma once
// The arithmetic of fake quantisation, written once for the CPU and CUDA kernels.
// Every backend (and the pure-PyTorch reference, python/lethe/ops/quant_reference.py) follows exactly
// these steps in fp32, so the quantised codes agree bit for bit:
//   symmetric int:  scale = absmax / scale_div, inv = 1 / scale,
//                   code = clamp(rne(x * inv), -2^(b-1), 2^(b-1)-1), y = code * scale
//   asymmetric int: lo = min(min x, 0), hi = max(max x, 0),
//                   scale = (hi/2 - lo/2) / (qmax/2)          (== (hi-lo)/qmax without overflow)
//                   zp = clamp(rne(-lo * inv), 0, qmax), code = clamp(rne(x * inv) + zp, 0, qmax),
//                   y = (code - zp) * scale                   with qmax = 2^b - 1
//   nf4:            scale = absmax, v = x * inv, code = #(NF4 midpoints < v), y = NF4[code] * scale
// Multiplying by the reciprocal is torchao's and bitsandbytes' convention, and cheaper than a
// division per element. Special groups: a scale below FLT_MIN (all zeros, or a subnormal absmax,
// whose reciprocal would overflow) gives y = 0; a group holding Inf or NaN gives y = NaN for the
// whole group and a zero clipped-STE mask.
#include <cmath>
#include <cstdint>

#include "lethe/common.h"

namespace lethe {
namespace quant {

enum Codebook : int64_t { kInt = 0, kNF4 = 1 };

constexpr float kMinScale = 1.17549435e-38f;  // FLT_MIN

// The 16 NF4 levels (QLoRA), and the fp32 midpoints between neighbours, 0.5f * (a + b).
#define LETHE_NF4_LEVELS                                                                       \
  {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,                   \
   -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,                  \
   0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,     \
   0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f}

// Running statistics of one group.
struct Stats {
  float lo;   // min(x), 0 included
  float hi;   // max(x), 0 included
  bool finite;
};

LETHE_HD Stats stats_init() { return Stats{0.0f, 0.0f, true}; }

LETHE_HD void stats_add(Stats& s, float v) {
  s.finite = s.finite && std::isfinite(v);
  s.lo = v < s.lo ? v : s.lo;
  s.hi = v > s.hi ? v : s.hi;
}

LETHE_HD Stats stats_merge(Stats a, Stats b) {
  return Stats{a.lo < b.lo ? a.lo : b.lo, a.hi > b.hi ? a.hi : b.hi, a.finite && b.finite};
}

// Per-group parameters: y = (code - zp) * scale; invalid = the group held Inf/NaN.
struct Params {
  float scale;
  float inv;  // 1 / scale, or 0 when scale < kMinScale
  float zp;
  float qmin;
  float qmax;
  bool invalid;
};

// Round half to even: adding and removing 1.5 * 2^23 rounds exactly for |v| < 2^22 (and
// vectorises, unlike nearbyint). Larger |v| (a tiny scale from a user's scale_div) may round by
// one, but lies far outside every code range ([-128, 255]), so the clamp gives the same code and
// the same clipped-STE mask as exact rounding.
LETHE_HD float rne(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return (v + 12582912.0f) - 12582912.0f;  // host code is built with -ffp-contract=off
#endif
}

LETHE_HD float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

LETHE_HD Params make_params(Stats s, int64_t bits, int64_t codebook, bool symmetric,
                            float scale_div) {
  Params p;
  p.invalid = !s.finite;
  float absmax = (-s.lo) > s.hi ? (-s.lo) : s.hi;
  if (codebook == kNF4) {
    p.scale = absmax;
    p.zp = 0.0f;
    p.qmin = 0.0f;
    p.qmax = 15.0f;
  } else if (symmetric) {
    p.scale = absmax / scale_div;
    p.zp = 0.0f;
    p.qmin = -static_cast<float>(int64_t(1) << (bits - 1));
    p.qmax = static_cast<float>((int64_t(1) << (bits - 1)) - 1);
  } else {
    p.qmin = 0.0f;
    p.qmax = static_cast<float>((int64_t(1) << bits) - 1);
    p.scale = (s.hi * 0.5f - s.lo * 0.5f) / (p.qmax * 0.5f);  // no FMA: see setup.py
  }
  p.inv = p.scale >= kMinScale ? 1.0f / p.scale : 0.0f;
  if (codebook != kNF4 && !symmetric) {
    p.zp = p.scale >= kMinScale ? clampf(rne(-s.lo * p.inv), p.qmin, p.qmax) : 0.0f;
  }
  return p;
}

// The NF4 level nearest to v (ties to the lower level): a compare-and-select chain over the fp32
// midpoints, so that no indexed array lands in GPU local memory and the CPU loop vectorises.
LETHE_HD float nf4_level(float v) {
  constexpr float levels[16] = LETHE_NF4_LEVELS;
  float level = levels[0];
  LETHE_UNROLL
  for (int i = 0; i < 15; ++i) level = v > 0.5f * (levels[i] + levels[i + 1]) ? levels[i + 1] : level;
  return level;
}

// One value of a group that is neither invalid nor zero-scale, integer and NF4 codebooks: the
// per-element step, which the CPU loops run after testing the group once.
LETHE_HD float int_value(float x, const Params& p, bool* kept) {
  const float q = rne(x * p.inv) + p.zp;
  const float code = clampf(q, p.qmin, p.qmax);
  *kept = code == q;
  return (code - p.zp) * p.scale;
}

LETHE_HD float nf4_value(float x, const Params& p) { return nf4_level(x * p.inv) * p.scale; }

// Quantise-dequantise one value; *kept is the clipped-STE mask (false where the code was clamped).
LETHE_HD float fake_quant_value(float x, const Params& p, int64_t codebook, bool* kept) {
  if (p.invalid) {
    *kept = false;
    return NAN;
  }
  if (!(p.scale >= kMinScale)) {
    *kept = true;
    return 0.0f;
  }
  if (codebook == kNF4) {
    *kept = true;
    return nf4_value(x, p);
  }
  return int_value(x, p, kept);
}

}  // namespace quant
}  // namespace lethe
