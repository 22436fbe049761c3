#pragma once
// The CPU device of the chunked LM-head driver (lethe/lm_head.h): MKL fp32 GEMMs through ATen
// (fp16/bf16 operands are converted to fp32 first), buffers from the output cache.
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>

#include "lethe/cpu_alloc.h"
#include "lethe/lm_head.h"

namespace lethe {
namespace cpu {

struct Device {
  static constexpr bool kLowPrecisionGemm = false;

  static at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype, const at::Tensor&) {
    return cached_empty(sizes, dtype);
  }

  // C (+)= A B; C may be a strided column block (the GEMM writes it in place, ldc = its row stride)
  static void mm(at::Tensor& C, const at::Tensor& A, const at::Tensor& B, bool accumulate) {
    if (accumulate)
      C.addmm_(A, B);
    else
      at::mm_out(C, A, B);
  }
};

using LmHead = lethe::LmHead<Device>;

}  // namespace cpu
}  // namespace lethe
