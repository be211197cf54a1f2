// Merge of partial attentions (host interface). The kernel is in merge_attention_states.cuh.
#pragma once

#include "xdit_ops/common.h"

namespace xdit_ops {

// Which kernels the merges run (the launcher reads XDIT_OPS_MERGE_IMPL): kAuto takes the
// vector kernels wherever head_dim and the addresses allow 16-byte accesses and the scalar
// ones elsewhere; kScalar always takes the scalar (warp-per-row) kernels, the baseline of an
// A/B measurement. Both give bit-identical results.
enum class MergeImpl : int { kAuto = 0, kScalar = 1 };

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
                                   MergeImpl impl, int num_sms, cudaStream_t stream);

// N-way merge: out = sum_i w_i * part_i with w_i = exp(lse_i - lse), lse = log(sum_i exp(lse_i)),
// in one pass over the partials (ring attention's combine step, done once at the end).
constexpr int kMaxPartials = 16;

struct MergeAttentionPartialsParams {
  // Partials, each contiguous: out [B, S, H, D] in T_in, lse [B, H, S] fp32.
  const void* parts[kMaxPartials];
  const float* part_lse[kMaxPartials];
  int num_parts;
  // Result, contiguous: out [B, S, H, D] in T_out, lse [B, H, S] fp32.
  void* out;
  float* lse;
  int64_t batch, seq, heads, head_dim;
};

cudaError_t merge_attention_partials(const MergeAttentionPartialsParams& params, DType in_dtype,
                                     DType out_dtype, MergeImpl impl, int num_sms,
                                     cudaStream_t stream);

}  // namespace xdit_ops
