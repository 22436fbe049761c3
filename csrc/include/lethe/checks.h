#pragma once
// Host-side argument checks shared by the CPU and CUDA implementations. The Python layer checks
// the same things first with friendlier wording; these guard direct torch.ops.lethe.* calls.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <tuple>

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

// ---- shred ops: shapes, dtypes, scalars and devices. Every tensor must be on the device of the
// first tensor argument, whose device the caller has checked against its backend's. Values held
// in tensors (labels, target ids and probabilities) are checked per backend (a kernel on the GPU).

// An optional float vector [N] (row_weight, grad_row_scale, grad_loss, lse).
inline void check_row_vector(const std::optional<at::Tensor>& t, const char* name, int64_t N,
                             const at::Device& dev, const char* ref) {
  if (!t.has_value()) return;
  check_same_device(*t, name, dev, ref);
  check_float_input(*t, name);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == N, name, " must have shape [N] = [", N, "], got ",
              t->sizes());
}

// target_ids int64 [N, K] and target_probs float [N, K] with K <= V; returns K.
inline int64_t check_target_shapes(const at::Tensor& ids, const at::Tensor& q, int64_t N, int64_t V,
                                   const at::Device& dev, const char* ref) {
  check_same_device(ids, "target_ids", dev, ref);
  check_same_device(q, "target_probs", dev, ref);
  TORCH_CHECK(ids.scalar_type() == at::kLong, "target_ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == N, "target_ids must have shape [N, K] with N = ", N,
              ", got ", ids.sizes());
  const int64_t K = ids.size(1);
  TORCH_CHECK(K <= V, "target_ids has K = ", K, " columns, more than the vocabulary size V = ", V);
  check_float_input(q, "target_probs");
  TORCH_CHECK(q.dim() == 2 && q.sizes() == ids.sizes(), "target_probs must have the shape of target_ids ",
              ids.sizes(), ", got ", q.sizes());
  return K;
}

// logits float [N, V] with V >= 1.
inline void check_logits_shape(const at::Tensor& logits) {
  check_float_input(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "logits must be 2-D [N, V], got ", logits.dim(), "-D");
  TORCH_CHECK(logits.size(1) >= 1, "logits must have at least one column (V >= 1)");
}

// The LM head: hidden float [N, H], weight float [V, H] with V >= 1, bias float [V] or none,
// weight and bias on hidden's device.
inline void check_linear_head(const at::Tensor& hidden, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias) {
  check_same_device(weight, "weight", hidden.device(), "hidden");
  check_float_input(hidden, "hidden");
  check_float_input(weight, "weight");
  TORCH_CHECK(hidden.dim() == 2, "hidden must be 2-D [N, H], got ", hidden.dim(), "-D");
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [V, H], got ", weight.dim(), "-D");
  TORCH_CHECK(weight.size(1) == hidden.size(1), "weight must have shape [V, H] with H = ", hidden.size(1),
              " (hidden's last dimension), got ", weight.sizes());
  TORCH_CHECK(weight.size(0) >= 1, "weight must have at least one row (V >= 1)");
  if (bias.has_value() && bias->defined()) {
    check_same_device(*bias, "bias", hidden.device(), "hidden");
    check_float_input(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must have shape [V] = [",
                weight.size(0), "], got ", bias->sizes());
  }
}

inline void check_teacher_topk_args(const at::Tensor& hidden, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& labels,
                                    int64_t k, int64_t chunk_size) {
  check_linear_head(hidden, weight, bias);
  const int64_t V = weight.size(0);
  check_same_device(labels, "labels", hidden.device(), "hidden");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0), "labels must have shape [N] = [",
              hidden.size(0), "], got ", labels.sizes());
  TORCH_CHECK(k >= 1 && k <= V, "k must be in [1, V] = [1, ", V, "], got ", k);
  TORCH_CHECK(chunk_size >= 1, "chunk_size must be >= 1, got ", chunk_size);
}

inline void check_select_forget_positions_args(const at::Tensor& label_logprob, const at::Tensor& labels,
                                               double fraction, int64_t skip) {
  check_float_input(label_logprob, "label_logprob");
  TORCH_CHECK(label_logprob.dim() == 2, "label_logprob must be 2-D [B, T], got shape ",
              label_logprob.sizes());
  check_same_device(labels, "labels", label_logprob.device(), "label_logprob");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.sizes() == label_logprob.sizes(), "labels must have the shape of label_logprob ",
              label_logprob.sizes(), ", got ", labels.sizes());
  TORCH_CHECK(fraction >= 0.0 && fraction <= 1.0, "fraction must be in [0, 1], got ", fraction);
  TORCH_CHECK(skip >= 0, "skip must be >= 0, got ", skip);
}

