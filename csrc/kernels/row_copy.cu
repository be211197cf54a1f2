// Batched row copies: see xdit_ops/row_copy.h.
#include <algorithm>

#include "xdit_ops/row_copy.h"

namespace xdit_ops {

namespace {

template <int kVec>
struct alignas(kVec) Chunk {
  unsigned char b[kVec];
};

template <int kVec, typename Index>
__device__ void copy_rows(const RowCopySegment& s) {
  using T = Chunk<kVec>;
  const Index per_row = static_cast<Index>(s.row_bytes / kVec);
  const Index total = per_row * static_cast<Index>(s.rows);
  const Index step = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += step) {
    const Index row = i / per_row, col = i - row * per_row;
    const T* src = reinterpret_cast<const T*>(static_cast<const unsigned char*>(s.src) +
                                              static_cast<int64_t>(row) * s.src_pitch) + col;
    T* dst = reinterpret_cast<T*>(static_cast<unsigned char*>(s.dst) +
                                  static_cast<int64_t>(row) * s.dst_pitch) + col;
    *dst = *src;
  }
}

template <int kVec>
__device__ void copy_segment(const RowCopySegment& s) {
  // 32-bit index arithmetic (a cheap division per chunk) whenever the segment allows it
  if (s.rows * (s.row_bytes / kVec) + static_cast<int64_t>(gridDim.x) * blockDim.x <
      (int64_t{1} << 32)) {
    copy_rows<kVec, uint32_t>(s);
  } else {
    copy_rows<kVec, int64_t>(s);
  }
}

__global__ void row_copy_kernel(RowCopyParams p, int4 vec) {
  const int which = blockIdx.y;
  const RowCopySegment& s = p.seg[which];
  const int v = which == 0 ? vec.x : which == 1 ? vec.y : which == 2 ? vec.z : vec.w;
  switch (v) {
    case 16: copy_segment<16>(s); break;
    case 8: copy_segment<8>(s); break;
    case 4: copy_segment<4>(s); break;
    case 2: copy_segment<2>(s); break;
    default: copy_segment<1>(s); break;
  }
}

}  // namespace

int row_copy_vector_bytes(const RowCopySegment& s) {
  const auto bits = reinterpret_cast<uintptr_t>(s.dst) | reinterpret_cast<uintptr_t>(s.src) |
                    static_cast<uintptr_t>(s.row_bytes) |
                    static_cast<uintptr_t>(s.rows > 1 ? s.dst_pitch | s.src_pitch : 0);
  for (int v = 16; v > 1; v /= 2) {
    if (bits % v == 0) return v;
  }
  return 1;
}

cudaError_t launch_row_copy(const RowCopyParams& params, cudaStream_t stream) {
  if (params.num_segments < 1 || params.num_segments > kRowCopyMaxSegments) {
    return cudaErrorInvalidValue;
  }
  int v[kRowCopyMaxSegments] = {1, 1, 1, 1};
  int64_t most = 0;
  for (int i = 0; i < params.num_segments; ++i) {
    const RowCopySegment& s = params.seg[i];
    v[i] = row_copy_vector_bytes(s);
    most = std::max(most, s.rows * (s.row_bytes / v[i]));
  }
  if (most == 0) return cudaSuccess;
  constexpr int kThreads = 512;
  // enough blocks to fill the GPU a few times over per segment, each thread several chunks
  const int64_t blocks = std::min<int64_t>((most + kThreads * 4 - 1) / (kThreads * 4), 264);
  row_copy_kernel<<<dim3(static_cast<unsigned>(blocks), params.num_segments), kThreads, 0,
                    stream>>>(params, make_int4(v[0], v[1], v[2], v[3]));
  return cudaGetLastError();
}

}  // namespace xdit_ops
