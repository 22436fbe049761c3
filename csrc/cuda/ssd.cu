// CUDA kernels of the ssd family (Selective Synaptic Dampening): fisher_accumulate and
// ssd_dampen. Definitions: python/lethe/ops/ssd_reference.py; same semantics and per-element
// arithmetic as csrc/cpu/ssd.cpp (lethe/ssd.h).
//
// Why it is built this way:
//  * Both ops stream over the whole parameter list with a few flops per element: bandwidth-bound,
//    so each is one launch for the list, never one per tensor. The list is a table (per tensor:
//    three addresses, length, dtype codes, first CUDA block, the random bits' key, its position
//    in the list) built on the host and copied to the device on the current stream from pinned
//    memory; a CUDA block finds its tensor by a binary search over the first blocks.
//  * A CUDA block takes one ssd::kBlock of one tensor (the fixed partition of the CPU kernel), its
//    threads striding by blockDim (coalesced). Dtypes are runtime codes, uniform over a block.
//  * ssd_dampen's count (int64, exact) and factor sum (fp64) are reduced in the block in a fixed
//    shuffle order and written to the block's own partial; a second kernel sums each tensor's
//    partials (contiguous), one warp per tensor, in a fixed order: deterministic, no atomics.
//  * Indices are int64 (tensors of more than 2^31 elements). Nothing here syncs with the host.
//    The table copy makes the ops unsuitable for CUDA-graph capture (as the Triton twins' table).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "errors.cuh"
#include "lethe/ssd.h"
#include "lethe/ssd_checks.h"
#include "reduce.cuh"

