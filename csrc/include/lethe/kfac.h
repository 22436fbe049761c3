#pragma once
// The kfac family's host functions, device-generic ATen code shared by csrc/cpu/kfac.cpp and
// csrc/cuda/kfac.cu (definitions: python/lethe/ops/kfac_reference.py). The ops are GEMM / LAPACK
// bound: MKL on the CPU, cuBLAS / cuSOLVER on CUDA do the flops; what is lethe's is the layout of
// the work:
//  * factor and eigenbasis updates: one GEMM over the rows that count, the ones column of a bias
//    appended to the rows (so the bias row and column come out of the same GEMM), accumulated in
//    the factor's dtype with the decay as GEMM's beta; the result is mirrored from its upper
//    triangle (exactly symmetric). On the CPU masked-out rows are gathered away; on CUDA they are
//    zeroed instead (no host sync for a count).
//  * damped inversion: factors of one size and dtype are inverted as a batch by a recursive block
//    Cholesky done in place, X = [[A, B^T], [B, C]]:
//      A^-1 (recursively), K = A^-1 B^T, S = C - B K (the Schur complement, positive definite iff
//      X is), S^-1 (recursively), X^-1 = [[A^-1 + K S^-1 K^T, -K S^-1], [-(K S^-1)^T, S^-1]],
//    with LAPACK's Cholesky and cholesky_inverse at leaves of <= kLeaf rows: about 4/3 n^3 flops,
//    nearly all in GEMMs (a Cholesky followed by LAPACK's potri runs at a third of GEMM speed here).
//    Only the lower triangle of the input is read. A leaf's failed Cholesky marks its matrix, which
//    is inverted again in fp64. On the CPU the matrices run side by side, one per thread, each a
//    loop of 2-D GEMMs on strided views (batched GEMMs on views copy there); on CUDA the batch goes
//    through strided batched GEMMs.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/cholesky_inverse.h>
#include <ATen/ops/diagonal.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/eye.h>
#include <ATen/ops/where.h>
#include <ATen/ops/linalg_cholesky_ex.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/tril.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/triu.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "lethe/kfac_checks.h"

