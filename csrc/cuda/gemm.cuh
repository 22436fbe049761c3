#pragma once
// Row-major GEMMs with an fp32 output for the fused LM-head kernels, through cublasGemmEx on the
// current stream: C = alpha * op(A) op(B) + beta * C, with A and B fp32, fp16 or bf16 (one dtype)
// and C fp32. ATen's mm/addmm keep C in the input dtype (or, with out_dtype, cannot accumulate
// into an fp32 C), and accumulating grad_weight in fp16/bf16 chunk after chunk would lose bits.
// Device is the CUDA device of the chunked LM-head driver (lethe/lm_head.h).
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <ATen/ops/empty.h>
#include <cublas_v2.h>

#include <algorithm>
#include <limits>

#include "lethe/lm_head.h"

namespace lethe {
namespace cuda {

inline cudaDataType_t cublas_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CUDA_R_32F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: TORCH_CHECK(false, "lethe gemm: unsupported dtype ", t);
  }
  return CUDA_R_32F;  // not reached
}

// A is [M, K] (or [K, M] when ta), B is [K, N] (or [N, K] when tb), C is [M, N]; all row-major with
// leading dimensions (row strides) lda, ldb, ldc. fp32 inputs follow torch's TF32 setting for matmuls.
inline void gemm_f32out(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                        const void* A, int64_t lda, const void* B, int64_t ldb, at::ScalarType dtype,
                        float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {  // an empty product (H = 0): C = beta * C, which cuBLAS would reject (ld 0)
    TORCH_CHECK(beta == 0.0f || beta == 1.0f, "lethe gemm: an empty product needs beta 0 or 1");
    if (beta == 0.0f)
      C10_CUDA_CHECK(cudaMemset2DAsync(C, ldc * sizeof(float), 0, N * sizeof(float), M,
                                       c10::cuda::getCurrentCUDAStream().stream()));
    return;
  }
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  TORCH_CHECK(M <= kMax && N <= kMax && K <= kMax && lda <= kMax && ldb <= kMax && ldc <= kMax,
              "lethe gemm: a dimension exceeds the 32-bit limit of cuBLAS (M=", M, ", N=", N,
              ", K=", K, ")");
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  if (dtype == at::kFloat && at::globalContext().allowTF32CuBLAS())
    compute = CUBLAS_COMPUTE_32F_FAST_TF32;
  const cudaDataType_t t = cublas_type(dtype);
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const cublasStatus_t st = cublasGemmEx(
      handle, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
      static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), &alpha, B, t,
      static_cast<int>(ldb), A, t, static_cast<int>(lda), &beta, C, CUDA_R_32F,
      static_cast<int>(ldc), compute, CUBLAS_GEMM_DEFAULT);
  TORCH_CHECK(st == CUBLAS_STATUS_SUCCESS, "lethe gemm: cublasGemmEx failed with status ",
              static_cast<int>(st), " (M=", M, ", N=", N, ", K=", K, ")");
}

// A matrix operand as cuBLAS reads it: row-major with row stride ld, or the transpose of one.
struct Operand {
  const void* ptr;
  int64_t ld;
  bool trans;
};

// X [rows, cols] with unit stride along one of its dimensions (a size-1 dimension's stride is
// meaningless: its row stride is then taken as the minimum, the row's length).
inline Operand operand(const at::Tensor& X) {
  if (X.stride(1) == 1 || X.size(1) == 1)
    return {X.const_data_ptr(), X.size(0) == 1 ? std::max<int64_t>(X.size(1), 1) : X.stride(0), false};
  TORCH_CHECK(X.stride(0) == 1 || X.size(0) == 1, "lethe gemm: an operand needs a unit stride, got strides ",
              X.strides());
  return {X.const_data_ptr(), X.size(1) == 1 ? std::max<int64_t>(X.size(0), 1) : X.stride(1), true};
}

struct Device {
  static constexpr bool kLowPrecisionGemm = true;  // fp16/bf16 on tensor cores, fp32 accumulation

  static at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype, const at::Tensor& like) {
    return at::empty(sizes, like.options().dtype(dtype));
  }

  // C (+)= A B with C fp32 [M, N] (row stride ldc: possibly a column block of a wider buffer)
  static void mm(at::Tensor& C, const at::Tensor& A, const at::Tensor& B, bool accumulate) {
    TORCH_CHECK(C.scalar_type() == at::kFloat && C.stride(1) == 1 && A.scalar_type() == B.scalar_type(),
                "lethe gemm: C must be fp32 with unit column stride, A and B of one dtype");
    const Operand a = operand(A), b = operand(B);
    gemm_f32out(a.trans, b.trans, C.size(0), C.size(1), A.size(1), 1.0f, a.ptr, a.ld, b.ptr, b.ld,
                A.scalar_type(), accumulate ? 1.0f : 0.0f, C.mutable_data_ptr<float>(), C.stride(0));
  }
};

using LmHead = lethe::LmHead<Device>;

}  // namespace cuda
}  // namespace lethe
