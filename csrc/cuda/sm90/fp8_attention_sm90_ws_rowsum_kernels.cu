// EXPERIMENT (branch fp8-rowsum): the per-tile K-scale kernels with the softmax's row sums from
// the tensor cores (kRowSumTC: P times an 8-row tile of e4m3 ones, beside P.V) instead of 64
// FADDs and a quad reduction per tile, bfloat16 output: Dp 128 with 2 consumers (ping-pong),
// Dp 64 with 3 (issuing freely). Selected by XDIT_OPS_FP8_ROWSUM=tc.
#include "xdit_ops/fp8_attention_sm90_ws.cuh"

namespace xdit_ops {

cudaError_t fp8_attention_sm90_ws_tile_k_scale_rowsum(const Fp8AttentionSm90Params& p, int batch,
                                                      int dp, int consumers,
                                                      cudaStream_t stream) {
  if (dp == 128 && consumers == 2) {
    return fp8_sm90_ws::launch<128, __nv_bfloat16, true, 2, true, true>(p, batch, stream);
  }
  if (dp == 64 && consumers == 3) {
    return fp8_sm90_ws::launch<64, __nv_bfloat16, true, 3, false, true>(p, batch, stream);
  }
  if (dp == 64 && consumers == 2) {
    return fp8_sm90_ws::launch<64, __nv_bfloat16, true, 2, true, true>(p, batch, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace xdit_ops
