// Standalone unit test of the merge kernels (no torch): each against a host loop in double
// precision, for fp32/fp16/bf16 blocks, strided (non-contiguous) tensors and -inf rows, with
// MergeImpl::kAuto (the vector kernel wherever the padded strides allow 16-byte accesses, e.g.
// head_dim 128, 72, 40) and MergeImpl::kScalar.
// Exit code: see test_common.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "test_common.h"
#include "xdit_ops/merge_attention_states.h"

namespace {

using xdit_test::DTypeOf;
using xdit_test::from_f;
using xdit_test::to_d;
using xdit_test::to_device;
using xdit_test::to_host;

// One case: B x S x H x D with padded strides everywhere, so a kernel that assumed contiguous
// tensors would read and write the wrong elements (and the padding checks catch stray writes).
template <typename T>
int run_case(int64_t B, int64_t S, int64_t H, int64_t D, const char* name, int num_sms,
             xdit_ops::MergeImpl impl) {
  std::mt19937 rng(1234 + B * 7 + S * 13 + H * 17 + D);
  std::normal_distribution<float> normal(0.f, 1.f);
  const float kNegInf = -INFINITY;
  const float kPad = 12345.f;

  // out: [B, S, H, D + 8] buffer viewed as [B, S, H, D]; lse: [B, S, H] viewed as [B, H, S].
  const int64_t Dp = D + 8;
  const int64_t o_sh = Dp, o_ss = H * Dp, o_sb = S * H * Dp;
  const int64_t l_ss = H, l_sh = 1, l_sb = S * H;
  // block_out: [B, S, 2, H, D] viewed at index 1 of the third dim; block_lse: [B, H, 2S] step 2.
  const int64_t k_sh = D, k_ss = 2 * H * D, k_sb = S * 2 * H * D, k_off = H * D;
  const int64_t bl_ss = 2, bl_sh = 2 * S, bl_sb = H * 2 * S;

  std::vector<float> out(B * o_sb, kPad), lse(B * l_sb), blse(B * bl_sb);
  std::vector<T> blk(B * k_sb);
  for (auto& x : blk) x = from_f<T>(normal(rng));
  for (auto& x : lse) x = 3.f * normal(rng);
  for (auto& x : blse) x = 3.f * normal(rng);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s)
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t d = 0; d < D; ++d) out[b * o_sb + s * o_ss + h * o_sh + d] = normal(rng);
        // -inf rows: accumulator empty (every 5th), block empty (every 7th), both (35th).
        if (s % 5 == 0) lse[b * l_sb + h * l_sh + s * l_ss] = kNegInf;
        if (s % 7 == 0) blse[b * bl_sb + h * bl_sh + s * bl_ss] = kNegInf;
      }

  // Host reference in double.
  std::vector<double> ref_out(out.begin(), out.end()), ref_lse(lse.begin(), lse.end());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t li = b * l_sb + h * l_sh + s * l_ss;
        const double la = lse[li], lb = blse[b * bl_sb + h * bl_sh + s * bl_ss];
        const double m = std::max(la, lb);
        if (m == -INFINITY) continue;
        const double ea = std::exp(la - m), eb = std::exp(lb - m);
        for (int64_t d = 0; d < D; ++d) {
          const int64_t oi = b * o_sb + s * o_ss + h * o_sh + d;
          const double vb = to_d<T>(blk[k_off + b * k_sb + s * k_ss + h * k_sh + d]);
          ref_out[oi] = (ea * out[oi] + eb * vb) / (ea + eb);
        }
        ref_lse[li] = m + std::log(ea + eb);
      }

  float* d_out = to_device(out);
  float* d_lse = to_device(lse);
  float* d_blse = to_device(blse);
  T* d_blk = to_device(blk);
  xdit_ops::MergeAttentionStatesParams p{};
  p.out = d_out;
  p.lse = d_lse;
  p.block_out = d_blk + k_off;
  p.block_lse = d_blse;
  p.batch = B;
  p.seq = S;
  p.heads = H;
  p.head_dim = D;
  p.out_stride_b = o_sb;
  p.out_stride_s = o_ss;
  p.out_stride_h = o_sh;
  p.lse_stride_b = l_sb;
  p.lse_stride_h = l_sh;
  p.lse_stride_s = l_ss;
  p.blk_stride_b = k_sb;
  p.blk_stride_s = k_ss;
  p.blk_stride_h = k_sh;
  p.blse_stride_b = bl_sb;
  p.blse_stride_h = bl_sh;
  p.blse_stride_s = bl_ss;
  CHECK_CUDA(xdit_ops::merge_attention_states(p, DTypeOf<T>::kValue, impl, num_sms, nullptr));
  out = to_host(d_out, out.size());
  lse = to_host(d_lse, lse.size());
  CHECK_CUDA(cudaFree(d_out));
  CHECK_CUDA(cudaFree(d_lse));
  CHECK_CUDA(cudaFree(d_blse));
  CHECK_CUDA(cudaFree(d_blk));

  int64_t bad = 0;
  double worst = 0.0;
  for (size_t i = 0; i < out.size(); ++i) {
    const bool pad = (static_cast<int64_t>(i) % Dp) >= D;
    const double want = pad ? kPad : ref_out[i];
    const double err = std::fabs(out[i] - want);
    if (!(err <= 1e-5 + 1e-5 * std::fabs(want))) ++bad;  // also catches NaN
    if (err > worst) worst = err;
  }
  for (size_t i = 0; i < lse.size(); ++i) {
    const bool both_inf = ref_lse[i] == -INFINITY;
    const bool ok = both_inf ? lse[i] == -INFINITY
                             : std::fabs(lse[i] - ref_lse[i]) <=
                                   1e-5 + 1e-5 * std::fabs(ref_lse[i]);
    if (!ok) ++bad;
  }
  std::printf("%-8s %-6s B=%lld S=%lld H=%lld D=%lld: max |err| %.3g, %lld mismatches -> %s\n",
              name, impl == xdit_ops::MergeImpl::kScalar ? "scalar" : "auto", (long long)B,
              (long long)S, (long long)H, (long long)D, worst, (long long)bad,
              bad ? "FAIL" : "ok");
  return bad ? 1 : 0;
}

}  // namespace

int main() {
  const int num_sms = xdit_test::device_sm_count("test_merge_attention_states");
  if (num_sms == 0) return xdit_test::kSkipped;
  int failures = 0;
  const int64_t shapes[][4] = {{1, 4097, 24, 128}, {3, 77, 30, 72}, {2, 33, 5, 40}, {1, 1, 1, 1}};
  for (const auto impl : {xdit_ops::MergeImpl::kAuto, xdit_ops::MergeImpl::kScalar}) {
    for (const auto& s : shapes) {
      failures += run_case<float>(s[0], s[1], s[2], s[3], "fp32", num_sms, impl);
      failures += run_case<__half>(s[0], s[1], s[2], s[3], "fp16", num_sms, impl);
      failures += run_case<__nv_bfloat16>(s[0], s[1], s[2], s[3], "bf16", num_sms, impl);
    }
    // A grid smaller than the rows: the kernels' grid-stride loops must cover the rest.
    failures += run_case<float>(2, 300, 7, 64, "fp32/1sm", 1, impl);
    failures += run_case<__nv_bfloat16>(2, 300, 7, 80, "bf16/1sm", 1, impl);
  }
  return xdit_test::finish("test_merge_attention_states", failures);
}