// labels and forget_mask: [N], or any shape of N elements (the reference flattens them).
inline void check_demote_targets_args(const at::Tensor& topk_ids, const at::Tensor& topk_logprobs,
                                      const at::Tensor& labels, const at::Tensor& forget_mask,
                                      int64_t variant, double top_p) {
  const at::Device dev = topk_ids.device();
  TORCH_CHECK(topk_ids.scalar_type() == at::kLong, "topk_ids must be int64, got ", topk_ids.scalar_type());
  TORCH_CHECK(topk_ids.dim() == 2, "topk_ids must be 2-D [N, K], got shape ", topk_ids.sizes());
  check_same_device(topk_logprobs, "topk_logprobs", dev, "topk_ids");
  check_same_device(labels, "labels", dev, "topk_ids");
  check_same_device(forget_mask, "forget_mask", dev, "topk_ids");
  check_float_input(topk_logprobs, "topk_logprobs");
  TORCH_CHECK(topk_logprobs.sizes() == topk_ids.sizes(), "topk_logprobs must have the shape of topk_ids ",
              topk_ids.sizes(), ", got ", topk_logprobs.sizes());
  const int64_t N = topk_ids.size(0);
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.numel() == N, "labels must have N = ", N, " elements (shape [N]), got shape ",
              labels.sizes());
  TORCH_CHECK(forget_mask.scalar_type() == at::kBool, "forget_mask must be bool, got ",
              forget_mask.scalar_type());
  TORCH_CHECK(forget_mask.numel() == N, "forget_mask must have N = ", N, " elements (shape [N]), got shape ",
              forget_mask.sizes());
  TORCH_CHECK(variant == 0 || variant == 1, "variant must be 0 (A) or 1 (B), got ", variant);
  TORCH_CHECK(top_p > 0.0 && top_p <= 1.0, "top_p must be in (0, 1], got ", top_p);
}

// ---- fused_linear_topk_kl: the arguments and output conventions both backends share.

// Which gradients a call computes: none without grad_row_scale, a bias gradient only with a bias.
struct GradMask {
  bool h, w, b;
  bool any() const { return h || w || b; }
};

// The checks after the backend's own device check of hidden; returns the gradients to compute.
inline GradMask check_fused_linear_topk_kl_args(const at::Tensor& hidden, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias,
                                                const std::optional<at::Tensor>& grad_row_scale,
                                                int64_t chunk_size, bool grad_hidden, bool grad_weight,
                                                bool grad_bias) {
  check_linear_head(hidden, weight, bias);
  check_row_vector(grad_row_scale, "grad_row_scale", hidden.size(0), hidden.device(), "hidden");
  TORCH_CHECK(chunk_size >= 1, "chunk_size must be >= 1, got ", chunk_size);
  const bool scaled = grad_row_scale.has_value();
  return GradMask{scaled && grad_hidden, scaled && grad_weight,
                  scaled && grad_bias && bias.has_value() && bias->defined()};
}

using FusedResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// (loss, grad_hidden, grad_weight, grad_bias) with every gradient not asked for an empty [0]
// tensor of hidden's dtype; for N = 0 the asked-for ones are [0, H] and zero [V, H] / [V].
inline FusedResult fused_result(const at::Tensor& loss, const GradMask& want, const at::Tensor& hidden,
                                const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                at::Tensor gh = {}, at::Tensor gw = {}, at::Tensor gb = {}) {
  const bool empty = hidden.size(0) == 0;
  auto none = [&] { return at::empty({0}, hidden.options()); };
  if (!want.h) gh = none();
  else if (empty) gh = at::empty({0, hidden.size(1)}, hidden.options());
  if (!want.w) gw = none();
  else if (empty) gw = at::zeros(weight.sizes(), weight.options());
  if (!want.b) gb = none();
  else if (empty) gb = at::zeros(bias->sizes(), bias->options());
  return {loss, gh, gw, gb};
}

// An fp32 accumulator as the gradient of `like` (in like's dtype).
inline at::Tensor grad_as(const at::Tensor& acc32, const at::Tensor& like) {
  return like.scalar_type() == at::kFloat ? acc32 : acc32.to(like.scalar_type());
}

}  // namespace lethe
