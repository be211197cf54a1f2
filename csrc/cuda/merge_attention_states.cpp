// Torch-aware launchers for xdit_ops::merge_attention_states_ and ::merge_attention_partials
// (schemas in xdit_ops/ops/merge_attention_states.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "xdit_ops/merge_attention_states.h"
#include "utils.h"

namespace xdit_ops {

namespace {

// XDIT_OPS_MERGE_IMPL=auto (default) | scalar, read on every call (one getenv) so that a
// benchmark can time both kernels in one process.
MergeImpl merge_impl(const char* op) {
  const char* v = std::getenv("XDIT_OPS_MERGE_IMPL");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return MergeImpl::kAuto;
  XDIT_CHECK(std::strcmp(v, "scalar") == 0, op, ": XDIT_OPS_MERGE_IMPL=", v,
             " is not auto or scalar");
  return MergeImpl::kScalar;
}

}  // namespace

void merge_attention_states_cuda(at::Tensor& out, at::Tensor& lse, const at::Tensor& block_out,
                                 const at::Tensor& block_lse) {
  constexpr const char* kOp = "merge_attention_states_";
  XDIT_CHECK(out.is_cuda() && lse.is_cuda() && block_out.is_cuda() && block_lse.is_cuda(), kOp,
             ": all tensors must be on a CUDA device");
  XDIT_CHECK(out.dim() == 4 && block_out.dim() == 4, kOp,
             ": out and block_out must be [B, S, H, D], got ", out.sizes(), " and ",
             block_out.sizes());
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
                                         merge_impl(kOp), num_sms(out.get_device()),
                                         c10::cuda::getCurrentCUDAStream().stream()));
}

std::tuple<at::Tensor, at::Tensor> merge_attention_partials_cuda(
    at::TensorList outs, at::TensorList lses, std::optional<at::ScalarType> out_dtype) {
  constexpr const char* kOp = "merge_attention_partials";
  XDIT_CHECK(!outs.empty() && outs.size() == lses.size(), kOp, ": got ", outs.size(),
             " outputs and ", lses.size(), " LSEs (need the same number, at least 1)");
  XDIT_CHECK(outs.size() <= static_cast<size_t>(kMaxPartials), kOp, ": at most ", kMaxPartials,
             " partials, got ", outs.size());
  const at::Tensor& o0 = outs[0];
  XDIT_CHECK(o0.dim() == 4, kOp, ": outputs must be [B, S, H, D], got ", o0.sizes());
  const int64_t B = o0.size(0), S = o0.size(1), H = o0.size(2), D = o0.size(3);
  MergeAttentionPartialsParams p;
  p.num_parts = static_cast<int>(outs.size());
  for (size_t i = 0; i < outs.size(); ++i) {
    XDIT_CHECK(outs[i].is_cuda() && lses[i].is_cuda() && outs[i].device() == o0.device() &&
                   lses[i].device() == o0.device(),
               kOp, ": partial ", i, " is not on ", o0.device());
    XDIT_CHECK(outs[i].sizes() == o0.sizes() && outs[i].scalar_type() == o0.scalar_type() &&
                   outs[i].is_contiguous(),
               kOp, ": partial ", i, " must be a contiguous ", o0.sizes(), " ",
               o0.scalar_type(), " tensor, got ", outs[i].sizes(), " ", outs[i].scalar_type());
    XDIT_CHECK(lses[i].dim() == 3 && lses[i].size(0) == B && lses[i].size(1) == H &&
                   lses[i].size(2) == S && lses[i].scalar_type() == at::kFloat &&
                   lses[i].is_contiguous(),
               kOp, ": lse ", i, " must be a contiguous float32 [", B, ", ", H, ", ", S,
               "] tensor, got ", lses[i].sizes(), " ", lses[i].scalar_type());
    p.parts[i] = outs[i].const_data_ptr();
    p.part_lse[i] = lses[i].const_data_ptr<float>();
  }
  const at::ScalarType odt = out_dtype.value_or(o0.scalar_type());
  const c10::cuda::CUDAGuard guard(o0.device());
  at::Tensor out = at::empty({B, S, H, D}, o0.options().dtype(odt));
  at::Tensor lse = at::empty({B, H, S}, o0.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.batch = B;
  p.seq = S;
  p.heads = H;
  p.head_dim = D;
  XDIT_CUDA_CHECK(merge_attention_partials(p, to_dtype(o0.scalar_type(), kOp), to_dtype(odt, kOp),
                                           merge_impl(kOp), num_sms(o0.get_device()),
                                           c10::cuda::getCurrentCUDAStream().stream()));
  return {out, lse};
}

TORCH_LIBRARY_IMPL(xdit_ops, CUDA, m) {
  m.impl("merge_attention_states_", &merge_attention_states_cuda);
  m.impl("merge_attention_partials", &merge_attention_partials_cuda);
}

}  // namespace xdit_ops
