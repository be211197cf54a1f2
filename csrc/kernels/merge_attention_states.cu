// Instantiations of the merge kernel. No torch headers here: this file compiles in seconds.
#include <algorithm>

#include "xdit_ops/merge_attention_states.cuh"

namespace xdit_ops {

cudaError_t merge_attention_states(const MergeAttentionStatesParams& params, DType block_dtype,
                                   int num_sms, cudaStream_t stream) {
  constexpr int kThreads = 256;
  constexpr int kWarpsPerBlock = kThreads / 32;
  const int64_t num_rows = params.batch * params.seq * params.heads;
  if (num_rows == 0) return cudaSuccess;
  // Enough blocks to fill every SM several times; the kernel grid-strides over the rest.
  const int64_t wanted = (num_rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int blocks = static_cast<int>(std::min<int64_t>(wanted, (int64_t)num_sms * 16));
  switch (block_dtype) {
    case DType::kFloat32:
      merge_attention_states_kernel<float><<<blocks, kThreads, 0, stream>>>(params);
      break;
    case DType::kFloat16:
      merge_attention_states_kernel<__half><<<blocks, kThreads, 0, stream>>>(params);
      break;
    case DType::kBFloat16:
      merge_attention_states_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(params);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace xdit_ops
