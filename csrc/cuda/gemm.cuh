#pragma once
// Row-major GEMMs with an fp32 output for the fused LM-head kernels, through cublasGemmEx on the
// current stream: C = alpha * op(A) op(B) + beta * C, with A and B fp32, fp16 or bf16 (one dtype)
// and C fp32. ATen's mm/addmm keep C in the input dtype (or, with out_dtype, cannot accumulate
// into an fp32 C), and accumulating grad_weight in fp16/bf16 chunk after chunk would lose bits.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cublas_v2.h>

#include <limits>

namespace lethe {
namespace cuda {

inline cudaDataType_t cublas_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CUDA_R_32F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: TORCH_CHECK(false, "lethe gemm: unsupported dtype ", t);
  }
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

}  // namespace cuda
}  // namespace lethe
