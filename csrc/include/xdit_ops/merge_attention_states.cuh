// Merge a partial attention result into an fp32 accumulator using both log-sum-exps.
//
//   lse = log(exp(lse_acc) + exp(lse_blk))
//   out = exp(lse_acc - lse) * out_acc + exp(lse_blk - lse) * out_blk
//
// This is the combine step of ring attention (and of any split-KV attention): each partial
// output is already normalised by its own softmax denominator, so the weights are the
// fraction of the total mass each part holds. All arithmetic is fp32. A row whose keys were
// all masked has lse = -inf: merging such a block row leaves the accumulator untouched (no NaN
// from (-inf) - (-inf) or from the block's undefined output).
#pragma once

#include <cmath>

#include "xdit_ops/common.cuh"
#include "xdit_ops/merge_attention_states.h"

namespace xdit_ops {

// Both kernels give one warp a (b, s, h) row of [B, S, H, D], row = (b * S + s) * H + h.
struct RowIndex {
  int64_t b, s, h;
};

__device__ __forceinline__ RowIndex split_row(int64_t row, int64_t seq, int64_t heads) {
  return {row / (heads * seq), (row / heads) % seq, row % heads};
}

// One warp per (b, s, h) row; the warp's lanes stride over head_dim so loads are coalesced.
template <typename T>
__global__ void merge_attention_states_kernel(MergeAttentionStatesParams p) {
  const int64_t num_rows = p.batch * p.seq * p.heads;
  const int lane = threadIdx.x & 31;
  const int64_t warps_per_grid = (int64_t)gridDim.x * (blockDim.x >> 5);
  for (int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); row < num_rows;
       row += warps_per_grid) {
    const RowIndex r = split_row(row, p.seq, p.heads);
    const int64_t b = r.b, s = r.s, h = r.h;
    float* lse_ptr = p.lse + b * p.lse_stride_b + h * p.lse_stride_h + s * p.lse_stride_s;
    const float la = *lse_ptr;
    const float lb = p.block_lse[b * p.blse_stride_b + h * p.blse_stride_h + s * p.blse_stride_s];
    const float m = fmaxf(la, lb);
    // A block with no keys (lse_blk = -inf) adds nothing, and its output may be NaN (a softmax
    // over no keys): skip it rather than multiply NaN by a zero weight.
    if (lb == -INFINITY) continue;
    const float ea = __expf(la - m);
    const float eb = __expf(lb - m);
    const float inv = 1.0f / (ea + eb);
    const float wa = ea * inv;
    const float wb = eb * inv;
    float* o = p.out + b * p.out_stride_b + s * p.out_stride_s + h * p.out_stride_h;
    const T* ob = static_cast<const T*>(p.block_out) + b * p.blk_stride_b + s * p.blk_stride_s +
                  h * p.blk_stride_h;
    for (int64_t d = lane; d < p.head_dim; d += 32) {
      // wa == 0 when the accumulator was empty (lse_acc = -inf): its contents are undefined
      // then (possibly NaN), so select instead of multiplying by zero.
      const float acc = wa == 0.0f ? 0.0f : wa * o[d];
      o[d] = acc + wb * to_float<T>(ob[d]);
    }
    // All lanes read lse before lane 0 writes it: the read happens above, in every lane, and
    // the write below depends on no other lane's read of the new value.
    __syncwarp();
    if (lane == 0) *lse_ptr = m + logf(ea + eb);
  }
}

// One warp per (b, s, h) row. Partials whose lse is -inf (no keys) get weight 0 and are never
// read: their output may be NaN. A row with no keys at all is written as 0 with lse = -inf.
template <typename TIn, typename TOut>
__global__ void merge_attention_partials_kernel(MergeAttentionPartialsParams p) {
  const int64_t num_rows = p.batch * p.seq * p.heads;
  const int lane = threadIdx.x & 31;
  const int64_t warps_per_grid = (int64_t)gridDim.x * (blockDim.x >> 5);
  for (int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); row < num_rows;
       row += warps_per_grid) {
    const RowIndex r = split_row(row, p.seq, p.heads);
    const int64_t b = r.b, s = r.s, h = r.h;
    const int64_t lse_idx = (b * p.heads + h) * p.seq + s;
    const int64_t out_idx = row * p.head_dim;  // [B, S, H, D] contiguous: row = (b*S + s)*H + h
    float m = -INFINITY;
    for (int i = 0; i < p.num_parts; ++i) m = fmaxf(m, p.part_lse[i][lse_idx]);
    float w[kMaxPartials];
    float total = 0.0f;
#pragma unroll
    for (int i = 0; i < kMaxPartials; ++i) {
      w[i] = 0.0f;
      if (i < p.num_parts && m != -INFINITY) {
        const float l = p.part_lse[i][lse_idx];
        w[i] = l == -INFINITY ? 0.0f : __expf(l - m);
        total += w[i];
      }
    }
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    TOut* o = static_cast<TOut*>(p.out) + out_idx;
    for (int64_t d = lane; d < p.head_dim; d += 32) {
      float acc = 0.0f;
#pragma unroll
      for (int i = 0; i < kMaxPartials; ++i) {
        if (w[i] != 0.0f) acc += w[i] * to_float<TIn>(static_cast<const TIn*>(p.parts[i])[out_idx + d]);
      }
      o[d] = from_float<TOut>(acc * inv);
    }
    if (lane == 0) p.lse[lse_idx] = total > 0.0f ? m + logf(total) : -INFINITY;
  }
}

}  // namespace xdit_ops
