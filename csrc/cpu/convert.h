// Conversions of the CPU kernels between fp16 / bf16 / fp32 / fp64 blocks (8-lane GCC vectors,
// bit arithmetic giving c10's results: round to nearest even), shared by the multi-tensor families
// (gu, ssd). Everything lives in an anonymous namespace, as vec.h (one copy per translation unit,
// for target_clones).
#pragma once

#include <ATen/core/ScalarType.h>

#include <cstdint>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "vec.h"  // F8v, LETHE_INLINE

namespace lethe {
namespace {

typedef double D4v __attribute__((vector_size(32)));
typedef float F4v __attribute__((vector_size(16)));
typedef double D2v __attribute__((vector_size(16)));

typedef uint32_t U8v __attribute__((vector_size(32)));
typedef uint16_t H8v __attribute__((vector_size(16)));

template <typename To, typename From>
LETHE_INLINE To bits(From v) {
  static_assert(sizeof(To) == sizeof(From));
  To t;
  std::memcpy(&t, &v, sizeof(t));
  return t;
}

// IEEE square roots of a vector. GCC does not vectorise sqrt under -fmath-errno (the default), and
// the 256-bit builtins are not available to every clone: the SSE ones are (VEX-encoded in the
// AVX clones).
LETHE_INLINE F8v vsqrt(F8v x) {
#if defined(__x86_64__) && defined(__SSE2__)
  F4v lo = __builtin_shufflevector(x, x, 0, 1, 2, 3), hi = __builtin_shufflevector(x, x, 4, 5, 6, 7);
  lo = __builtin_ia32_sqrtps(lo);
  hi = __builtin_ia32_sqrtps(hi);
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7);
#else
  for (int l = 0; l < 8; ++l) x[l] = std::sqrt(x[l]);
  return x;
#endif
}

LETHE_INLINE D4v vsqrt(D4v x) {
#if defined(__x86_64__) && defined(__SSE2__)
  D2v lo = __builtin_shufflevector(x, x, 0, 1), hi = __builtin_shufflevector(x, x, 2, 3);
  lo = __builtin_ia32_sqrtpd(lo);
  hi = __builtin_ia32_sqrtpd(hi);
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3);
#else
  for (int l = 0; l < 4; ++l) x[l] = std::sqrt(x[l]);
  return x;
#endif
}

// ---- fp16 / bf16 <-> fp32, 8 lanes, branch-free (the same results as c10's scalar conversions)

// fp16 -> fp32 as c10's fp16_ieee_to_fp32_value: normal halves (Inf / NaN included) rebiased by a
// multiplication by 2^-112, subnormal ones through a magic number; no fp32 denormal is involved, so
// it holds under flush-to-zero too.
LETHE_INLINE F8v half_to_float(H8v h16) {
  const U8v w = __builtin_convertvector(h16, U8v) << 16;
  const U8v sign = w & 0x80000000u;
  const U8v two_w = w + w;
  const F8v normalized = bits<F8v>((two_w >> 4) + (0xE0u << 23)) * 0x1p-112f;
  const F8v denormalized = bits<F8v>((two_w >> 17) | (126u << 23)) - 0.5f;
  return bits<F8v>(sign | (two_w < (1u << 27) ? bits<U8v>(denormalized) : bits<U8v>(normalized)));
}

LETHE_INLINE F8v bf16_to_float(H8v h16) { return bits<F8v>(__builtin_convertvector(h16, U8v) << 16); }

// fp32 -> fp16, round to nearest even (F. Giesen's float_to_half_fast3_rtne): NaN -> 0x7e00.
LETHE_INLINE H8v float_to_half(F8v f) {
  U8v u = bits<U8v>(f);
  const U8v sign = u & 0x80000000u;
  u ^= sign;
  const U8v norm = (u + 0xC8000000u + 0xfffu + ((u >> 13) & 1u)) >> 13;  // rebias to 15, round
  const U8v sub = bits<U8v>(bits<F8v>(u) + 0.5f) - 0x3f000000u;          // subnormal: align, round
  U8v o = u < (113u << 23) ? sub : norm;
  o = u >= (143u << 23) ? (u > 0x7f800000u ? U8v{} + 0x7e00u : U8v{} + 0x7c00u) : o;
  o |= sign >> 16;
  return __builtin_convertvector(o, H8v);
}

