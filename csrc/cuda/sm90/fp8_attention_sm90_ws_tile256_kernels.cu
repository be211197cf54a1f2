// Torch-free instantiations of the wide warp-specialised sm_90a FP8 attention kernel: one K
// scale per 128-key block, 256-key tiles (XDIT_OPS_FP8_K_SCALE=tile with
// XDIT_OPS_FP8_KTILE_N=256, opt-in): head dim 128 only, float16 and bfloat16 outputs (two
// kernels; their own translation unit, compiled beside the others).
#include "xdit_ops/fp8_attention_sm90_ws.cuh"

namespace xdit_ops {

cudaError_t fp8_attention_sm90_ws_tile_k_scale_wide(const Fp8AttentionSm90Params& p, int batch,
                                                    int head_dim_padded, DType out_dtype,
                                                    cudaStream_t stream) {
  if (p.seq_q == 0 || batch == 0 || p.heads == 0) return cudaSuccess;
  if (head_dim_padded != 128) return cudaErrorInvalidValue;
  constexpr int kN = kFp8AttentionSm90WsWideBlockN;
  if (out_dtype == DType::kBFloat16) {
    return fp8_sm90_ws::launch<128, __nv_bfloat16, true, kN>(p, batch, stream);
  }
  if (out_dtype == DType::kFloat16) {
    return fp8_sm90_ws::launch<128, __half, true, kN>(p, batch, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace xdit_ops
