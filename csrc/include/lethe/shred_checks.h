#pragma once
// Argument checks of the shred family's ops, for the CPU and CUDA kernels: the checks of
// python/lethe/ops/shred.py in the same order and words. Every tensor must be on the device of
// the op's first tensor argument. (The dispatcher sends a call to the CUDA kernel when any tensor
// is a CUDA one, so mixed devices always meet one of these checks, worded as in Python.) Values held in tensors (labels, target ids and probabilities) are checked inside the
// kernels (BadValue in lethe/checks.h).
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <tuple>

#include "lethe/checks.h"

namespace lethe {

// The values in tensors, on the host (contiguous CPU tensors): raise the first bad one as
// lethe/checks.h words it. Target ids in [0, V), and with probs, probabilities >= 0 with each row
// summing to 1 within tol or exactly 0: the lowest bad row of the first kind that has one
// (csrc/cpu/shred_kl.cpp). Labels in [0, V) or ignore_index (-100 for the shred ops, the
// token_stats op's argument otherwise): the lowest bad index (csrc/cpu/shred_teacher.cpp). The CPU kernels call them on their inputs; the CUDA kernels, which
// find bad values without a host sync, call them on host copies under LETHE_SYNC_CHECKS=1.
void check_target_values(const at::Tensor& ids, const at::Tensor& q, int64_t V, float tol, bool probs);
void check_label_values(const at::Tensor& labels, int64_t V, int64_t ignore_index = -100);

// How far a row of target probabilities may sum from 1: 1e-3, or bfloat16's epsilon.
inline float target_sum_tol(at::ScalarType probs) { return probs == at::kBFloat16 ? 7.8125e-3f : 1e-3f; }

// hidden float [N, H], weight float [V, H] with V >= 1, bias float [V] or none, all on hidden's device.
inline void check_linear_head(const at::Tensor& hidden, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias) {
  check_float(hidden, "hidden");
  check_float(weight, "weight");
  check_same_device(weight, "weight", hidden, "hidden");
  check_dims(hidden, "hidden", 2, "[N, H]");
  check_dims(weight, "weight", 2, "[V, H]");
  TORCH_CHECK_VALUE(weight.size(1) == hidden.size(1), "weight must have shape [V, H] with H = ", hidden.size(1),
                    " (hidden's last dimension), got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) >= 1, "weight must have at least one row (V >= 1), got shape ",
                    weight.sizes());
  if (present(bias)) {
    check_float(*bias, "bias");
    check_same_device(*bias, "bias", hidden, "hidden");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must have shape [V] = [",
                      weight.size(0), "], got ", bias->sizes());
  }
}

inline void check_chunk_size(int64_t chunk_size) {
  TORCH_CHECK_VALUE(chunk_size >= 1, "chunk_size must be >= 1, got ", chunk_size);
}

// target_ids int64 [N, K] with K <= V, target_probs float of the same shape; returns K.
inline int64_t check_targets(const at::Tensor& ids, const at::Tensor& q, int64_t N, int64_t V,
                             const at::Tensor& ref, const char* ref_name) {
  check_dtype(ids, "target_ids", at::kLong);
  check_same_device(ids, "target_ids", ref, ref_name);
  TORCH_CHECK_VALUE(ids.dim() == 2 && ids.size(0) == N, "target_ids must have shape [N, K] with N = ", N,
                    ", got ", ids.sizes());
  const int64_t K = ids.size(1);
  TORCH_CHECK_VALUE(K <= V, "target_ids has K = ", K, " columns, more than the vocabulary size V = ", V);
  check_float(q, "target_probs");
  check_same_device(q, "target_probs", ref, ref_name);
  TORCH_CHECK_VALUE(q.sizes() == ids.sizes(), "target_probs must have the shape of target_ids ", ids.sizes(),
                    ", got ", q.sizes());
  return K;
}

inline void check_logits(const at::Tensor& logits) {
  check_float(logits, "logits");
  check_dims(logits, "logits", 2, "[N, V]");
  TORCH_CHECK_VALUE(logits.size(1) >= 1, "logits must have at least one column (V >= 1)");
}

inline void check_teacher_topk_args(const at::Tensor& hidden, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& labels,
                                    int64_t k, int64_t chunk_size) {
  check_linear_head(hidden, weight, bias);
  const int64_t N = hidden.size(0), V = weight.size(0);
  check_dtype(labels, "labels", at::kLong);
  check_same_device(labels, "labels", hidden, "hidden");
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == N, "labels must have shape [N] = [", N, "], got ",
                    labels.sizes());
  TORCH_CHECK_VALUE(k >= 1 && k <= V, "k must be in [1, V] = [1, ", V, "], got ", k);
  check_chunk_size(chunk_size);
}