// fp32 -> bf16, round to nearest even: NaN -> 0x7fc0 (as c10::BFloat16).
LETHE_INLINE H8v float_to_bf16(F8v f) {
  const U8v u = bits<U8v>(f);
  U8v r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  r = f != f ? U8v{} + 0x7fc0u : r;
  return __builtin_convertvector(r, H8v);
}

template <typename A>
LETHE_INLINE void put8(A* dst, F8v f, int64_t m) {
  if constexpr (std::is_same_v<A, float>) {
    std::memcpy(dst, &f, m * sizeof(float));
  } else {
    for (int64_t l = 0; l < m; ++l) dst[l] = f[l];
  }
}

template <typename A>
LETHE_INLINE F8v get8(const A* src, int64_t m) {
  F8v f = {};
  if constexpr (std::is_same_v<A, float>) {
    std::memcpy(&f, src, m * sizeof(float));
  } else {
    for (int64_t l = 0; l < m; ++l) f[l] = static_cast<float>(src[l]);
  }
  return f;
}

template <typename A, typename Conv>
LETHE_INLINE void from16(const uint16_t* src, A* dst, int64_t n, Conv conv) {
  int64_t e = 0;
  for (; e + 8 <= n; e += 8) {
    H8v h;
    std::memcpy(&h, src + e, sizeof(h));
    put8(dst + e, conv(h), 8);
  }
  if (e < n) {
    H8v h = {};
    std::memcpy(&h, src + e, (n - e) * sizeof(uint16_t));
    put8(dst + e, conv(h), n - e);
  }
}

template <typename A, typename Conv>
LETHE_INLINE void to16(const A* src, uint16_t* dst, int64_t n, Conv conv) {
  int64_t e = 0;
  for (; e + 8 <= n; e += 8) {
    const H8v h = conv(get8(src + e, 8));
    std::memcpy(dst + e, &h, sizeof(h));
  }
  if (e < n) {
    const H8v h = conv(get8(src + e, n - e));
    std::memcpy(dst + e, &h, (n - e) * sizeof(uint16_t));
  }
}

// A tensor's values [o, o + n) as A: the tensor's own memory when it holds A, else converted into buf.
template <typename A>
LETHE_INLINE const A* load_data(const void* base, at::ScalarType dt, int64_t o, int64_t n, A* buf) {
  constexpr at::ScalarType kA = std::is_same_v<A, float> ? at::kFloat : at::kDouble;
  if (dt == kA) return static_cast<const A*>(base) + o;
  switch (dt) {
    case at::kFloat: {
      const float* p = static_cast<const float*>(base) + o;
      for (int64_t e = 0; e < n; ++e) buf[e] = p[e];
      break;
    }
    case at::kDouble: {
      const double* p = static_cast<const double*>(base) + o;
      for (int64_t e = 0; e < n; ++e) buf[e] = static_cast<A>(p[e]);
      break;
    }
    case at::kHalf:
      from16(static_cast<const uint16_t*>(base) + o, buf, n, half_to_float);
      break;
    default:  // bf16 (the checks allow nothing else)
      from16(static_cast<const uint16_t*>(base) + o, buf, n, bf16_to_float);
      break;
  }
  return buf;
}

// y[0, n) stored in a tensor's values [o, o + n) in its dtype (y is that memory when it holds A).
template <typename A>
LETHE_INLINE void store_data(void* base, at::ScalarType dt, int64_t o, int64_t n, const A* y) {
  switch (dt) {
    case at::kFloat: {
      float* p = static_cast<float*>(base) + o;
      if (static_cast<const void*>(p) != static_cast<const void*>(y))
        for (int64_t e = 0; e < n; ++e) p[e] = static_cast<float>(y[e]);
      break;
    }
    case at::kDouble: {
      double* p = static_cast<double*>(base) + o;
      if (static_cast<const void*>(p) != static_cast<const void*>(y))
        for (int64_t e = 0; e < n; ++e) p[e] = y[e];
      break;
    }
    case at::kHalf:
      to16(y, static_cast<uint16_t*>(base) + o, n, float_to_half);
      break;
    default:
      to16(y, static_cast<uint16_t*>(base) + o, n, float_to_bf16);
      break;
  }
}

}  // namespace
}  // namespace lethe
