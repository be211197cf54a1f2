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
//
// Two kernels per merge. The scalar ones give a warp to each (b, s, h) row and its lanes 2- or
// 4-byte elements at a stride of 32: they take any head_dim, stride and alignment. The vector
// ones move 16 bytes of each input per thread and access (8 bf16/fp16 or 4 fp32 elements, a
// "chunk"), which is what a memory-bound kernel needs to come near HBM bandwidth; they need
// head_dim and every address to suit 16-byte accesses, which the host checks
// (merge_attention_states.cu). Both compute the same fp32 expressions in the same order, so
// their results are bit-identical.
#pragma once

#include <cmath>
#include <cstdint>

#include "xdit_ops/common.cuh"
#include "xdit_ops/merge_attention_states.h"

namespace xdit_ops {

// A (b, s, h) row of [B, S, H, D] by its index row = (b * S + s) * H + h.
struct RowIndex {
  int64_t b, s, h;
};

__device__ __forceinline__ RowIndex split_row(int64_t row, int64_t seq, int64_t heads) {
  return {row / (heads * seq), (row / heads) % seq, row % heads};
}

// Scalar kernel: one warp per (b, s, h) row; the warp's lanes stride over head_dim so loads are
// coalesced.
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

// Scalar kernel: one warp per (b, s, h) row. Partials whose lse is -inf (no keys) get weight 0
// and are never read: their output may be NaN. A row with no keys at all is written as 0 with
// lse = -inf.
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


// ------------------------------------------------------------------------------ vector kernels

namespace merge_detail {

constexpr int kThreads = 256;
// Partials whose chunk loads a thread issues before it uses any of them: memory-level
// parallelism without holding all kMaxPartials chunks in registers.
constexpr int kPartGroup = 4;
static_assert(kMaxPartials % kPartGroup == 0, "partials come in whole groups");

// A chunk: the elements of T in one 16-byte access, widened to fp32.
template <typename T>
struct Chunk;

template <>
struct Chunk<float> {
  static constexpr int kElems = 4;
  static __device__ __forceinline__ void widen(const uint4& v, float* f) {
    f[0] = __uint_as_float(v.x);
    f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z);
    f[3] = __uint_as_float(v.w);
  }
};

template <>
struct Chunk<__nv_bfloat16> {
  static constexpr int kElems = 8;
  // bf16 is the top half of an fp32: widening is exact, a shift or a mask (little endian: the
  // lower-addressed element is the low half of each word).
  static __device__ __forceinline__ void widen(const uint4& v, float* f) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      f[2 * k] = __uint_as_float(w[k] << 16);
      f[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
  }
};

template <>
struct Chunk<__half> {
  static constexpr int kElems = 8;
  static __device__ __forceinline__ void widen(const uint4& v, float* f) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      f[2 * k] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[k] & 0xffffu)));
      f[2 * k + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[k] >> 16)));
    }
  }
};

// Two fp32 values rounded to T (round to nearest even, as from_float) and packed into a word,
// the first in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(a))) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(b))) << 16);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(a))) |
         (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(b))) << 16);
}

// Stores kElems fp32 values as T at dst, which is aligned to kElems * sizeof(T) bytes (8, 16
// or 32): one 8-byte store, or 16-byte stores.
template <typename T, int kElems>
__device__ __forceinline__ void store_chunk(T* dst, const float* f) {
  if constexpr (sizeof(T) == 4) {
    static_assert(kElems % 4 == 0, "fp32 chunks are whole 16-byte vectors");
#pragma unroll
    for (int q = 0; q < kElems / 4; ++q) {
      reinterpret_cast<float4*>(dst)[q] = make_float4(f[4 * q], f[4 * q + 1], f[4 * q + 2],
                                                      f[4 * q + 3]);
    }
  } else if constexpr (kElems == 4) {
    *reinterpret_cast<uint2*>(dst) = make_uint2(pack2<T>(f[0], f[1]), pack2<T>(f[2], f[3]));
  } else {
    static_assert(kElems == 8, "2-byte chunks are 4 or 8 elements");
    *reinterpret_cast<uint4*>(dst) = make_uint4(pack2<T>(f[0], f[1]), pack2<T>(f[2], f[3]),
                                                pack2<T>(f[4], f[5]), pack2<T>(f[6], f[7]));
  }
}

