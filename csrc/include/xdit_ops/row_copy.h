// Batched row copies (host interface, torch-free): up to kRowCopyMaxSegments independent
// copies of `rows` rows of `row_bytes` bytes each, rows `src_pitch` / `dst_pitch` bytes apart,
// in one kernel launch. usp_attention's call-graph replay (graph_call) copies a call's Q, K, V
// into the graph's static inputs and the graph's output out with it: one launch instead of one
// cudaMemcpy(2D)Async per tensor (each ~3-5 us of host time on the GPU machines, run 51).
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
  int num_segments;
};

// The widest access (16, 8, 4, 2 or 1 bytes) dividing every address, pitch and row size of the
// segment: what the kernel moves per load/store for it.
int row_copy_vector_bytes(const RowCopySegment& s);

// Copies every segment (none may overlap another's destination) on `stream`.
cudaError_t launch_row_copy(const RowCopyParams& params, cudaStream_t stream);

}  // namespace xdit_ops
