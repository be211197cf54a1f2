// Torch-free instantiations of the warp-specialised sm_90a FP8 attention kernel with one K
// scale per 128-key tile (XDIT_OPS_FP8_K_SCALE=tile): head dim 64 and 128, float16 and
// bfloat16 outputs (four kernels with two consumer warpgroups; their own translation unit,
// compiled beside the per-key ones; other head dims are zero-padded). At head dim 64 with the
// row sums from the tensor cores (kRowSumTC), at 128 with the late row sums (kLateRowSum) and,
// up to kFastEpilogueMaxTiles key tiles, the fast epilogue with the key loop unrolled by two
// (kUnroll2). The three-consumer kernels are in fp8_attention_sm90_ws_tile3_kernels.cu.
#include "xdit_ops/fp8_attention_sm90_ws.cuh"

namespace xdit_ops {

cudaError_t fp8_attention_sm90_ws_tile_k_scale(const Fp8AttentionSm90Params& p, int batch,
                                               int head_dim_padded, DType out_dtype,
                                               int consumers, bool ping_pong,
                                               cudaStream_t stream) {
  if (p.seq_q == 0 || batch == 0 || p.heads == 0) return cudaSuccess;
  if (consumers == 3) {
    return fp8_attention_sm90_ws_tile_k_scale_3wg(p, batch, head_dim_padded, out_dtype,
                                                  ping_pong, stream);
  }
  if (consumers != 2 || !ping_pong) return cudaErrorInvalidValue;
  // At padded head dim 64 the row sums come from the tensor cores (kRowSumTC), as in the
  // three-consumer kernels: the same bits whatever the number of consumers. At 128 the
  // threads' row sums are reduced once after the key loop (kLateRowSum; runs 75-76).
  return fp8_sm90_common::dispatch(head_dim_padded, out_dtype, [&](auto dp, auto out) {
    constexpr int kDP = decltype(dp)::value;
    using Out = typename decltype(out)::type;
    if constexpr (kDP == 128) {
      // the epilogue by the number of key tiles (kFastEpilogue), with it the key loop unrolled
      // by two (kUnroll2)
      return fp8_sm90_ws::launch_tile<128, Out, 2, true, false, true, true>(p, batch, stream);
    } else {
      return fp8_sm90_ws::launch<kDP, Out, true, 2, true, kDP == 64>(p, batch, stream);
    }
  });
}

}  // namespace xdit_ops
