// CPU kernels of the ssd family (definitions: python/lethe/ops/ssd_reference.py; arithmetic:
// lethe/ssd.h). Every op is one pass over its list: each tensor is cut into blocks of
// ssd::kBlock elements (a fixed partition, independent of the thread count) and one
// at::parallel_for runs over all blocks of all tensors. A block is processed in chunks of kChunk
// elements converted to fp32 (convert.h: fp16 / bf16 by bit arithmetic, rounding to nearest even
// on the way out; fp32 data is used in place).
//   fisher_accumulate: I + (g * g) * s over the chunk (vectorised by the compiler); a bf16 I is
//                      stored by stochastic rounding with the hash's random bits.
//   ssd_dampen:        8-lane vectors (GCC vector extensions, one clone per vector ISA): the
//                      selection mask, the factor, the product, and per lane the count and the
//                      fp64 sum of the factors; a general exponent takes the scalar pow path.
//                      Block sums go to a buffer the host adds per tensor in block order.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "convert.h"  // load_data, store_data, F8v / D4v
#include "lethe/ssd.h"
#include "lethe/ssd_checks.h"
#include "vec.h"  // LETHE_CLONES, LETHE_INLINE

namespace lethe {
namespace {

constexpr int64_t kChunk = 1024;  // elements converted at a time (4 KiB per fp32 stream)
typedef int32_t I8v __attribute__((vector_size(32)));
typedef int64_t L4v __attribute__((vector_size(32)));

struct Item {  // one tensor of the list
  void* a;        // fisher: importance; dampen: param
  at::ScalarType adt;
  const void* b;  // fisher: grad; dampen: importance (d)
  at::ScalarType bdt;
  const void* c;  // dampen: forget_importance (f)
  at::ScalarType cdt;
  int64_t n;
  int64_t block0;  // its first block in the op's list of blocks
  uint32_t key;    // fisher: the random bits' key
};

// The items and the total number of blocks.
int64_t plan(std::vector<Item>& items) {
  int64_t b = 0;
  for (auto& it : items) {
    it.block0 = b;
    b += ssd::num_blocks(it.n);
  }
  return b;
}

// The item of block `blk` (items ordered by block0; empty tensors have no block).
const Item& item_of(const std::vector<Item>& items, int64_t blk) {
  auto it = std::upper_bound(items.begin(), items.end(), blk,
                             [](int64_t v, const Item& x) { return v < x.block0; });
  return *(it - 1);
}

// ---- fisher_accumulate

LETHE_CLONES void fisher_f32(float* out, const float* imp, const float* g, int64_t n, float s) {
  for (int64_t e = 0; e < n; ++e) out[e] = ssd::fisher_value(imp[e], g[e], s);
}

// imp (bf16 bits) <- bf16_stochastic(imp + (g * g) * s) over n elements from element e0 of the
// tensor: 8 lanes at a time (the hash of ssd::random_bits in uint32 vectors), then the tail.
LETHE_CLONES void fisher_bf16(uint16_t* imp, const float* g, int64_t n, float s, uint32_t key, int64_t e0) {
  int64_t e = 0;
  const U8v lane = {0, 1, 2, 3, 4, 5, 6, 7};
  for (; e + 8 <= n; e += 8) {
    H8v h;
    std::memcpy(&h, imp + e, sizeof(h));
    F8v vg;
    std::memcpy(&vg, g + e, sizeof(vg));
    const F8v v = bf16_to_float(h) + (vg * vg) * s;
    const uint64_t i0 = static_cast<uint64_t>(e0 + e);
    // the 8 indices share their upper 32 bits unless the block crosses 2^32: then lane by lane
    U8v r;
    if ((i0 >> 32) == ((i0 + 7) >> 32)) {
      const uint32_t hi = ssd::hash32<uint32_t>(static_cast<uint32_t>(i0 >> 32) ^ key);
      r = ssd::hash32<U8v>(((U8v{} + static_cast<uint32_t>(i0)) + lane) ^ hi);
    } else {
      for (int l = 0; l < 8; ++l) r[l] = ssd::random_bits(key, static_cast<int64_t>(i0) + l);
    }
    const U8v u = bits<U8v>(v);
    U8v out = (u + (r & 0xffffu)) >> 16;
    out = (u & 0x7fffffffu) > 0x7f800000u ? U8v{} + 0x7fc0u : out;
    const H8v o16 = __builtin_convertvector(out, H8v);
    std::memcpy(imp + e, &o16, sizeof(o16));
  }
  for (; e < n; ++e) {
    float v = bf16_to_float(H8v{} + imp[e])[0] + (g[e] * g[e]) * s;
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    imp[e] = ssd::bf16_stochastic(u, ssd::random_bits(key, e0 + e));
  }
}

void fisher_block(const Item& it, int64_t blk, float s) {
  float gbuf[kChunk];
  const int64_t first = (blk - it.block0) * ssd::kBlock, last = std::min(it.n, first + ssd::kBlock);
  for (int64_t o = first; o < last; o += kChunk) {
    const int64_t n = std::min(kChunk, last - o);
    const float* g = load_data<float>(it.b, it.bdt, o, n, gbuf);
    if (it.adt == at::kFloat) {
      float* imp = static_cast<float*>(it.a) + o;
      fisher_f32(imp, imp, g, n, s);
    } else {  // bf16
      fisher_bf16(static_cast<uint16_t*>(it.a) + o, g, n, s, it.key, o);
    }
  }
}

void fisher_accumulate_cpu(at::TensorList importance, at::TensorList grad, double scale, int64_t seed) {
  check_fisher_accumulate(importance, grad, scale, seed);
  std::vector<Item> items;
  for (size_t t = 0; t < importance.size(); ++t) {
    if (importance[t].numel() == 0) continue;
    items.push_back({importance[t].data_ptr(), importance[t].scalar_type(), grad[t].const_data_ptr(),
                     grad[t].scalar_type(), nullptr, at::kFloat, importance[t].numel(), 0,
                     ssd::tensor_key(seed, static_cast<int64_t>(t))});
  }
  const int64_t nb = plan(items);
  const float s = static_cast<float>(scale);
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) fisher_block(item_of(items, b), b, s);
  });
}

