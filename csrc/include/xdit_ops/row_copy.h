// Batched row copies (host interface, torch-free): up to kRowCopyMaxSegments independent
// copies of `rows` rows of `row_bytes` bytes each, rows `src_pitch` / `dst_pitch` bytes apart,
// in one kernel. usp_attention's call graphs (graph_call) hold two of them as kernel nodes:
// one at the graph's root copies a call's Q, K, V into the static inputs, one after its last
// node copies the outputs out, their parameters (addresses, pitches) updated per call with
// cudaGraphExecKernelNodeSetParams instead of two launches around the graph's.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace xdit_ops {

constexpr int kRowCopyMaxSegments = 4;

struct RowCopySegment {
  void* dst;
  const void* src;
  int64_t rows;
  int64_t row_bytes;
  int64_t dst_pitch;
  int64_t src_pitch;
};

struct RowCopyParams {
  RowCopySegment seg[kRowCopyMaxSegments];
  int num_segments;  // segments past it, and empty ones, copy nothing
};

// The widest access (16, 8, 4, 2 or 1 bytes) dividing every address, pitch and row size of the
// segment: what the kernel moves per load/store for it.
int row_copy_vector_bytes(const RowCopySegment& s);

// Blocks per segment for copies of at most `bytes` bytes each (moved 16 bytes at a time; a
// narrower segment loops more in the same grid): a graph node's grid for its largest copy.
unsigned row_copy_blocks(int64_t bytes);

// One row copy as a kernel node's parameters: `node` runs the kernel over `params` on a grid
// of `grid_x` blocks per segment and `grid_y` >= params.num_segments segments (a node keeps
// its grid; the parameters of each call change). `node` points into this struct (its argument
// array): fill it in place with row_copy_prepare and use it while the struct lives, unmoved.
struct RowCopyLaunch {
  RowCopyParams params;
  int4 vec;  // each segment's access width (row_copy_vector_bytes)
  void* args[2];
  cudaKernelNodeParams node;
};

// Sets launch.vec from launch.params and launch.node for cudaGraphAddKernelNode /
// cudaGraphExecKernelNodeSetParams (every segment copied; none may overlap another's
// destination). cudaErrorInvalidValue when the segments do not fit the grid.
cudaError_t row_copy_prepare(RowCopyLaunch& launch, unsigned grid_x, unsigned grid_y);

}  // namespace xdit_ops
