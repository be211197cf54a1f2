// Host interface of the sm_90a FP8 attention kernel (torch-free).
//
// The kernel consumes the quantization pass's output (xdit_ops/reference/fp8_attention.py,
// QuantizedQKV; produced on the GPU by the Triton quantization kernels) and implements the
// same numerics as the Triton attention kernel: INT8 Q K^T on wgmma (s32 accumulators),
// per-row and per-key scales, online softmax over 64-key tiles in fp32 base 2,
// P = exp2(s - m + 8) cast to e4m3, P.V on wgmma (e4m3, fp32 accumulator from zero per tile)
// added to an fp32 output accumulator (two-level accumulation).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "xdit_ops/common.h"

namespace xdit_ops {

struct Fp8AttentionSm90Params {
  const int8_t* q8;        // [B, H, Sq, DP]
  const float* q_scale;    // [B, H, Sq]
  const int8_t* k8;        // [B, H, Sk_pad, DP]
  const float* k_scale;    // [B, H, Sk_pad]
  const uint8_t* vt8;      // [B, H, DP, Sk_pad] e4m3 bytes
  const float* v_scale;    // [B, H, DP]
  const float* lse_corr;   // [B, H, Sq]
  void* out;               // [B, Sq, H, D] (strides below), float16 or bfloat16
  float* lse;              // [B, H, Sq] or nullptr
  int64_t out_stride_b, out_stride_s, out_stride_h;
  int heads, seq_q, seq_k, seq_k_pad, head_dim;
};

// head_dim_padded: 64 or 128; out_dtype: kFloat16 or kBFloat16.
cudaError_t fp8_attention_sm90(const Fp8AttentionSm90Params& p, int batch, int head_dim_padded,
                               DType out_dtype, cudaStream_t stream);

}  // namespace xdit_ops