// ---- ssd_dampen

struct Sums {
  int64_t count = 0;
  double sum = 0;
};

// y = p * w where selected, else p, over n fp32 values (y may be p); the count and the fp64 sum of
// the factors added to acc. The exponent kind is a template argument, so each loop is branch-free.
template <int kKind>
LETHE_INLINE void dampen_f32(float* y, const float* p, const float* d, const float* f, int64_t n, float alpha,
                             float lambd, double e, float bound, Sums& acc) {
  int64_t i = 0;
  if constexpr (kKind != ssd::kPowGeneral) {
    I8v cnt = {};
    D4v s_lo = {}, s_hi = {};
    const F8v va = F8v{} + alpha, vl = F8v{} + lambd, vb = F8v{} + bound, zero = {};
    for (; i + 8 <= n; i += 8) {
      F8v vd, vf, vp;
      std::memcpy(&vd, d + i, sizeof(vd));
      std::memcpy(&vf, f + i, sizeof(vf));
      std::memcpy(&vp, p + i, sizeof(vp));
      const I8v sel = vf > vd * va;
      F8v w = (vd * vl) / vf;
      if constexpr (kKind == ssd::kPowZero) w = F8v{} + 1.0f;
      if constexpr (kKind == ssd::kPowTwo) w = w * w;
      if constexpr (kKind == ssd::kPowThree) w = w * w * w;
      if constexpr (kKind == ssd::kPowNegOne) w = 1.0f / w;
      w = w > vb ? vb : w;
      const F8v out = sel ? vp * w : vp;
      std::memcpy(y + i, &out, sizeof(out));
      cnt -= sel;
      const F8v ws = sel ? w : zero;
      s_lo += __builtin_convertvector(__builtin_shufflevector(ws, ws, 0, 1, 2, 3), D4v);
      s_hi += __builtin_convertvector(__builtin_shufflevector(ws, ws, 4, 5, 6, 7), D4v);
    }
    for (int l = 0; l < 8; ++l) acc.count += cnt[l];
    for (int l = 0; l < 4; ++l) acc.sum += s_lo[l];
    for (int l = 0; l < 4; ++l) acc.sum += s_hi[l];
  }
  for (; i < n; ++i) {
    const int kind = kKind;
    if (ssd::selected(d[i], f[i], alpha)) {
      const float w = ssd::factor(d[i], f[i], lambd, kind, e, bound);
      y[i] = p[i] * w;
      acc.count += 1;
      acc.sum += static_cast<double>(w);
    } else {
      y[i] = p[i];
    }
  }
}

