// Ulysses all-to-all pack/unpack kernels: copies between BSHD tensors and the rank-major
// buffers that one all-to-all moves.
//
//   pack:   q, k, v [B, L, H, D] (strided) -> for rank j: [3, B, L, heads_j, D], rank-major
//   unpack: for rank j: [B, J + L, heads_j, D], rank-major -> [B, J + L, H, D] contiguous
//   place:  received [U, 3, B, L, h, D] + joint rows -> q [B, J + U*L, h, D], kv [2, B, ...]
//
// Both iterate over "rows" (pack: (t, b, l) with t in q/k/v; unpack: output rows (b, r)) and,
// within a row, over (head g, vector c). A row of the BSHD side is H runs of D elements; in the
// rank-major buffer head g of rank j (heads [start_j, start_j + heads_j)) sits at
//     base_g + row * row_stride_g,  base_g = num_rows * D * start_j + (g - start_j) * D,
//                                   row_stride_g = heads_j * D
// (every rank's block holds its heads of all num_rows rows),
// so each block builds that per-head table in shared memory once and every copy is two loads
// of it and a multiply-add. Units below are vectors of the width the launcher chose; a vector
// never straddles a head because D (in bytes) is a multiple of the width.
#pragma once

#include <cstdint>

#include "xdit_ops/common.cuh"
#include "xdit_ops/ulysses_pack.h"

