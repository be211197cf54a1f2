// Torch-free instantiations of the warp-specialised sm_90a FP8 attention kernel with one K
// scale per 128-key tile and the softmax kept before the P.V wait (kOverlapPV;
// XDIT_OPS_FP8_PV_OVERLAP=1, opt-in), with fp32 or half-precision exponentials (kExpH2): head
// dim 128 only, float16 and bfloat16 outputs (four kernels; their own translation unit).
#include "xdit_ops/fp8_attention_sm90_ws.cuh"

namespace xdit_ops {

namespace {

template <bool kExpH2>
cudaError_t launch_ov(const Fp8AttentionSm90Params& p, int batch, DType out_dtype,
                      cudaStream_t stream) {
  if (out_dtype == DType::kBFloat16) {
    return fp8_sm90_ws::launch<128, __nv_bfloat16, true, kExpH2, true>(p, batch, stream);
  }
  if (out_dtype == DType::kFloat16) {
    return fp8_sm90_ws::launch<128, __half, true, kExpH2, true>(p, batch, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t fp8_attention_sm90_ws_tile_k_scale_overlap(const Fp8AttentionSm90Params& p,
                                                       int batch, int head_dim_padded,
                                                       DType out_dtype, bool exp_h2,
                                                       cudaStream_t stream) {
  if (p.seq_q == 0 || batch == 0 || p.heads == 0) return cudaSuccess;
  if (head_dim_padded != 128) return cudaErrorInvalidValue;
  return exp_h2 ? launch_ov<true>(p, batch, out_dtype, stream)
                : launch_ov<false>(p, batch, out_dtype, stream);
}

}  // namespace xdit_ops
