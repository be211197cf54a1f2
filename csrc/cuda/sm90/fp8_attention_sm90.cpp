// Torch-aware launchers of xdit_ops::fp8_attention_sm90_fwd, xdit_ops::fp8_attention_sm90ws_fwd
// and xdit_ops::fp8_attention_sm90ws_ktile_fwd (schemas in xdit_ops/ops/fp8_attention.py): the
// sm_90a FP8 attention kernels (one warpgroup with cp.async; warp-specialised with TMA; the
// warp-specialised one with one K scale per 128-key tile) on the quantization pass's output
// (QuantizedQKV layouts). All take the same inputs and checks; the ktile op also the number of
// its kernel's consumer warpgroups (2, or 3 at padded head dim 64) and their issue order.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "utils.h"
#include "xdit_ops/fp8_attention_sm90.h"
#include "xdit_ops/fp8_attention_sm90_ws.h"

namespace xdit_ops {

namespace {

// kWarpSpecializedTileK: k_scale equal within every 128-key tile (XDIT_OPS_FP8_K_SCALE=tile);
// the warp-specialised kernel's per-tile variant, at both padded head dims (64 and 128).
enum class Sm90Kernel { kOneWarpgroup, kWarpSpecialized, kWarpSpecializedTileK };

// One launcher for the three ops (same inputs and checks); the kernel is a template argument
// so that each op registers its own instantiation. consumers and ping_pong: the ktile op's
// (its kernel's consumer warpgroups and issue order; 2 and true for the other two).
template <Sm90Kernel kernel>
std::tuple<at::Tensor, at::Tensor> fp8_attention_sm90_run(
    const at::Tensor& q8, const at::Tensor& q_scale, const at::Tensor& k8,
    const at::Tensor& k_scale, const at::Tensor& vt8, const at::Tensor& v_scale,
    const at::Tensor& lse_corr, int64_t seqlen_k, int64_t head_dim, const at::Tensor& out_like,
    bool return_lse, int64_t consumers, bool ping_pong) {
  constexpr bool kWs = kernel != Sm90Kernel::kOneWarpgroup;
  const char* kOp = kernel == Sm90Kernel::kWarpSpecialized       ? "fp8_attention_sm90ws_fwd"
                    : kernel == Sm90Kernel::kWarpSpecializedTileK ? "fp8_attention_sm90ws_ktile_fwd"
                                                                  : "fp8_attention_sm90_fwd";
  XDIT_CHECK(q8.is_cuda(), kOp, ": tensors must be on a CUDA device, got ", q8.device());
  for (const at::Tensor* t : {&q_scale, &k8, &k_scale, &vt8, &v_scale, &lse_corr}) {
    XDIT_CHECK(t->device() == q8.device(), kOp, ": tensors are on different devices (",
               q8.device(), ", ", t->device(), ")");
    XDIT_CHECK(t->is_contiguous(), kOp, ": quantized inputs must be contiguous");
  }
  XDIT_CHECK(q8.is_contiguous(), kOp, ": quantized inputs must be contiguous");
  XDIT_CHECK(q8.dim() == 4 && k8.dim() == 4 && vt8.dim() == 4, kOp,
             ": q8/k8/vt8 must be 4-D, got ", q8.sizes(), ", ", k8.sizes(), ", ", vt8.sizes());
  XDIT_CHECK(q8.scalar_type() == at::kChar && k8.scalar_type() == at::kChar, kOp,
             ": q8 and k8 must be int8, got ", q8.scalar_type(), " and ", k8.scalar_type());
  XDIT_CHECK(vt8.scalar_type() == at::kFloat8_e4m3fn, kOp, ": vt8 must be float8_e4m3fn, got ",
             vt8.scalar_type());
  for (const at::Tensor* t : {&q_scale, &k_scale, &v_scale, &lse_corr}) {
    XDIT_CHECK(t->scalar_type() == at::kFloat, kOp, ": scales must be float32, got ",
               t->scalar_type());
  }
  const int64_t B = q8.size(0), H = q8.size(1), Sq = q8.size(2), DP = q8.size(3);
  const int64_t Skp = k8.size(2);
  XDIT_CHECK(DP == 64 || DP == 128, kOp, ": padded head_dim must be 64 or 128, got ", DP);
  XDIT_CHECK(head_dim >= 1 && head_dim <= DP, kOp, ": head_dim ", head_dim, " not in [1, ", DP,
             "]");
  XDIT_CHECK(k8.size(0) == B && k8.size(1) == H && k8.size(3) == DP, kOp, ": k8 ", k8.sizes(),
             " does not match q8 ", q8.sizes());
  XDIT_CHECK(Skp % 64 == 0 && seqlen_k >= 0 && seqlen_k <= Skp, kOp, ": seqlen_k ", seqlen_k,
             " and padded key length ", Skp, " (must be a multiple of 64)");
  XDIT_CHECK(vt8.size(0) == B && vt8.size(1) == H && vt8.size(2) == DP && vt8.size(3) == Skp,
             kOp, ": vt8 must be [B, H, DP, Sk_pad] = [", B, ", ", H, ", ", DP, ", ", Skp,
             "], got ", vt8.sizes());
  XDIT_CHECK(q_scale.numel() == B * H * Sq && lse_corr.numel() == B * H * Sq &&
                 k_scale.numel() == B * H * Skp && v_scale.numel() == B * H * DP,
             kOp, ": scale sizes do not match the quantized tensors");
  const at::ScalarType out_type = out_like.scalar_type();
  XDIT_CHECK(out_type == at::kHalf || out_type == at::kBFloat16, kOp,
             ": output dtype must be float16 or bfloat16, got ", out_type);
  // The consumer warpgroups of the ktile kernel (XDIT_OPS_FP8_SM90_CONSUMERS): 2 (in
  // ping-pong), or 3 at padded head dim 64 (issuing freely; in round robin for bfloat16 output
  // only, the A/B measurement).
  XDIT_CHECK(consumers == 2 || consumers == 3, kOp, ": consumers must be 2 or 3, got ",
             consumers);
  XDIT_CHECK(consumers == 2 || DP == 64, kOp,
             ": 3 consumer warpgroups are built for padded head_dim 64 only, got ", DP);
  XDIT_CHECK(ping_pong || consumers == 3, kOp, ": ping_pong=False is built for 3 consumers");
  XDIT_CHECK(!ping_pong || consumers == 2 || out_type == at::kBFloat16, kOp,
             ": 3 consumers in round robin (ping_pong=True) are built for bfloat16 output only");

  if (kWs) {
    // TMA and bulk copies read from 16-byte aligned global addresses (row strides are DP and
    // Sk_pad bytes, Sk_pad floats for k_scale).
    for (const at::Tensor* t : {&q8, &k8, &vt8, &k_scale}) {
      XDIT_CHECK(reinterpret_cast<std::uintptr_t>(t->const_data_ptr()) % 16 == 0, kOp,
                 ": q8, k8, vt8 and k_scale must start 16-byte aligned");
    }
  }

  const c10::cuda::CUDAGuard guard(q8.device());
  at::Tensor out = at::empty({B, Sq, H, head_dim}, q8.options().dtype(out_type));
  at::Tensor lse = at::empty({B, H, return_lse ? Sq : 0}, q8.options().dtype(at::kFloat));
  if (kWs && seqlen_k == 0) {
    // No keys: what the emulation returns (the kernel needs at least one key tile).
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  Fp8AttentionSm90Params p;
  p.q8 = q8.const_data_ptr<int8_t>();
  p.q_scale = q_scale.const_data_ptr<float>();
  p.k8 = k8.const_data_ptr<int8_t>();
  p.k_scale = k_scale.const_data_ptr<float>();
  p.vt8 = static_cast<const uint8_t*>(vt8.const_data_ptr());
  p.v_scale = v_scale.const_data_ptr<float>();
  p.lse_corr = lse_corr.const_data_ptr<float>();
  p.out = out.data_ptr();
  p.lse = return_lse ? lse.data_ptr<float>() : nullptr;
  p.out_stride_b = out.stride(0);
  p.out_stride_s = out.stride(1);
  p.out_stride_h = out.stride(2);
  p.heads = static_cast<int>(H);
  p.seq_q = static_cast<int>(Sq);
  p.seq_k = static_cast<int>(seqlen_k);
  p.seq_k_pad = static_cast<int>(Skp);
  p.head_dim = static_cast<int>(head_dim);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (kernel == Sm90Kernel::kWarpSpecializedTileK) {
    XDIT_CUDA_CHECK(fp8_attention_sm90_ws_tile_k_scale(
        p, static_cast<int>(B), static_cast<int>(DP), to_dtype(out_type, kOp),
        static_cast<int>(consumers), ping_pong, stream));
  } else if (kWs) {
    XDIT_CUDA_CHECK(fp8_attention_sm90_ws(p, static_cast<int>(B), static_cast<int>(DP),
                                          to_dtype(out_type, kOp), stream));
  } else {
    XDIT_CUDA_CHECK(fp8_attention_sm90(p, static_cast<int>(B), static_cast<int>(DP),
                                       to_dtype(out_type, kOp), stream));
  }
  return {out, lse};
}

// fp8_attention_sm90_fwd, fp8_attention_sm90ws_fwd: the common schema.
template <Sm90Kernel kernel>
std::tuple<at::Tensor, at::Tensor> fp8_attention_sm90_fwd_cuda(
    const at::Tensor& q8, const at::Tensor& q_scale, const at::Tensor& k8,
    const at::Tensor& k_scale, const at::Tensor& vt8, const at::Tensor& v_scale,
    const at::Tensor& lse_corr, int64_t seqlen_k, int64_t head_dim, const at::Tensor& out_like,
    bool return_lse) {
  return fp8_attention_sm90_run<kernel>(q8, q_scale, k8, k_scale, vt8, v_scale, lse_corr,
                                        seqlen_k, head_dim, out_like, return_lse, 2, true);
}

// fp8_attention_sm90ws_ktile_fwd: the common schema + consumers, ping_pong.
std::tuple<at::Tensor, at::Tensor> fp8_attention_sm90ws_ktile_fwd_cuda(
    const at::Tensor& q8, const at::Tensor& q_scale, const at::Tensor& k8,
    const at::Tensor& k_scale, const at::Tensor& vt8, const at::Tensor& v_scale,
    const at::Tensor& lse_corr, int64_t seqlen_k, int64_t head_dim, const at::Tensor& out_like,
    bool return_lse, int64_t consumers, bool ping_pong) {
  return fp8_attention_sm90_run<Sm90Kernel::kWarpSpecializedTileK>(
      q8, q_scale, k8, k_scale, vt8, v_scale, lse_corr, seqlen_k, head_dim, out_like,
      return_lse, consumers, ping_pong);
}

}  // namespace

}  // namespace xdit_ops

TORCH_LIBRARY_IMPL(xdit_ops, CUDA, m) {
  using xdit_ops::Sm90Kernel;
  m.impl("fp8_attention_sm90_fwd",
         &xdit_ops::fp8_attention_sm90_fwd_cuda<Sm90Kernel::kOneWarpgroup>);
  m.impl("fp8_attention_sm90ws_fwd",
         &xdit_ops::fp8_attention_sm90_fwd_cuda<Sm90Kernel::kWarpSpecialized>);
  m.impl("fp8_attention_sm90ws_ktile_fwd", &xdit_ops::fp8_attention_sm90ws_ktile_fwd_cuda);
}
