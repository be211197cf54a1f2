// Row gather kernel (torch-free): see gather_rows.h for the contract.
//
// A memory-bound copy. Each output row is a run of row_bytes / sizeof(V) vectors of V (16, 8,
// 4, 2 or 1 bytes: the widest that every address allows). A block of kThreads threads covers
// kThreads / tpr output rows at a time with tpr threads per row (tpr a power of two, no larger
// than the row needs), so short rows (a 5-column test tensor) do not idle a warp per row and
// long rows are read by coalesced 16-byte accesses. When there are few rows, blockIdx.y splits
// each row's columns between blocks, so a handful of long rows still spreads over the GPU.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "xdit_ops/gather_rows.h"

namespace xdit_ops {

namespace gather_rows_detail {

constexpr int kThreads = 256;
// Vectors a thread loads before it stores any: several 16-byte loads in flight per thread are
// what a copy needs to approach HBM bandwidth.
constexpr int kUnroll = 4;

// The source pointer and strides by a runtime index, by selects over the unrolled parameter
// array: indexing the kernel-parameter array with a register would make nvcc copy it to local
// memory (a stack frame) in every thread.
struct SourceView {
  const char* base;
  int64_t outer_stride;
  int64_t row_stride;
};

__device__ __forceinline__ SourceView source_view(const GatherRowsParams& p, int s) {
  SourceView v{static_cast<const char*>(p.src[0]), p.src_outer_stride[0], p.src_row_stride[0]};
#pragma unroll
  for (int k = 1; k < kGatherRowsMaxSources; ++k) {
    if (k == s) {
      v = {static_cast<const char*>(p.src[k]), p.src_outer_stride[k], p.src_row_stride[k]};
    }
  }
  return v;
}

}  // namespace gather_rows_detail

// V: the access type (uint4, uint2, unsigned, unsigned short, unsigned char); IndexT: int32_t
// or int64_t. log2_tpr: log2 of the threads per row.
template <typename V, typename IndexT>
__global__ void __launch_bounds__(gather_rows_detail::kThreads)
    gather_rows_kernel(const GatherRowsParams p, int log2_tpr) {
  using namespace gather_rows_detail;
  const int tpr = 1 << log2_tpr;
  const int lane = threadIdx.x & (tpr - 1);
  const int rows_per_block = kThreads >> log2_tpr;
  const int64_t num_vec = p.row_bytes / static_cast<int64_t>(sizeof(V));
  const int64_t total_rows = p.outer * p.num_rows;
  const int64_t col_step = static_cast<int64_t>(gridDim.y) * tpr;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * tpr + lane;
  const IndexT* index = static_cast<const IndexT*>(p.index);
  const V fill = *reinterpret_cast<const V*>(p.fill_pattern);

  for (int64_t g = static_cast<int64_t>(blockIdx.x) * rows_per_block + (threadIdx.x >> log2_tpr);
       g < total_rows; g += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t o = g / p.num_rows;
    const int64_t i = g - o * p.num_rows;
    V* __restrict__ dst = reinterpret_cast<V*>(static_cast<char*>(p.out) + g * p.row_bytes);
    const int s = static_cast<int>(__ldg(index + 2 * i));
    if (s < 0) {
      for (int64_t c = col0; c < num_vec; c += col_step) dst[c] = fill;
      continue;
    }
    const int64_t r = static_cast<int64_t>(__ldg(index + 2 * i + 1));
    const SourceView sv = source_view(p, s);
    const V* __restrict__ src =
        reinterpret_cast<const V*>(sv.base + o * sv.outer_stride + r * sv.row_stride);
    int64_t c = col0;
    for (; c + (kUnroll - 1) * col_step < num_vec; c += kUnroll * col_step) {
      V v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = __ldg(src + c + u * col_step);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) dst[c + u * col_step] = v[u];
    }
    for (; c < num_vec; c += col_step) dst[c] = __ldg(src + c);
  }
}

}  // namespace xdit_ops
