// CPU kernels of the gu family (definitions: python/lethe/ops/gu_reference.py; arithmetic:
// lethe/gu.h). Every op is one pass over its list: each tensor's rows are cut into blocks of
// gu::kBlock elements (a fixed partition, independent of the thread count) and one
// at::parallel_for runs over all blocks of all tensors. A block computes in its tensor's compute
// type A (float, double for a float64 basis) with 8-lane float / 4-lane double vectors (GCC vector
// extensions, one clone per vector ISA: vec.h's LETHE_CLONES) and writes its sums to an fp64
// buffer; the host then adds them per scope in tensor and block order, so that the results are
// deterministic and the same for any thread count. Data of other dtypes (x, exp_avg_sq, out) is
// converted to A a block at a time (fp16 / bf16 by vectorised bit arithmetic, rounding to nearest
// even on the way out).
//   dots:      per block u = 1 / (sqrt(v) + eps), w = u x; <q_i, w> for 8 rows per pass, <w, x>.
//   gram:      the upper triangle of the rows' Gram matrix, (u z_i) z_j, in 2 x 4 register tiles,
//              mirrored. A tensor's rows lie a row apart, often a power of two of bytes, so the
//              same chunk of every row falls into the same cache sets: the block's rows are first
//              packed, chunk-interleaved (P[c][r][0, C), 1 KiB per row and chunk), so that the at
//              most 17 rows of a chunk sit together in L1 while its tiles run.
//   axpy:      y = scale (x - sum_i c_i q_i) into out (or a block buffer, stored in out's dtype),
//              with sum y^2 and, for dots, <q_i, y> from the unrounded y (the rows copied to a
//              packed block on the first pass, read from it by the second).
//   transform: the block's K_t old rows packed as gram's, then each chunk's new rows written in place.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "lethe/gu.h"
#include "lethe/gu_checks.h"
#include "convert.h"  // fp16 / bf16 blocks: load_data, store_data, bits
#include "vec.h"  // LETHE_CLONES, LETHE_INLINE, F8v

