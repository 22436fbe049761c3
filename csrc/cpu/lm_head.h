#pragma once
// The LM-head products of the shred CPU kernels with fp32 arithmetic for any weight dtype. An
// fp16/bf16 weight [V, H] is converted a block of rows at a time into a 16 MiB fp32 buffer, never
// whole: a whole fp32 copy would be V*H*4 bytes per call (2 GiB for a Llama-3 head), more than
// the loss's own working memory. Converting twice per chunk of tokens costs 2VH element copies
// against the chunk's 6cVH flops.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>

namespace lethe {
namespace cpu {

// A reusable fp32 buffer for a block of weight rows: 16 MiB, 256 to 4096 rows (undefined, and
// unused, for an fp32 weight). The block is the buffer's row count.
inline at::Tensor head_buffer(const at::Tensor& weight) {
  if (weight.scalar_type() == at::kFloat) return at::Tensor();
  const int64_t H = std::max<int64_t>(weight.size(1), 1);
  const int64_t rows = std::clamp<int64_t>((int64_t(16) << 20) / (4 * H) / 256 * 256, 256, 4096);
  return at::empty({std::min(rows, weight.size(0)), weight.size(1)}, weight.options().dtype(at::kFloat));
}

// fn(v0, vb, wb) for each block of weight rows [v0, v0 + vb), wb their fp32 copy in buf.
template <typename Fn>
void for_each_block(const at::Tensor& weight, at::Tensor& buf, Fn fn) {
  const int64_t V = weight.size(0), block = buf.size(0);
  for (int64_t v0 = 0; v0 < V; v0 += block) {
    const int64_t vb = std::min(block, V - v0);
    at::Tensor wb = buf.narrow(0, 0, vb);
    wb.copy_(weight.narrow(0, v0, vb));
    fn(v0, vb, wb);
  }
}

// z [c, V] (row stride V) = h [c, H] fp32 @ weight^T.
inline void head_logits(at::Tensor& z, const at::Tensor& h, const at::Tensor& weight, at::Tensor& buf) {
  if (!buf.defined()) {
    at::mm_out(z, h, weight.t());
    return;
  }
  for_each_block(weight, buf, [&](int64_t v0, int64_t vb, const at::Tensor& wb) {
    at::Tensor zb = z.narrow(1, v0, vb);  // strided: the GEMM writes it in place (ldc = V)
    at::mm_out(zb, h, wb.t());
  });
}

// out [c, H] fp32 = g [c, V] fp32 @ weight.
inline void head_grad_hidden(at::Tensor& out, const at::Tensor& g, const at::Tensor& weight, at::Tensor& buf) {
  if (!buf.defined()) {
    at::mm_out(out, g, weight);
    return;
  }
  for_each_block(weight, buf, [&](int64_t v0, int64_t vb, const at::Tensor& wb) {
    if (v0 == 0)
      at::mm_out(out, g.narrow(1, 0, vb), wb);
    else
      out.addmm_(g.narrow(1, v0, vb), wb);
  });
}

}  // namespace cpu
}  // namespace lethe
