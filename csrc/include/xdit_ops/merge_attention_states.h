// Merge of partial attentions (host interface). The kernel is in merge_attention_states.cuh.
#pragma once

#include "xdit_ops/common.h"

namespace xdit_ops {

struct MergeAttentionStatesParams {
  // Accumulator, updated in place: out [B, S, H, D] fp32, lse [B, H, S] fp32.
  float* out;
  float* lse;
  // Block to merge: out [B, S, H, D] in T, lse [B, H, S] fp32.
  const void* block_out;
  const float* block_lse;
  int64_t batch, seq, heads, head_dim;
  // Element strides; the head_dim stride is 1 for both outputs.
  int64_t out_stride_b, out_stride_s, out_stride_h;
  int64_t lse_stride_b, lse_stride_h, lse_stride_s;
  int64_t blk_stride_b, blk_stride_s, blk_stride_h;
  int64_t blse_stride_b, blse_stride_h, blse_stride_s;
};

// Launches on `stream`; returns the launch error (never synchronises).
cudaError_t merge_attention_states(const MergeAttentionStatesParams& params, DType block_dtype,
                                   int num_sms, cudaStream_t stream);

}  // namespace xdit_ops