namespace lethe {
namespace {

using gu::kMaxRows;

template <typename A>
struct VT;
template <>
struct VT<float> {
  using V = F8v;
  static constexpr int64_t L = 8;
};
template <>
struct VT<double> {
  using V = D4v;
  static constexpr int64_t L = 4;
};

template <typename V, typename A>
LETHE_INLINE V vload(const A* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename V, typename A>
LETHE_INLINE void vstore(A* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename A, typename V>
LETHE_INLINE A vsum(V v) {  // lane order: fixed
  A s = v[0];
  for (int l = 1; l < int(sizeof(V) / sizeof(A)); ++l) s += v[l];
  return s;
}


// ---- the blocks

struct Item {  // one tensor of the list
  void* basis;   // [kt, n] of A
  int64_t kt, n;
  bool f64;      // A = double
  const void* x;  // x (dots, axpy), or nullptr
  at::ScalarType xdt;
  const void* v;  // exp_avg_sq, or nullptr
  at::ScalarType vdt;
  void* out;  // axpy's out
  at::ScalarType odt;
  int64_t scope;
  int64_t block0;  // its first block in the op's list of blocks
};

// w[e] = x[e] * u[e], u = 1 / (sqrt(v) + eps) (gu::metric_weight); w may be v.
template <typename A>
LETHE_INLINE void weighted(const A* x, const A* v, A* w, int64_t n, A eps, bool times_x) {
  using V = typename VT<A>::V;
  constexpr int64_t L = VT<A>::L;
  const int64_t nv = n / L * L;
  const V one = V{} + A(1), ev = V{} + eps;
  for (int64_t e = 0; e < nv; e += L) {
    V u = one / (vsqrt(vload<V>(v + e)) + ev);
    if (times_x) u = vload<V>(x + e) * u;
    vstore(w + e, u);
  }
  for (int64_t e = nv; e < n; ++e) {
    const A u = gu::metric_weight<A>(v[e], eps);
    w[e] = times_x ? x[e] * u : u;
  }
}

// acc[r] += q_r w lane-wise over the vector part of n elements, tail[r] += the rest, for R rows
// q_r = q + r * stride.
template <typename A, int R>
LETHE_INLINE void dot_rows(const A* q, int64_t stride, const A* w, int64_t n, typename VT<A>::V* acc, A* tail) {
  using V = typename VT<A>::V;
  constexpr int64_t L = VT<A>::L;
  V a[R];
  for (int r = 0; r < R; ++r) a[r] = acc[r];
  const int64_t nv = n / L * L;
  for (int64_t e = 0; e < nv; e += L) {
    const V wv = vload<V>(w + e);
    for (int r = 0; r < R; ++r) a[r] += vload<V>(q + r * stride + e) * wv;
  }
  for (int r = 0; r < R; ++r) {
    acc[r] = a[r];
    for (int64_t e = nv; e < n; ++e) tail[r] += q[r * stride + e] * w[e];
  }
}

template <typename A>
LETHE_INLINE void dot_rows_any(const A* q, int64_t stride, int64_t rows, const A* w, int64_t n,
                               typename VT<A>::V* acc, A* tail) {
  for (int64_t r0 = 0; r0 < rows; r0 += 8) {
    const A* qr = q + r0 * stride;
    switch (std::min<int64_t>(8, rows - r0)) {
      case 1: dot_rows<A, 1>(qr, stride, w, n, acc + r0, tail + r0); break;
      case 2: dot_rows<A, 2>(qr, stride, w, n, acc + r0, tail + r0); break;
      case 3: dot_rows<A, 3>(qr, stride, w, n, acc + r0, tail + r0); break;
      case 4: dot_rows<A, 4>(qr, stride, w, n, acc + r0, tail + r0); break;
      case 5: dot_rows<A, 5>(qr, stride, w, n, acc + r0, tail + r0); break;
      case 6: dot_rows<A, 6>(qr, stride, w, n, acc + r0, tail + r0); break;
      case 7: dot_rows<A, 7>(qr, stride, w, n, acc + r0, tail + r0); break;
      default: dot_rows<A, 8>(qr, stride, w, n, acc + r0, tail + r0); break;
    }
  }
}

// Per-row sums: vector accumulators and scalar tails, added at the end (lanes, then the tail).
template <typename A>
struct RowSums {
  typename VT<A>::V acc[kMaxRows + 1];
  A tail[kMaxRows + 1];
  explicit RowSums(int64_t rows) {
    for (int64_t r = 0; r < rows; ++r) {
      acc[r] = typename VT<A>::V{};
      tail[r] = A(0);
    }
  }
  double get(int64_t r) const { return static_cast<double>(vsum<A>(acc[r]) + tail[r]); }
};

// Gram: acc[i * m + j] += sum_e (u z_i) z_j over [0, n) (a multiple of L) for a TI x TJ tile of the
// packed rows z_r = z + r * C.
template <typename A, int TI, int TJ, bool kU>
LETHE_INLINE void gram_tile(const A* z, int64_t C, const A* u, int64_t i0, int64_t j0, int64_t m, int64_t n,
                            typename VT<A>::V* acc) {
  using V = typename VT<A>::V;
  constexpr int64_t L = VT<A>::L;
  V a[TI][TJ];
  for (int i = 0; i < TI; ++i)
    for (int j = 0; j < TJ; ++j) a[i][j] = acc[(i0 + i) * m + j0 + j];
  const A* zi0 = z + i0 * C;
  const A* zj0 = z + j0 * C;
  for (int64_t e = 0; e < n; e += L) {
    V zi[TI];
    for (int i = 0; i < TI; ++i) zi[i] = vload<V>(zi0 + i * C + e);
    if constexpr (kU) {
      const V uv = vload<V>(u + e);
      for (int i = 0; i < TI; ++i) zi[i] = zi[i] * uv;
    }
    for (int j = 0; j < TJ; ++j) {
      const V zj = vload<V>(zj0 + j * C + e);
      for (int i = 0; i < TI; ++i) a[i][j] += zi[i] * zj;
    }
  }
  for (int i = 0; i < TI; ++i)
    for (int j = 0; j < TJ; ++j) acc[(i0 + i) * m + j0 + j] = a[i][j];
}

template <typename A, bool kU>
LETHE_INLINE void gram_chunk(const A* z, int64_t C, const A* u, int64_t m, int64_t n, typename VT<A>::V* acc) {
  for (int64_t i0 = 0; i0 < m; i0 += 2) {
    const bool two = m - i0 >= 2;
    for (int64_t j0 = i0; j0 < m; j0 += 4) {  // from the diagonal: the upper triangle (and a little more)
      switch ((two ? 4 : 0) + std::min<int64_t>(4, m - j0) - 1) {
        case 0: gram_tile<A, 1, 1, kU>(z, C, u, i0, j0, m, n, acc); break;
        case 1: gram_tile<A, 1, 2, kU>(z, C, u, i0, j0, m, n, acc); break;
        case 2: gram_tile<A, 1, 3, kU>(z, C, u, i0, j0, m, n, acc); break;
        case 3: gram_tile<A, 1, 4, kU>(z, C, u, i0, j0, m, n, acc); break;
        case 4: gram_tile<A, 2, 1, kU>(z, C, u, i0, j0, m, n, acc); break;
        case 5: gram_tile<A, 2, 2, kU>(z, C, u, i0, j0, m, n, acc); break;
        case 6: gram_tile<A, 2, 3, kU>(z, C, u, i0, j0, m, n, acc); break;
        default: gram_tile<A, 2, 4, kU>(z, C, u, i0, j0, m, n, acc); break;
      }
    }
  }
}

// Chunks of a block whose rows are packed into a contiguous buffer: a tensor's rows lie a row
// apart, often a power of two of bytes, so that the same chunk of every row falls into the same
// cache sets; packed, the at most 17 rows of a chunk stay in L1 together.
constexpr int64_t kChunkBytes = 1024;  // per row

// n values copied (an inline vector loop: the chunks are short, a library call per row costs)
template <typename A>
LETHE_INLINE void copy_row(A* dst, const A* src, int64_t n) {
  using V = typename VT<A>::V;
  constexpr int64_t L = VT<A>::L;
  int64_t e = 0;
  for (; e + L <= n; e += L) vstore(dst + e, vload<V>(src + e));
  for (; e < n; ++e) dst[e] = src[e];
}

// x's values [o, o + n) as A into dst (the tensor's own memory copied when it holds A).
template <typename A>
LETHE_INLINE void pack_data(const void* base, at::ScalarType dt, int64_t o, int64_t n, A* dst) {
  const A* p = load_data<A>(base, dt, o, n, dst);
  if (p != dst) copy_row(dst, p, n);
}

// The rows q_r = q + r * stride (r < kt) of one block of n elements packed chunk by chunk,
// P[c][r][0, C) for chunk c (m rows per chunk: room for x after the basis rows); read row by row,
// so that each row streams.
template <typename A>
LETHE_INLINE void pack_rows(A* P, int64_t m, const A* q, int64_t stride, int64_t kt, int64_t n) {
  constexpr int64_t C = kChunkBytes / sizeof(A);
  for (int64_t r = 0; r < kt; ++r)
    for (int64_t c0 = 0; c0 < n; c0 += C) copy_row(P + (c0 / C * m + r) * C, q + r * stride + c0, std::min(C, n - c0));
}

// One block of subspace_dots: part[...] (K + 1 entries, or the packed upper triangle of (K + 1)^2).
// scratch: kScratch doubles (a packed block).
template <typename A>
LETHE_INLINE void dots_block(const Item& it, int64_t o, int64_t n, A eps, int64_t K, bool gram, double* part,
                             A* scratch) {
  using V = typename VT<A>::V;
  constexpr int64_t L = VT<A>::L;
  const A* q = static_cast<const A*>(it.basis) + o;
  if (!gram) {  // one pass over the rows: streamed, not packed
    A* xbuf = scratch;
    A* wbuf = scratch + gu::kBlock;
    const A* x = load_data<A>(it.x, it.xdt, o, n, xbuf);
    const A* w = x;
    if (it.v) {
      weighted<A>(x, load_data<A>(it.v, it.vdt, o, n, wbuf), wbuf, n, eps, true);
      w = wbuf;
    }
    RowSums<A> sums(it.kt + 1);
    dot_rows_any<A>(q, it.n, it.kt, w, n, sums.acc, sums.tail);
    dot_rows<A, 1>(x, 0, w, n, sums.acc + it.kt, sums.tail + it.kt);
    for (int64_t r = 0; r < it.kt; ++r) part[r] = sums.get(r);
    part[K] = sums.get(it.kt);
    return;
  }
  // gram: rows z_0..z_{m-1} = the basis rows (and x) packed, P[c][r][0, C); the last chunk
  // zero-padded to a multiple of L (0 adds nothing: (u 0) z = 0 for the finite u of the padding)
  const int64_t m = it.kt + (it.x ? 1 : 0);
  if (m == 0) return;
  constexpr int64_t C = kChunkBytes / sizeof(A);
  const int64_t nc = (n + C - 1) / C, last = n - (nc - 1) * C, lastv = (last + L - 1) / L * L;
  A* P = scratch;                                  // [nc, m, C]
  A* u = scratch + (kMaxRows + 1) * gu::kBlock;    // [n]
  pack_rows<A>(P, m, q, it.n, it.kt, n);
  if (it.x)
    for (int64_t c = 0; c < nc; ++c)
      pack_data<A>(it.x, it.xdt, o + c * C, std::min(C, n - c * C), P + (c * m + it.kt) * C);
  if (it.v) weighted<A>(nullptr, load_data<A>(it.v, it.vdt, o, n, u), u, n, eps, false);
  if (lastv > last) {
    for (int64_t r = 0; r < m; ++r) std::memset(P + ((nc - 1) * m + r) * C + last, 0, (lastv - last) * sizeof(A));
    std::memset(u + n, 0, (lastv - last) * sizeof(A));
  }
  V acc[(kMaxRows + 1) * (kMaxRows + 1)];
  for (int64_t p = 0; p < m * m; ++p) acc[p] = V{};
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t len = c + 1 < nc ? C : lastv;
    if (it.v)
      gram_chunk<A, true>(P + c * m * C, C, u + c * C, m, len, acc);
    else
      gram_chunk<A, false>(P + c * m * C, C, nullptr, m, len, acc);
  }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = i; j < m; ++j)
      part[gu::tri_index(i < it.kt ? i : K, j < it.kt ? j : K, K + 1)] = vsum<A>(acc[i * m + j]);
}

// y = (src - c_0 q_0 - ... - c_{R-1} q_{R-1}) for R rows; the last group also scales by sc and
// adds y^2 to yacc / ytail. With pack, the rows are also copied to pack (rows kBlock apart).
template <typename A, int R, bool kLast>
LETHE_INLINE void sub_rows(const A* src, A* y, const A* q, int64_t stride, const A* c, A sc, int64_t n,
                           typename VT<A>::V& yacc, A& ytail, A* pack) {
  using V = typename VT<A>::V;
  constexpr int64_t L = VT<A>::L;
  V cv[R > 0 ? R : 1];
  for (int r = 0; r < R; ++r) cv[r] = V{} + c[r];
  const V sv = V{} + sc;
  const int64_t nv = n / L * L;
  for (int64_t e = 0; e < nv; e += L) {
    V t = vload<V>(src + e);
    for (int r = 0; r < R; ++r) {
      const V qv = vload<V>(q + r * stride + e);
      if (pack) vstore(pack + r * gu::kBlock + e, qv);
      t -= cv[r] * qv;
    }
    if constexpr (kLast) {
      t = sv * t;
      yacc += t * t;
    }
    vstore(y + e, t);
  }
  for (int64_t e = nv; e < n; ++e) {
    A t = src[e];
    for (int r = 0; r < R; ++r) {
      if (pack) pack[r * gu::kBlock + e] = q[r * stride + e];
      t -= c[r] * q[r * stride + e];
    }
    if constexpr (kLast) {
      t = sc * t;
      ytail += t * t;
    }
    y[e] = t;
  }
}

// y = sc (s - sum_r c_r q_r) over n elements (rows q_r = q + r * stride), yacc / ytail += y^2; the
// rows copied to pack[r * kBlock + e] when pack is given.
template <typename A>
LETHE_INLINE void axpy_values(const A* s, A* y, const A* q, int64_t stride, int64_t kt, const A* c, A sc,
                              int64_t n, typename VT<A>::V& yacc, A& ytail, A* pack) {
  int64_t g = 0;
  do {
    const int64_t R = std::min<int64_t>(4, kt - g);
    const A* src = g == 0 ? s : y;
    const A* qg = q + g * stride;
    A* pg = pack ? pack + g * gu::kBlock : nullptr;
    if (g + 4 >= kt) {
      switch (R) {
        case 0: sub_rows<A, 0, true>(src, y, qg, stride, c + g, sc, n, yacc, ytail, pg); break;
        case 1: sub_rows<A, 1, true>(src, y, qg, stride, c + g, sc, n, yacc, ytail, pg); break;
        case 2: sub_rows<A, 2, true>(src, y, qg, stride, c + g, sc, n, yacc, ytail, pg); break;
        case 3: sub_rows<A, 3, true>(src, y, qg, stride, c + g, sc, n, yacc, ytail, pg); break;
        default: sub_rows<A, 4, true>(src, y, qg, stride, c + g, sc, n, yacc, ytail, pg); break;
      }
    } else {
      sub_rows<A, 4, false>(src, y, qg, stride, c + g, sc, n, yacc, ytail, pg);
    }
    g += 4;
  } while (g < kt);
}

// One block of subspace_axpy; scratch: kScratch doubles (a packed block).
template <typename A>
LETHE_INLINE void axpy_block(const Item& it, int64_t o, int64_t n, const A* c, A sc, bool dots, int64_t K,
                             double* part, A* scratch) {
  using V = typename VT<A>::V;
  constexpr at::ScalarType kA = std::is_same_v<A, float> ? at::kFloat : at::kDouble;
  const bool direct = it.odt == kA;  // y computed in out itself
  const A* q = static_cast<const A*>(it.basis) + o;
  const void* src = it.x ? it.x : it.out;
  const at::ScalarType sdt = it.x ? it.xdt : it.odt;
  // dots: the rows are read twice (y, then <q_i, y>): the first pass streams them and copies them
  // to a packed block (rows kBlock apart, in L2), which the second reads
  A* pack = dots && it.kt > 0 ? scratch : nullptr;
  A* y = direct ? static_cast<A*>(it.out) + o : scratch + kMaxRows * gu::kBlock;
  V yacc = {};
  A ytail = 0;
  axpy_values<A>(load_data<A>(src, sdt, o, n, y), y, q, it.n, it.kt, c, sc, n, yacc, ytail, pack);
  part[K] = static_cast<double>(vsum<A>(yacc) + ytail);
  if (pack) {
    RowSums<A> sums(it.kt);
    dot_rows_any<A>(pack, gu::kBlock, it.kt, y, n, sums.acc, sums.tail);
    for (int64_t r = 0; r < it.kt; ++r) part[r] = sums.get(r);
  }
  if (!direct) store_data<A>(it.out, it.odt, o, n, y);
}

// new rows r0..r0+R-1 of one chunk: sum_j c[r][j] old_j (old rows ostride apart), written to q
// (rows stride apart); two vectors per step for R rows (2 R accumulators: one coefficient
// broadcast serves two vectors).
template <typename A, int R>
LETHE_INLINE void transform_rows(const A* old, int64_t ostride, int64_t kt, const A* c, A* q, int64_t stride,
                                 int64_t n) {
  using V = typename VT<A>::V;
  constexpr int64_t L = VT<A>::L;
  const int64_t nv = n / L * L;
  int64_t e = 0;
  for (; e + 2 * L <= nv; e += 2 * L) {
    V a[R][2];
    const V o0 = vload<V>(old + e), o1 = vload<V>(old + e + L);
    for (int r = 0; r < R; ++r) {
      const V cr = V{} + c[r * kt];
      a[r][0] = cr * o0;
      a[r][1] = cr * o1;
    }
    for (int64_t j = 1; j < kt; ++j) {
      const V p0 = vload<V>(old + j * ostride + e), p1 = vload<V>(old + j * ostride + e + L);
      for (int r = 0; r < R; ++r) {
        const V cr = V{} + c[r * kt + j];
        a[r][0] += cr * p0;
        a[r][1] += cr * p1;
      }
    }
    for (int r = 0; r < R; ++r) {
      vstore(q + r * stride + e, a[r][0]);
      vstore(q + r * stride + e + L, a[r][1]);
    }
  }
  for (; e < nv; e += L) {
    V a[R];
    const V o0 = vload<V>(old + e);
    for (int r = 0; r < R; ++r) a[r] = (V{} + c[r * kt]) * o0;
    for (int64_t j = 1; j < kt; ++j) {
      const V oj = vload<V>(old + j * ostride + e);
      for (int r = 0; r < R; ++r) a[r] += (V{} + c[r * kt + j]) * oj;
    }
    for (int r = 0; r < R; ++r) vstore(q + r * stride + e, a[r]);
  }
  for (; e < n; ++e) {
    for (int r = 0; r < R; ++r) {
      A a = c[r * kt] * old[e];
      for (int64_t j = 1; j < kt; ++j) a += c[r * kt + j] * old[j * ostride + e];
      q[r * stride + e] = a;
    }
  }
}

// One block of subspace_transform; c: [kt, kt] row-major in A. The old rows are packed first,
// P[c][r][0, C), then each chunk's new rows written in place.
template <typename A>
LETHE_INLINE void transform_block(const Item& it, int64_t o, int64_t n, const A* c, A* scratch) {
  constexpr int64_t C = kChunkBytes / sizeof(A);
  A* q = static_cast<A*>(it.basis) + o;
  const int64_t kt = it.kt;
  pack_rows<A>(scratch, kt, q, it.n, kt, n);
  for (int64_t e0 = 0; e0 < n; e0 += C) {
    const int64_t cl = std::min(C, n - e0);
    const A* old = scratch + e0 * kt;
    for (int64_t i = 0; i < kt; i += 4) {
      A* qi = q + i * it.n + e0;
      const A* ci = c + i * kt;
      switch (std::min<int64_t>(4, kt - i)) {
        case 1: transform_rows<A, 1>(old, C, kt, ci, qi, it.n, cl); break;
        case 2: transform_rows<A, 2>(old, C, kt, ci, qi, it.n, cl); break;
        case 3: transform_rows<A, 3>(old, C, kt, ci, qi, it.n, cl); break;
        default: transform_rows<A, 4>(old, C, kt, ci, qi, it.n, cl); break;
      }
    }
  }
}

// Entry points, one clone per vector ISA, each with the loops above inlined.
LETHE_CLONES void dots_f32(const Item& it, int64_t o, int64_t n, float eps, int64_t K, bool gram, double* part,
                           float* scratch) {
  dots_block<float>(it, o, n, eps, K, gram, part, scratch);
}
LETHE_CLONES void dots_f64(const Item& it, int64_t o, int64_t n, double eps, int64_t K, bool gram, double* part,
                           double* scratch) {
  dots_block<double>(it, o, n, eps, K, gram, part, scratch);
}
LETHE_CLONES void axpy_f32(const Item& it, int64_t o, int64_t n, const float* c, float sc, bool dots, int64_t K,
                           double* part, float* scratch) {
  axpy_block<float>(it, o, n, c, sc, dots, K, part, scratch);
}
LETHE_CLONES void axpy_f64(const Item& it, int64_t o, int64_t n, const double* c, double sc, bool dots, int64_t K,
                           double* part, double* scratch) {
  axpy_block<double>(it, o, n, c, sc, dots, K, part, scratch);
}
LETHE_CLONES void transform_f32(const Item& it, int64_t o, int64_t n, const float* c, float* scratch) {
  transform_block<float>(it, o, n, c, scratch);
}
LETHE_CLONES void transform_f64(const Item& it, int64_t o, int64_t n, const double* c, double* scratch) {
  transform_block<double>(it, o, n, c, scratch);
}

// ---- host side

constexpr int64_t kGrain = 4;  // blocks: fewer run on the calling thread
constexpr int64_t kScratch = (kMaxRows + 2) * gu::kBlock;  // doubles of scratch per thread: a packed block

int64_t row_numel(const at::Tensor& b) {
  int64_t n = 1;
  for (int64_t d = 1; d < b.dim(); ++d) n *= b.size(d);
  return n;
}

struct Plan {
  std::vector<Item> items;
  std::vector<int32_t> block_item;  // the item of each block
  int64_t K = 0;

