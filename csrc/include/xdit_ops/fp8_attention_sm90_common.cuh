// Pieces shared by the two sm_90a FP8 attention kernels (torch-free): fp8_attention_sm90.cuh
// (one warpgroup, cp.async) and fp8_attention_sm90_ws.cuh (warp-specialised, TMA). Both compute
// the same numerics (see fp8_attention_sm90.h): the softmax's constants and conversions, the
// P.V wgmma atom, the LSE epilogue and the host's head-dim / output-dtype dispatch live here.
// (Output conversions: xdit_ops::from_float in common.cuh.)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cute/tensor.hpp>  // first: the atom headers below expect it
#include <cute/arch/mma_sm90_gmma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>

#include "xdit_ops/common.cuh"
#include "xdit_ops/common.h"
#include "xdit_ops/fp8_attention_sm90.h"

namespace xdit_ops {
namespace fp8_sm90_common {

constexpr float kPShift = 8.0f;  // P = exp2(s - m + kPShift) before its e4m3 cast
constexpr float kLn2 = 0.6931471805599453f;

// P.V: e4m3 x e4m3 -> fp32, 64 query rows by the padded head dim, both operands in shared memory.
template <int kDP>
struct MmaPVSel;
template <>
struct MmaPVSel<64> {
  using type = decltype(cute::make_tiled_mma(
      cute::SM90::GMMA::MMA_64x64x32_F32E4M3E4M3_SS_TN<cute::GMMA::ScaleIn::One,
                                                       cute::GMMA::ScaleIn::One>{}));
};
template <>
struct MmaPVSel<128> {
  using type = decltype(cute::make_tiled_mma(
      cute::SM90::GMMA::MMA_64x128x32_F32E4M3E4M3_SS_TN<cute::GMMA::ScaleIn::One,
                                                        cute::GMMA::ScaleIn::One>{}));
};

// int32 -> fp32 without I2F (the exponential unit's rate on Hopper): exact for |x| < 2^22.
__device__ __forceinline__ float int_to_float_exact(int x) {
  return __int_as_float(x + 0x4B400000) - 12582912.0f;
}

// Max / sum over the four lanes of a quad (the lanes that share a row of a wgmma accumulator).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// The natural-log LSE of a thread's two accumulator rows, row0 and row0 + 8 (the wgmma C
// layout), from the base-2 running max m_i and sum l_i: (m + log2 l - kPShift) ln 2 + lse_corr.
// Rows past seq_q are skipped; the caller picks one lane per quad and checks p.lse.
__device__ __forceinline__ void store_lse(const Fp8AttentionSm90Params& p, int64_t bh, int row0,
                                          const float (&m_i)[2], const float (&l_i)[2]) {
  CUTE_UNROLL
  for (int j = 0; j < 2; ++j) {
    const int row = row0 + 8 * j;
    if (row < p.seq_q) {
      p.lse[bh * p.seq_q + row] = (m_i[j] + log2f(l_i[j]) - kPShift) * kLn2 +
                                  p.lse_corr[bh * p.seq_q + row];
    }
  }
}

template <typename T>
struct TypeTag {
  using type = T;
};

// The instantiations both kernels provide: launch(cute::Int<kDP>, TypeTag<OutT>) for padded
// head dim 64 or 128 and a float16 or bfloat16 output; cudaErrorInvalidValue otherwise.
template <class Launch>
cudaError_t dispatch(int head_dim_padded, DType out_dtype, Launch&& launch) {
  if (head_dim_padded == 64) {
    if (out_dtype == DType::kBFloat16) return launch(cute::Int<64>{}, TypeTag<__nv_bfloat16>{});
    if (out_dtype == DType::kFloat16) return launch(cute::Int<64>{}, TypeTag<__half>{});
  } else if (head_dim_padded == 128) {
    if (out_dtype == DType::kBFloat16) return launch(cute::Int<128>{}, TypeTag<__nv_bfloat16>{});
    if (out_dtype == DType::kFloat16) return launch(cute::Int<128>{}, TypeTag<__half>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace fp8_sm90_common
}  // namespace xdit_ops
