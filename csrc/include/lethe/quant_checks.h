#pragma once
// Argument checks of the quant family's ops, for the CPU and CUDA kernels (worded as
// check_fake_quantize and check_fake_quantize_backward in python/lethe/ops/quant.py).
#include <cmath>

#include "lethe/checks.h"

namespace lethe {

inline void check_fake_quantize_args(const at::Tensor& x, int64_t group_size, int64_t bits,
                                     int64_t codebook, bool symmetric, double scale_div) {
  check_float(x, "x");
  TORCH_CHECK_VALUE(group_size >= 1, "group_size must be >= 1, got ", group_size);
  TORCH_CHECK_VALUE(x.numel() % group_size == 0, "group_size (", group_size,
                    ") must divide the number of elements of x (", x.numel(), ")");
  TORCH_CHECK_VALUE(codebook == 0 || codebook == 1, "codebook must be 0 (int) or 1 (nf4), got ", codebook);
  if (codebook == 1) {
    TORCH_CHECK_VALUE(bits == 4, "bits must be 4 for the nf4 codebook, got ", bits);
  } else {
    TORCH_CHECK_VALUE(bits >= 2 && bits <= 8, "bits must be in [2, 8], got ", bits);
    if (symmetric) {
      TORCH_CHECK_VALUE(scale_div > 0.0 && std::isfinite(scale_div),
                        "scale_div must be a positive finite number, got ", Num{scale_div});
    }
  }
}

inline void check_fake_quantize_backward_args(const at::Tensor& grad, const at::Tensor& mask) {
  check_float(grad, "grad");
  check_dtype(mask, "mask", at::kBool);
  TORCH_CHECK_VALUE(mask.sizes() == grad.sizes(), "mask must have grad's shape ", grad.sizes(), ", got ",
                    mask.sizes());
  check_same_device(mask, "mask", grad, "grad");
}

}  // namespace lethe
