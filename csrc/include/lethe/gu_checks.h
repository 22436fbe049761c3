#pragma once
// Argument checks of the gu family's ops, for the CPU and CUDA kernels: the checks of
// python/lethe/ops/gu.py (check_subspace_dots, check_subspace_axpy, check_subspace_transform) in
// the same order and words. Python's type checks of the lists themselves (a list of tensors, of
// ints, a number) are the dispatcher's here. No value checks: the ops read no value that could be
// out of range.
#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <unordered_map>

#include "lethe/checks.h"
#include "lethe/gu.h"

namespace lethe {
namespace gu {

inline std::string item_name(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

inline void check_contiguous(const at::Tensor& t, const std::string& name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

// The basis list; returns K = max_t K_t.
inline int64_t check_basis(at::TensorList basis) {
  TORCH_CHECK_VALUE(!basis.empty(), "basis must hold at least one tensor");
  int64_t k = 0;
  for (size_t i = 0; i < basis.size(); ++i) {
    const at::Tensor& b = basis[i];
    const std::string name = item_name("basis", i);
    const auto dt = b.scalar_type();
    TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble, name, " must be float32 or float64, got ",
                     dtype_name(dt));
    check_same_device(b, name.c_str(), basis[0], "basis[0]");
    TORCH_CHECK_VALUE(b.dim() >= 1, name, " must be [K, *shape] (K basis rows), got shape ", b.sizes());
    TORCH_CHECK_VALUE(b.size(0) <= kMaxRows, name, " must have at most ", kMaxRows, " rows, got ", b.size(0));
    check_contiguous(b, name);
    k = b.size(0) > k ? b.size(0) : k;
  }
  return k;
}

inline bool is_data_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble;
}

// A list of data tensors, one per basis tensor, each shaped like a row of it.
inline void check_like(const std::optional<at::TensorList>& ts, const char* name, at::TensorList basis) {
  if (!ts.has_value()) return;
  const at::TensorList l = *ts;
  TORCH_CHECK_VALUE(l.size() == basis.size(), name, " must hold one tensor per basis tensor (", basis.size(),
                    "), got ", l.size());
  for (size_t i = 0; i < l.size(); ++i) {
    const at::Tensor& t = l[i];
    const std::string tn = item_name(name, i);
    TORCH_CHECK_TYPE(is_data_dtype(t.scalar_type()), tn, " must be float32, float16, bfloat16 or float64, got ",
                     dtype_name(t.scalar_type()));
    check_same_device(t, tn.c_str(), basis[0], "basis[0]");
    const auto row = basis[i].sizes().slice(1);
    TORCH_CHECK_VALUE(t.sizes() == row, tn, " must have the shape of a row of basis[", i, "] (", row, "), got ",
                      t.sizes());
    check_contiguous(t, tn);
  }
}

inline void check_scope(at::IntArrayRef scope, int64_t num_scopes, at::TensorList basis) {
  TORCH_CHECK_VALUE(scope.size() == basis.size(), "scope must hold one int per basis tensor (", basis.size(),
                    "), got ", scope.size());
  TORCH_CHECK_VALUE(num_scopes >= 1, "num_scopes must be >= 1, got ", num_scopes);
  std::unordered_map<int64_t, size_t> first;
  for (size_t i = 0; i < scope.size(); ++i) {
    const int64_t s = scope[i];
    TORCH_CHECK_VALUE(s >= 0 && s < num_scopes, "scope[", i, "] must be in [0, num_scopes) = [0, ", num_scopes,
                      "), got ", s);
    const size_t j = first.emplace(s, i).first->second;
    TORCH_CHECK_VALUE(basis[i].size(0) == basis[j].size(0), "basis[", i, "] must have as many rows as basis[", j,
                      "] of the same scope (", basis[j].size(0), "), got ", basis[i].size(0));
  }
}

inline void check_eps(double eps, bool have_exp_avg_sq) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eps must be a finite number >= 0, got ", Num{eps});
  TORCH_CHECK_VALUE(!(have_exp_avg_sq && eps == 0), "eps must be > 0 when exp_avg_sq is given, got 0");
}

inline void check_coeff(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& ref) {
  check_dtype(t, name, at::kDouble);
  check_same_device(t, name, ref, "basis[0]");
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

inline int64_t coeff_scopes(const at::Tensor& coeff) { return coeff.dim() >= 1 ? coeff.size(0) : 1; }

}  // namespace gu

inline void check_subspace_dots(at::TensorList basis, const std::optional<at::TensorList>& x,
                                const std::optional<at::TensorList>& exp_avg_sq, double eps, at::IntArrayRef scope,
                                int64_t num_scopes, bool gram) {
  gu::check_basis(basis);
  gu::check_like(x, "x", basis);
  gu::check_like(exp_avg_sq, "exp_avg_sq", basis);
  gu::check_eps(eps, exp_avg_sq.has_value());
  gu::check_scope(scope, num_scopes, basis);
  TORCH_CHECK_VALUE(x.has_value() || gram,
                    "x must be given when gram is False (the inner products are with x)");
}

inline void check_subspace_axpy(at::TensorList out, const std::optional<at::TensorList>& x, at::TensorList basis,
                                const at::Tensor& coeff, const at::Tensor& scale, at::IntArrayRef scope,
                                bool /*dots*/) {
  const int64_t k = gu::check_basis(basis);
  gu::check_like(out, "out", basis);
  gu::check_like(x, "x", basis);
  const int64_t S = gu::coeff_scopes(coeff);
  gu::check_coeff(coeff, "coeff", {S, k}, basis[0]);
  gu::check_coeff(scale, "scale", {S}, basis[0]);
  gu::check_scope(scope, S, basis);
  for (size_t i = 0; i < basis.size(); ++i) {
    TORCH_CHECK_VALUE(!overlap(out[i], basis[i]), "out[", i, "] must not overlap basis[", i, "]");
    if (x.has_value()) {
      TORCH_CHECK_VALUE(!overlap(out[i], (*x)[i]), "out[", i, "] must not overlap x[", i,
                        "] (pass x=None to update out in place)");
    }
  }
  if (x.has_value()) {
    check_no_overlap(out, "out", {{"basis", basis}, {"x", *x}});
  } else {
    check_no_overlap(out, "out", {{"basis", basis}});
  }
}

inline void check_subspace_transform(at::TensorList basis, const at::Tensor& coeff, at::IntArrayRef scope) {
  const int64_t k = gu::check_basis(basis);
  const int64_t S = gu::coeff_scopes(coeff);
  gu::check_coeff(coeff, "coeff", {S, k, k}, basis[0]);
  gu::check_scope(scope, S, basis);
  check_no_overlap(basis, "basis", {});
}

}  // namespace lethe
