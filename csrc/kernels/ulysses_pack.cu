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

cudaError_t ulysses_push_qkv(const UlyssesPushParams& p, int elem_size, int num_sms,
                             cudaStream_t stream) {
  const int64_t num_rows = 3 * p.batch * p.seq;
  if (num_rows == 0 || p.heads == 0 || p.head_dim == 0) return cudaSuccess;
  if (p.num_ranks < 1 || p.num_ranks > kMaxUlyssesRanks || p.rank < 0 ||
      p.rank >= p.num_ranks || p.heads > kMaxPushHeads || p.head_start[0] != 0 ||
      p.head_start[p.num_ranks] != p.heads || (p.joint_kv != 0 && p.joint_kv != p.joint)) {
    return cudaErrorInvalidValue;
  }
  const uint64_t es = elem_size;
  const int w = copy_width({p.head_dim * es, dst_bits(p.dst, p.num_ranks),
                            source_bits(p.src, p.src_stride_b, p.src_stride_s, p.src_stride_h,
                                        es)});
  const int64_t dv = p.head_dim * elem_size / w;
  if (p.heads * dv > INT32_MAX) return cudaErrorInvalidValue;
  UlyssesPushArgs a;
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
  const int blocks = grid_size(num_rows, a.span, num_sms);
  return dispatch_copy_width(w, [&](auto vec) {
    using Vec = decltype(vec);
    ulysses_push_kernel<Vec><<<blocks, kThreads, sizeof(PushHead<Vec>) * p.heads, stream>>>(a);
    return cudaGetLastError();
  });
}

cudaError_t ulysses_push_out(const UlyssesPushOutParams& p, int elem_size, int num_sms,
                             cudaStream_t stream) {
  const int64_t num_rows = p.batch * (p.joint + p.num_ranks * p.seq);
  if (num_rows == 0 || p.heads == 0 || p.head_dim == 0) return cudaSuccess;
  if (p.num_ranks < 1 || p.num_ranks > kMaxUlyssesRanks || p.head_start < 0 ||
      p.head_start + p.heads > p.heads_total) {
    return cudaErrorInvalidValue;
  }
  const uint64_t es = elem_size;
  const int w = copy_width({p.head_dim * es, dst_bits(p.dst, p.num_ranks),
                            reinterpret_cast<uint64_t>(p.src), p.src_stride_b * es,
                            p.src_stride_s * es, p.src_stride_h * es});
  const int64_t dv = p.head_dim * elem_size / w;
  if (p.heads * dv > INT32_MAX) return cudaErrorInvalidValue;
  UlyssesPushOutArgs a;
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
  const int blocks = grid_size(num_rows, a.span, num_sms);
  return dispatch_copy_width(w, [&](auto vec) {
    ulysses_push_out_kernel<decltype(vec)><<<blocks, kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  });
}

}  // namespace xdit_ops
