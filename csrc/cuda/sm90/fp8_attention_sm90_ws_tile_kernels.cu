// Torch-free instantiations of the warp-specialised sm_90a FP8 attention kernel with one K
// scale per 128-key tile (XDIT_OPS_FP8_K_SCALE=tile): head dim 64 and 128, float16 and
// bfloat16 outputs (four kernels with two consumer warpgroups; their own translation unit,
// compiled beside the per-key ones; other head dims are zero-padded). The three-consumer
// kernels are in fp8_attention_sm90_ws_tile3_kernels.cu.
#include <cstdlib>
#include <cstring>

#include "xdit_ops/fp8_attention_sm90_ws.cuh"

namespace xdit_ops {

cudaError_t fp8_attention_sm90_ws_tile_k_scale_rowsum(const Fp8AttentionSm90Params& p, int batch,
                                                      int dp, int consumers, int row_sum,
                                                      cudaStream_t stream);

cudaError_t fp8_attention_sm90_ws_tile_k_scale(const Fp8AttentionSm90Params& p, int batch,
                                               int head_dim_padded, DType out_dtype,
                                               int consumers, bool ping_pong,
                                               cudaStream_t stream) {
  if (p.seq_q == 0 || batch == 0 || p.heads == 0) return cudaSuccess;
  if (const char* e = std::getenv("XDIT_OPS_FP8_ROWSUM")) {  // EXPERIMENT (fp8-rowsum)
    const int row_sum = std::strcmp(e, "tc") == 0 ? 2 : std::strcmp(e, "chains") == 0 ? 1 : 0;
    if (row_sum > 0 && out_dtype == DType::kBFloat16 && (consumers == 3) == !ping_pong) {
      return fp8_attention_sm90_ws_tile_k_scale_rowsum(p, batch, head_dim_padded, consumers,
                                                       row_sum, stream);
    }
  }
  if (consumers == 3) {
    return fp8_attention_sm90_ws_tile_k_scale_3wg(p, batch, head_dim_padded, out_dtype,
                                                  ping_pong, stream);
  }
  if (consumers != 2 || !ping_pong) return cudaErrorInvalidValue;
  return fp8_sm90_common::dispatch(head_dim_padded, out_dtype, [&](auto dp, auto out) {
    return fp8_sm90_ws::launch<decltype(dp)::value, typename decltype(out)::type, true>(
        p, batch, stream);
  });
}

}  // namespace xdit_ops
