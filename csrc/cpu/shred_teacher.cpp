// CPU kernels of the shred family (see python/lethe/ops/shred_reference.py for the definitions):
//   teacher_topk             the teacher pass fused with the LM head, chunk_size tokens at a time;
//   select_forget_positions  per sequence, the lowest label log-probs after the first `skip`;
//   demote_targets           renormalised top-K teacher probs with the label / nucleus zeroed.
// All arithmetic in fp32 (teacher_topk's log-sum-exp: the fp32 vector pass of vec.h; other sums of
// many terms accumulate in double). Orderings follow torch.sort:
// NaN counts as larger than every number; equal values keep ascending id / position order.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "gemm.h"
#include "lethe/shred.h"
#include "lethe/shred_checks.h"
#include "vec.h"

namespace lethe {
namespace {

using shred::kIgnoreIndex;

// Strict total order "a comes before b" for a descending sort by value with ties (and NaN ties)
// broken by ascending index; NaN sorts first, as torch.sort(descending=True) puts it.
inline bool desc_before(float va, int64_t ia, float vb, int64_t ib) {
  const bool na = std::isnan(va), nb = std::isnan(vb);
  if (na || nb) return na != nb ? na : ia < ib;
  if (va != vb) return va > vb;
  return ia < ib;
}

// Ascending by value (NaN last, as torch.sort puts it), ties by ascending index: a stable sort.
inline bool asc_before(float va, int64_t ia, float vb, int64_t ib) {
  const bool na = std::isnan(va), nb = std::isnan(vb);
  if (na || nb) return na != nb ? nb : ia < ib;
  if (va != vb) return va < vb;
  return ia < ib;
}

struct Entry {
  float v;
  int64_t id;
};

// ---------------------------------------------------------------------------------------------
// teacher_topk

inline bool entry_better(const Entry& a, const Entry& b) {
  return desc_before(a.v, a.id, b.v, b.id);
}

// Offer z[i] (ids ascending) to the size-K heap whose top is the worst kept entry.
LETHE_INLINE void heap_offer(Entry* heap, int64_t K, float v, int64_t i) {
  const Entry e{v, i};
  if (entry_better(e, heap[0])) {
    std::pop_heap(heap, heap + K, entry_better);
    heap[K - 1] = e;
    std::push_heap(heap, heap + K, entry_better);
  }
}

// Top-K of z[0..V) into heap[0..K) (a heap, worst on top). Only an element that is NaN or
// larger than the worst kept value can enter (ids ascend, so an equal later one never
// displaces it): a 16-lane pre-filter against that threshold skips vectors with no candidate,
// and candidates still go through the exact order (value desc, NaN first, id asc).
LETHE_CLONES void row_topk(const float* z, int64_t V, int64_t K, Entry* heap) {
  for (int64_t i = 0; i < K; ++i) heap[i] = {z[i], i};
  std::make_heap(heap, heap + K, entry_better);
  int64_t i = K;
  const int64_t head = std::min(V, (K + kLanes - 1) / kLanes * kLanes);
  for (; i < head; ++i) heap_offer(heap, K, z[i], i);  // up to the next multiple of 16
  float thr = heap[0].v;
  const int64_t nv = i + (V - i) / kLanes * kLanes;
  for (; i < nv; i += kLanes) {
    if (thr != thr) return;  // the whole heap is NaN: nothing later can enter
    const F16v x = loadu(z + i);
    // lanes with !(x <= thr): x > thr or x NaN
    const I16v c = ~(x <= splat(thr));
    uint64_t q[8];
    std::memcpy(q, &c, sizeof(q));
    if ((q[0] | q[1] | q[2] | q[3] | q[4] | q[5] | q[6] | q[7]) == 0) continue;
    for (int64_t j = 0; j < kLanes; ++j) {
      const float v = z[i + j];
      if (!(v <= thr)) {
        heap_offer(heap, K, v, i + j);
        thr = heap[0].v;
      }
    }
  }
  for (; i < V; ++i) heap_offer(heap, K, z[i], i);
}

// One row of logits z[0..V): top-K (value desc, id asc) into ids/lp and the log-sum-exp.
void teacher_row(const float* z, int64_t V, int64_t K, int64_t label, std::vector<Entry>& heap,
                 int64_t* ids, float* lp, float* label_lp) {
  const float lse = row_lse(z, nullptr, V);
  heap.resize(K);
  row_topk(z, V, K, heap.data());
  std::sort_heap(heap.begin(), heap.end(), entry_better);  // best first
  for (int64_t j = 0; j < K; ++j) {
    ids[j] = heap[j].id;
    lp[j] = heap[j].v - lse;
  }
  *label_lp = label == kIgnoreIndex ? 0.0f : z[label] - lse;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> teacher_topk_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t k, int64_t chunk_size) {
  check_teacher_topk_args(hidden, weight, bias, labels, k, chunk_size);
  const int64_t N = hidden.size(0), V = weight.size(0), K = k;
  const at::Tensor lab = labels.contiguous();
  const int64_t* lab_p = lab.const_data_ptr<int64_t>();
  check_label_values(lab, V);
  at::Tensor ids = at::empty({N, K}, hidden.options().dtype(at::kLong));
  at::Tensor lp = at::empty({N, K}, hidden.options().dtype(at::kFloat));
  at::Tensor label_lp = at::empty({N}, hidden.options().dtype(at::kFloat));
  if (N == 0) return {ids, lp, label_lp};

  int64_t* ids_p = ids.mutable_data_ptr<int64_t>();
  float* lp_p = lp.mutable_data_ptr<float>();
  float* llp_p = label_lp.mutable_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / V);
  // the chunked LM-head driver holds one [chunk, V] block of logits (lethe/lm_head.h)
  cpu::LmHead(hidden, weight, chunk_size, bias).run([&](int64_t c0, int64_t n, at::Tensor& z) {
    const float* z_p = z.const_data_ptr<float>();
    at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
      std::vector<Entry> heap;
      heap.reserve(K);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t row = c0 + r;
        teacher_row(z_p + r * V, V, K, lab_p[row], heap, ids_p + row * K, lp_p + row * K, llp_p + row);
      }
    });
  });
  return {ids, lp, label_lp};
}

