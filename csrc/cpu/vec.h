// Shared fp32 vector row kernels of the CPU ops (GCC vector extensions, cloned per ISA with
// target_clones): 16-lane float vectors, a vector exp and the blocked online max / sum-exp row
// pass. Everything lives in an anonymous namespace, so each translation unit that includes this
// header gets its own (internal-linkage) copies, as target_clones functions require.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
#define LETHE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LETHE_CLONES
#endif
#define LETHE_INLINE inline __attribute__((always_inline))

namespace lethe {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// Vector row kernels (fp32)
// ---------------------------------------------------------------------------------------------

typedef float F16v __attribute__((vector_size(64)));
typedef int32_t I16v __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 256;  // floats per online-softmax block (1 KiB, stays in L1)

// An fp32 view of n values: the values themselves for float, else converted into buf.
template <typename scalar_t>
LETHE_INLINE const float* f32_view(const scalar_t* src, int64_t n, std::vector<float>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    buf.resize(n);
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf.data();
  }
}

LETHE_INLINE F16v splat(float v) { return F16v{} + v; }

LETHE_INLINE F16v loadu(const float* p) {
  F16v v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

LETHE_INLINE void storeu(float* p, F16v v) { std::memcpy(p, &v, sizeof(v)); }

// The first n (< 16) floats of p, the other lanes set to fill.
LETHE_INLINE F16v load_part(const float* p, int64_t n, float fill) {
  F16v v = splat(fill);
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  return v;
}

// exp for x <= 88 (our arguments are <= ~0): Cody-Waite reduction and Cephes' degree-6
// polynomial, ~1 ulp. exp(x) = 0 below -87.3 (no subnormals); NaN stays NaN. FV is a float vector
// type and IV the int32 vector of its width: F16v / I16v, or F8v / I8v below.
template <typename FV, typename IV>
LETHE_INLINE FV vexp_n(FV x) {
  const FV lo = FV{} + -87.33654475f, hi = FV{} + 88.0f;
  FV xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  FV n = xc * 1.44269504088896341f;
  n = (n + 12582912.0f) - 12582912.0f;  // round to nearest integer
  xc = xc - n * 0.693359375f;
  xc = xc - n * -2.12194440e-4f;
  const FV z = xc * xc;
  FV y = FV{} + 1.9875691500e-4f;
  y = y * xc + 1.3981999507e-3f;
  y = y * xc + 8.3334519073e-3f;
  y = y * xc + 4.1665795894e-2f;
  y = y * xc + 1.6666665459e-1f;
  y = y * xc + 5.0000001201e-1f;
  y = y * z + xc + 1.0f;
  const IV e = (__builtin_convertvector(n, IV) + 127) << 23;
  FV scale;  // 2^n: the bits of e (memcpy, not a pointer cast: strict aliasing)
  std::memcpy(&scale, &e, sizeof(scale));
  FV r = y * scale;
  r = x < lo ? FV{} : r;
  return x != x ? x : r;
}

LETHE_INLINE F16v vexp(F16v x) { return vexp_n<F16v, I16v>(x); }

// 8-lane vectors: an AVX2 target runs their comparisons and selects natively, where it expands
// those of 16-lane vectors piecewise (scalar: -Wvector-operation-performance says so); AVX-512
// runs them as 256-bit instructions. Row kernels dominated by selects use these.
typedef float F8v __attribute__((vector_size(32)));
typedef int32_t I8v __attribute__((vector_size(32)));
constexpr int64_t kLanes8 = 8;

LETHE_INLINE F8v loadu8(const float* p) {
  F8v v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The first n (< 8) floats of p, the other lanes set to fill.
LETHE_INLINE F8v load_part8(const float* p, int64_t n, float fill) {
  F8v v = F8v{} + fill;
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  return v;
}

LETHE_INLINE F8v vexp8(F8v x) { return vexp_n<F8v, I8v>(x); }

// Horizontal max and sum of a vector of either width.
template <typename V>
LETHE_INLINE float hmax(V v) {
  float m = v[0];
  for (int i = 1; i < int(sizeof(V) / sizeof(float)); ++i) m = v[i] > m ? v[i] : m;
  return m;
}

template <typename V>
LETHE_INLINE float hsum(V v) {
  float s = 0.0f;
  for (int i = 0; i < int(sizeof(V) / sizeof(float)); ++i) s += v[i];
  return s;
}

// max and sum(exp(x - max)) of x = z (+ b), online over blocks.
template <bool kBias>
LETHE_INLINE void max_sumexp_impl(const float* z, const float* b, int64_t V, float* m_out,
                                  float* s_out) {
  float m = -kInf;
  F16v sv = {};
  for (int64_t i = 0; i < V; i += kBlock) {
    const int64_t n = std::min(kBlock, V - i), nv = n / kLanes * kLanes;
    const float* zb = z + i;
    const float* bb = kBias ? b + i : nullptr;
    F16v mv = splat(-kInf), tail = splat(-kInf);
    for (int64_t j = 0; j < nv; j += kLanes) {
      F16v x = loadu(zb + j);
      if constexpr (kBias) x += loadu(bb + j);
      mv = x > mv ? x : mv;
    }
    if (nv < n) {
      tail = load_part(zb + nv, n - nv, -kInf);
      if constexpr (kBias) tail += load_part(bb + nv, n - nv, 0.0f);
      mv = tail > mv ? tail : mv;
    }
    const float bm = hmax(mv);
    if (bm > m) {
      sv *= vexp(splat(m - bm));
      m = bm;
    }
    if (m == -kInf) continue;  // everything so far is -inf (or NaN, which max skips)
    const F16v mm = splat(m);
    for (int64_t j = 0; j < nv; j += kLanes) {
      F16v x = loadu(zb + j);
      if constexpr (kBias) x += loadu(bb + j);
      sv += vexp(x - mm);
    }
    if (nv < n) sv += vexp(tail - mm);
  }
  // a NaN anywhere (skipped by the max) still reaches the sum through vexp
  *m_out = m;
  *s_out = hsum(sv);
}

// Entry points, one clone per vector ISA.
LETHE_CLONES void row_max_sumexp(const float* z, const float* b, int64_t V, float* m, float* s) {
  if (b)
    max_sumexp_impl<true>(z, b, V, m, s);
  else
    max_sumexp_impl<false>(z, b, V, m, s);
}

// log-sum-exp of z (+ b) as torch.logsumexp: a NaN anywhere gives NaN, a +inf max gives +inf, an
// all -inf row gives -inf. Rows with a finite max take the vector pass; the rest (rare) need only
// the max and whether a NaN occurs.
inline float row_lse(const float* z, const float* b, int64_t V) {
  float m, s;
  row_max_sumexp(z, b, V, &m, &s);
  if (std::isfinite(m)) return m + std::log(s);
  float mx = -kInf;
  for (int64_t i = 0; i < V; ++i) {
    const float x = b ? z[i] + b[i] : z[i];
    if (std::isnan(x)) return std::numeric_limits<float>::quiet_NaN();
    mx = x > mx ? x : mx;
  }
  return mx;
}

}  // namespace
}  // namespace lethe
