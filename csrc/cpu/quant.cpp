// CPU kernels of the quant family: fake_quantize (quantise-dequantise, optional clipped-STE mask).
// Groups are contiguous runs of group_size elements of the row-major tensor. Small groups are
// processed whole by one thread (stats and apply while the group is in L1); large groups (rows of
// a per-row quantiser, or the whole tensor) are split into chunks: parallel partial stats, a merge,
// then a parallel apply pass.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "lethe/cpu_alloc.h"
#include "lethe/quant.h"
#include "lethe/quant_checks.h"
#include "vec.h"  // LETHE_CLONES (one clone per vector ISA), F16v / I16v, kLanes

namespace lethe {
namespace {

using quant::Params;
using quant::Stats;

constexpr int64_t kChunk = 16384;  // elements a task handles; also the largest fused group

// GCC/Clang vector extensions: one source, lowered to zmm, 2 x ymm or 4 x xmm per clone. Plain
// lane arrays left the min/max reduction scalar (GCC will not reorder a float min reduction).

LETHE_INLINE void stats_f32(const float* x, int64_t n, float* lo_out, float* hi_out,
                            bool* finite_out) {
  F16v lo = {}, hi = {};
  I16v bad = {};
  const I16v expo = I16v{} + 0x7f800000;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    F16v v;
    std::memcpy(&v, x + i, sizeof(v));
    I16v b;
    std::memcpy(&b, &v, sizeof(b));
    bad |= (b & expo) == expo;
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  // halve the 16 lanes four times, then the scalar tail
  F16v t;
  t = __builtin_shufflevector(lo, lo, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  lo = t < lo ? t : lo;
  t = __builtin_shufflevector(lo, lo, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3);
  lo = t < lo ? t : lo;
  t = __builtin_shufflevector(lo, lo, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1);
  lo = t < lo ? t : lo;
  t = __builtin_shufflevector(hi, hi, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  hi = t > hi ? t : hi;
  t = __builtin_shufflevector(hi, hi, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3);
  hi = t > hi ? t : hi;
  t = __builtin_shufflevector(hi, hi, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1);
  hi = t > hi ? t : hi;
  I16v u = __builtin_shufflevector(bad, bad, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  bad |= u;
  u = __builtin_shufflevector(bad, bad, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3);
  bad |= u;
  u = __builtin_shufflevector(bad, bad, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1);
  bad |= u;
  Stats s{lo[0] < lo[1] ? lo[0] : lo[1], hi[0] > hi[1] ? hi[0] : hi[1], !(bad[0] | bad[1])};
  for (; i < n; ++i) quant::stats_add(s, x[i]);
  *lo_out = s.lo;
  *hi_out = s.hi;
  *finite_out = s.finite;
}

// The group was tested once (apply): the loops run the header's per-element step only. p is a
// local copy, so the compiler knows the stores to y cannot change it (and vectorises).
LETHE_INLINE void apply_int_f32(const float* x, float* y, bool* mask, int64_t n, const Params p) {
  bool kept;
  if (mask) {
    for (int64_t i = 0; i < n; ++i) {
      y[i] = quant::int_value(x[i], p, &kept);
      mask[i] = kept;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = quant::int_value(x[i], p, &kept);
  }
}

LETHE_INLINE void apply_nf4_f32(const float* x, float* y, int64_t n, const Params p) {
  for (int64_t i = 0; i < n; ++i) y[i] = quant::nf4_value(x[i], p);
}

LETHE_INLINE Stats stats_of(const float* x, int64_t n) {
  Stats s;
  stats_f32(x, n, &s.lo, &s.hi, &s.finite);
  return s;
}

LETHE_INLINE void apply(const float* x, float* y, bool* mask, int64_t n, const Params& p,
                         int64_t codebook) {
  if (p.invalid || !(p.scale >= quant::kMinScale)) {
    const float v = p.invalid ? NAN : 0.0f;
    for (int64_t i = 0; i < n; ++i) y[i] = v;
    if (mask) std::memset(mask, p.invalid ? 0 : 1, n);
  } else if (codebook == quant::kNF4) {
    apply_nf4_f32(x, y, n, p);
    if (mask) std::memset(mask, 1, n);
  } else {
    apply_int_f32(x, y, mask, n, p);
  }
}

// Entry points, one clone per vector ISA, each with the loops above inlined.
LETHE_CLONES void groups_f32(const float* x, float* y, bool* mask, int64_t G, int64_t L,
                             int64_t bits, int64_t codebook, bool symmetric, float scale_div) {
  for (int64_t g = 0; g < G; ++g) {
    const Params p = quant::make_params(stats_of(x + g * L, L), bits, codebook, symmetric, scale_div);
    apply(x + g * L, y + g * L, mask ? mask + g * L : nullptr, L, p, codebook);
  }
}

LETHE_CLONES Stats chunk_stats_f32(const float* x, int64_t n) { return stats_of(x, n); }

LETHE_CLONES void chunk_apply_f32(const float* x, float* y, bool* mask, int64_t n, Params p,
                                  int64_t codebook) {
  apply(x, y, mask, n, p, codebook);
}

template <typename scalar_t>
struct F32Out {  // an fp32 output span, stored back when the tensor is fp16/bf16
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
    const int64_t block = std::max<int64_t>(1, kChunk / L);  // groups converted at a time
    at::parallel_for(0, G, block, [&](int64_t g0, int64_t g1) {
      std::vector<float> inbuf;
      F32Out<scalar_t> out;
      for (int64_t b = g0; b < g1; b += block) {
        const int64_t nb = std::min(block, g1 - b), n = nb * L, start = b * L;
        groups_f32(f32_view(x + start, n, inbuf), out.target(y + start, n), mask ? mask + start : nullptr,
                   nb, L, bits, codebook, symmetric, scale_div);
        out.store(y + start, n);
      }
    });
    return;
  }
  const int64_t C = (L + kChunk - 1) / kChunk;
  std::vector<Stats> partial(G * C);
  at::parallel_for(0, G * C, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> inbuf;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / C, c = t % C, start = g * L + c * kChunk;
      const int64_t n = std::min(kChunk, L - c * kChunk);
      partial[t] = chunk_stats_f32(f32_view(x + start, n, inbuf), n);
    }
  });
  std::vector<Params> params(G);
  for (int64_t g = 0; g < G; ++g) {
    Stats s = partial[g * C];
    for (int64_t c = 1; c < C; ++c) s = quant::stats_merge(s, partial[g * C + c]);
    params[g] = quant::make_params(s, bits, codebook, symmetric, scale_div);
  }
  at::parallel_for(0, G * C, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> inbuf;
    F32Out<scalar_t> out;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / C, c = t % C, start = g * L + c * kChunk;
      const int64_t n = std::min(kChunk, L - c * kChunk);
      chunk_apply_f32(f32_view(x + start, n, inbuf), out.target(y + start, n),
                      mask ? mask + start : nullptr, n, params[g], codebook);
      out.store(y + start, n);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> fake_quantize_cpu(const at::Tensor& x, int64_t group_size,
                                                     int64_t bits, int64_t codebook,
                                                     bool symmetric, double scale_div,
                                                     bool return_mask) {
  check_fake_quantize_args(x, group_size, bits, codebook, symmetric, scale_div);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = cached_empty(x.sizes(), x.scalar_type());
  at::Tensor mask = cached_empty(return_mask ? x.sizes() : at::IntArrayRef{0}, at::kBool);
  if (x.numel() == 0) return {y, mask};
  LETHE_DISPATCH_FLOATS(x.scalar_type(), "fake_quantize_cpu",
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

// grad where mask, else +0: a select on the raw bits (uint of the element's width), so one loop
// serves every float dtype and vectorises; the output comes from the buffer cache (a fresh
// output page-faults on first write, which cost more than the select itself).
template <typename bits_t>
void masked_copy(const bits_t* g, const bool* m, bits_t* out, int64_t n) {
  at::parallel_for(0, n, 1 << 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) out[i] = g[i] & static_cast<bits_t>(-static_cast<bits_t>(m[i]));
  });
}

at::Tensor fake_quantize_backward_cpu(const at::Tensor& grad, const at::Tensor& mask) {
  check_fake_quantize_backward_args(grad, mask);
  const at::Tensor gc = grad.contiguous(), mc = mask.contiguous();
  at::Tensor out = cached_empty(grad.sizes(), grad.scalar_type());
  const int64_t n = grad.numel();
  if (n == 0) return out;
  const bool* m = mc.const_data_ptr<bool>();
  if (grad.element_size() == 4) {
    masked_copy(static_cast<const uint32_t*>(gc.const_data_ptr()), m,
                static_cast<uint32_t*>(out.mutable_data_ptr()), n);
  } else {
    masked_copy(static_cast<const uint16_t*>(gc.const_data_ptr()), m,
                static_cast<uint16_t*>(out.mutable_data_ptr()), n);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lethe, CPU, m) {
  m.impl("fake_quantize", &fake_quantize_cpu);
  m.impl("fake_quantize_backward", &fake_quantize_backward_cpu);
}

}  // namespace lethe
