// Torch-free instantiations of the per-tile K-scale kernel with three consumer warpgroups (192
// query rows per CTA; XDIT_OPS_FP8_SM90_CONSUMERS=3, auto's choice at padded head dim 64),
// padded head dim 64 only: float16 and bfloat16 outputs with the consumers issuing their GEMMs
// freely (the faster order: run 60, H100, 446.5 against 429.8 TFLOPS kernel-only at
// (2,4250,24,64)), and bfloat16 in the round-robin order (the A/B measurement); all with the row
// sums from the tensor cores (kRowSumTC; run 68: 480.0 against 441.7 TFLOPS). Their own
// translation unit, compiled beside the 2-consumer ones.
#include "xdit_ops/fp8_attention_sm90_ws.cuh"

namespace xdit_ops {

cudaError_t fp8_attention_sm90_ws_tile_k_scale_3wg(const Fp8AttentionSm90Params& p, int batch,
                                                   int head_dim_padded, DType out_dtype,
                                                   bool ping_pong, cudaStream_t stream) {
  if (head_dim_padded != 64) return cudaErrorInvalidValue;
  // the consumers issuing freely (auto's kernels): the epilogue by the number of key tiles
  // (kFastEpilogue; the key loop not unrolled: run 89, -6% with ~300 bytes of spills)
  if (out_dtype == DType::kBFloat16) {
    using Out = __nv_bfloat16;
    if (ping_pong) return fp8_sm90_ws::launch<64, Out, true, 3, true, true>(p, batch, stream);
    return fp8_sm90_ws::launch_tile<64, Out, 3, false, true, false, false>(p, batch, stream);
  }
  if (out_dtype == DType::kFloat16 && !ping_pong) {
    return fp8_sm90_ws::launch_tile<64, __half, 3, false, true, false, false>(p, batch, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace xdit_ops