// The vector kernels' index arithmetic (fast_div, common.cuh): divisors of the flat index, all
// below 2^31.
struct VecIndex {
  uint32_t num_chunks;  // merge_attention_partials: rows x chunks per row
  uint32_t num_rows;    // B * S * H
  FastDiv chunks_per_row, heads, seq;
};

// (b, s, h) of row (b * S + s) * H + h, and (b * H + h) * S + s, its index in a contiguous
// [B, H, S] LSE.
struct Row32 {
  uint32_t b, s, h;
};
__device__ __forceinline__ Row32 split_row32(uint32_t row, const VecIndex& ix) {
  const uint32_t bs = fast_div(row, ix.heads);
  const uint32_t b = fast_div(bs, ix.seq);
  return {b, bs - b * ix.seq.d, row - bs * ix.heads.d};
}

// Partial i's data pointer by a compile-time i (the callers' loops are unrolled): indexing the
// kernel-parameter array with a register would copy it to local memory.
__device__ __forceinline__ const uint4* part_data(const MergeAttentionPartialsParams& p, int i) {
  return static_cast<const uint4*>(p.parts[i]);
}

}  // namespace merge_detail

// Vector kernel of merge_attention_partials. The partials and the result are contiguous, so
// the flat element index row * D + d addresses all of them alike: thread t takes chunk t (16
// bytes of every partial, elements [t * E, t * E + E) with E = 16 / sizeof(TIn)) and the grid
// strides over the chunks. The host guarantees that D is a multiple of E (no chunk spans two
// rows), that every partial is 16-byte aligned, that num_parts <= kParts (4, 8 or 16: the
// unrolled slots) and that there are fewer than 2^31 chunks. Each thread computes its row's
// weights from the N LSEs; the thread holding a row's first chunk writes the row's LSE.
template <typename TIn, typename TOut, int kParts>
__global__ void __launch_bounds__(merge_detail::kThreads)
    merge_attention_partials_vec_kernel(const MergeAttentionPartialsParams p,
                                        const merge_detail::VecIndex ix) {
  using namespace merge_detail;
  static_assert(kParts % kPartGroup == 0 && kParts <= kMaxPartials, "whole groups of partials");
  constexpr int kE = Chunk<TIn>::kElems;
  const int num_parts = p.num_parts;
  for (uint32_t c = blockIdx.x * blockDim.x + threadIdx.x; c < ix.num_chunks;
       c += gridDim.x * blockDim.x) {
    const uint32_t row = fast_div(c, ix.chunks_per_row);
    const Row32 r = split_row32(row, ix);
    const uint32_t lse_idx = (r.b * ix.heads.d + r.h) * ix.seq.d + r.s;
    // All N LSE loads at once (the threads sharing a row share them through L1), kept for the
    // weights below.
    float l[kParts];
#pragma unroll
    for (int i = 0; i < kParts; ++i) {
      l[i] = i < num_parts ? __ldg(p.part_lse[i] + lse_idx) : -INFINITY;
    }
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < kParts; ++i) m = fmaxf(m, l[i]);
    float acc[kE];
#pragma unroll
    for (int k = 0; k < kE; ++k) acc[k] = 0.0f;
    float total = 0.0f;
    // m = -inf: no partial has a key for this row; nothing is read, the row is 0.
    if (m != -INFINITY) {
#pragma unroll
      for (int g = 0; g < kParts; g += kPartGroup) {
        if (g < num_parts) {
          float w[kPartGroup];
          uint4 v[kPartGroup];
          // The weights first, then every chunk load of the group, then the arithmetic: the
          // loads of a group are in flight together.
#pragma unroll
          for (int j = 0; j < kPartGroup; ++j) {
            w[j] = l[g + j] == -INFINITY ? 0.0f : __expf(l[g + j] - m);
          }
#pragma unroll
          for (int j = 0; j < kPartGroup; ++j) {
            // A partial with weight 0 is not read: its data may be NaN (a softmax over no keys).
            v[j] = w[j] != 0.0f ? __ldcs(part_data(p, g + j) + c) : make_uint4(0, 0, 0, 0);
          }
#pragma unroll
          for (int j = 0; j < kPartGroup; ++j) {
            total += w[j];
            if (w[j] != 0.0f) {
              float x[kE];
              Chunk<TIn>::widen(v[j], x);
#pragma unroll
              for (int k = 0; k < kE; ++k) acc[k] += w[j] * x[k];
            }
          }
        }
      }
    }
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
#pragma unroll
    for (int k = 0; k < kE; ++k) acc[k] *= inv;
    store_chunk<TOut, kE>(static_cast<TOut*>(p.out) + static_cast<size_t>(c) * kE, acc);
    if (c == row * ix.chunks_per_row.d) {
      p.lse[lse_idx] = total > 0.0f ? m + logf(total) : -INFINITY;
    }
  }
}