namespace xdit_ops {

// Per-rank head split plus the thread mapping, shared by both kernels (all in vector units).
struct HeadSplit {
  int64_t heads, dv;  // heads per row; vectors per head (D * elem_size / width)
  int64_t num_rows;   // rows to copy, also the rows of each rank's block: 3*B*L or B*(J+L)
  int span;           // threads per row: a power of two, 32..blockDim
  int head_start[kMaxUlyssesRanks + 1];
};

struct UlyssesPackArgs {
  const void* src[3];
  int64_t stride_b[3], stride_s[3], stride_h[3];  // vectors
  void* out;
  int64_t batch, seq;
  HeadSplit split;
};

struct UlyssesUnpackArgs {
  const void* recv;
  void* out;
  int64_t joint, seq;  // J, L
  bool joint_front;
  HeadSplit split;
};

struct UlyssesPlaceArgs {
  const void* recv;
  const void* joint_src[3];
  int64_t stride_b[3], stride_s[3], stride_h[3];  // vectors
  int64_t joint_head_start;
  void* qbuf;
  void* kv;
  int64_t ranks, batch, seq, heads, dv, joint, joint_kv;
  int span;
};

// table[2g] = base_g, table[2g + 1] = row_stride_g (see the header comment).
__device__ __forceinline__ void build_head_table(int64_t* table, const HeadSplit& s) {
  for (int g = threadIdx.x; g < s.heads; g += blockDim.x) {
    int j = 0;
    while (g >= s.head_start[j + 1]) ++j;  // num_ranks <= 64, once per head per block
    const int64_t start = s.head_start[j];
    const int64_t count = s.head_start[j + 1] - start;
    table[2 * g] = s.num_rows * s.dv * start + (g - start) * s.dv;
    table[2 * g + 1] = count * s.dv;
  }
}

// Selecting with ternaries keeps the three-way choice in registers: indexing the kernel
// parameter arrays with a runtime index would copy them to local memory.
template <typename T>
__host__ __device__ __forceinline__ T pick3(int t, T a, T b, T c) {
  return t == 0 ? a : (t == 1 ? b : c);
}

// Row `row` of the pack's and the push's order (q's B * L rows (b, l), then k's, then v's):
// its tensor t, batch b, position l, the first vector of its head 0 and the head stride.
template <typename Vec, typename Args>
__device__ __forceinline__ const Vec* qkv_row(const Args& a, int64_t row, int64_t bl, int& t,
                                              int64_t& b, int64_t& l, int64_t& sh) {
  t = static_cast<int>(row / bl);
  const int64_t rem = row - t * bl;
  b = rem / a.seq;
  l = rem - b * a.seq;
  sh = pick3(t, a.stride_h[0], a.stride_h[1], a.stride_h[2]);
  return static_cast<const Vec*>(pick3(t, a.src[0], a.src[1], a.src[2])) +
         b * pick3(t, a.stride_b[0], a.stride_b[1], a.stride_b[2]) +
         l * pick3(t, a.stride_s[0], a.stride_s[1], a.stride_s[2]);
}

// Block: blockDim / span rows at a time; a row's span threads stride over its heads * dv
// vectors, so a warp reads and writes consecutive vectors of one head run.
template <typename Vec>
__global__ void ulysses_pack_kernel(UlyssesPackArgs a) {
  extern __shared__ int64_t table[];
  const HeadSplit& s = a.split;
  build_head_table(table, s);
  __syncthreads();
  const int rows_per_step = blockDim.x / s.span;
  const int lane = threadIdx.x % s.span;
  // A row is heads * dv < 2^31 vectors (the launcher checks): 32-bit index arithmetic.
  const int per_row = static_cast<int>(s.heads * s.dv), dv = static_cast<int>(s.dv);
  const int64_t bl = a.batch * a.seq;
  Vec* out = static_cast<Vec*>(a.out);
  for (int64_t row = (int64_t)blockIdx.x * rows_per_step + threadIdx.x / s.span; row < s.num_rows;
       row += (int64_t)gridDim.x * rows_per_step) {
    int t;
    int64_t b, l, sh;
    const Vec* src = qkv_row<Vec>(a, row, bl, t, b, l, sh);
    for (int i = lane; i < per_row; i += s.span) {
      const int g = i / dv, c = i - g * dv;
      out[table[2 * g] + row * table[2 * g + 1] + c] = src[g * sh + c];
    }
  }
}

// Output row (b, r) of [B, J + L, H, D]: with the joint rows behind, r < L takes received row
// J + r and r >= L takes r - L (every rank sends its J joint rows first).
template <typename Vec>
__global__ void ulysses_unpack_kernel(UlyssesUnpackArgs a) {
  extern __shared__ int64_t table[];
  const HeadSplit& s = a.split;
  build_head_table(table, s);
  __syncthreads();
  const int rows_per_step = blockDim.x / s.span;
  const int lane = threadIdx.x % s.span;
  const int per_row = static_cast<int>(s.heads * s.dv), dv = static_cast<int>(s.dv);
  const int64_t rows_per_b = a.joint + a.seq;
  const Vec* recv = static_cast<const Vec*>(a.recv);
  for (int64_t row = (int64_t)blockIdx.x * rows_per_step + threadIdx.x / s.span; row < s.num_rows;
       row += (int64_t)gridDim.x * rows_per_step) {
    const int64_t b = row / rows_per_b, r = row - b * rows_per_b;
    const int64_t rr = a.joint_front ? r : (r < a.seq ? a.joint + r : r - a.seq);
    const int64_t src_row = b * rows_per_b + rr;
    Vec* dst = static_cast<Vec*>(a.out) + row * per_row;
    for (int i = lane; i < per_row; i += s.span) {
      const int g = i / dv, c = i - g * dv;
      dst[i] = recv[table[2 * g] + src_row * table[2 * g + 1] + c];
    }
  }
}

// Rows of the two outputs in order: qbuf's B * (J + U*L), then kv's 2 * B * (Jk + U*L). A row
// is the h heads of one token; its source is either one joint row of q/k/v (strided, heads from
// joint_head_start) or one received row, [u, t, b, l] of recv, whose h * D elements are
// contiguous.
template <typename Vec>
__global__ void ulysses_place_kernel(UlyssesPlaceArgs a) {
  const int rows_per_step = blockDim.x / a.span;
  const int lane = threadIdx.x % a.span;
  const int per_row = static_cast<int>(a.heads * a.dv), dv = static_cast<int>(a.dv);
  const int64_t gathered = a.ranks * a.seq;
  const int64_t q_rows = a.batch * (a.joint + gathered);
  const int64_t kv_rows = a.batch * (a.joint_kv + gathered);  // per tensor
  const int64_t num_rows = q_rows + 2 * kv_rows;
  const Vec* recv = static_cast<const Vec*>(a.recv);
  for (int64_t row = (int64_t)blockIdx.x * rows_per_step + threadIdx.x / a.span; row < num_rows;
       row += (int64_t)gridDim.x * rows_per_step) {
    int t = 0;
    int64_t rem = row, joint = a.joint;
    Vec* dst = static_cast<Vec*>(a.qbuf) + row * per_row;
    if (row >= q_rows) {
      rem = row - q_rows;
      dst = static_cast<Vec*>(a.kv) + rem * per_row;
      t = rem < kv_rows ? 1 : 2;
      rem -= (t - 1) * kv_rows;
      joint = a.joint_kv;
    }
    const int64_t rows_per_b = joint + gathered;
    const int64_t b = rem / rows_per_b, r = rem - b * rows_per_b;
    const Vec* src;
    int64_t sh;
    if (r < joint) {
      sh = pick3(t, a.stride_h[0], a.stride_h[1], a.stride_h[2]);
      src = static_cast<const Vec*>(pick3(t, a.joint_src[0], a.joint_src[1], a.joint_src[2])) +
            b * pick3(t, a.stride_b[0], a.stride_b[1], a.stride_b[2]) +
            r * pick3(t, a.stride_s[0], a.stride_s[1], a.stride_s[2]) + a.joint_head_start * sh;
    } else {
      const int64_t u = (r - joint) / a.seq, l = r - joint - u * a.seq;
      sh = dv;
      src = recv + (((u * 3 + t) * a.batch + b) * a.seq + l) * per_row;
    }
    for (int i = lane; i < per_row; i += a.span) {
      const int g = i / dv, c = i - g * dv;
      dst[i] = src[g * sh + c];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Push variants (see ulysses_pack.h): stores go straight into the destination ranks' buffers.

struct UlyssesPushArgs {
  const void* src[3];
  int64_t stride_b[3], stride_s[3], stride_h[3];  // vectors
  void* dst[kMaxUlyssesRanks];
  int64_t batch, seq, ranks, rank, joint, joint_kv, dv;  // B, L, U, me, J, Jk; vectors per head
  int64_t heads;
  int span;
  int head_start[kMaxUlyssesRanks + 1];
};

// Where head g goes: its destination's query and K/V buffers, the destination's row length
// (heads_j * dv) and the head's place in that row ((g - start_j) * dv).
template <typename Vec>
struct PushHead {
  Vec* q;
  Vec* kv;
  int64_t row, at;
};

// Rows (t, b, l) of q, k, v in order, as in the pack; a row's span threads stride over its
// heads * dv vectors, so consecutive lanes store consecutive vectors of one destination's head.
// The table build indexes the parameter arrays (head_start, dst) with a runtime index; that
// happens once per head per block, outside the copy loop, which reads only the table.
template <typename Vec>
__global__ void ulysses_push_kernel(UlyssesPushArgs a) {
  extern __shared__ int64_t smem[];
  PushHead<Vec>* table = reinterpret_cast<PushHead<Vec>*>(smem);
  const int64_t gathered = a.ranks * a.seq;
  for (int g = threadIdx.x; g < a.heads; g += blockDim.x) {
    int j = 0;
    while (g >= a.head_start[j + 1]) ++j;
    const int64_t count = a.head_start[j + 1] - a.head_start[j];
    Vec* base = static_cast<Vec*>(a.dst[j]);
    table[g] = PushHead<Vec>{base, base + a.batch * (a.joint + gathered) * count * a.dv,
                             count * a.dv, (g - a.head_start[j]) * a.dv};
  }
  __syncthreads();
  const int rows_per_step = blockDim.x / a.span;
  const int lane = threadIdx.x % a.span;
  const int per_row = static_cast<int>(a.heads * a.dv), dv = static_cast<int>(a.dv);
  const int64_t bl = a.batch * a.seq, num_rows = 3 * bl;
  for (int64_t row = (int64_t)blockIdx.x * rows_per_step + threadIdx.x / a.span; row < num_rows;
       row += (int64_t)gridDim.x * rows_per_step) {
    int t;
    int64_t b, l, sh;
    const Vec* src = qkv_row<Vec>(a, row, bl, t, b, l, sh);
    // The row's index in the destination's query buffer, or in its K/V buffer (t = 1, 2).
    const int64_t at = a.rank * a.seq + l;
    const int64_t drow = t == 0 ? b * (a.joint + gathered) + a.joint + at
                                : ((t - 1) * a.batch + b) * (a.joint_kv + gathered) + a.joint_kv + at;
    for (int i = lane; i < per_row; i += a.span) {
      const int g = i / dv, c = i - g * dv;
      const PushHead<Vec> e = table[g];
      (t == 0 ? e.q : e.kv)[drow * e.row + e.at + c] = src[g * sh + c];
    }
  }
}

struct UlyssesPushOutArgs {
  const void* src;
  int64_t stride_b, stride_s, stride_h;  // vectors
  void* dst[kMaxUlyssesRanks];
  int64_t batch, joint, seq, heads_total, head_start, heads, dv, ranks;
  bool joint_front;
  int span;
};

// Rows (b, r) of o: a sequence row goes to one rank, a joint row to every rank; the h heads of
// a row are one contiguous run of h * dv vectors in the destination row.
template <typename Vec>
__global__ void ulysses_push_out_kernel(UlyssesPushOutArgs a) {
  __shared__ Vec* dst[kMaxUlyssesRanks];
  for (int u = threadIdx.x; u < a.ranks; u += blockDim.x) dst[u] = static_cast<Vec*>(a.dst[u]);
  __syncthreads();
  const int rows_per_step = blockDim.x / a.span;
  const int lane = threadIdx.x % a.span;
  const int per_row = static_cast<int>(a.heads * a.dv), dv = static_cast<int>(a.dv);
  const int64_t rows_per_b = a.joint + a.ranks * a.seq, num_rows = a.batch * rows_per_b;
  const int64_t out_rows = a.joint + a.seq, out_row = a.heads_total * a.dv;
  const Vec* src_all = static_cast<const Vec*>(a.src);
  for (int64_t row = (int64_t)blockIdx.x * rows_per_step + threadIdx.x / a.span; row < num_rows;
       row += (int64_t)gridDim.x * rows_per_step) {
    const int64_t b = row / rows_per_b, r = row - b * rows_per_b;
    const Vec* src = src_all + b * a.stride_b + r * a.stride_s;
    int64_t u0, u1, pos;  // destinations [u0, u1) and the row there
    if (r < a.joint) {
      u0 = 0;
      u1 = a.ranks;
      pos = a.joint_front ? r : a.seq + r;
    } else {
      u0 = (r - a.joint) / a.seq;
      u1 = u0 + 1;
      const int64_t l = r - a.joint - u0 * a.seq;
      pos = a.joint_front ? a.joint + l : l;
    }
    const int64_t off = (b * out_rows + pos) * out_row + a.head_start * a.dv;
    for (int i = lane; i < per_row; i += a.span) {
      const int g = i / dv, c = i - g * dv;
      const Vec x = src[g * a.stride_h + c];
      for (int64_t u = u0; u < u1; ++u) dst[u][off + i] = x;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Push kernels, version 2 (the default; XDIT_OPS_PUSH_KERNEL=v1 selects the ones above).
//
// Why v1 is slow at small sizes: a block walks rows (one token of one tensor), so every row pays
// two 64-bit divisions, and its 256 lanes cover a row of heads * dv vectors (384 at 24 heads of
// 128 bf16) with half the lanes idle on the second pass; each vector costs a 32-bit division,
// a 32-byte table read and a pointer select, and since a store may alias the next load the
// compiler keeps one 16-byte load in flight per thread (load, store, load, store: the SASS).
// At 48 registers (ptxas, sm_90a) 5 blocks fit an SM, so at (1,4608,24,128) over 4 ranks its
// grid of 8 blocks per SM runs in 1.6 waves.
//
// v2 copies "segments": a run of n_rows rows of one source block whose row is R = heads * dv
// vectors (heads of one destination), stored to rows of the destination. Every row of a
// segment is one run in the destination, so segment vector i is (row, rem) = divmod(i, R) and
// rem = (head, c) = divmod(rem, dv) on the source side. A block copies one tile of
// kPushTileVecs consecutive vectors of one segment: the tile's segment and bases are worked out
// once per block from blockIdx, the per-vector divisions are multiply-high by host-computed
// constants, and each thread loads all its kPushUnroll vectors before it stores any. Blocks of neighbouring
// indices go to different destinations (every destination is written all the time, each rank
// starting with its next peer), one tile per block, so the hardware's block scheduler does the
// load balancing and the last wave is short.

// A non-coherent (read-only path) load on the device; the sources are never written by the
// kernel (the destinations are other allocations).
template <typename Vec>
__host__ __device__ __forceinline__ Vec load_ro(const Vec* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

// Threads per block and vectors per thread of the v2 push kernels (one tile per block).
constexpr int kPushThreads = 256;
constexpr int kPushUnroll = 8;
constexpr int kPushTileVecs = kPushThreads * kPushUnroll;

// One tile: vectors [i0, i0 + kPushTileVecs) of a segment of n vectors (i0 + kPushTileVecs
// < 2^31, checked by the launcher), thread `tid` taking i0 + tid + k * kPushThreads. Source
// vector (row, g, c) at src + row * ss + g * sh + c; destination row `row` at
// dst[u] + row * ds, its rem-th vector. The loaded vectors go to num_dst destinations (the
// joint rows of the output push go to every rank). dst_of(u) returns the u-th base.
template <typename Vec, typename DstOf>
__host__ __device__ __forceinline__ void push_copy_tile(const Vec* src, int64_t ss, int64_t sh,
                                                        DstOf dst_of, int num_dst, int64_t ds,
                                                        uint32_t n, const FastDiv& row_div,
                                                        const FastDiv& dv_div, uint32_t i0,
                                                        int tid) {
  Vec v[kPushUnroll];
  // all loads first: kPushUnroll independent loads in flight per thread
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int k = 0; k < kPushUnroll; ++k) {
    const uint32_t i = i0 + tid + k * kPushThreads;
    const uint32_t row = fast_div(i, row_div), rem = i - row * row_div.d;
    const uint32_t g = fast_div(rem, dv_div), c = rem - g * dv_div.d;
    if (i < n) v[k] = load_ro(src + row * ss + g * sh + c);
  }
  // then the stores; (row, rem) again rather than kept: two registers a vector saved for three
  // instructions
  for (int u = 0; u < num_dst; ++u) {
    Vec* dst = dst_of(u);
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
    for (int k = 0; k < kPushUnroll; ++k) {
      const uint32_t i = i0 + tid + k * kPushThreads;
      const uint32_t row = fast_div(i, row_div), rem = i - row * row_div.d;
      if (i < n) dst[row * ds + rem] = v[k];
    }
  }
}

// Per destination rank j of the input push: its query and K/V buffers, its first head, the
// divider by its row length R_j = heads_j * dv (vectors) and the tiles of one (t, b) segment
// (L rows of R_j vectors).
struct PushDestV2 {
  void* q;
  void* kv;
  int head_start;
  int tiles_per_seg;
  FastDiv row;
};

struct UlyssesPushV2Args {
  const void* src[3];
  int64_t stride_b[3], stride_s[3], stride_h[3];  // vectors
  int64_t batch, seq, joint, joint_kv;            // B, L, J, Jk
  int ranks, rank;
  FastDiv dv;  // vectors per head
  PushDestV2 dest[kMaxUlyssesRanks];
};

// The rank that slot k (0 <= k < U) of rank `rank` (0 <= rank < U) serves: (rank + 1 + k) % U,
// so every rank starts with its next peer. rank + 1 + k < 2U: one conditional subtraction.
// Host and device, like the block functions that call it.
__host__ __device__ __forceinline__ int push_peer(int rank, int k, int ranks) {
  const int u = rank + 1 + k;
  return u >= ranks ? u - ranks : u;
}

// Block -> (slot = block % U, c = block / U); slot k serves rank (rank + 1 + k) % U, so
// neighbouring blocks write to different ranks and every rank starts with its next peer. Rank
// j's tiles c enumerate its 3 * B segments (t, b) of L rows (q's B, then k's, then v's), each
// cut into tiles_per_seg tiles; blocks past a smaller share (uneven heads) exit at once.
// Kernel parameters are __grid_constant__, so dest[j] with a runtime j reads the parameter
// bank in place instead of copying the array to local memory.
// (A host-and-device function of (block, thread), so that a host program can run the same
// index arithmetic block by block.)
template <typename Vec>
__host__ __device__ __forceinline__ void push_v2_block(const UlyssesPushV2Args& a,
                                                       unsigned block, int tid) {
  const int slot = static_cast<int>(block % static_cast<unsigned>(a.ranks));
  const int c = static_cast<int>(block / static_cast<unsigned>(a.ranks));
  const PushDestV2& d = a.dest[push_peer(a.rank, slot, a.ranks)];
  const int tps = d.tiles_per_seg;
  if (tps == 0 || c >= 3 * static_cast<int>(a.batch) * tps) return;
  const int seg = c / tps, chunk = c - seg * tps;
  const int t = seg / static_cast<int>(a.batch);
  const int64_t b = seg - t * a.batch;
  const int64_t R = d.row.d, gathered = a.ranks * a.seq;
  const int64_t at = a.rank * a.seq;  // this rank's first row among the gathered ones
  // q: row b * (J + U*L) + J + at of [B, J + U*L, R]; k, v: row ((t-1) * B + b) * (Jk + U*L)
  // + Jk + at of [2, B, Jk + U*L, R].
  Vec* dst = t == 0 ? static_cast<Vec*>(d.q) + (b * (a.joint + gathered) + a.joint + at) * R
                    : static_cast<Vec*>(d.kv) +
                          (((t - 1) * a.batch + b) * (a.joint_kv + gathered) + a.joint_kv + at) *
                              R;
  const int64_t sh = pick3(t, a.stride_h[0], a.stride_h[1], a.stride_h[2]);
  const Vec* src = static_cast<const Vec*>(pick3(t, a.src[0], a.src[1], a.src[2])) +
                   b * pick3(t, a.stride_b[0], a.stride_b[1], a.stride_b[2]) + d.head_start * sh;
  push_copy_tile<Vec>(src, pick3(t, a.stride_s[0], a.stride_s[1], a.stride_s[2]), sh,
                      [dst](int) { return dst; }, 1, R, static_cast<uint32_t>(a.seq * R), d.row,
                      a.dv, static_cast<uint32_t>(chunk) * kPushTileVecs, tid);
}

template <typename Vec>
__global__ void __launch_bounds__(kPushThreads)
    ulysses_push_v2_kernel(const __grid_constant__ UlyssesPushV2Args a) {
  push_v2_block<Vec>(a, blockIdx.x, threadIdx.x);
}

struct UlyssesPushOutV2Args {
  const void* src;
  int64_t stride_b, stride_s, stride_h;  // vectors
  void* dst[kMaxUlyssesRanks];
  int64_t batch, joint, seq;   // B, J, L
  int64_t out_row, head_off;   // H * dv: a destination row; h0 * dv: this rank's heads in it
  int ranks, rank;
  bool joint_front;
  int tiles_seq, tiles_joint;  // tiles of one (b, u) segment (L rows), of one joint one (J rows)
  FastDiv row, dv;             // R = h * dv; vectors per head
};

// Blocks [0, U * B * tiles_seq): sequence tiles, slot = block % U serving rank
// (rank + 1 + slot) % U, c = block / U -> (b, tile) of that rank's L rows (source rows
// J + u*L ..); then B * tiles_joint joint tiles, each loaded once and stored to every rank.
template <typename Vec>
__host__ __device__ __forceinline__ void push_out_v2_block(const UlyssesPushOutV2Args& a,
                                                           unsigned block, int tid) {
  const int64_t R = a.row.d, rows_out = a.joint + a.seq;
  const unsigned num_seq = static_cast<unsigned>(a.ranks * a.batch * a.tiles_seq);
  const Vec* src = static_cast<const Vec*>(a.src);
  if (block < num_seq) {
    const int slot = static_cast<int>(block % static_cast<unsigned>(a.ranks));
    const int c = static_cast<int>(block / static_cast<unsigned>(a.ranks));
    const int u = push_peer(a.rank, slot, a.ranks);
    const int64_t b = c / a.tiles_seq;
    const int chunk = c - static_cast<int>(b) * a.tiles_seq;
    // rank u's L rows: rows J + u*L .. of o, rows (J or 0) .. of its output
    Vec* dst = static_cast<Vec*>(a.dst[u]) +
               (b * rows_out + (a.joint_front ? a.joint : 0)) * a.out_row + a.head_off;
    push_copy_tile<Vec>(src + b * a.stride_b + (a.joint + u * a.seq) * a.stride_s, a.stride_s,
                        a.stride_h, [dst](int) { return dst; }, 1, a.out_row,
                        static_cast<uint32_t>(a.seq * R), a.row, a.dv,
                        static_cast<uint32_t>(chunk) * kPushTileVecs, tid);
  } else {
    const int c = static_cast<int>(block - num_seq);
    const int64_t b = c / a.tiles_joint;
    const int chunk = c - static_cast<int>(b) * a.tiles_joint;
    // the J joint rows, rows 0 .. of o, to rows (0 or L) .. of every rank's output
    const int64_t off = (b * rows_out + (a.joint_front ? 0 : a.seq)) * a.out_row + a.head_off;
    push_copy_tile<Vec>(
        src + b * a.stride_b, a.stride_s, a.stride_h,
        [&a, off](int k) { return static_cast<Vec*>(a.dst[push_peer(a.rank, k, a.ranks)]) + off; },
        a.ranks, a.out_row, static_cast<uint32_t>(a.joint * R), a.row, a.dv,
        static_cast<uint32_t>(chunk) * kPushTileVecs, tid);
  }
}

template <typename Vec>
__global__ void __launch_bounds__(kPushThreads)
    ulysses_push_out_v2_kernel(const __grid_constant__ UlyssesPushOutV2Args a) {
  push_out_v2_block<Vec>(a, blockIdx.x, threadIdx.x);
}

}  // namespace xdit_ops
