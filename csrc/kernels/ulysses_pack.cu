// Instantiations of the Ulysses pack/unpack copies. No torch headers here.
#include <algorithm>
#include <cstdint>

#include "xdit_ops/copy_width.h"
#include "xdit_ops/ulysses_pack.cuh"

namespace xdit_ops {

namespace {

constexpr int kThreads = 256;
// A copy needs many bytes in flight per SM to reach HBM bandwidth: 8 resident blocks of 256
// threads fill an SM (2048 threads); the kernels grid-stride over whatever is left.
constexpr int kBlocksPerSm = 8;
// The per-head table lives in shared memory (16 bytes a head) under the 48 KiB default.
constexpr int64_t kMaxHeads = 3072;

int round_up_pow2(int64_t n) {
  int p = 32;
  while (p < n && p < kThreads) p *= 2;
  return p;
}

bool fill_split(HeadSplit& s, int64_t heads, int64_t dv, int64_t num_rows, int num_ranks,
                const int* head_start) {
  if (num_ranks < 1 || num_ranks > kMaxUlyssesRanks || heads > kMaxHeads ||
      heads * dv > INT32_MAX) {
    return false;
  }
  s.heads = heads;
  s.dv = dv;
  s.num_rows = num_rows;
  s.span = round_up_pow2(heads * dv);
  for (int j = 0; j <= num_ranks; ++j) s.head_start[j] = head_start[j];
  return head_start[0] == 0 && head_start[num_ranks] == heads;
}

// Element strides of q, k, v (or their joint rows) in vectors of w bytes.
void vector_strides(const int64_t (&elems)[3], int elem_size, int w, int64_t (&vecs)[3]) {
  for (int t = 0; t < 3; ++t) vecs[t] = elems[t] * elem_size / w;
}

// OR of the byte addresses and byte strides of three strided sources (q, k, v or their joint
// rows): what limits their common copy width.
uint64_t source_bits(const void* const (&src)[3], const int64_t (&stride_b)[3],
                     const int64_t (&stride_s)[3], const int64_t (&stride_h)[3],
                     uint64_t elem_size) {
  uint64_t bits = 0;
  for (int t = 0; t < 3; ++t) {
    bits |= reinterpret_cast<uint64_t>(src[t]) | stride_b[t] * elem_size |
            stride_s[t] * elem_size | stride_h[t] * elem_size;
  }
  return bits;
}

// OR of the destination addresses of the push kernels.
uint64_t dst_bits(void* const* dst, int num_ranks) {
  uint64_t bits = 0;
  for (int j = 0; j < num_ranks; ++j) bits |= reinterpret_cast<uint64_t>(dst[j]);
  return bits;
}

// Blocks for num_rows rows, kThreads / span at a time, capped at kBlocksPerSm per SM.
int grid_size(int64_t num_rows, int span, int num_sms) {
  const int64_t rows_per_step = kThreads / span;
  const int64_t wanted = (num_rows + rows_per_step - 1) / rows_per_step;
  return static_cast<int>(std::min<int64_t>(wanted, (int64_t)num_sms * kBlocksPerSm));
}

template <typename Kernel, typename Args>
cudaError_t launch(Kernel kernel, const Args& args, int num_sms, cudaStream_t stream) {
  const size_t smem = 2 * sizeof(int64_t) * args.split.heads;
  kernel<<<grid_size(args.split.num_rows, args.split.span, num_sms), kThreads, smem, stream>>>(
      args);
  return cudaGetLastError();
}

}  // namespace

cudaError_t ulysses_pack_qkv(const UlyssesPackParams& p, int elem_size, int num_sms,
                             cudaStream_t stream) {
  const int64_t num_rows = 3 * p.batch * p.seq;
  if (num_rows == 0 || p.heads == 0 || p.head_dim == 0) return cudaSuccess;
  const uint64_t es = elem_size;
  const int w = copy_width({reinterpret_cast<uint64_t>(p.out), p.head_dim * es,
                            source_bits(p.src, p.src_stride_b, p.src_stride_s, p.src_stride_h,
                                        es)});
  UlyssesPackArgs a;
  for (int t = 0; t < 3; ++t) a.src[t] = p.src[t];
  vector_strides(p.src_stride_b, elem_size, w, a.stride_b);
  vector_strides(p.src_stride_s, elem_size, w, a.stride_s);
  vector_strides(p.src_stride_h, elem_size, w, a.stride_h);
  a.out = p.out;
  a.batch = p.batch;
  a.seq = p.seq;
  if (!fill_split(a.split, p.heads, p.head_dim * elem_size / w, num_rows, p.num_ranks,
                  p.head_start)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_copy_width(w, [&](auto vec) {
    return launch(ulysses_pack_kernel<decltype(vec)>, a, num_sms, stream);
  });
}

cudaError_t ulysses_unpack_out(const UlyssesUnpackParams& p, int elem_size, int num_sms,
                               cudaStream_t stream) {
  const int64_t num_rows = p.batch * (p.joint + p.seq);
  if (num_rows == 0 || p.heads == 0 || p.head_dim == 0) return cudaSuccess;
  const int w = copy_width({reinterpret_cast<uint64_t>(p.recv),
                            reinterpret_cast<uint64_t>(p.out),
                            static_cast<uint64_t>(p.head_dim) * elem_size});
  UlyssesUnpackArgs a;
  a.recv = p.recv;
  a.out = p.out;
  a.joint = p.joint;
  a.seq = p.seq;
  a.joint_front = p.joint_front;
  if (!fill_split(a.split, p.heads, p.head_dim * elem_size / w, num_rows, p.num_ranks,
                  p.head_start)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_copy_width(w, [&](auto vec) {
    return launch(ulysses_unpack_kernel<decltype(vec)>, a, num_sms, stream);
  });
}

cudaError_t ulysses_place_gathered(const UlyssesPlaceParams& p, int elem_size, int num_sms,
                                   cudaStream_t stream) {
  const int64_t gathered = p.ranks * p.seq;
  const int64_t num_rows = p.batch * (p.joint + gathered) + 2 * p.batch * (p.joint_kv + gathered);
  if (num_rows == 0 || p.heads == 0 || p.head_dim == 0) return cudaSuccess;
  if (p.joint_kv != 0 && p.joint_kv != p.joint) return cudaErrorInvalidValue;
  const uint64_t es = elem_size;
  // the joint tensors matter for the width only when they are read
  const uint64_t joint_bits = p.joint > 0 ? source_bits(p.joint_src, p.joint_stride_b,
                                                        p.joint_stride_s, p.joint_stride_h, es)
                                          : 0;
  const int w = copy_width({reinterpret_cast<uint64_t>(p.recv),
                            reinterpret_cast<uint64_t>(p.qbuf),
                            reinterpret_cast<uint64_t>(p.kv), p.head_dim * es, joint_bits});
  const int64_t dv = p.head_dim * elem_size / w;
  if (p.heads * dv > INT32_MAX) return cudaErrorInvalidValue;
  UlyssesPlaceArgs a;
  a.recv = p.recv;
  for (int t = 0; t < 3; ++t) a.joint_src[t] = p.joint_src[t];
  vector_strides(p.joint_stride_b, elem_size, w, a.stride_b);
  vector_strides(p.joint_stride_s, elem_size, w, a.stride_s);
  vector_strides(p.joint_stride_h, elem_size, w, a.stride_h);
  a.joint_head_start = p.joint_head_start;
  a.qbuf = p.qbuf;
  a.kv = p.kv;
  a.ranks = p.ranks;
  a.batch = p.batch;
  a.seq = p.seq;
  a.heads = p.heads;
  a.dv = dv;
  a.joint = p.joint;
  a.joint_kv = p.joint_kv;
  a.span = round_up_pow2(p.heads * dv);
  const int blocks = grid_size(num_rows, a.span, num_sms);
  return dispatch_copy_width(w, [&](auto vec) {
    ulysses_place_kernel<decltype(vec)><<<blocks, kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  });
}

namespace {

// Tiles of kPushTileVecs covering n vectors, or -1 when a tile's vector index would leave the
// 31 bits the v2 kernels' index arithmetic (FastDiv) works in.
int64_t push_tiles(int64_t n) {
  const int64_t tiles = (n + kPushTileVecs - 1) / kPushTileVecs;
  return tiles * kPushTileVecs <= (int64_t{1} << 31) ? tiles : -1;
}

// The v1 arguments of the input push and the vector width w (bytes); cudaErrorNotReady when
// there is nothing to copy.
cudaError_t push_args(const UlyssesPushParams& p, int elem_size, UlyssesPushArgs& a, int& w) {
  const int64_t num_rows = 3 * p.batch * p.seq;
  if (num_rows == 0 || p.heads == 0 || p.head_dim == 0) return cudaErrorNotReady;
  if (p.num_ranks < 1 || p.num_ranks > kMaxUlyssesRanks || p.rank < 0 ||
      p.rank >= p.num_ranks || p.heads > kMaxPushHeads || p.head_start[0] != 0 ||
      p.head_start[p.num_ranks] != p.heads || (p.joint_kv != 0 && p.joint_kv != p.joint) ||
      (p.kernel_version != 1 && p.kernel_version != 2)) {
    return cudaErrorInvalidValue;
  }
  const uint64_t es = elem_size;
  w = copy_width({p.head_dim * es, dst_bits(p.dst, p.num_ranks),
                  source_bits(p.src, p.src_stride_b, p.src_stride_s, p.src_stride_h, es)});
  const int64_t dv = p.head_dim * elem_size / w;
  if (p.heads * dv > INT32_MAX) return cudaErrorInvalidValue;
  for (int t = 0; t < 3; ++t) a.src[t] = p.src[t];
  vector_strides(p.src_stride_b, elem_size, w, a.stride_b);
  vector_strides(p.src_stride_s, elem_size, w, a.stride_s);
  vector_strides(p.src_stride_h, elem_size, w, a.stride_h);
  for (int j = 0; j < kMaxUlyssesRanks; ++j) a.dst[j] = j < p.num_ranks ? p.dst[j] : nullptr;
  for (int j = 0; j <= kMaxUlyssesRanks; ++j) {
    a.head_start[j] = j <= p.num_ranks ? p.head_start[j] : p.heads;
  }
  a.batch = p.batch;
  a.seq = p.seq;
  a.ranks = p.num_ranks;
  a.rank = p.rank;
  a.joint = p.joint;
  a.joint_kv = p.joint_kv;
  a.dv = dv;
  a.heads = p.heads;
  a.span = round_up_pow2(p.heads * dv);
  return cudaSuccess;
}

// The v2 arguments and grid from the v1 ones (vector width w bytes); false when the tile
// indices do not fit (the launcher then runs v1).
bool push_v2_args(const UlyssesPushArgs& v1, int w, UlyssesPushV2Args& a, int64_t& blocks) {
  a = UlyssesPushV2Args{};
  for (int t = 0; t < 3; ++t) {
    a.src[t] = v1.src[t];
    a.stride_b[t] = v1.stride_b[t];
    a.stride_s[t] = v1.stride_s[t];
    a.stride_h[t] = v1.stride_h[t];
  }
  a.batch = v1.batch;
  a.seq = v1.seq;
  a.joint = v1.joint;
  a.joint_kv = v1.joint_kv;
  a.ranks = static_cast<int>(v1.ranks);
  a.rank = static_cast<int>(v1.rank);
  a.dv = make_fast_div(static_cast<uint32_t>(v1.dv));
  int64_t max_tiles = 0;
  for (int j = 0; j < a.ranks; ++j) {
    const int64_t row = (v1.head_start[j + 1] - v1.head_start[j]) * v1.dv;
    const int64_t tiles = push_tiles(v1.seq * row);
    if (tiles < 0) return false;
    // rank j's query buffer [B, J + U*L, heads_j, D], its K/V buffer right after it
    char* q = static_cast<char*>(v1.dst[j]);
    a.dest[j] = PushDestV2{q, q + v1.batch * (v1.joint + v1.ranks * v1.seq) * row * w,
                           v1.head_start[j], static_cast<int>(tiles),
                           make_fast_div(static_cast<uint32_t>(row > 0 ? row : 1))};
    max_tiles = std::max(max_tiles, 3 * v1.batch * tiles);
  }
  blocks = max_tiles * a.ranks;
  return blocks <= INT32_MAX;
}

// The v1 arguments of the output push and the vector width w.
cudaError_t push_out_args(const UlyssesPushOutParams& p, int elem_size, UlyssesPushOutArgs& a,
                          int& w) {
  const int64_t num_rows = p.batch * (p.joint + p.num_ranks * p.seq);
  if (num_rows == 0 || p.heads == 0 || p.head_dim == 0) return cudaErrorNotReady;
  if (p.num_ranks < 1 || p.num_ranks > kMaxUlyssesRanks || p.head_start < 0 ||
      p.head_start + p.heads > p.heads_total || p.rank < 0 || p.rank >= p.num_ranks ||
      (p.kernel_version != 1 && p.kernel_version != 2)) {
    return cudaErrorInvalidValue;
  }
  const uint64_t es = elem_size;
  w = copy_width({p.head_dim * es, dst_bits(p.dst, p.num_ranks),
                  reinterpret_cast<uint64_t>(p.src), p.src_stride_b * es, p.src_stride_s * es,
                  p.src_stride_h * es});
  const int64_t dv = p.head_dim * elem_size / w;
  if (p.heads * dv > INT32_MAX) return cudaErrorInvalidValue;
  a.src = p.src;
  a.stride_b = p.src_stride_b * elem_size / w;
  a.stride_s = p.src_stride_s * elem_size / w;
  a.stride_h = p.src_stride_h * elem_size / w;
  for (int j = 0; j < kMaxUlyssesRanks; ++j) a.dst[j] = j < p.num_ranks ? p.dst[j] : nullptr;
  a.batch = p.batch;
  a.joint = p.joint;
  a.seq = p.seq;
  a.heads_total = p.heads_total;
  a.head_start = p.head_start;
  a.heads = p.heads;
  a.dv = dv;
  a.ranks = p.num_ranks;
  a.joint_front = p.joint_front;
  a.span = round_up_pow2(p.heads * dv);
  return cudaSuccess;
}

// v2 of the output push: U * B sequence segments of L rows, B joint segments of J rows, rows of
// h * dv vectors; false when the tile indices do not fit.
bool push_out_v2_args(const UlyssesPushOutArgs& v1, int rank, UlyssesPushOutV2Args& v,
                      int64_t& blocks) {
  v = UlyssesPushOutV2Args{};
  v.src = v1.src;
  v.stride_b = v1.stride_b;
  v.stride_s = v1.stride_s;
  v.stride_h = v1.stride_h;
  for (int j = 0; j < kMaxUlyssesRanks; ++j) v.dst[j] = v1.dst[j];
  v.batch = v1.batch;
  v.joint = v1.joint;
  v.seq = v1.seq;
  v.out_row = v1.heads_total * v1.dv;
  v.head_off = v1.head_start * v1.dv;
  v.ranks = static_cast<int>(v1.ranks);
  v.rank = rank;
  v.joint_front = v1.joint_front;
  const int64_t row = v1.heads * v1.dv;
  const int64_t tiles_seq = push_tiles(v1.seq * row), tiles_joint = push_tiles(v1.joint * row);
  if (tiles_seq < 0 || tiles_joint < 0) return false;
  blocks = v1.batch * (v1.ranks * tiles_seq + tiles_joint);
  v.tiles_seq = static_cast<int>(tiles_seq);
  v.tiles_joint = static_cast<int>(tiles_joint);
  v.row = make_fast_div(static_cast<uint32_t>(row));
  v.dv = make_fast_div(static_cast<uint32_t>(v1.dv));
  return blocks <= INT32_MAX;
}

// The rank-block output push as a plain one: this rank's block in every receive buffer is an
// output of h heads (H = h, h0 = 0), joint rows first, starting at the block's offset
// B * (J + L) * h0 * D; its destination rows (h * D elements) follow each other, so each
// destination gets one contiguous run. False for a bad rank count or head range.
bool rank_block_params(const UlyssesPushOutParams& p, int elem_size, UlyssesPushOutParams& b) {
  if (p.num_ranks < 1 || p.num_ranks > kMaxUlyssesRanks || p.head_start < 0 ||
      p.head_start + p.heads > p.heads_total) {
    return false;
  }
  b = p;
  b.rank_blocks = false;
  b.heads_total = p.heads;
  b.head_start = 0;
  b.joint_front = true;
  const int64_t offset = p.batch * (p.joint + p.seq) * p.head_start * p.head_dim * elem_size;
  for (int j = 0; j < p.num_ranks; ++j) b.dst[j] = static_cast<char*>(p.dst[j]) + offset;
  return true;
}

}  // namespace

cudaError_t ulysses_push_qkv(const UlyssesPushParams& p, int elem_size, int num_sms,
                             cudaStream_t stream) {
  UlyssesPushArgs a;
  int w = 1;
  const cudaError_t err = push_args(p, elem_size, a, w);
  if (err != cudaSuccess) return err == cudaErrorNotReady ? cudaSuccess : err;
  UlyssesPushV2Args v;
  int64_t blocks = 0;
  const bool v2 = p.kernel_version == 2 && push_v2_args(a, w, v, blocks);
  if (p.src_head_given) {
    // a head chunk of every share: only v2 reads a source head per destination
    if (!v2) return cudaErrorInvalidValue;
    for (int j = 0; j < p.num_ranks; ++j) v.dest[j].head_start = p.src_head_start[j];
  }
  return dispatch_copy_width(w, [&](auto vec) {
    using Vec = decltype(vec);
    if (v2) {
      ulysses_push_v2_kernel<Vec><<<static_cast<unsigned>(blocks), kPushThreads, 0, stream>>>(v);
    } else {
      ulysses_push_kernel<Vec>
          <<<grid_size(3 * p.batch * p.seq, a.span, num_sms), kThreads,
             sizeof(PushHead<Vec>) * p.heads, stream>>>(a);
    }
    return cudaGetLastError();
  });
}

cudaError_t ulysses_push_out(const UlyssesPushOutParams& p, int elem_size, int num_sms,
                             cudaStream_t stream) {
  if (p.rank_blocks) {
    UlyssesPushOutParams b;
    if (!rank_block_params(p, elem_size, b)) return cudaErrorInvalidValue;
    return ulysses_push_out(b, elem_size, num_sms, stream);
  }
  UlyssesPushOutArgs a;
  int w = 1;
  const cudaError_t err = push_out_args(p, elem_size, a, w);
  if (err != cudaSuccess) return err == cudaErrorNotReady ? cudaSuccess : err;
  UlyssesPushOutV2Args v;
  int64_t blocks = 0;
  const bool v2 = p.kernel_version == 2 && push_out_v2_args(a, p.rank, v, blocks);
  return dispatch_copy_width(w, [&](auto vec) {
    using Vec = decltype(vec);
    if (v2) {
      ulysses_push_out_v2_kernel<Vec>
          <<<static_cast<unsigned>(blocks), kPushThreads, 0, stream>>>(v);
    } else {
      ulysses_push_out_kernel<Vec>
          <<<grid_size(p.batch * (p.joint + p.num_ranks * p.seq), a.span, num_sms), kThreads, 0,
             stream>>>(a);
    }
    return cudaGetLastError();
  });
}

}  // namespace xdit_ops
