// Every op's schema, declared once. Implementations register per dispatch key in cpu/ and cuda/;
// fake (meta) kernels and autograd are registered from Python (python/lethe/ops/).
#include <torch/library.h>

TORCH_LIBRARY(lethe, m) {
  // quant: quantise-dequantise contiguous groups of group_size elements; codebook 0 = uniform
  // integer, 1 = NF4. Returns (y, mask); mask (clipped STE) is empty unless return_mask.
  m.def("fake_quantize(Tensor x, int group_size, int bits, int codebook, bool symmetric, "
        "float scale_div, bool return_mask) -> (Tensor, Tensor)");
}