inline void check_select_forget_positions_args(const at::Tensor& label_logprob, const at::Tensor& labels,
                                               double fraction, int64_t skip) {
  check_float(label_logprob, "label_logprob");
  check_dims(label_logprob, "label_logprob", 2, "[B, T]");
  check_dtype(labels, "labels", at::kLong);
  check_same_device(labels, "labels", label_logprob, "label_logprob");
  TORCH_CHECK_VALUE(labels.sizes() == label_logprob.sizes(), "labels must have the shape of label_logprob ",
                    label_logprob.sizes(), ", got ", labels.sizes());
  TORCH_CHECK_VALUE(fraction >= 0.0 && fraction <= 1.0, "fraction must be in [0, 1], got ", Num{fraction});
  TORCH_CHECK_VALUE(skip >= 0, "skip must be >= 0, got ", skip);
}

// labels and forget_mask: [N], or any shape of N elements.
inline void check_demote_targets_args(const at::Tensor& topk_ids, const at::Tensor& topk_logprobs,
                                      const at::Tensor& labels, const at::Tensor& forget_mask,
                                      int64_t variant, double top_p) {
  check_dtype(topk_ids, "topk_ids", at::kLong);
  check_dims(topk_ids, "topk_ids", 2, "[N, K]");
  const int64_t N = topk_ids.size(0);
  check_float(topk_logprobs, "topk_logprobs");
  check_same_device(topk_logprobs, "topk_logprobs", topk_ids, "topk_ids");
  TORCH_CHECK_VALUE(topk_logprobs.sizes() == topk_ids.sizes(), "topk_logprobs must have the shape of topk_ids ",
                    topk_ids.sizes(), ", got ", topk_logprobs.sizes());
  const std::tuple<const at::Tensor*, const char*, at::ScalarType> rows[] = {
      {&labels, "labels", at::kLong}, {&forget_mask, "forget_mask", at::kBool}};
  for (const auto& [t, name, dtype] : rows) {
    check_dtype(*t, name, dtype);
    check_same_device(*t, name, topk_ids, "topk_ids");
    TORCH_CHECK_VALUE(t->numel() == N, name, " must have N = ", N, " elements (shape [N]), got shape ",
                      t->sizes());
  }
  TORCH_CHECK_VALUE(variant == 0 || variant == 1, "variant must be 0 (A) or 1 (B), got ", variant);
  TORCH_CHECK_VALUE(top_p > 0.0 && top_p <= 1.0, "top_p must be in (0, 1], got ", Num{top_p});
}

// Returns K.
inline int64_t check_topk_kl_args(const at::Tensor& logits, const at::Tensor& ids, const at::Tensor& q,
                                  const std::optional<at::Tensor>& row_weight) {
  check_logits(logits);
  const int64_t N = logits.size(0), V = logits.size(1);
  const int64_t K = check_targets(ids, q, N, V, logits, "logits");
  check_row_vector(row_weight, "row_weight", N, logits, "logits");
  return K;
}

inline int64_t check_topk_kl_backward_args(const at::Tensor& grad_loss, const at::Tensor& logits,
                                           const at::Tensor& ids, const at::Tensor& q, const at::Tensor& lse,
                                           const std::optional<at::Tensor>& row_weight) {
  check_logits(logits);
  const int64_t N = logits.size(0), V = logits.size(1);
  check_row_vector(grad_loss, "grad_loss", N, logits, "logits");
  check_row_vector(lse, "lse", N, logits, "logits");
  const int64_t K = check_targets(ids, q, N, V, logits, "logits");
  check_row_vector(row_weight, "row_weight", N, logits, "logits");
  return K;
}

// ---- fused_linear_topk_kl: the arguments and output conventions both backends share.

// Which gradients a call computes: none without grad_row_scale, a bias gradient only with a bias.
struct GradMask {
  bool h, w, b;
  bool any() const { return h || w || b; }
};

// Returns the gradients to compute.
inline GradMask check_fused_linear_topk_kl_args(const at::Tensor& hidden, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias, const at::Tensor& ids,
                                                const at::Tensor& q, const std::optional<at::Tensor>& row_weight,
                                                const std::optional<at::Tensor>& grad_row_scale,
                                                int64_t chunk_size, bool grad_hidden, bool grad_weight,
                                                bool grad_bias) {
  check_linear_head(hidden, weight, bias);
  const int64_t N = hidden.size(0), V = weight.size(0);
  check_targets(ids, q, N, V, hidden, "hidden");
  check_row_vector(row_weight, "row_weight", N, hidden, "hidden");
  check_row_vector(grad_row_scale, "grad_row_scale", N, hidden, "hidden");
  check_chunk_size(chunk_size);
  const bool scaled = present(grad_row_scale);
  return GradMask{scaled && grad_hidden, scaled && grad_weight, scaled && grad_bias && present(bias)};
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

}  // namespace lethe
