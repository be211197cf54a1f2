// Torch-free instantiations of the warp-specialised sm_90a FP8 attention kernel: head dim 64
// and 128, float16 and bfloat16 outputs (four kernels; other head dims are zero-padded).
#include "xdit_ops/fp8_attention_sm90_ws.cuh"

namespace xdit_ops {

cudaError_t fp8_attention_sm90_ws(const Fp8AttentionSm90Params& p, int batch,
                                  int head_dim_padded, DType out_dtype, cudaStream_t stream) {
  if (p.seq_q == 0 || batch == 0 || p.heads == 0) return cudaSuccess;
  using fp8_sm90_ws::launch;
  if (head_dim_padded == 64) {
    if (out_dtype == DType::kBFloat16) return launch<64, __nv_bfloat16>(p, batch, stream);
    if (out_dtype == DType::kFloat16) return launch<64, __half>(p, batch, stream);
  } else if (head_dim_padded == 128) {
    if (out_dtype == DType::kBFloat16) return launch<128, __nv_bfloat16>(p, batch, stream);
    if (out_dtype == DType::kFloat16) return launch<128, __half>(p, batch, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace xdit_ops
