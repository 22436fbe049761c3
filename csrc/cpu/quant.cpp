// CPU kernels of the quant family: fake_quantize (quantise-dequantise, optional clipped-STE mask).
// Groups are contiguous runs of group_size elements of the row-major tensor. Small groups are
// processed whole by one thread (stats and apply while the group is in L1); large groups (rows of
// a per-row quantiser, or the whole tensor) are split into chunks: parallel partial stats, a merge,
// then a parallel apply pass.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "lethe/checks.h"
#include "lethe/quant.h"

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
// Runtime dispatch to the widest vector unit; the loops below are written so GCC vectorises them.
#define LETHE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LETHE_CLONES
#endif

namespace lethe {
namespace {

using quant::Params;
using quant::Stats;

constexpr int64_t kLanes = 16;
constexpr int64_t kChunk = 16384;  // elements a task handles; also the largest fused group

// Exact round-half-even for |v| < 2^22; |x * inv| is at most a few hundred here.
inline float rne_small(float v) {
  return (v + 12582912.0f) - 12582912.0f;
}

LETHE_CLONES void stats_f32(const float* x, int64_t n, float* lo_out, float* hi_out,
                            bool* finite_out) {
  float lo[kLanes], hi[kLanes];
  uint32_t bad[kLanes];
  for (int j = 0; j < kLanes; ++j) lo[j] = hi[j] = 0.0f, bad[j] = 0;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float v = x[i + j];
      uint32_t b;
      std::memcpy(&b, &v, 4);
      bad[j] |= (b & 0x7f800000u) == 0x7f800000u;
      lo[j] = v < lo[j] ? v : lo[j];
      hi[j] = v > hi[j] ? v : hi[j];
    }
  }
  Stats s = quant::stats_init();
  for (; i < n; ++i) quant::stats_add(s, x[i]);
  for (int j = 0; j < kLanes; ++j) {
    s.lo = lo[j] < s.lo ? lo[j] : s.lo;
    s.hi = hi[j] > s.hi ? hi[j] : s.hi;
    s.finite = s.finite && !bad[j];
  }
  *lo_out = s.lo;
  *hi_out = s.hi;
  *finite_out = s.finite;
}

LETHE_CLONES void apply_int_f32(const float* x, float* y, bool* mask, int64_t n, float scale,
                                float inv, float zp, float qmin, float qmax) {
  if (mask) {
    for (int64_t i = 0; i < n; ++i) {
      const float q = rne_small(x[i] * inv) + zp;
      const float c = q < qmin ? qmin : (q > qmax ? qmax : q);
      mask[i] = c == q;
      y[i] = (c - zp) * scale;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float q = rne_small(x[i] * inv) + zp;
      const float c = q < qmin ? qmin : (q > qmax ? qmax : q);
      y[i] = (c - zp) * scale;
    }
  }
}

LETHE_CLONES void apply_nf4_f32(const float* x, float* y, int64_t n, float scale, float inv) {
  for (int64_t i = 0; i < n; ++i) y[i] = quant::nf4_level(x[i] * inv) * scale;
}

Stats stats_of(const float* x, int64_t n) {
  Stats s;
  stats_f32(x, n, &s.lo, &s.hi, &s.finite);
  return s;
}

void apply(const float* x, float* y, bool* mask, int64_t n, const Params& p, int64_t codebook) {
  if (p.invalid || !(p.scale >= quant::kMinScale)) {
    const float v = p.invalid ? NAN : 0.0f;
    for (int64_t i = 0; i < n; ++i) y[i] = v;
    if (mask) std::memset(mask, p.invalid ? 0 : 1, n);
  } else if (codebook == quant::kNF4) {
    apply_nf4_f32(x, y, n, p.scale, p.inv);
    if (mask) std::memset(mask, 1, n);
  } else {
    apply_int_f32(x, y, mask, n, p.scale, p.inv, p.zp, p.qmin, p.qmax);
  }
}

