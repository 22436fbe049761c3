#pragma once
// Argument checks of the kfac family's ops, for the CPU and CUDA kernels: the checks of
// python/lethe/ops/kfac.py in the same order and words. The lists' own types are the dispatcher's.
// kfac_damped_inverse's symmetry check reads values (a host sync on a GPU, once per inversion);
// kfac_eigen_precondition's lam >= 0 likewise.
#include <ATen/core/Tensor.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/max.h>
#include <ATen/ops/min.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#include "lethe/checks.h"

namespace lethe {
namespace kfac {

inline std::string item(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }
inline bool is_factor(at::ScalarType s) { return s == at::kFloat || s == at::kDouble; }
inline bool is_data(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble;
}

inline void check_factor_dtype(const at::Tensor& t, const std::string& name) {
  TORCH_CHECK_TYPE(is_factor(t.scalar_type()), name, " must be float32 or float64, got ", dtype_name(t.scalar_type()));
}

inline void check_square(const at::Tensor& t, const std::string& name, int64_t n = -1, const char* what = "") {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == t.size(1), name, " must be a square 2-D matrix, got shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(n < 0 || t.size(0) == n, name, " must be ", n, " x ", n, " (", what, "), got shape ", t.sizes());
}

inline void check_nonneg(double v, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0, name, " must be a finite number >= 0, got ", Num{v});
}

inline void check_rows(const at::Tensor& x, const char* name, const std::optional<at::Tensor>& mask, int64_t D,
                       const char* factor_name, bool bias) {
  TORCH_CHECK_TYPE(is_data(x.scalar_type()), name, " must be float32, float16, bfloat16 or float64, got ",
                   dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == D, name, " must have ", factor_name, "'s size",
                    bias ? " (its size less the bias column)" : "", ", ", D, ", as its last dimension, got shape ",
                    x.sizes());
  if (present(mask)) {
    check_dtype(*mask, "mask", at::kBool);
    TORCH_CHECK_VALUE(mask->sizes() == x.sizes().slice(0, x.dim() - 1), "mask must have ", name,
                      "'s leading shape (", x.sizes().slice(0, x.dim() - 1), "), got ", mask->sizes());
  }
}

inline void check_like(const at::Tensor& t, const std::string& name, const at::Tensor& g, size_t i) {
  TORCH_CHECK_TYPE(t.scalar_type() == g.scalar_type(), name, " must have grad[", i, "]'s dtype (",
                   dtype_name(g.scalar_type()), "), got ", dtype_name(t.scalar_type()));
  check_same_device(t, name.c_str(), g, item("grad", i).c_str());
}

inline void check_grad_item(const at::Tensor& g, size_t i, const at::Tensor& first) {
  const std::string n = item("grad", i);
  check_factor_dtype(g, n);
  TORCH_CHECK_VALUE(g.dim() == 2, n, " must be 2-D [out, in] (a bias as the last input column), got shape ",
                    g.sizes());
  check_same_device(g, n.c_str(), first, "grad[0]");
}

inline void check_count(size_t have, const char* name, size_t want) {
  TORCH_CHECK_VALUE(have == want, name, " must hold one tensor per grad tensor (", want, "), got ", have);
}

}  // namespace kfac

inline void check_kfac_factor_update(const at::Tensor& factor, const at::Tensor& x,
                                     const std::optional<at::Tensor>& mask, bool bias, double scale, double decay) {
  kfac::check_factor_dtype(factor, "factor");
  kfac::check_square(factor, "factor");
  TORCH_CHECK_VALUE(factor.is_contiguous(), "factor must be contiguous");
  TORCH_CHECK_VALUE(!bias || factor.size(0) >= 1, "factor must be at least 1 x 1 with bias=True (the ones column)");
  kfac::check_rows(x, "x", mask, factor.size(0) - (bias ? 1 : 0), "factor", bias);
  check_same_device(x, "x", factor, "factor");
  if (present(mask)) check_same_device(*mask, "mask", factor, "factor");
  kfac::check_nonneg(scale, "scale");
  kfac::check_nonneg(decay, "decay");
  TORCH_CHECK_VALUE(!overlap(factor, x) && !(present(mask) && overlap(factor, *mask)),
                    "factor must not overlap x or mask");
}

inline void check_kfac_damped_inverse(at::TensorList factors, at::ArrayRef<double> damping) {
  TORCH_CHECK_VALUE(damping.size() == factors.size(), "damping must hold one number per factor (", factors.size(),
                    "), got ", damping.size());
  for (size_t i = 0; i < factors.size(); ++i) {
    const std::string n = kfac::item("factors", i);
    kfac::check_factor_dtype(factors[i], n);
    kfac::check_square(factors[i], n);
    check_same_device(factors[i], n.c_str(), factors[0], "factors[0]");
    kfac::check_nonneg(damping[i], kfac::item("damping", i).c_str());
  }
  for (size_t i = 0; i < factors.size(); ++i) {  // values: symmetric (its lower triangle is what is read)
    const auto& f = factors[i];
    if (f.numel() == 0) continue;
    const double eps = f.scalar_type() == at::kFloat ? std::numeric_limits<float>::epsilon()
                                                     : std::numeric_limits<double>::epsilon();
    // four passes: aminmax of F, a blocked transposing copy, an in-place difference, its aminmax;
    // one host read for all four numbers
    auto [lo, hi] = at::aminmax(f);
    at::Tensor d = f.t().clone(at::MemoryFormat::Contiguous).sub_(f);
    auto [dlo, dhi] = at::aminmax(d);
    at::Tensor v = at::stack({lo, hi, dlo, dhi}).to(at::kDouble).cpu();
    const double* p = v.const_data_ptr<double>();
    const double tol = 64 * eps * std::max(-p[0], p[1]);
    const double asym = std::max(-p[2], p[3]);
    TORCH_CHECK_VALUE(std::isfinite(asym) && asym <= tol, kfac::item("factors", i),
                      " must be symmetric with finite values (max |F - F^T| = ", Num{asym}, ", at most ", Num{tol},
                      " allowed)");
  }
}