namespace lethe {
namespace kfac {

constexpr int64_t kLeaf = 64;  // leaves of the recursive inversion (measured: 64 beats 128 and 256 on 2 cores)

// x [..., D] as the [N', D (+1)] rows that count, in dtype dt.
inline at::Tensor rows(const at::Tensor& x, const std::optional<at::Tensor>& mask, bool bias, at::ScalarType dt) {
  at::Tensor X = x.reshape({-1, x.size(-1)}).to(dt);
  const bool gather = present(mask) && x.device().is_cpu();
  if (gather) X = X.index_select(0, at::nonzero(mask->reshape({-1})).squeeze(1));
  if (bias) X = at::cat({X, at::ones({X.size(0), 1}, X.options())}, 1);
  if (present(mask) && !gather) X = X * mask->reshape({-1, 1}).to(dt);
  return X;
}

// f <- triu(f) + triu(f, 1)^T (2-D or batched): the strict lower triangle from a contiguous
// transposed copy (a transposing copy_ is blocked; triu of a transposed view is not, 7x slower here).
inline void mirror_block(at::Tensor f) {
  // (clone, not contiguous(): a 1 x 1 matrix's transpose is contiguous, and would alias f)
  at::Tensor t = f.transpose(-1, -2).clone(at::MemoryFormat::Contiguous);
  f.triu_();
  f.add_(t.tril_(-1));
}

// Above 256 by blocks of rows: each diagonal block as above, the block row left of it one
// transposing copy of the block column above it (about one pass over the matrix instead of four).
inline void mirror_upper(at::Tensor& f) {
  constexpr int64_t B = 256;
  const int64_t n = f.size(-1);
  if (n <= B) return mirror_block(f);
  for (int64_t i = 0; i < n; i += B) {
    const int64_t b = std::min(B, n - i);
    mirror_block(f.narrow(-2, i, b).narrow(-1, i, b));
    if (i > 0) f.narrow(-2, i, b).narrow(-1, 0, i).copy_(f.narrow(-2, 0, i).narrow(-1, i, b).transpose(-1, -2));
  }
}

// c <- beta c + alpha a b, 2-D (CPU, views) or batched (CUDA).
inline void gemm_(at::Tensor c, const at::Tensor& a, const at::Tensor& b, double beta, double alpha) {
  if (c.dim() == 2) {
    c.addmm_(a, b, beta, alpha);
  } else {
    c.baddbmm_(a, b, beta, alpha);
  }
}

// In-place inverse of the symmetric positive definite matrices x (2-D, or [B, n, n]); failed |= a
// leaf's Cholesky failed ([B] or [] bool). With full = false the strict lower triangle is left
// stale (the caller mirrors the upper one).
inline void invert_(at::Tensor x, at::Tensor& failed, bool full = true) {
  const int64_t n = x.size(-1);
  if (n == 0) return;
  if (n <= kLeaf) {
    auto [L, info] = at::linalg_cholesky_ex(x, false, false);
    at::Tensor bad = info.ne(0);
    // A failed factor's L has zeros on its diagonal, which cholesky_inverse refuses: invert the
    // identity in its place (the matrix is marked, and factorised again or reported).
    L = at::where(bad.unsqueeze(-1).unsqueeze(-1), at::eye(n, L.options()), L);
    x.copy_(at::cholesky_inverse(L, false));
    failed = failed.logical_or(bad);
    return;
  }
  const int64_t m = n / 2, r = n - m;
  auto X11 = x.narrow(-2, 0, m).narrow(-1, 0, m);
  auto X12 = x.narrow(-2, 0, m).narrow(-1, m, r);
  auto X21 = x.narrow(-2, m, r).narrow(-1, 0, m);
  auto X22 = x.narrow(-2, m, r).narrow(-1, m, r);
  invert_(X11, failed);                                      // A^-1
  gemm_(X12, X11, X21.transpose(-1, -2), 0.0, 1.0);          // K = A^-1 B^T
  gemm_(X22, X21, X12, 1.0, -1.0);                           // S = C - B K
  invert_(X22, failed);                                      // S^-1
  at::Tensor T = X12.dim() == 2 ? at::mm(X12, X22) : at::bmm(X12, X22);  // K S^-1
  gemm_(X11, T, X12.transpose(-1, -2), 1.0, 1.0);            // A^-1 + K S^-1 K^T
  X12.copy_(T).neg_();
  if (full) X21.copy_(X12.transpose(-1, -2));
}

// (F + damping I) in dtype dt into `out` (2-D, or one matrix of a batch): only F's lower triangle
// is read by the inversion, so nothing is mirrored here.
inline void damped_into(at::Tensor out, const at::Tensor& f, double damping) {
  out.copy_(f);
  out.diagonal().add_(damping);
}

// Inverts the matrices idx of `factors` (one size), damped, in dtype dt: on the CPU each in its own
// output, a loop of 2-D GEMMs; on CUDA as one batch of strided batched GEMMs, then split.
// Returns the inverses and which failed a leaf's Cholesky ([B] bool, on the CPU).
inline std::pair<std::vector<at::Tensor>, at::Tensor> invert_group(at::TensorList factors, at::ArrayRef<double> damping,
                                                                   const std::vector<size_t>& idx, at::ScalarType dt) {
  const int64_t B = static_cast<int64_t>(idx.size()), n = factors[idx[0]].size(0);
  const auto opts = factors[idx[0]].options().dtype(dt);
  std::vector<at::Tensor> out;
  at::Tensor failed = at::zeros({B}, opts.dtype(at::kBool));
  if (factors[idx[0]].is_cuda()) {
    at::Tensor x = at::empty({B, n, n}, opts);
    for (int64_t j = 0; j < B; ++j) damped_into(x.select(0, j), factors[idx[j]], damping[idx[j]]);
    invert_(x, failed, false);
    mirror_upper(x);
    for (int64_t j = 0; j < B; ++j) out.push_back(x.select(0, j).clone());  // outputs that share no storage
    return {out, failed.cpu()};
  }
  // The matrices side by side, one per thread (their GEMMs then run single-threaded, where the
  // small ones of the recursion are far more efficient than split over threads); a lone matrix
  // runs inline, multi-threaded.
  out.resize(B);
  std::vector<uint8_t> bad(B, 0);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t j = b0; j < b1; ++j) {
      at::Tensor x = at::empty({n, n}, opts);
      damped_into(x, factors[idx[j]], damping[idx[j]]);
      at::Tensor f = at::zeros({}, opts.dtype(at::kBool));
      invert_(x, f, false);
      mirror_upper(x);
      bad[j] = f.item<bool>();
      out[j] = x;
    }
  });
  for (int64_t j = 0; j < B; ++j) failed[j] = static_cast<bool>(bad[j]);
  return {out, failed};
}

}  // namespace kfac

inline void kfac_factor_update_impl(at::Tensor factor, const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                    bool bias, double scale, double decay) {
  check_kfac_factor_update(factor, x, mask, bias, scale, decay);
  at::Tensor X = kfac::rows(x, mask, bias, factor.scalar_type());
  // Only the upper triangle's blocks (a SYRK's flops, about half a GEMM's): each a GEMM on strided
  // views, no copy; the lower triangle then comes from the mirror. beta = 0 ignores the old values.
  const int64_t n = factor.size(0), B = n > 1024 ? 512 : n;
  for (int64_t i = 0; i < n; i += B) {
    const int64_t bi = std::min(B, n - i);
    for (int64_t j = i; j < n; j += B) {
      const int64_t bj = std::min(B, n - j);
      factor.narrow(0, i, bi).narrow(1, j, bj).addmm_(X.narrow(1, i, bi).t(), X.narrow(1, j, bj), decay, scale);
    }
  }
  kfac::mirror_upper(factor);
}

