// Instantiations of the merge kernel. No torch headers here: this file compiles in seconds.
#include <algorithm>

#include "xdit_ops/merge_attention_states.cuh"

namespace xdit_ops {

namespace {

constexpr int kThreads = 256;  // 8 warps, one (b, s, h) row each

// Enough blocks to fill every SM several times; the kernels grid-stride over the rest.
int row_blocks(int64_t num_rows, int num_sms) {
  const int64_t wanted = (num_rows + kThreads / 32 - 1) / (kThreads / 32);
  return static_cast<int>(std::min<int64_t>(wanted, (int64_t)num_sms * 16));
}

}  // namespace

cudaError_t merge_attention_states(const MergeAttentionStatesParams& params, DType block_dtype,
                                   int num_sms, cudaStream_t stream) {
  const int64_t num_rows = params.batch * params.seq * params.heads;
  if (num_rows == 0) return cudaSuccess;
  const int blocks = row_blocks(num_rows, num_sms);
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

namespace {

template <typename TIn>
cudaError_t launch_partials(const MergeAttentionPartialsParams& p, DType out_dtype, int blocks,
                            int threads, cudaStream_t stream) {
  switch (out_dtype) {
    case DType::kFloat32:
      merge_attention_partials_kernel<TIn, float><<<blocks, threads, 0, stream>>>(p);
      break;
    case DType::kFloat16:
      merge_attention_partials_kernel<TIn, __half><<<blocks, threads, 0, stream>>>(p);
      break;
    case DType::kBFloat16:
      merge_attention_partials_kernel<TIn, __nv_bfloat16><<<blocks, threads, 0, stream>>>(p);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t merge_attention_partials(const MergeAttentionPartialsParams& params, DType in_dtype,
                                     DType out_dtype, int num_sms, cudaStream_t stream) {
  if (params.num_parts < 1 || params.num_parts > kMaxPartials) return cudaErrorInvalidValue;
  const int64_t num_rows = params.batch * params.seq * params.heads;
  if (num_rows == 0) return cudaSuccess;
  const int blocks = row_blocks(num_rows, num_sms);
  switch (in_dtype) {
    case DType::kFloat32:
      return launch_partials<float>(params, out_dtype, blocks, kThreads, stream);
    case DType::kFloat16:
      return launch_partials<__half>(params, out_dtype, blocks, kThreads, stream);
    case DType::kBFloat16:
      return launch_partials<__nv_bfloat16>(params, out_dtype, blocks, kThreads, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace xdit_ops
