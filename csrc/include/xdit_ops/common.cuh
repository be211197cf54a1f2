// Device helpers for the torch-free kernels: dtype conversions and division by a runtime
// divisor.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "xdit_ops/common.h"

namespace xdit_ops {

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// n / d and n % d for 0 <= n < 2^31, 1 <= d < 2^31, by a multiply-high: with
// s = ceil(log2 d) and m = floor(2^32 (2^s - d) / d) + 1, floor(n / d) = (mulhi(n, m) + n) >> s
// (the 33-bit multiplier 2^32 + m split into its top bit and m; n < 2^31 keeps the sum in 32
// bits). Branchless: d = 1 gives m = 1, s = 0, hence n. A 32-bit division is a sequence of ~20
// instructions; the index splits of the Ulysses and merge kernels use this instead, with the
// divisor built on the host (make_fast_div) and n % d = n - fast_div(n, f) * f.d.
struct FastDiv {
  uint32_t d, m;
  int s;
};

inline FastDiv make_fast_div(uint32_t d) {
  int s = 0;
  while ((uint64_t{1} << s) < d) ++s;
  const uint64_t m = ((((uint64_t{1} << s) - d) << 32) / d) + 1;
  return FastDiv{d, static_cast<uint32_t>(m), s};
}

__host__ __device__ __forceinline__ uint32_t mulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

__host__ __device__ __forceinline__ uint32_t fast_div(uint32_t n, const FastDiv& f) {
  return (mulhi32(n, f.m) + n) >> f.s;
}

}  // namespace xdit_ops