namespace lethe {
namespace {

constexpr int kThreads = 256;
enum Code : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

struct Entry {
  void* a;        // fisher: importance; dampen: param
  const void* b;  // fisher: grad; dampen: importance (d)
  const void* c;  // dampen: forget_importance (f)
  int64_t n;
  int64_t start;  // first CUDA block
  int64_t out;    // position in the list (the outputs' row)
  int32_t codes;  // a | b << 4 | c << 8
  uint32_t key;
};

int32_t code_of(at::ScalarType s) {
  switch (s) {
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    default: return kF32;
  }
}

__device__ __forceinline__ float load_any(const void* p, int32_t code, int64_t i) {
  switch (code) {
    case kF16: return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    case kBF16: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    case kF64: return static_cast<float>(static_cast<const double*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_any(void* p, int32_t code, int64_t i, float v) {
  switch (code) {
    case kF16: static_cast<c10::Half*>(p)[i] = c10::Half(v); break;
    case kBF16: static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

// The entry of CUDA block b: the last whose start is <= b.
__device__ __forceinline__ const Entry& find_entry(const Entry* __restrict__ tab, int n, int64_t b) {
  int lo = 0, hi = n;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (tab[mid].start <= b) lo = mid; else hi = mid;
  }
  return tab[lo];
}

__global__ void __launch_bounds__(kThreads) fisher_kernel(const Entry* __restrict__ tab, int n_tab, float s) {
  const Entry& e = find_entry(tab, n_tab, blockIdx.x);
  const int64_t first = (static_cast<int64_t>(blockIdx.x) - e.start) * ssd::kBlock;
  const int64_t last = first + ssd::kBlock < e.n ? first + ssd::kBlock : e.n;
  const int32_t ac = e.codes & 15, gc = (e.codes >> 4) & 15;
  for (int64_t i = first + threadIdx.x; i < last; i += kThreads) {
    const float v = ssd::fisher_value(load_any(e.a, ac, i), load_any(e.b, gc, i), s);
    if (ac == kF32) {
      static_cast<float*>(e.a)[i] = v;
    } else {
      static_cast<uint16_t*>(e.a)[i] = ssd::bf16_stochastic(__float_as_uint(v), ssd::random_bits(e.key, i));
    }
  }
}

template <int kKind>
__global__ void __launch_bounds__(kThreads) dampen_kernel(const Entry* __restrict__ tab, int n_tab, float alpha,
                                                          float lambd, double ex, float bound,
                                                          int64_t* __restrict__ pc, double* __restrict__ ps) {
  const Entry& e = find_entry(tab, n_tab, blockIdx.x);
  const int64_t first = (static_cast<int64_t>(blockIdx.x) - e.start) * ssd::kBlock;
  const int64_t last = first + ssd::kBlock < e.n ? first + ssd::kBlock : e.n;
  const int32_t pcode = e.codes & 15, dcode = (e.codes >> 4) & 15, fcode = (e.codes >> 8) & 15;
  int64_t count = 0;
  double sum = 0;
  for (int64_t i = first + threadIdx.x; i < last; i += kThreads) {
    const float d = load_any(e.b, dcode, i), f = load_any(e.c, fcode, i);
    if (ssd::selected(d, f, alpha)) {
      const float w = ssd::factor(d, f, lambd, kKind, ex, bound);
      store_any(e.a, pcode, i, load_any(e.a, pcode, i) * w);
      count += 1;
      sum += static_cast<double>(w);
    }
  }
  count = cuda::block_sum(count);
  sum = cuda::block_sum(sum);
  if (threadIdx.x == 0) {
    pc[blockIdx.x] = count;
    ps[blockIdx.x] = sum;
  }
}

// counts[out] and sums[out] of each entry: the sums of its blocks' partials, one warp per entry.
__global__ void reduce_kernel(const Entry* __restrict__ tab, int n_tab, int64_t n_blocks,
                              const int64_t* __restrict__ pc, const double* __restrict__ ps,
                              int64_t* __restrict__ counts, double* __restrict__ sums) {
  const int t = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (t >= n_tab) return;
  const int lane = threadIdx.x & 31;
  const int64_t b0 = tab[t].start, b1 = t + 1 < n_tab ? tab[t + 1].start : n_blocks;
  int64_t c = 0;
  double s = 0;
  for (int64_t b = b0 + lane; b < b1; b += 32) {
    c += pc[b];
    s += ps[b];
  }
  c = cuda::warp_sum(c);
  s = cuda::warp_sum(s);
  if (lane == 0) {
    counts[tab[t].out] = c;
    sums[tab[t].out] = s;
  }
}

struct Plan {
  at::Tensor dev;  // the table on the device (kept alive until the kernels are queued)
  const Entry* tab = nullptr;
  int n = 0;
  int64_t blocks = 0;
};

Plan make_plan(std::vector<Entry>& ents, const at::Tensor& like) {
  Plan plan;
  for (auto& e : ents) {
    e.start = plan.blocks;
    plan.blocks += ssd::num_blocks(e.n);
  }
  plan.n = static_cast<int>(ents.size());
  if (ents.empty()) return plan;
  const int64_t bytes = static_cast<int64_t>(sizeof(Entry) * ents.size());
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.mutable_data_ptr(), ents.data(), static_cast<size_t>(bytes));
  plan.dev = at::empty({bytes}, like.options().dtype(at::kByte));
  plan.dev.copy_(host, /*non_blocking=*/true);  // on the current stream
  plan.tab = reinterpret_cast<const Entry*>(plan.dev.const_data_ptr());
  return plan;
}

void fisher_accumulate_cuda(at::TensorList importance, at::TensorList grad, double scale, int64_t seed) {
  check_fisher_accumulate(importance, grad, scale, seed);
  const c10::cuda::CUDAGuard guard(importance[0].device());
  cuda::bad_value_record(importance[0].get_device());  // raises one recorded by an earlier call
  std::vector<Entry> ents;
  for (size_t t = 0; t < importance.size(); ++t) {
    if (importance[t].numel() == 0) continue;
    ents.push_back({importance[t].data_ptr(), grad[t].const_data_ptr(), nullptr, importance[t].numel(), 0,
                    static_cast<int64_t>(t), code_of(importance[t].scalar_type()) | (code_of(grad[t].scalar_type()) << 4),
                    ssd::tensor_key(seed, static_cast<int64_t>(t))});
  }
  Plan plan = make_plan(ents, importance[0]);
  if (plan.blocks == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  fisher_kernel<<<static_cast<unsigned>(plan.blocks), kThreads, 0, stream>>>(plan.tab, plan.n,
                                                                             static_cast<float>(scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> ssd_dampen_cuda(at::TensorList param, at::TensorList importance,
                                                   at::TensorList forget_importance, double alpha, double lambd,
                                                   double exponent, double bound) {
  check_ssd_dampen(param, importance, forget_importance, alpha, lambd, exponent, bound);
  const c10::cuda::CUDAGuard guard(param[0].device());
  cuda::bad_value_record(param[0].get_device());
  const int64_t T = static_cast<int64_t>(param.size());
  at::Tensor counts = at::zeros({T}, param[0].options().dtype(at::kLong));
  at::Tensor sums = at::zeros({T}, param[0].options().dtype(at::kDouble));
  std::vector<Entry> ents;
  for (int64_t t = 0; t < T; ++t) {
    if (param[t].numel() == 0) continue;
    ents.push_back({param[t].data_ptr(), importance[t].const_data_ptr(), forget_importance[t].const_data_ptr(),
                    param[t].numel(), 0, t,
                    code_of(param[t].scalar_type()) | (code_of(importance[t].scalar_type()) << 4) |
                        (code_of(forget_importance[t].scalar_type()) << 8),
                    0u});
  }
  Plan plan = make_plan(ents, param[0]);
  if (plan.blocks == 0) return {counts, sums};
  at::Tensor pc = at::empty({plan.blocks}, param[0].options().dtype(at::kLong));
  at::Tensor ps = at::empty({plan.blocks}, param[0].options().dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const unsigned grid = static_cast<unsigned>(plan.blocks);
  const float a = static_cast<float>(alpha), l = static_cast<float>(lambd), b = static_cast<float>(bound);
  int64_t* pcp = pc.mutable_data_ptr<int64_t>();
  double* psp = ps.mutable_data_ptr<double>();
  switch (ssd::power_kind(exponent)) {
#define LETHE_SSD_KIND(K) \
  case K: dampen_kernel<K><<<grid, kThreads, 0, stream>>>(plan.tab, plan.n, a, l, exponent, b, pcp, psp); break;
    LETHE_SSD_KIND(ssd::kPowZero)
    LETHE_SSD_KIND(ssd::kPowOne)
    LETHE_SSD_KIND(ssd::kPowTwo)
    LETHE_SSD_KIND(ssd::kPowThree)
    LETHE_SSD_KIND(ssd::kPowNegOne)
    default: dampen_kernel<ssd::kPowGeneral><<<grid, kThreads, 0, stream>>>(plan.tab, plan.n, a, l, exponent, b, pcp,
                                                                            psp);
#undef LETHE_SSD_KIND
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int warps = 8;
  reduce_kernel<<<static_cast<unsigned>((plan.n + warps - 1) / warps), warps * 32, 0, stream>>>(
      plan.tab, plan.n, plan.blocks, pcp, psp, counts.mutable_data_ptr<int64_t>(), sums.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {counts, sums};
}

}  // namespace

TORCH_LIBRARY_IMPL(lethe, CUDA, m) {
  m.impl("fisher_accumulate", &fisher_accumulate_cuda);
  m.impl("ssd_dampen", &ssd_dampen_cuda);
}

}  // namespace lethe