inline std::tuple<std::vector<at::Tensor>, at::Tensor> kfac_damped_inverse_impl(at::TensorList factors,
                                                                              at::ArrayRef<double> damping) {
  check_kfac_damped_inverse(factors, damping);
  std::vector<at::Tensor> out(factors.size());
  const auto dev = factors.empty() ? at::Device(at::kCPU) : factors[0].device();
  at::Tensor retried = at::zeros({static_cast<int64_t>(factors.size())}, at::TensorOptions().dtype(at::kBool));
  std::map<std::pair<int64_t, int>, std::vector<size_t>> groups;  // (size, dtype) -> factors
  for (size_t i = 0; i < factors.size(); ++i) {
    groups[{factors[i].size(0), static_cast<int>(factors[i].scalar_type())}].push_back(i);
  }
  for (auto& [key, idx] : groups) {
    const auto dt = factors[idx[0]].scalar_type();
    auto [inv, failed] = kfac::invert_group(factors, damping, idx, dt);
    std::vector<size_t> which;  // the factors to factorise again in fp64
    for (size_t j = 0; j < idx.size(); ++j) {
      out[idx[j]] = inv[j];
      if (failed[j].item<bool>()) which.push_back(idx[j]);
    }
    if (which.empty()) continue;
    TORCH_CHECK_VALUE(dt == at::kFloat, "factors[", which[0], "] + damping[", which[0],
                      "] I must be positive definite (its Cholesky failed in float64)");
    auto [inv64, failed64] = kfac::invert_group(factors, damping, which, at::kDouble);
    for (size_t j = 0; j < which.size(); ++j) {
      TORCH_CHECK_VALUE(!failed64[j].item<bool>(), "factors[", which[j], "] + damping[", which[j],
                        "] I must be positive definite (its Cholesky failed in float64)");
      out[which[j]] = inv64[j].to(at::kFloat);
      retried[which[j]] = true;
    }
  }
  return {out, retried.to(dev)};
}

inline std::tuple<std::vector<at::Tensor>, at::Tensor> kfac_precondition_impl(at::TensorList grad, at::TensorList a_inv,
                                                                            at::TensorList g_inv) {
  check_kfac_precondition(grad, a_inv, g_inv);
  std::vector<at::Tensor> out, quad;
  for (size_t i = 0; i < grad.size(); ++i) {
    at::Tensor p = at::mm(at::mm(g_inv[i], grad[i]), a_inv[i]);
    quad.push_back(at::sum(grad[i].to(at::kDouble) * p.to(at::kDouble)));
    out.push_back(p);
  }
  at::Tensor q = quad.empty() ? at::zeros({0}, at::TensorOptions().dtype(at::kDouble)) : at::stack(quad);
  return {out, q};
}

inline std::tuple<std::vector<at::Tensor>, at::Tensor> kfac_eigen_precondition_impl(
    at::TensorList grad, at::TensorList q_a, at::TensorList q_g, at::TensorList lam, double damping) {
  check_kfac_eigen_precondition(grad, q_a, q_g, lam, damping);
  std::vector<at::Tensor> out, quad;
  for (size_t i = 0; i < grad.size(); ++i) {
    at::Tensor r = at::mm(at::mm(q_g[i].t(), grad[i]), q_a[i]);
    at::Tensor s = r / (lam[i] + damping);
    quad.push_back(at::sum(r.to(at::kDouble) * s.to(at::kDouble)));
    out.push_back(at::mm(at::mm(q_g[i], s), q_a[i].t()));
  }
  at::Tensor q = quad.empty() ? at::zeros({0}, at::TensorOptions().dtype(at::kDouble)) : at::stack(quad);
  return {out, q};
}

inline void kfac_eigen_update_impl(at::Tensor lam, const at::Tensor& a, const at::Tensor& g, const at::Tensor& q_a,
                                   const at::Tensor& q_g, const std::optional<at::Tensor>& mask, bool bias,
                                   double scale, double decay) {
  check_kfac_eigen_update(lam, a, g, q_a, q_g, mask, bias, scale, decay);
  const auto dt = lam.scalar_type();
  at::Tensor A = at::mm(kfac::rows(a, mask, bias, dt), q_a);
  at::Tensor G = at::mm(kfac::rows(g, mask, false, dt), q_g);
  lam.addmm_((G * G).t(), A * A, decay, scale);
}

}  // namespace lethe
