// Ulysses all-to-all pack/unpack (host interface). The kernels are in ulysses_pack.cuh.
//
// Both ops are pure copies between a BSHD tensor and the destination-major buffer an
// all-to-all moves, with per-rank head counts that may be uneven (30 heads over 4 ranks:
// 8, 8, 7, 7). Sizes and strides are in elements; the launcher picks the widest vector
// (16, 8, 4, 2 or 1 bytes) that every pointer, stride and row length allows.
#pragma once

#include "xdit_ops/common.h"

namespace xdit_ops {

// Upper bound on the Ulysses degree (ranks a head dimension is split over).
constexpr int kMaxUlyssesRanks = 64;
// Upper bound on the heads of one ulysses_push_qkv (its kernel keeps a 32-byte table entry per
// head in shared memory, under the 48 KiB default).
constexpr int64_t kMaxPushHeads = 1024;

struct UlyssesPackParams {
  // q, k, v: [B, L, H, D], any strides with the head_dim stride 1.
  const void* src[3];
  int64_t src_stride_b[3], src_stride_s[3], src_stride_h[3];
  // Result, contiguous: for rank j a block [3, B, L, heads_j, D], blocks in rank order.
  void* out;
  int64_t batch, seq, heads, head_dim;
  int num_ranks;
  // head_start[j] = heads_0 + ... + heads_{j-1}; head_start[num_ranks] = heads.
  int head_start[kMaxUlyssesRanks + 1];
};

struct UlyssesUnpackParams {
  // Received: for source rank j a contiguous block [B, J + L, heads_j, D], blocks in rank order.
  const void* recv;
  // Result, contiguous [B, J + L, H, D]; joint rows first (joint_front) or behind the L rows.
  void* out;
  int64_t batch, joint, seq, heads, head_dim;
  bool joint_front;
  int num_ranks;
  int head_start[kMaxUlyssesRanks + 1];
};

struct UlyssesPlaceParams {
  // Received Q/K/V of the input exchange: contiguous [U, 3, B, L, h, D] (source rank major).
  const void* recv;
  // Joint rows of q, k, v: [B, J, H_all, D], any strides with the head_dim stride 1; this
  // rank's h heads start at joint_head_start. Not read when joint == 0.
  const void* joint_src[3];
  int64_t joint_stride_b[3], joint_stride_s[3], joint_stride_h[3];
  int64_t joint_head_start;
  // Results, contiguous: qbuf [B, J + U*L, h, D] and kv [2, B, Jk + U*L, h, D], joint rows
  // first (Jk is J or 0: joint K/V inline or handled apart).
  void* qbuf;
  void* kv;
  int64_t ranks, batch, seq, heads, head_dim, joint, joint_kv;  // U, B, L, h, D, J, Jk
};

// Push variants: the pack and the exchange in one pass. Every rank's destination buffer is
// mapped into this process (symmetric memory over NVLink); the kernels store straight into it,
// in the layout the destination reads, so nothing is copied after the exchange.
//
// Input push: rank j's buffer dst[j] holds its query buffer [B, J + U*L, heads_j, D] followed
// by its K/V buffer [2, B, Jk + U*L, heads_j, D] (joint rows first, left to their owner); this
// rank writes its L rows of heads [start_j, start_j + heads_j) of q, k, v at rows
// J + rank*L .. (query) and Jk + rank*L .. (keys, values).
struct UlyssesPushParams {
  const void* src[3];
  int64_t src_stride_b[3], src_stride_s[3], src_stride_h[3];
  void* dst[kMaxUlyssesRanks];
  int64_t batch, seq, heads, head_dim, joint, joint_kv;  // B, L, H, D, J, Jk
  int num_ranks, rank;
  int head_start[kMaxUlyssesRanks + 1];
  // Optional (src_head_given): destination j's heads come from source heads
  // [src_head_start[j], + heads_j) instead of [head_start[j], ..): a head chunk of every share,
  // with `heads` the chunk's total. Version 2 only (an error with version 1).
  int src_head_start[kMaxUlyssesRanks];
  bool src_head_given = false;
  // Which kernel (XDIT_OPS_PUSH_KERNEL in the torch launcher; its v3 runs these as 2): 2,
  // tiles of one destination segment per block (the default), or 1, rows per block (the first
  // version, kept for one release to compare with). Version 2 falls back to 1 past its 32-bit
  // tile indices (a segment of 2^31 vectors).
  int kernel_version = 2;
};

// Output push: this rank's attention output o [B, J + U*L, h, D] (joint rows first, any
// strides with D contiguous) for heads [head_start, head_start + h) -> every rank's output
// buffer dst[u], [B, J + L, H, D] with the joint rows in front or behind: rank u gets its L
// sequence rows (rows J + u*L ..) and every rank gets the J joint rows.
struct UlyssesPushOutParams {
  const void* src;
  int64_t src_stride_b, src_stride_s, src_stride_h;
  void* dst[kMaxUlyssesRanks];
  int64_t batch, joint, seq, heads_total, head_start, heads, head_dim;  // B, J, L, H, h0, h, D
  bool joint_front;
  int num_ranks;
  int rank = 0;            // this rank (version 2 starts with rank + 1's rows)
  int kernel_version = 2;  // as in UlyssesPushParams
  // Rank blocks (ulysses_push_out_blocks): dst[u] instead holds the output all-to-all's
  // receive buffer, source-rank-major, rank j's block [B, J + L, heads_j, D] (joint rows first)
  // at element B * (J + L) * (heads_0 + ... + heads_{j-1}) * D; this rank fills its own block
  // in every buffer, one contiguous run per destination, and ulysses_unpack_out builds the
  // [B, J + L, H, D] output from it. joint_front is then ignored.
  bool rank_blocks = false;
};

// Launch on `stream`; return the launch error (never synchronise). elem_size: bytes per element.
cudaError_t ulysses_pack_qkv(const UlyssesPackParams& params, int elem_size, int num_sms,
                             cudaStream_t stream);
cudaError_t ulysses_unpack_out(const UlyssesUnpackParams& params, int elem_size, int num_sms,
                               cudaStream_t stream);
cudaError_t ulysses_place_gathered(const UlyssesPlaceParams& params, int elem_size, int num_sms,
                                   cudaStream_t stream);
cudaError_t ulysses_push_qkv(const UlyssesPushParams& params, int elem_size, int num_sms,
                             cudaStream_t stream);
cudaError_t ulysses_push_out(const UlyssesPushOutParams& params, int elem_size, int num_sms,
                             cudaStream_t stream);

}  // namespace xdit_ops