  // Items with no work (no rows and no data) get no blocks.
  Plan(at::TensorList basis, const std::optional<at::TensorList>& x, const std::optional<at::TensorList>& v,
       at::TensorList* out, at::IntArrayRef scope, bool write_basis = false) {
    items.reserve(basis.size());
    int64_t nb = 0;
    for (size_t t = 0; t < basis.size(); ++t) {
      const at::Tensor& b = basis[t];
      Item it{};
      it.basis = write_basis ? b.mutable_data_ptr() : const_cast<void*>(b.const_data_ptr());
      it.kt = b.size(0);
      it.n = row_numel(b);
      it.f64 = b.scalar_type() == at::kDouble;
      if (x) {
        it.x = (*x)[t].const_data_ptr();
        it.xdt = (*x)[t].scalar_type();
      }
      if (v) {
        it.v = (*v)[t].const_data_ptr();
        it.vdt = (*v)[t].scalar_type();
      }
      if (out) {
        it.out = (*out)[t].mutable_data_ptr();
        it.odt = (*out)[t].scalar_type();
      }
      it.scope = scope[t];
      it.block0 = nb;
      K = std::max(K, it.kt);
      const bool work = it.n > 0 && (it.kt > 0 || it.x || it.out);
      const int64_t blocks = work ? gu::num_blocks(it.n) : 0;
      for (int64_t i = 0; i < blocks; ++i) block_item.push_back(static_cast<int32_t>(t));
      nb += blocks;
      items.push_back(it);
    }
  }
  int64_t num_blocks() const { return static_cast<int64_t>(block_item.size()); }

