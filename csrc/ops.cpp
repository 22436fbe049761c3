// Every op's schema, declared once. Implementations register per dispatch key in cpu/ and cuda/;
// fake (meta) kernels and autograd are registered from Python (python/lethe/ops/).
#include <torch/library.h>

TORCH_LIBRARY(lethe, m) {
  // quant: quantise-dequantise contiguous groups of group_size elements; codebook 0 = uniform
  // integer, 1 = NF4. Returns (y, mask); mask (clipped STE) is empty unless return_mask.
  m.def("fake_quantize(Tensor x, int group_size, int bits, int codebook, bool symmetric, "
        "float scale_div, bool return_mask) -> (Tensor, Tensor)");
  // The clipped STE's backward: grad where mask, else 0 (grad's dtype and shape).
  m.def("fake_quantize_backward(Tensor grad, Tensor mask) -> Tensor");

  // shred: SHRED's teacher pass, selection, demotion and the demoted top-K KL (see
  // python/lethe/ops/shred_reference.py for the definitions).
  // Teacher pass fused with the LM head, chunk_size tokens at a time: top-K ids (int64, by logit
  // descending, ties by id), their log-probs and the label's log-prob (0 where label == -100).
  m.def("teacher_topk(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int k, "
        "int chunk_size) -> (Tensor, Tensor, Tensor)");
  // Per row of [B,T]: the ceil(fraction * n) lowest label log-probs among valid positions after
  // the first `skip` valid ones (ties: earlier position first). Returns a bool mask.
  m.def("select_forget_positions(Tensor label_logprob, Tensor labels, float fraction, int skip) "
        "-> Tensor");
  // Target probs over the top-K: renormalised teacher probs, with the label (variant 0 = A) or
  // also the teacher's top-p nucleus (variant 1 = B) zeroed at forget positions.
  m.def("demote_targets(Tensor topk_ids, Tensor topk_logprobs, Tensor labels, Tensor forget_mask, "
        "int variant, float top_p) -> Tensor");
  // Per-position row_weight * KL(q || softmax(z)) [N] fp32 and the log-normaliser used [N] fp32
  // (full vocabulary, or the K target ids when full_normalize is false).
  m.def("topk_kl(Tensor logits, Tensor target_ids, Tensor target_probs, Tensor? row_weight, "
        "bool full_normalize) -> (Tensor, Tensor)");
  // Gradient wrt logits of sum_t grad_loss[t] * loss[t]. check_values=False skips the value
  // checks of the targets (a host sync on GPUs): for autograd, whose forward made them. (The CPU
  // kernel still checks the ids' range, which costs it no sync.)
  m.def("topk_kl_backward(Tensor grad_loss, Tensor logits, Tensor target_ids, Tensor target_probs, "
        "Tensor lse, Tensor? row_weight, bool full_normalize, bool check_values=True) -> Tensor");
  // topk_kl on logits = hidden @ weight^T + bias, chunk_size tokens at a time, never holding
  // [N,V]. With grad_row_scale given, also the gradients of sum_t grad_row_scale[t] * loss[t]
  // wrt hidden, weight and bias (computed in the same pass) for which grad_hidden, grad_weight
  // and grad_bias are set (a frozen head skips its GEMM and [V, H] buffer); every gradient not
  // computed is an empty [0] tensor of hidden's dtype. check_values as in topk_kl_backward.
  m.def("fused_linear_topk_kl(Tensor hidden, Tensor weight, Tensor? bias, Tensor target_ids, "
        "Tensor target_probs, Tensor? row_weight, Tensor? grad_row_scale, bool full_normalize, "
        "int chunk_size, bool grad_hidden=True, bool grad_weight=True, bool grad_bias=True, "
        "bool check_values=True) -> (Tensor, Tensor, Tensor, Tensor)");
}
