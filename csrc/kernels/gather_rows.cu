// Instantiations and launch configuration of the row gather. No torch headers here.
#include <algorithm>

#include "xdit_ops/copy_width.h"
#include "xdit_ops/gather_rows.cuh"

namespace xdit_ops {

namespace {

using gather_rows_detail::kThreads;
using gather_rows_detail::kUnroll;

// Blocks per SM that keep every SM's memory pipeline busy. The 16-byte variant uses 48 registers
// (5 resident 256-thread blocks per SM on sm_90; capping it at 32 registers for 8 blocks spills),
// and 5 blocks x 256 threads x 4 vectors of 16 bytes in flight is far more than the ~16 KB per
// SM that HBM latency x bandwidth asks for. The grid-stride loop covers what does not fit.
constexpr int kBlocksPerSm = 8;

int log2_ceil(int64_t x) {
  int l = 0;
  while ((int64_t{1} << l) < x) ++l;
  return l;
}

template <typename V, typename IndexT>
cudaError_t launch(const GatherRowsParams& p, int num_sms, cudaStream_t stream) {
  const int64_t num_vec = p.row_bytes / static_cast<int64_t>(sizeof(V));
  const int log2_tpr = std::min(log2_ceil(num_vec), log2_ceil(kThreads));
  const int rows_per_block = kThreads >> log2_tpr;
  const int64_t total_rows = p.outer * p.num_rows;
  const int64_t row_blocks = (total_rows + rows_per_block - 1) / rows_per_block;
  const int64_t target = static_cast<int64_t>(num_sms) * kBlocksPerSm;
  // Columns are split only while rows alone cannot fill the GPU, and never below kUnroll
  // vectors per thread per row.
  int64_t col_blocks = 1;
  if (row_blocks < target) {
    const int64_t col_tiles = (num_vec + (int64_t{kUnroll} << log2_tpr) - 1) /
                              (int64_t{kUnroll} << log2_tpr);
    col_blocks = std::min<int64_t>({col_tiles, (target + row_blocks - 1) / row_blocks, 65535});
    col_blocks = std::max<int64_t>(col_blocks, 1);
  }
  // Rows beyond the grid are covered by the kernel's grid-stride loop.
  const int64_t grid_x = std::min<int64_t>(row_blocks, target * 64);
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(col_blocks));
  gather_rows_kernel<V, IndexT><<<grid, kThreads, 0, stream>>>(p, log2_tpr);
  return cudaGetLastError();
}

template <typename IndexT>
cudaError_t launch_width(const GatherRowsParams& p, int vector_bytes, int num_sms,
                         cudaStream_t stream) {
  return dispatch_copy_width(vector_bytes, [&](auto vec) {
    return launch<decltype(vec), IndexT>(p, num_sms, stream);
  });
}

}  // namespace

int gather_rows_vector_bytes(const GatherRowsParams& p) {
  uint64_t bits = static_cast<uint64_t>(p.row_bytes) | reinterpret_cast<uintptr_t>(p.out);
  for (int s = 0; s < p.num_sources; ++s) {
    bits |= reinterpret_cast<uintptr_t>(p.src[s]);
    bits |= static_cast<uint64_t>(p.src_outer_stride[s]);
    bits |= static_cast<uint64_t>(p.src_row_stride[s]);
  }
  return copy_width(bits);
}

cudaError_t gather_rows(const GatherRowsParams& params, int num_sms, cudaStream_t stream) {
  if (params.num_sources < 1 || params.num_sources > kGatherRowsMaxSources ||
      params.row_bytes < 0 || params.outer < 0 || params.num_rows < 0) {
    return cudaErrorInvalidValue;
  }
  if (params.outer == 0 || params.num_rows == 0 || params.row_bytes == 0) return cudaSuccess;
  const int vector_bytes = gather_rows_vector_bytes(params);
  return params.index_is_int64
             ? launch_width<int64_t>(params, vector_bytes, num_sms, stream)
             : launch_width<int32_t>(params, vector_bytes, num_sms, stream);
}

}  // namespace xdit_ops