LETHE_CLONES void dampen_chunk(float* y, const float* p, const float* d, const float* f, int64_t n, float alpha,
                               float lambd, int kind, double e, float bound, Sums& acc) {
  switch (kind) {
    case ssd::kPowZero: return dampen_f32<ssd::kPowZero>(y, p, d, f, n, alpha, lambd, e, bound, acc);
    case ssd::kPowOne: return dampen_f32<ssd::kPowOne>(y, p, d, f, n, alpha, lambd, e, bound, acc);
    case ssd::kPowTwo: return dampen_f32<ssd::kPowTwo>(y, p, d, f, n, alpha, lambd, e, bound, acc);
    case ssd::kPowThree: return dampen_f32<ssd::kPowThree>(y, p, d, f, n, alpha, lambd, e, bound, acc);
    case ssd::kPowNegOne: return dampen_f32<ssd::kPowNegOne>(y, p, d, f, n, alpha, lambd, e, bound, acc);
    default: return dampen_f32<ssd::kPowGeneral>(y, p, d, f, n, alpha, lambd, e, bound, acc);
  }
}

struct DampenArgs {
  float alpha, lambd, bound;
  int kind;
  double e;
};

Sums dampen_block(const Item& it, int64_t blk, const DampenArgs& a) {
  float pbuf[kChunk], dbuf[kChunk], fbuf[kChunk];
  Sums acc;
  const int64_t first = (blk - it.block0) * ssd::kBlock, last = std::min(it.n, first + ssd::kBlock);
  for (int64_t o = first; o < last; o += kChunk) {
    const int64_t n = std::min(kChunk, last - o);
    const float* d = load_data<float>(it.b, it.bdt, o, n, dbuf);
    const float* f = load_data<float>(it.c, it.cdt, o, n, fbuf);
    if (it.adt == at::kFloat) {
      float* p = static_cast<float*>(it.a) + o;
      dampen_chunk(p, p, d, f, n, a.alpha, a.lambd, a.kind, a.e, a.bound, acc);
    } else {
      const float* p = load_data<float>(it.a, it.adt, o, n, pbuf);
      dampen_chunk(pbuf, p, d, f, n, a.alpha, a.lambd, a.kind, a.e, a.bound, acc);
      store_data<float>(it.a, it.adt, o, n, pbuf);
    }
  }
  return acc;
}

std::tuple<at::Tensor, at::Tensor> ssd_dampen_cpu(at::TensorList param, at::TensorList importance,
                                                  at::TensorList forget_importance, double alpha, double lambd,
                                                  double exponent, double bound) {
  check_ssd_dampen(param, importance, forget_importance, alpha, lambd, exponent, bound);
  const int64_t T = static_cast<int64_t>(param.size());
  std::vector<Item> items;
  std::vector<int64_t> index;  // the list position of each item
  for (int64_t t = 0; t < T; ++t) {
    if (param[t].numel() == 0) continue;
    items.push_back({param[t].data_ptr(), param[t].scalar_type(), importance[t].const_data_ptr(),
                     importance[t].scalar_type(), forget_importance[t].const_data_ptr(),
                     forget_importance[t].scalar_type(), param[t].numel(), 0, 0});
    index.push_back(t);
  }
  const int64_t nb = plan(items);
  const DampenArgs a{static_cast<float>(alpha), static_cast<float>(lambd), static_cast<float>(bound),
                     ssd::power_kind(exponent), exponent};
  std::vector<Sums> part(nb);
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) part[b] = dampen_block(item_of(items, b), b, a);
  });
  at::Tensor counts = at::zeros({T}, param[0].options().dtype(at::kLong));
  at::Tensor sums = at::zeros({T}, param[0].options().dtype(at::kDouble));
  int64_t* c = counts.mutable_data_ptr<int64_t>();
  double* s = sums.mutable_data_ptr<double>();
  for (size_t i = 0; i < items.size(); ++i) {
    const int64_t end = i + 1 < items.size() ? items[i + 1].block0 : nb;
    for (int64_t b = items[i].block0; b < end; ++b) {
      c[index[i]] += part[b].count;
      s[index[i]] += part[b].sum;
    }
  }
  return {counts, sums};
}

}  // namespace

TORCH_LIBRARY_IMPL(lethe, CPU, m) {
  m.impl("fisher_accumulate", &fisher_accumulate_cpu);
  m.impl("ssd_dampen", &ssd_dampen_cpu);
}

}  // namespace lethe