inline void check_kfac_precondition(at::TensorList grad, at::TensorList a_inv, at::TensorList g_inv) {
  kfac::check_count(a_inv.size(), "a_inv", grad.size());
  kfac::check_count(g_inv.size(), "g_inv", grad.size());
  for (size_t i = 0; i < grad.size(); ++i) {
    const auto& g = grad[i];
    kfac::check_grad_item(g, i, grad[0]);
    kfac::check_like(a_inv[i], kfac::item("a_inv", i), g, i);
    kfac::check_square(a_inv[i], kfac::item("a_inv", i), g.size(1), ("grad[" + std::to_string(i) + "]'s input size").c_str());
    kfac::check_like(g_inv[i], kfac::item("g_inv", i), g, i);
    kfac::check_square(g_inv[i], kfac::item("g_inv", i), g.size(0), ("grad[" + std::to_string(i) + "]'s output size").c_str());
  }
}

inline void check_kfac_eigen_precondition(at::TensorList grad, at::TensorList q_a, at::TensorList q_g,
                                          at::TensorList lam, double damping) {
  kfac::check_count(q_a.size(), "q_a", grad.size());
  kfac::check_count(q_g.size(), "q_g", grad.size());
  kfac::check_count(lam.size(), "lam", grad.size());
  for (size_t i = 0; i < grad.size(); ++i) {
    const auto& g = grad[i];
    const std::string si = std::to_string(i);
    kfac::check_grad_item(g, i, grad[0]);
    kfac::check_like(q_a[i], kfac::item("q_a", i), g, i);
    kfac::check_square(q_a[i], kfac::item("q_a", i), g.size(1), ("grad[" + si + "]'s input size").c_str());
    kfac::check_like(q_g[i], kfac::item("q_g", i), g, i);
    kfac::check_square(q_g[i], kfac::item("q_g", i), g.size(0), ("grad[" + si + "]'s output size").c_str());
    kfac::check_like(lam[i], kfac::item("lam", i), g, i);
    TORCH_CHECK_VALUE(lam[i].sizes() == g.sizes(), "lam[", i, "] must have grad[", i, "]'s shape (", g.sizes(),
                      "), got ", lam[i].sizes());
  }
  TORCH_CHECK_VALUE(std::isfinite(damping) && damping > 0, "damping must be a finite number > 0, got ", Num{damping});
  for (size_t i = 0; i < lam.size(); ++i) {
    if (lam[i].numel() == 0) continue;
    const double lo = lam[i].min().item<double>();
    TORCH_CHECK_VALUE(lo >= 0, "lam[", i, "] must be >= 0 everywhere (eigenvalues clamped at 0), got a minimum of ",
                      Num{lo});
  }
}

inline void check_kfac_eigen_update(const at::Tensor& lam, const at::Tensor& a, const at::Tensor& g,
                                    const at::Tensor& q_a, const at::Tensor& q_g,
                                    const std::optional<at::Tensor>& mask, bool bias, double scale, double decay) {
  kfac::check_factor_dtype(lam, "lam");
  TORCH_CHECK_VALUE(lam.dim() == 2, "lam must be 2-D [out, in], got shape ", lam.sizes());
  TORCH_CHECK_VALUE(lam.is_contiguous(), "lam must be contiguous");
  const int64_t out = lam.size(0), in = lam.size(1);
  const struct { const at::Tensor& q; const char* name; int64_t n; const char* what; } qs[] = {
      {q_a, "q_a", in, "lam's input size"}, {q_g, "q_g", out, "lam's output size"}};
  for (const auto& q : qs) {
    TORCH_CHECK_TYPE(q.q.scalar_type() == lam.scalar_type(), q.name, " must have lam's dtype (",
                     dtype_name(lam.scalar_type()), "), got ", dtype_name(q.q.scalar_type()));
    kfac::check_square(q.q, q.name, q.n, q.what);
    check_same_device(q.q, q.name, lam, "lam");
  }
  TORCH_CHECK_VALUE(!bias || in >= 1, "lam must have at least one input column with bias=True (the ones column)");
  kfac::check_rows(a, "a", mask, in - (bias ? 1 : 0), "lam's input", bias);
  kfac::check_rows(g, "g", std::nullopt, out, "lam's output", false);
  TORCH_CHECK_VALUE(g.sizes().slice(0, g.dim() - 1) == a.sizes().slice(0, a.dim() - 1), "g must have a's leading shape (",
                    a.sizes().slice(0, a.dim() - 1), "), got shape ", g.sizes());
  check_same_device(a, "a", lam, "lam");
  check_same_device(g, "g", lam, "lam");
  if (present(mask)) check_same_device(*mask, "mask", lam, "lam");
  kfac::check_nonneg(scale, "scale");
  kfac::check_nonneg(decay, "decay");
  TORCH_CHECK_VALUE(!overlap(lam, a) && !overlap(lam, g) && !overlap(lam, q_a) && !overlap(lam, q_g) &&
                        !(present(mask) && overlap(lam, *mask)),
                    "lam must not overlap a, g, q_a, q_g or mask");
}

}  // namespace lethe
