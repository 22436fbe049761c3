#pragma once
// Macros shared by host and device code.

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LETHE_HD __host__ __device__ __forceinline__
#else
#define LETHE_HD inline
#endif

#if defined(__CUDACC__)
#define LETHE_UNROLL _Pragma("unroll")
#else
#define LETHE_UNROLL
#endif
