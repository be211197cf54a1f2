// Torch-free instantiations of the warp-specialised sm_90a FP8 attention kernel with one K
// scale per 128-key tile and its exponentials in half precision (kExpH2; XDIT_OPS_FP8_EXP=f16x2,
// opt-in): head dim 128 only, float16 and bfloat16 outputs (two kernels; their own translation
// unit, compiled beside the others).
#include "xdit_ops/fp8_attention_sm90_ws.cuh"

namespace xdit_ops {

cudaError_t fp8_attention_sm90_ws_tile_k_scale_exp_h2(const Fp8AttentionSm90Params& p, int batch,
                                                      int head_dim_padded, DType out_dtype,
                                                      cudaStream_t stream) {
  if (p.seq_q == 0 || batch == 0 || p.heads == 0) return cudaSuccess;
  if (head_dim_padded != 128) return cudaErrorInvalidValue;
  if (out_dtype == DType::kBFloat16) {
    return fp8_sm90_ws::launch<128, __nv_bfloat16, true, true>(p, batch, stream);
  }
  if (out_dtype == DType::kFloat16) {
    return fp8_sm90_ws::launch<128, __half, true, true>(p, batch, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace xdit_ops