// Vector kernel of merge_attention_states_ (in place, strided). Each row takes D / E threads
// (E = 16 / sizeof(T) elements: 16 bytes of the block and 4 * E of the fp32 accumulator per
// thread), a block kThreads / (D / E) whole rows at a time. The host guarantees D / E <=
// kThreads, a multiple-of-E D and 16-byte aligned addresses and strides. The LSE is updated in
// place: every thread of a row reads it before the row's first thread writes it, which a
// barrier orders (a row's threads may span warps).
template <typename T>
__global__ void __launch_bounds__(merge_detail::kThreads)
    merge_attention_states_vec_kernel(const MergeAttentionStatesParams p,
                                      const merge_detail::VecIndex ix) {
  using namespace merge_detail;
  constexpr int kE = Chunk<T>::kElems;
  const uint32_t threads_per_row = static_cast<uint32_t>(p.head_dim / kE);
  const uint32_t rows_per_block = kThreads / threads_per_row;
  const uint32_t row_in_block = threadIdx.x / threads_per_row;
  const int d0 = static_cast<int>(threadIdx.x - row_in_block * threads_per_row) * kE;
  // The loop bounds are uniform over the block: every thread reaches every barrier.
  for (uint32_t row0 = blockIdx.x * rows_per_block; row0 < ix.num_rows;
       row0 += gridDim.x * rows_per_block) {
    const uint32_t row = row0 + row_in_block;
    const bool live = row_in_block < rows_per_block && row < ix.num_rows;
    float* lse_ptr = nullptr;
    float new_lse = 0.0f;
    bool write_lse = false;
    if (live) {
      const Row32 r = split_row32(row, ix);
      lse_ptr = p.lse + r.b * p.lse_stride_b + r.h * p.lse_stride_h + r.s * p.lse_stride_s;
      float4* o = reinterpret_cast<float4*>(p.out + r.b * p.out_stride_b + r.s * p.out_stride_s +
                                            r.h * p.out_stride_h + d0);
      // The accumulator's loads go out with the LSE loads, before anything depends on them
      // (a dependent chain of loads per row would leave HBM idle): it is read in place, and
      // what an empty accumulator holds is discarded below, not multiplied.
      float4 a[kE / 4];
#pragma unroll
      for (int q = 0; q < kE / 4; ++q) a[q] = o[q];
      const float la = *lse_ptr;
      const float lb = __ldg(p.block_lse + r.b * p.blse_stride_b + r.h * p.blse_stride_h +
                             r.s * p.blse_stride_s);
      // A block with no keys adds nothing and is not read (its output may be NaN): the row
      // stays as it is.
      if (lb != -INFINITY) {
        const uint4 braw = __ldcs(reinterpret_cast<const uint4*>(
            static_cast<const T*>(p.block_out) + r.b * p.blk_stride_b + r.s * p.blk_stride_s +
            r.h * p.blk_stride_h + d0));
        const float m = fmaxf(la, lb);
        const float ea = __expf(la - m);
        const float eb = __expf(lb - m);
        const float inv = 1.0f / (ea + eb);
        const float wa = ea * inv;
        const float wb = eb * inv;
        float x[kE];
        Chunk<T>::widen(braw, x);
        // wa == 0 when the accumulator was empty (lse_acc = -inf): its contents are undefined
        // then (possibly NaN), so select instead of multiplying by zero.
#pragma unroll
        for (int q = 0; q < kE / 4; ++q) {
          const float acc0 = wa == 0.0f ? 0.0f : wa * a[q].x;
          const float acc1 = wa == 0.0f ? 0.0f : wa * a[q].y;
          const float acc2 = wa == 0.0f ? 0.0f : wa * a[q].z;
          const float acc3 = wa == 0.0f ? 0.0f : wa * a[q].w;
          o[q] = make_float4(acc0 + wb * x[4 * q], acc1 + wb * x[4 * q + 1],
                             acc2 + wb * x[4 * q + 2], acc3 + wb * x[4 * q + 3]);
        }
        new_lse = m + logf(ea + eb);
        write_lse = d0 == 0;
      }
    }
    __syncthreads();
    if (write_lse) *lse_ptr = new_lse;
  }
}

}  // namespace xdit_ops
