// Batched row copies: see xdit_ops/row_copy.h.
#include <algorithm>

#include "xdit_ops/copy_width.h"
#include "xdit_ops/row_copy.h"

namespace xdit_ops {

namespace {

constexpr int kThreads = 512;

// T: the copy unit of the segment's width (copy_width.h's types: uint4 for 16 bytes, ...)
template <typename T, typename Index>
__device__ void copy_rows(const RowCopySegment& s) {
  const Index per_row = static_cast<Index>(s.row_bytes / sizeof(T));
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

template <typename T>
__device__ void copy_segment(const RowCopySegment& s) {
  // 32-bit index arithmetic (a cheap division per unit) whenever the segment allows it
  if (s.rows * static_cast<int64_t>(s.row_bytes / sizeof(T)) +
          static_cast<int64_t>(gridDim.x) * blockDim.x <
      (int64_t{1} << 32)) {
    copy_rows<T, uint32_t>(s);
  } else {
    copy_rows<T, int64_t>(s);
  }
}

__global__ void row_copy_kernel(RowCopyParams p, int4 vec) {
  const int which = blockIdx.y;
  if (which >= p.num_segments) return;
  const RowCopySegment& s = p.seg[which];
  if (s.rows <= 0 || s.row_bytes <= 0) return;
  // each segment its own width (a 16-byte Q/K/V beside an 8-byte joint_lengths), mapped to
  // the unit types of copy_width.h's dispatch_copy_width, which is host-only
  const int v = which == 0 ? vec.x : which == 1 ? vec.y : which == 2 ? vec.z : vec.w;
  switch (v) {
    case 16: copy_segment<uint4>(s); break;
    case 8: copy_segment<uint2>(s); break;
    case 4: copy_segment<uint32_t>(s); break;
    case 2: copy_segment<uint16_t>(s); break;
    default: copy_segment<uint8_t>(s); break;
  }
}

}  // namespace

int row_copy_vector_bytes(const RowCopySegment& s) {
  // (a pitch is applied only between rows)
  const uint64_t pitches = s.rows > 1 ? static_cast<uint64_t>(s.dst_pitch | s.src_pitch) : 0;
  return copy_width({reinterpret_cast<uint64_t>(s.dst), reinterpret_cast<uint64_t>(s.src),
                     static_cast<uint64_t>(s.row_bytes), pitches});
}

unsigned row_copy_blocks(int64_t bytes) {
  // enough blocks to fill the GPU a few times over per segment, each thread several units
  const int64_t units = std::max<int64_t>(bytes / 16, 1);
  return static_cast<unsigned>(
      std::min<int64_t>((units + kThreads * 4 - 1) / (kThreads * 4), 264));
}

cudaError_t row_copy_prepare(RowCopyLaunch& launch, unsigned grid_x, unsigned grid_y) {
  const int n = launch.params.num_segments;
  if (n < 0 || n > kRowCopyMaxSegments || static_cast<unsigned>(n) > grid_y || grid_x == 0) {
    return cudaErrorInvalidValue;
  }
  int v[kRowCopyMaxSegments] = {1, 1, 1, 1};
  for (int i = 0; i < n; ++i) v[i] = row_copy_vector_bytes(launch.params.seg[i]);
  launch.vec = make_int4(v[0], v[1], v[2], v[3]);
  launch.args[0] = &launch.params;
  launch.args[1] = &launch.vec;
  launch.node = {};
  launch.node.func = reinterpret_cast<void*>(&row_copy_kernel);
  launch.node.gridDim = dim3(grid_x, grid_y);
  launch.node.blockDim = dim3(kThreads);
  launch.node.sharedMemBytes = 0;
  launch.node.kernelParams = launch.args;
  launch.node.extra = nullptr;
  return cudaSuccess;
}

}  // namespace xdit_ops
