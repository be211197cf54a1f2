// Torch-aware launcher for xdit_ops::merge_attention_states_ (schema in
// xdit_ops/ops/merge_attention_states.py).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "xdit_ops/merge_attention_states.h"
#include "utils.h"

namespace xdit_ops {

void merge_attention_states_cuda(at::Tensor& out, at::Tensor& lse, const at::Tensor& block_out,
                                 const at::Tensor& block_lse) {
  constexpr const char* kOp = "merge_attention_states_";
  XDIT_CHECK(out.is_cuda() && lse.is_cuda() && block_out.is_cuda() && block_lse.is_cuda(), kOp,
             ": all tensors must be on a CUDA device");
  XDIT_CHECK(out.dim() == 4 && block_out.dim() == 4, kOp, ": out and block_out must be [B, S, H, D], got ",
             out.sizes(), " and ", block_out.sizes());
  XDIT_CHECK(out.sizes() == block_out.sizes(), kOp, ": out ", out.sizes(), " and block_out ",
             block_out.sizes(), " differ");
  const int64_t B = out.size(0), S = out.size(1), H = out.size(2), D = out.size(3);
  XDIT_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == S, kOp,
             ": lse must be [B, H, S] = [", B, ", ", H, ", ", S, "], got ", lse.sizes());
  XDIT_CHECK(block_lse.sizes() == lse.sizes(), kOp, ": block_lse ", block_lse.sizes(),
             " must match lse ", lse.sizes());
  XDIT_CHECK(out.scalar_type() == at::kFloat && lse.scalar_type() == at::kFloat &&
                 block_lse.scalar_type() == at::kFloat,
             kOp, ": out, lse and block_lse must be float32, got ", out.scalar_type(), ", ",
             lse.scalar_type(), ", ", block_lse.scalar_type());
  XDIT_CHECK(out.stride(3) == 1 && block_out.stride(3) == 1, kOp,
             ": head_dim must be the contiguous dimension of out and block_out");
  XDIT_CHECK(out.device() == block_out.device() && out.device() == lse.device() &&
                 out.device() == block_lse.device(),
             kOp, ": tensors are on different devices");

  const c10::cuda::CUDAGuard guard(out.device());
  MergeAttentionStatesParams p;
  p.out = out.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.block_out = block_out.const_data_ptr();
  p.block_lse = block_lse.const_data_ptr<float>();
  p.batch = B;
  p.seq = S;
  p.heads = H;
  p.head_dim = D;
  p.out_stride_b = out.stride(0);
  p.out_stride_s = out.stride(1);
  p.out_stride_h = out.stride(2);
  p.lse_stride_b = lse.stride(0);
  p.lse_stride_h = lse.stride(1);
  p.lse_stride_s = lse.stride(2);
  p.blk_stride_b = block_out.stride(0);
  p.blk_stride_s = block_out.stride(1);
  p.blk_stride_h = block_out.stride(2);
  p.blse_stride_b = block_lse.stride(0);
  p.blse_stride_h = block_lse.stride(1);
  p.blse_stride_s = block_lse.stride(2);
  XDIT_CUDA_CHECK(merge_attention_states(p, to_dtype(block_out.scalar_type(), kOp),
                                         num_sms(out.get_device()),
                                         c10::cuda::getCurrentCUDAStream().stream()));
}

TORCH_LIBRARY_IMPL(xdit_ops, CUDA, m) {
  m.impl("merge_attention_states_", &merge_attention_states_cuda);
}

}  // namespace xdit_ops
