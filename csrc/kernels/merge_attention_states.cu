// Instantiations and launch choices of the merge kernels. No torch headers here: this file
// compiles in seconds.
#include <algorithm>
#include <atomic>
#include <cstdint>

#include "xdit_ops/copy_width.h"
#include "xdit_ops/merge_attention_states.cuh"

namespace xdit_ops {

namespace {

constexpr int kScalarThreads = 256;  // 8 warps, one (b, s, h) row each
constexpr int kVecThreads = merge_detail::kThreads;

// Scalar kernels: enough blocks to fill every SM several times; they grid-stride over the rest.
int row_blocks(int64_t num_rows, int num_sms) {
  const int64_t wanted = (num_rows + kScalarThreads / 32 - 1) / (kScalarThreads / 32);
  return static_cast<int>(std::min<int64_t>(wanted, (int64_t)num_sms * 16));
}

// Vector kernels: as many blocks as the GPU holds at once (one wave), each grid-striding over
// an equal share: more would only add a partial last wave. Queried once per kernel (the answer
// depends on its registers), hence the kernel as a template argument: one cache each.
template <auto kKernel>
cudaError_t one_wave(int64_t work_blocks, int num_sms, int* blocks) {
  static std::atomic<int> cached{0};
  int per_sm = cached.load(std::memory_order_relaxed);
  if (per_sm == 0) {
    const cudaError_t err =
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kKernel, kVecThreads, 0);
    if (err != cudaSuccess) return err;
    per_sm = std::max(per_sm, 1);
    cached.store(per_sm, std::memory_order_relaxed);
  }
  *blocks = static_cast<int>(std::min<int64_t>(work_blocks, (int64_t)num_sms * per_sm));
  return cudaSuccess;
}

// Bytes per element of a DType.
int dtype_bytes(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// An applied stride in bytes for an alignment test: 0 for a dimension of one index (never
// applied, whatever its stride).
uint64_t stride_bytes(int64_t size, int64_t stride, int elem) {
  return size > 1 ? static_cast<uint64_t>(stride) * elem : 0;
}

// The vector kernels index in 32 bits (fast_div): every index below 2^31.
constexpr int64_t kMaxVecIndex = int64_t{1} << 31;

merge_detail::VecIndex vec_index(int64_t batch, int64_t seq, int64_t heads, int64_t num_chunks,
                                 int64_t chunks_per_row) {
  merge_detail::VecIndex ix;
  ix.num_chunks = static_cast<uint32_t>(num_chunks);
  ix.num_rows = static_cast<uint32_t>(batch * seq * heads);
  ix.chunks_per_row = make_fast_div(static_cast<uint32_t>(chunks_per_row));
  ix.heads = make_fast_div(static_cast<uint32_t>(heads));
  ix.seq = make_fast_div(static_cast<uint32_t>(seq));
  return ix;
}

// Whether merge_attention_states_ can run its vector kernel: 16-byte accesses to every row of
// the block and 16-byte accesses to the fp32 accumulator, at most one block of threads a row.
bool states_vectorizable(const MergeAttentionStatesParams& p, DType block_dtype) {
  const int eb = dtype_bytes(block_dtype);
  const int64_t elems = 16 / eb;  // a chunk: 16 bytes of the block
  if (p.head_dim == 0 || p.head_dim % elems != 0 || p.head_dim / elems > kVecThreads) {
    return false;
  }
  if (p.batch * p.seq * p.heads * (p.head_dim / elems) >= kMaxVecIndex) return false;
  const int block_align = copy_width(
      {reinterpret_cast<uint64_t>(p.block_out), stride_bytes(p.batch, p.blk_stride_b, eb),
       stride_bytes(p.seq, p.blk_stride_s, eb), stride_bytes(p.heads, p.blk_stride_h, eb)});
  const int out_align = copy_width(
      {reinterpret_cast<uint64_t>(p.out), stride_bytes(p.batch, p.out_stride_b, 4),
       stride_bytes(p.seq, p.out_stride_s, 4), stride_bytes(p.heads, p.out_stride_h, 4)});
  return block_align == 16 && out_align == 16;
}

// Whether merge_attention_partials can run its vector kernel: contiguous partials (the
// launcher's contract) whose rows are whole 16-byte chunks from 16-byte aligned starts.
bool partials_vectorizable(const MergeAttentionPartialsParams& p, DType in_dtype) {
  // head_dim 0 stays scalar: the vector kernel has no chunk to write the row's LSE from.
  const int eb = dtype_bytes(in_dtype);
  if (p.head_dim == 0 || (p.head_dim * eb) % 16 != 0) return false;
  if (p.batch * p.seq * p.heads * (p.head_dim * eb / 16) >= kMaxVecIndex) return false;
  uint64_t bits = reinterpret_cast<uint64_t>(p.out);
  for (int i = 0; i < p.num_parts; ++i) bits |= reinterpret_cast<uint64_t>(p.parts[i]);
  return copy_width(bits) == 16;
}

template <typename T>
cudaError_t launch_states(const MergeAttentionStatesParams& p, bool vec, int num_sms,
                          cudaStream_t stream) {
  const int64_t num_rows = p.batch * p.seq * p.heads;
  if (vec) {
    const int64_t chunks_per_row = p.head_dim / merge_detail::Chunk<T>::kElems;
    const int64_t rows_per_block = kVecThreads / chunks_per_row;
    int blocks = 0;
    const cudaError_t err = one_wave<merge_attention_states_vec_kernel<T>>(
        (num_rows + rows_per_block - 1) / rows_per_block, num_sms, &blocks);
    if (err != cudaSuccess) return err;
    merge_attention_states_vec_kernel<T><<<blocks, kVecThreads, 0, stream>>>(
        p, vec_index(p.batch, p.seq, p.heads, num_rows * chunks_per_row, chunks_per_row));
  } else {
    merge_attention_states_kernel<T>
        <<<row_blocks(num_rows, num_sms), kScalarThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

// kParts: the partial slots the vector kernel unrolls (num_parts rounded up to 4, 8 or 16).
template <typename TIn, typename TOut, int kParts>
cudaError_t launch_partials_vec(const MergeAttentionPartialsParams& p, int num_sms,
                                cudaStream_t stream) {
  const int64_t chunks_per_row = p.head_dim / merge_detail::Chunk<TIn>::kElems;
  const int64_t num_chunks = p.batch * p.seq * p.heads * chunks_per_row;
  int blocks = 0;
  const cudaError_t err = one_wave<merge_attention_partials_vec_kernel<TIn, TOut, kParts>>(
      (num_chunks + kVecThreads - 1) / kVecThreads, num_sms, &blocks);
  if (err != cudaSuccess) return err;
  merge_attention_partials_vec_kernel<TIn, TOut, kParts><<<blocks, kVecThreads, 0, stream>>>(
      p, vec_index(p.batch, p.seq, p.heads, num_chunks, chunks_per_row));
  return cudaGetLastError();
}

template <typename TIn, typename TOut>
cudaError_t launch_partials_as(const MergeAttentionPartialsParams& p, bool vec, int num_sms,
                               cudaStream_t stream) {
  if (vec) {
    if (p.num_parts <= 4) return launch_partials_vec<TIn, TOut, 4>(p, num_sms, stream);
    if (p.num_parts <= 8) return launch_partials_vec<TIn, TOut, 8>(p, num_sms, stream);
    return launch_partials_vec<TIn, TOut, kMaxPartials>(p, num_sms, stream);
  }
  const int64_t num_rows = p.batch * p.seq * p.heads;
  merge_attention_partials_kernel<TIn, TOut>
      <<<row_blocks(num_rows, num_sms), kScalarThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename TIn>
cudaError_t launch_partials(const MergeAttentionPartialsParams& p, DType out_dtype, bool vec,
                            int num_sms, cudaStream_t stream) {
  switch (out_dtype) {
    case DType::kFloat32:
      return launch_partials_as<TIn, float>(p, vec, num_sms, stream);
    case DType::kFloat16:
      return launch_partials_as<TIn, __half>(p, vec, num_sms, stream);
    case DType::kBFloat16:
      return launch_partials_as<TIn, __nv_bfloat16>(p, vec, num_sms, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t merge_attention_states(const MergeAttentionStatesParams& params, DType block_dtype,
                                   MergeImpl impl, int num_sms, cudaStream_t stream) {
  const int64_t num_rows = params.batch * params.seq * params.heads;
  if (num_rows == 0) return cudaSuccess;
  const bool vec = impl == MergeImpl::kAuto && states_vectorizable(params, block_dtype);
  switch (block_dtype) {
    case DType::kFloat32:
      return launch_states<float>(params, vec, num_sms, stream);
    case DType::kFloat16:
      return launch_states<__half>(params, vec, num_sms, stream);
    case DType::kBFloat16:
      return launch_states<__nv_bfloat16>(params, vec, num_sms, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t merge_attention_partials(const MergeAttentionPartialsParams& params, DType in_dtype,
                                     DType out_dtype, MergeImpl impl, int num_sms,
                                     cudaStream_t stream) {
  if (params.num_parts < 1 || params.num_parts > kMaxPartials) return cudaErrorInvalidValue;
  const int64_t num_rows = params.batch * params.seq * params.heads;
  if (num_rows == 0) return cudaSuccess;
  const bool vec = impl == MergeImpl::kAuto && partials_vectorizable(params, in_dtype);
  switch (in_dtype) {
    case DType::kFloat32:
      return launch_partials<float>(params, out_dtype, vec, num_sms, stream);
    case DType::kFloat16:
      return launch_partials<__half>(params, out_dtype, vec, num_sms, stream);
    case DType::kBFloat16:
      return launch_partials<__nv_bfloat16>(params, out_dtype, vec, num_sms, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace xdit_ops
