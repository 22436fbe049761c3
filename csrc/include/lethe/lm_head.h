#pragma once
// The chunked LM-head loop of every loss and statistic that needs the logits hidden @ weight^T,
// written once for the CPU and CUDA kernels (Triton's is triton_kernels/lm_head.py). No [N, V]
// tensor is ever held: per chunk of rows [s, s + c)
//   1. z = h_c W^T into one fp32 [chunk, V] buffer, plus the bias when the driver was given it
//      (rounded separately, as the reference's (h @ w^T) + b); else the bias is the row work's;
//   2. rows(s, c, z): the per-chunk row work (a kernel launch or a parallel loop), which may turn z
//      into gradient rows G in place;
//   3. with gradients asked for: grad_bias += sum_rows G, grad_hidden[s:s+c] = G W and
//      grad_weight (+)= G^T h_c (the first chunk writes it, the others accumulate), all in fp32.
// Device is a policy:
//   static constexpr bool kLowPrecisionGemm   whether its GEMM multiplies fp16/bf16 operands into
//                                             an fp32 result (CUDA: tensor cores); else every
//                                             operand is converted to fp32 first (CPU)
//   static at::Tensor empty(sizes, dtype, like)  a buffer on like's device
//   static void mm(C, A, B, accumulate)       C (+)= A B, C fp32 (possibly a column block of a
//                                             wider buffer), A and B of one dtype, either may be
//                                             a transposed view
// The operands are the inputs' dtype when hidden and weight agree and the device multiplies it
// natively; otherwise fp32. A weight that is not in the operand dtype is converted a block of rows
// at a time into a 16 MiB buffer, never whole: a whole fp32 copy of a Llama-3 head is 2 GiB, more
// than the loss's own working memory, and converting twice per chunk costs 2VH element copies
// against the chunk's 6cVH flops. fp16/bf16 gradient rows are rounded to the operand dtype for the
// two gradient GEMMs, as an fp16/bf16 autograd graph holds them.
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <optional>

#include "lethe/shred_checks.h"  // GradMask

namespace lethe {

struct HeadGrads {
  at::Tensor hidden, weight, bias;  // undefined when not asked for
};

template <typename Device>
class LmHead {
 public:
  LmHead(const at::Tensor& hidden, const at::Tensor& weight, int64_t chunk_size,
         const std::optional<at::Tensor>& add_bias = std::nullopt)
      : N_(hidden.size(0)), H_(hidden.size(1)), V_(weight.size(0)), C_(std::min(chunk_size, hidden.size(0))) {
    if (add_bias.has_value() && add_bias->defined()) b32_ = add_bias->to(at::kFloat).contiguous();
    const bool agree = hidden.scalar_type() == weight.scalar_type();
    op_ = Device::kLowPrecisionGemm && agree ? hidden.scalar_type() : at::kFloat;
    h_ = hidden.contiguous();
    W_ = weight.scalar_type() == op_ ? weight.contiguous() : weight;  // else read block by block
    if (W_.scalar_type() != op_) {
      const int64_t rows = std::clamp<int64_t>((int64_t(16) << 20) / (4 * std::max<int64_t>(H_, 1)) / 256 * 256,
                                               256, 4096);
      wbuf_ = Device::empty({std::min(rows, V_), H_}, op_, weight);
    }
    // The [chunk, V] buffers are allocated with a power-of-two number of rows (at most chunk_size)
    // and narrowed: batches whose row counts vary then reuse a few sizes from the CPU output-buffer
    // cache, which reuses only exact sizes, instead of leaving one block per row count behind.
    B_ = std::min(chunk_size, pow2_at_least(C_));
    z_ = Device::empty({B_, V_}, at::kFloat, hidden);
  }

  int64_t chunk() const { return C_; }

  // Runs the loop; rows(s, c, z) with z the [c, V] fp32 logits of rows [s, s + c).
  template <typename Rows>
  HeadGrads run(Rows&& rows, GradMask want = {false, false, false}) {
    HeadGrads g;
    at::Tensor gh32, glow;
    if (want.h) {
      g.hidden = Device::empty({N_, H_}, h_.scalar_type(), h_);
      if (h_.scalar_type() != at::kFloat) gh32 = Device::empty({B_, H_}, at::kFloat, h_);
    }
    if (want.w) g.weight = Device::empty({V_, H_}, at::kFloat, h_);  // the first chunk writes it
    if (want.b) g.bias = Device::empty({V_}, at::kFloat, h_).zero_();
    if ((want.h || want.w) && op_ != at::kFloat) glow = Device::empty({B_, V_}, op_, h_);
    for (int64_t s = 0; s < N_; s += C_) {
      const int64_t c = std::min(C_, N_ - s);
      at::Tensor hc = h_.narrow(0, s, c);
      if (hc.scalar_type() != op_) hc = hc.to(op_);
      at::Tensor z = z_.narrow(0, 0, c);
      times_weight_t(z, hc);
      if (b32_.defined()) z.add_(b32_);
      rows(s, c, z);
      if (!want.any()) continue;
      if (want.b) g.bias.add_(z.sum(0));
      if (!want.h && !want.w) continue;
      at::Tensor G = z;
      if (glow.defined()) G = glow.narrow(0, 0, c).copy_(z);
      if (want.h) {
        at::Tensor dh = gh32.defined() ? gh32.narrow(0, 0, c) : g.hidden.narrow(0, s, c);
        times_weight(dh, G);
        if (gh32.defined()) g.hidden.narrow(0, s, c).copy_(dh);
      }
      if (want.w) Device::mm(g.weight, G.t(), hc, s > 0);
    }
    return g;
  }

 private:
  // fn(v0, vb, wb) for each block of weight rows [v0, v0 + vb) in the operand dtype: the weight
  // itself, or its rows converted into the block buffer.
  template <typename Fn>
  void for_each_block(Fn fn) {
    if (!wbuf_.defined()) {
      fn(0, V_, W_);
      return;
    }
    const int64_t block = wbuf_.size(0);
    for (int64_t v0 = 0; v0 < V_; v0 += block) {
      const int64_t vb = std::min(block, V_ - v0);
      at::Tensor wb = wbuf_.narrow(0, 0, vb);
      wb.copy_(W_.narrow(0, v0, vb));
      fn(v0, vb, wb);
    }
  }

  // z [c, V] = hc W^T, block by block into z's columns (the GEMM writes the strided block in place)
  void times_weight_t(at::Tensor& z, const at::Tensor& hc) {
    for_each_block([&](int64_t v0, int64_t vb, const at::Tensor& wb) {
      at::Tensor zb = z.narrow(1, v0, vb);
      Device::mm(zb, hc, wb.t(), false);
    });
  }

  // out [c, H] = G W, accumulated over the blocks
  void times_weight(at::Tensor& out, const at::Tensor& G) {
    for_each_block([&](int64_t v0, int64_t vb, const at::Tensor& wb) {
      Device::mm(out, G.narrow(1, v0, vb), wb, v0 > 0);
    });
  }

  static int64_t pow2_at_least(int64_t n) {
    int64_t p = 1;
    while (p < n) p <<= 1;
    return p;
  }

  int64_t N_, H_, V_, C_, B_;
  at::ScalarType op_;
  at::Tensor h_, W_, wbuf_, z_, b32_;
};

// The gradient of `like` from its fp32 accumulator (in like's dtype).
inline at::Tensor grad_as(const at::Tensor& acc32, const at::Tensor& like) {
  return like.scalar_type() == at::kFloat ? acc32 : acc32.to(like.scalar_type());
}

}  // namespace lethe
