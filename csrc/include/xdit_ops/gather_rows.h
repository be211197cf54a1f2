// Row gather (host interface, torch-free). The kernel is in gather_rows.cuh.
//
// out[o, i, :] = sources[index[i, 0]][o, index[i, 1], :], or the fill value where
// index[i, 0] < 0. Sources are [outer, h_s, W] with any outer and row strides and contiguous
// rows; out is [outer, n, W] contiguous. The copy moves bytes: the element type matters only
// for the fill pattern, which the caller encodes.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace xdit_ops {

constexpr int kGatherRowsMaxSources = 8;

struct GatherRowsParams {
  // Strides in bytes; the launcher sets the stride of a dimension of size one to 0 (it is never
  // applied, and an arbitrary value would only spoil the alignment test).
  const void* src[kGatherRowsMaxSources];
  int64_t src_outer_stride[kGatherRowsMaxSources];  // between consecutive outer indices
  int64_t src_row_stride[kGatherRowsMaxSources];    // between consecutive rows
  int num_sources;
  // [num_rows, 2] contiguous, int32 or int64 (index_is_int64). Trusted: entries are not
  // range-checked on the device (the launcher checks host-side indices before the copy).
  const void* index;
  bool index_is_int64;
  void* out;           // [outer, num_rows, W] contiguous
  int64_t outer;       // product of the leading dims
  int64_t num_rows;    // n
  int64_t row_bytes;   // W * element size
  // The fill element repeated over 16 bytes (an element size divides 16); aligned so that the
  // kernel reads it as one 16-byte vector.
  alignas(16) uint32_t fill_pattern[4];
};

// The widest access (16, 8, 4, 2 or 1 bytes) that divides row_bytes, every strided address and
// the output; the launcher passes it (it knows the pointers and strides).
int gather_rows_vector_bytes(const GatherRowsParams& params);

// Launches on `stream`; returns the launch error (never synchronises).
cudaError_t gather_rows(const GatherRowsParams& params, int num_sms, cudaStream_t stream);

}  // namespace xdit_ops
