#pragma once
// Argument checks of the ssd family's ops, for the CPU and CUDA kernels: the checks of
// python/lethe/ops/ssd.py (check_fisher_accumulate, check_ssd_dampen) in the same order and words.
// Python's type checks of the lists themselves (a list of tensors, a number, an int) are the
// dispatcher's here. No value checks: the ops read no value that could be out of range.
#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "lethe/checks.h"

namespace lethe {
namespace ssd {

inline std::string item(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

inline bool is_importance(at::ScalarType s) { return s == at::kFloat || s == at::kBFloat16; }
inline bool is_grad(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble;
}
inline bool is_param(at::ScalarType s) { return s == at::kFloat || s == at::kHalf || s == at::kBFloat16; }

template <typename Ok>
inline void check_first(at::TensorList ts, const char* name, Ok ok, const char* words) {
  TORCH_CHECK_VALUE(!ts.empty(), name, " must hold at least one tensor");
  for (size_t i = 0; i < ts.size(); ++i) {
    const std::string tn = item(name, i);
    TORCH_CHECK_TYPE(ok(ts[i].scalar_type()), tn, " must be ", words, ", got ", dtype_name(ts[i].scalar_type()));
    check_same_device(ts[i], tn.c_str(), ts[0], (std::string(name) + "[0]").c_str());
    TORCH_CHECK_VALUE(ts[i].is_contiguous(), tn, " must be contiguous");
  }
}

template <typename Ok>
inline void check_pair(at::TensorList ts, const char* name, at::TensorList first, const char* first_name, Ok ok,
                       const char* words) {
  TORCH_CHECK_VALUE(ts.size() == first.size(), name, " must hold one tensor per ", first_name, " tensor (",
                    first.size(), "), got ", ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    const std::string tn = item(name, i);
    TORCH_CHECK_TYPE(ok(ts[i].scalar_type()), tn, " must be ", words, ", got ", dtype_name(ts[i].scalar_type()));
    check_same_device(ts[i], tn.c_str(), first[0], (std::string(first_name) + "[0]").c_str());
    TORCH_CHECK_VALUE(ts[i].sizes() == first[i].sizes(), tn, " must have the shape of ", first_name, "[", i, "] (",
                      first[i].sizes(), "), got ", ts[i].sizes());
    TORCH_CHECK_VALUE(ts[i].is_contiguous(), tn, " must be contiguous");
  }
}

}  // namespace ssd

inline void check_fisher_accumulate(at::TensorList importance, at::TensorList grad, double scale, int64_t /*seed*/) {
  ssd::check_first(importance, "importance", ssd::is_importance, "float32 or bfloat16");
  ssd::check_pair(grad, "grad", importance, "importance", ssd::is_grad, "float32, float16, bfloat16 or float64");
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale >= 0, "scale must be a finite number >= 0, got ", Num{scale});
  for (size_t i = 0; i < importance.size(); ++i) {
    TORCH_CHECK_VALUE(!overlap(importance[i], grad[i]), "importance[", i, "] must not overlap grad[", i, "]");
  }
  check_no_overlap(importance, "importance", {{"grad", grad}});
}

inline void check_ssd_dampen(at::TensorList param, at::TensorList importance, at::TensorList forget_importance,
                             double alpha, double lambd, double exponent, double bound) {
  ssd::check_first(param, "param", ssd::is_param, "float32, float16 or bfloat16");
  ssd::check_pair(importance, "importance", param, "param", ssd::is_importance, "float32 or bfloat16");
  ssd::check_pair(forget_importance, "forget_importance", param, "param", ssd::is_importance, "float32 or bfloat16");
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha > 0, "alpha must be a finite number > 0, got ", Num{alpha});
  TORCH_CHECK_VALUE(std::isfinite(lambd) && lambd >= 0, "lambd must be a finite number >= 0, got ", Num{lambd});
  TORCH_CHECK_VALUE(std::isfinite(exponent), "exponent must be a finite number, got ", Num{exponent});
  TORCH_CHECK_VALUE(std::isfinite(bound) && bound >= 0, "bound must be a finite number >= 0, got ", Num{bound});
  for (size_t i = 0; i < param.size(); ++i) {
    TORCH_CHECK_VALUE(!overlap(param[i], importance[i]) && !overlap(param[i], forget_importance[i]),
                      "param[", i, "] must not overlap importance[", i, "] or forget_importance[", i, "]");
  }
  check_no_overlap(param, "param", {{"importance", importance}, {"forget_importance", forget_importance}});
}

}  // namespace lethe
