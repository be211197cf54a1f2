// EXPERIMENT (branch fp8-rowsum): the per-tile K-scale kernels with other row sums (kRowSum:
// 1, four FADD chains per row; 2, from the tensor cores: V^T with 8 rows of e4m3 ones, P.V with
// N = Dp + 8), bfloat16 output: Dp 128 with 2 consumers (ping-pong), Dp 64 with 3 (issuing
// freely) and 2. Selected by XDIT_OPS_FP8_ROWSUM=chains|tc.
#include "xdit_ops/fp8_attention_sm90_ws.cuh"

namespace xdit_ops {

template <int kRowSum>
static cudaError_t rowsum_launch(const Fp8AttentionSm90Params& p, int batch, int dp,
                                 int consumers, cudaStream_t stream) {
  if (dp == 128 && consumers == 2) {
    return fp8_sm90_ws::launch<128, __nv_bfloat16, true, 2, true, kRowSum>(p, batch, stream);
  }
  if (dp == 64 && consumers == 3) {
    return fp8_sm90_ws::launch<64, __nv_bfloat16, true, 3, false, kRowSum>(p, batch, stream);
  }
  if (dp == 64 && consumers == 2) {
    return fp8_sm90_ws::launch<64, __nv_bfloat16, true, 2, true, kRowSum>(p, batch, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t fp8_attention_sm90_ws_tile_k_scale_rowsum(const Fp8AttentionSm90Params& p, int batch,
                                                      int dp, int consumers, int row_sum,
                                                      cudaStream_t stream) {
  if (row_sum == 1) return rowsum_launch<1>(p, batch, dp, consumers, stream);
  if (row_sum == 2) return rowsum_launch<2>(p, batch, dp, consumers, stream);
  return cudaErrorInvalidValue;
}

}  // namespace xdit_ops