// Float views of a span of a possibly reduced-precision tensor: zero-copy for float32.
template <typename scalar_t>
struct F32Span {
  std::vector<float> buf;
  const float* load(const scalar_t* src, int64_t n) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      return src;
    } else {
      buf.resize(n);
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
      return buf.data();
    }
  }
};

template <typename scalar_t>
struct F32Out {
  std::vector<float> buf;
  float* target(scalar_t* dst, int64_t n) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      return dst;
    } else {
      buf.resize(n);
      return buf.data();
    }
  }
  void store(scalar_t* dst, int64_t n) {
    if constexpr (!std::is_same_v<scalar_t, float>) {
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(buf[i]);
    }
  }
};

template <typename scalar_t>
void fake_quantize_impl(const scalar_t* x, scalar_t* y, bool* mask, int64_t numel, int64_t L,
                        int64_t bits, int64_t codebook, bool symmetric, float scale_div) {
  const int64_t G = numel / L;
  if (L <= kChunk) {
    at::parallel_for(0, G, std::max<int64_t>(1, kChunk / L), [&](int64_t g0, int64_t g1) {
      F32Span<scalar_t> in;
      F32Out<scalar_t> out;
      for (int64_t g = g0; g < g1; ++g) {
        const float* xf = in.load(x + g * L, L);
        float* yf = out.target(y + g * L, L);
        const Params p = quant::make_params(stats_of(xf, L), bits, codebook, symmetric, scale_div);
        apply(xf, yf, mask ? mask + g * L : nullptr, L, p, codebook);
        out.store(y + g * L, L);
      }
    });
    return;
  }
  const int64_t C = (L + kChunk - 1) / kChunk;
  std::vector<Stats> partial(G * C);
  at::parallel_for(0, G * C, 1, [&](int64_t t0, int64_t t1) {
    F32Span<scalar_t> in;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / C, c = t % C, start = g * L + c * kChunk;
      const int64_t n = std::min(kChunk, L - c * kChunk);
      partial[t] = stats_of(in.load(x + start, n), n);
    }
  });
  std::vector<Params> params(G);
  for (int64_t g = 0; g < G; ++g) {
    Stats s = partial[g * C];
    for (int64_t c = 1; c < C; ++c) s = quant::stats_merge(s, partial[g * C + c]);
    params[g] = quant::make_params(s, bits, codebook, symmetric, scale_div);
  }
  at::parallel_for(0, G * C, 1, [&](int64_t t0, int64_t t1) {
    F32Span<scalar_t> in;
    F32Out<scalar_t> out;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / C, c = t % C, start = g * L + c * kChunk;
      const int64_t n = std::min(kChunk, L - c * kChunk);
      apply(in.load(x + start, n), out.target(y + start, n), mask ? mask + start : nullptr, n,
            params[g], codebook);
      out.store(y + start, n);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> fake_quantize_cpu(const at::Tensor& x, int64_t group_size,
                                                     int64_t bits, int64_t codebook,
                                                     bool symmetric, double scale_div,
                                                     bool return_mask) {
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor for the CPU kernel, got ", x.device());
  check_fake_quantize_args(x, group_size, bits, codebook, symmetric, scale_div);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc, at::MemoryFormat::Contiguous);
  at::Tensor mask = return_mask ? at::empty(x.sizes(), x.options().dtype(at::kBool))
                                : at::empty({0}, x.options().dtype(at::kBool));
  if (x.numel() == 0) return {y, mask};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fake_quantize_cpu",
                                  [&] {
                                    fake_quantize_impl<scalar_t>(
                                        xc.const_data_ptr<scalar_t>(),
                                        y.mutable_data_ptr<scalar_t>(),
                                        return_mask ? mask.mutable_data_ptr<bool>() : nullptr,
                                        x.numel(), group_size, bits, codebook, symmetric,
                                        static_cast<float>(scale_div));
                                  });
  return {y, mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(lethe, CPU, m) { m.impl("fake_quantize", &fake_quantize_cpu); }

}  // namespace lethe
