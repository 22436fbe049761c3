#pragma once
// Argument checks of the token_stats op, for the CPU and CUDA kernels: the checks of
// python/lethe/ops/token_stats.py in the same order and words. Every tensor must be on hidden's
// device. The labels' values are checked inside the kernels (BadValue::kLabel in lethe/checks.h,
// worded with the op's ignore_index; the host check is check_label_values of lethe/shred_checks.h).
#include <optional>
#include <tuple>

#include "lethe/checks.h"
#include "lethe/shred_checks.h"  // check_linear_head, check_chunk_size, check_label_values

namespace lethe {

// (label_logprob, lse, mean_logprob, var_logprob, argmax), each [N].
using TokenStatsResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline void check_token_stats_args(const at::Tensor& hidden, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& labels,
                                   int64_t /*ignore_index*/, int64_t chunk_size) {
  check_linear_head(hidden, weight, bias);
  const int64_t N = hidden.size(0);
  check_dtype(labels, "labels", at::kLong);
  check_same_device(labels, "labels", hidden, "hidden");
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == N, "labels must have shape [N] = [", N, "], got ",
                    labels.sizes());
  check_chunk_size(chunk_size);
}

}  // namespace lethe