// ---------------------------------------------------------------------------------------------
// select_forget_positions

at::Tensor select_forget_positions_cpu(const at::Tensor& label_logprob, const at::Tensor& labels,
                                       double fraction, int64_t skip) {
  check_select_forget_positions_args(label_logprob, labels, fraction, skip);

  const int64_t B = label_logprob.size(0), T = label_logprob.size(1);
  at::Tensor out = at::zeros({B, T}, label_logprob.options().dtype(at::kBool));
  if (B == 0 || T == 0) return out;
  const at::Tensor vals = label_logprob.to(at::kFloat).contiguous();
  const at::Tensor lab = labels.contiguous();
  const float* v_p = vals.const_data_ptr<float>();
  const int64_t* l_p = lab.const_data_ptr<int64_t>();
  bool* o_p = out.mutable_data_ptr<bool>();

  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / T), [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> pos;
    pos.reserve(T);
    for (int64_t b = b0; b < b1; ++b) {
      const float* v = v_p + b * T;
      const int64_t* l = l_p + b * T;
      pos.clear();
      int64_t skipped = 0;
      for (int64_t t = 0; t < T; ++t) {
        if (l[t] == kIgnoreIndex) continue;
        if (skipped < skip) {
          ++skipped;
          continue;
        }
        pos.push_back(t);
      }
      const int64_t n = static_cast<int64_t>(pos.size());
      if (n == 0) continue;
      const int64_t m = shred::forget_count(fraction, n);
      if (m == 0) continue;
      auto lower = [&](int64_t a, int64_t c) { return asc_before(v[a], a, v[c], c); };
      if (m < n) std::nth_element(pos.begin(), pos.begin() + (m - 1), pos.end(), lower);
      bool* o = o_p + b * T;
      for (int64_t j = 0; j < m; ++j) o[pos[j]] = true;
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// demote_targets

at::Tensor demote_targets_cpu(const at::Tensor& topk_ids, const at::Tensor& topk_logprobs,
                              const at::Tensor& labels, const at::Tensor& forget_mask,
                              int64_t variant, double top_p) {
  check_demote_targets_args(topk_ids, topk_logprobs, labels, forget_mask, variant, top_p);
  const int64_t N = topk_ids.size(0), K = topk_ids.size(1);

  at::Tensor q = at::empty({N, K}, topk_logprobs.options().dtype(at::kFloat));
  if (N == 0 || K == 0) return q;
  const at::Tensor ids = topk_ids.contiguous();
  const at::Tensor lps = topk_logprobs.to(at::kFloat).contiguous();
  const at::Tensor lab = labels.contiguous();
  const at::Tensor fm = forget_mask.contiguous();
  const int64_t* id_p = ids.const_data_ptr<int64_t>();
  const float* lp_p = lps.const_data_ptr<float>();
  const int64_t* l_p = lab.const_data_ptr<int64_t>();
  const bool* f_p = fm.const_data_ptr<bool>();
  float* q_p = q.mutable_data_ptr<float>();
  const bool nucleus = variant == 1;

  at::parallel_for(0, N, std::max<int64_t>(1, 8192 / K), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      shred::demote_row(id_p + r * K, lp_p + r * K, K, l_p[r], f_p[r], nucleus, top_p, q_p + r * K);
    }
  });
  return q;
}

}  // namespace

void check_label_values(const at::Tensor& labels, int64_t V, int64_t ignore_index) {
  const int64_t* l = labels.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < labels.numel(); ++i)
    if (l[i] != ignore_index && (l[i] < 0 || l[i] >= V))
      raise_bad_value(BadValueRecord{static_cast<int32_t>(BadValue::kLabel), 0, i, l[i], V, 0.0, 0.0, ignore_index});
}

TORCH_LIBRARY_IMPL(lethe, CPU, m) {
  m.impl("teacher_topk", &teacher_topk_cpu);
  m.impl("select_forget_positions", &select_forget_positions_cpu);
  m.impl("demote_targets", &demote_targets_cpu);
}

}  // namespace lethe
