#pragma once
// Host-side argument checks shared by the CPU and CUDA implementations. The Python layer checks
// the same things first with friendlier wording; these guard direct torch.ops.lethe.* calls.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

// Dispatch over the three accepted float dtypes only (no double instantiations).
#define LETHE_DISPATCH_FLOATS(TYPE, NAME, ...)                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)          \
                             AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace lethe {

// t must be on dev, the device of the argument named ref.
inline void check_same_device(const at::Tensor& t, const char* name, const at::Device& dev,
                              const char* ref) {
  TORCH_CHECK(t.device() == dev, name, " must be on ", dev, " (", ref, "'s device), got ",
              t.device());
}

inline void check_float_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                  t.scalar_type() == at::kBFloat16,
              name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_fake_quantize_args(const at::Tensor& x, int64_t group_size, int64_t bits,
                                     int64_t codebook, bool symmetric, double scale_div) {
  check_float_input(x, "x");
  TORCH_CHECK(group_size >= 1, "group_size must be >= 1, got ", group_size);
  TORCH_CHECK(x.numel() % group_size == 0, "group_size (", group_size,
              ") must divide the number of elements of x (", x.numel(), ")");
  TORCH_CHECK(codebook == 0 || codebook == 1, "codebook must be 0 (int) or 1 (nf4), got ",
              codebook);
  if (codebook == 1) {
    TORCH_CHECK(bits == 4, "bits must be 4 for the nf4 codebook, got ", bits);
  } else {
    TORCH_CHECK(bits >= 2 && bits <= 8, "bits must be in [2, 8], got ", bits);
    if (symmetric) {
      TORCH_CHECK(scale_div > 0.0 && std::isfinite(scale_div),
                  "scale_div must be a positive finite number, got ", scale_div);
    }
  }
}

inline void check_fake_quantize_backward_args(const at::Tensor& grad, const at::Tensor& mask) {
  check_float_input(grad, "grad");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.sizes() == grad.sizes(), "mask must have grad's shape ", grad.sizes(), ", got ",
              mask.sizes());
  TORCH_CHECK(mask.device() == grad.device(), "mask must be on grad's device ", grad.device(),
              ", got ", mask.device());
}

}  // namespace lethe