  // f(item, offset, n, block index, scratch) for every block, in parallel.
  template <typename F>
  void run(F f) const {
    at::parallel_for(0, num_blocks(), kGrain, [&](int64_t b0, int64_t b1) {
      std::vector<double> scratch(kScratch);
      for (int64_t b = b0; b < b1; ++b) {
        const Item& it = items[block_item[b]];
        const int64_t o = (b - it.block0) * gu::kBlock;
        f(it, o, std::min(gu::kBlock, it.n - o), b, scratch.data());
      }
    });
  }

  // out[scope][p] = the sum of the blocks' part[p] (P per block), in tensor and block order.
  void reduce(const std::vector<double>& part, int64_t P, double* out) const {
    for (int64_t b = 0; b < num_blocks(); ++b) {
      double* o = out + items[block_item[b]].scope * P;
      const double* p = part.data() + b * P;
      for (int64_t i = 0; i < P; ++i) o[i] += p[i];
    }
  }
};

at::Tensor subspace_dots_cpu(at::TensorList basis, const std::optional<at::TensorList>& x,
                             const std::optional<at::TensorList>& exp_avg_sq, double eps, at::IntArrayRef scope,
                             int64_t num_scopes, bool gram) {
  check_subspace_dots(basis, x, exp_avg_sq, eps, scope, num_scopes, gram);
  const Plan plan(basis, x, exp_avg_sq, nullptr, scope);
  const int64_t K = plan.K, K1 = K + 1;
  const auto f64 = basis[0].options().dtype(at::kDouble);
  at::Tensor out = gram ? at::zeros({num_scopes, K1, K1}, f64) : at::zeros({num_scopes, K1}, f64);
  const int64_t P = gram ? gu::tri_size(K1) : K1;
  std::vector<double> part(plan.num_blocks() * P, 0.0);
  const float eps32 = static_cast<float>(eps);
  plan.run([&](const Item& it, int64_t o, int64_t n, int64_t b, double* scratch) {
    double* pb = part.data() + b * P;
    if (it.f64)
      dots_f64(it, o, n, eps, K, gram, pb, scratch);
    else
      dots_f32(it, o, n, eps32, K, gram, pb, reinterpret_cast<float*>(scratch));
  });
  if (!gram) {
    plan.reduce(part, P, out.mutable_data_ptr<double>());
    return out;
  }
  std::vector<double> tri(num_scopes * P, 0.0);
  plan.reduce(part, P, tri.data());
  double* o = out.mutable_data_ptr<double>();
  for (int64_t s = 0; s < num_scopes; ++s)
    for (int64_t i = 0; i < K1; ++i)
      for (int64_t j = i; j < K1; ++j)
        o[(s * K1 + i) * K1 + j] = o[(s * K1 + j) * K1 + i] = tri[s * P + gu::tri_index(i, j, K1)];
  return out;
}

at::Tensor subspace_axpy_cpu(at::TensorList out, const std::optional<at::TensorList>& x, at::TensorList basis,
                             const at::Tensor& coeff, const at::Tensor& scale, at::IntArrayRef scope, bool dots) {
  check_subspace_axpy(out, x, basis, coeff, scale, scope, dots);
  const Plan plan(basis, x, std::nullopt, &out, scope);
  const int64_t K = plan.K, K1 = K + 1, S = coeff.size(0);
  // coeff and scale rounded to each tensor's compute type once: [S, K] and [S] (any strides)
  const double* cp = coeff.const_data_ptr<double>();
  const double* sp = scale.const_data_ptr<double>();
  std::vector<double> c64(S * K), s64(S);
  std::vector<float> c32(S * K), s32(S);
  for (int64_t s = 0; s < S; ++s) {
    s64[s] = sp[s * scale.stride(0)];
    s32[s] = static_cast<float>(s64[s]);
    for (int64_t i = 0; i < K; ++i) {
      c64[s * K + i] = cp[s * coeff.stride(0) + i * coeff.stride(1)];
      c32[s * K + i] = static_cast<float>(c64[s * K + i]);
    }
  }
  at::Tensor stats = at::zeros({S, K1}, basis[0].options().dtype(at::kDouble));
  std::vector<double> part(plan.num_blocks() * K1, 0.0);
  plan.run([&](const Item& it, int64_t o, int64_t n, int64_t b, double* scratch) {
    double* pb = part.data() + b * K1;
    const int64_t s = it.scope;
    if (it.f64)
      axpy_f64(it, o, n, c64.data() + s * K, s64[s], dots, K, pb, scratch);
    else
      axpy_f32(it, o, n, c32.data() + s * K, s32[s], dots, K, pb, reinterpret_cast<float*>(scratch));
  });
  plan.reduce(part, K1, stats.mutable_data_ptr<double>());
  return stats;
}

void subspace_transform_cpu(at::TensorList basis, const at::Tensor& coeff, at::IntArrayRef scope) {
  check_subspace_transform(basis, coeff, scope);
  const Plan plan(basis, std::nullopt, std::nullopt, nullptr, scope, /*write_basis=*/true);
  const int64_t K = plan.K, S = coeff.size(0);
  const double* cp = coeff.const_data_ptr<double>();
  // per tensor its [kt, kt] coefficients, row-major, in its compute type
  std::vector<std::vector<double>> c64(basis.size());
  std::vector<std::vector<float>> c32(basis.size());
  for (size_t t = 0; t < basis.size(); ++t) {
    const Item& it = plan.items[t];
    const int64_t kt = it.kt, s = it.scope;
    TORCH_INTERNAL_ASSERT(s < S && kt <= K);
    for (int64_t i = 0; i < kt; ++i)
      for (int64_t j = 0; j < kt; ++j) {
        const double v = cp[s * coeff.stride(0) + i * coeff.stride(1) + j * coeff.stride(2)];
        if (it.f64)
          c64[t].push_back(v);
        else
          c32[t].push_back(static_cast<float>(v));
      }
  }
  plan.run([&](const Item& it, int64_t o, int64_t n, int64_t /*b*/, double* scratch) {
    const size_t t = static_cast<size_t>(&it - plan.items.data());
    if (it.f64)
      transform_f64(it, o, n, c64[t].data(), scratch);
    else
      transform_f32(it, o, n, c32[t].data(), reinterpret_cast<float*>(scratch));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lethe, CPU, m) {
  m.impl("subspace_dots", &subspace_dots_cpu);
  m.impl("subspace_axpy", &subspace_axpy_cpu);
  m.impl("subspace_transform", &subspace_transform_cpu);
}

}  // namespace lethe
