// Host interface of the warp-specialised sm_90a FP8 attention kernel (torch-free).
//
// Same inputs (Fp8AttentionSm90Params, the quantization pass's QuantizedQKV layouts) and the
// same numerics as fp8_attention_sm90 except for the key-tile width: INT8 Q K^T on wgmma (s32),
// per-row and per-key scales, online softmax over 128-key tiles in fp32 base 2 (the reference
// SCHEME with block_n = 128, as the Triton kernel's default at head dim 128),
// P = exp2(s - m + 8) cast to e4m3, P.V on wgmma (e4m3, P from registers, fp32 accumulator
// from zero per tile) added to an fp32 output accumulator (two-level accumulation).
//
// What differs is the schedule: a producer warp loads Q, K and V^T with TMA into a 4-stage
// shared-memory ring (mbarriers); two consumer warpgroups of 64 query rows each share every
// K/V tile and take turns on the tensor cores (named barriers), so that one's softmax runs
// while the other's GEMMs do. See fp8_attention_sm90_ws.cuh.
#pragma once

#include <cuda_runtime_api.h>

#include "xdit_ops/common.h"
#include "xdit_ops/fp8_attention_sm90.h"

namespace xdit_ops {

// The key-tile width of the online softmax: the emulation scheme's block_n this kernel computes.
constexpr int kFp8AttentionSm90WsBlockN = 128;

// head_dim_padded: 64 or 128; out_dtype: kFloat16 or kBFloat16. p.seq_k >= 1, p.seq_k_pad a
// multiple of 64 (cudaErrorInvalidValue otherwise) and q8/k8/vt8/k_scale 16-byte aligned (TMA
// and bulk copies; the torch launcher checks it).
//
// p.vt8 must hold V^T with its keys in the P.V key order (P.V takes P from registers; see
// pv_a_register in fp8_attention_sm90_ws.cuh): inside every 32-key block, column pi(k) holds
// key k, pi(8 jj + 2 l + b) = 4 l + 16 (jj >> 1) + 2 (jj & 1) + b (jj, l < 4, b < 2). The
// quantization pass writes it with vt_pv_order=True (xdit_ops.reference.fp8_attention); with
// the plain layout the kernel computes garbage, which it cannot detect.
cudaError_t fp8_attention_sm90_ws(const Fp8AttentionSm90Params& p, int batch,
                                  int head_dim_padded, DType out_dtype, cudaStream_t stream);

// The same kernel with one K scale per 128-key tile (the scheme with k_block = 128;
// XDIT_OPS_FP8_K_SCALE=tile, and auto's choice for sm90ws): p.k_scale must be equal within every 128-key tile (keys < seq_k;
// the quantization pass with k_block = 128 writes it so), the kernel reads each tile's first
// scale and folds it into the exponent's FMA (no per-score K-scale multiply). Numerics: the
// emulation of that scheme up to about one int32 dot-product unit of score in the exponent
// (see softmax_tile in fp8_attention_sm90_ws.cuh). Built for head_dim_padded 64 and 128
// (cudaErrorInvalidValue otherwise). At head_dim_padded 64 the softmax's row sums add the
// e4m3 P (from the tensor cores: kRowSumTC), not the fp32 P: the scheme with p8_row_sum.
//
// consumers: the consumer warpgroups per CTA (XDIT_OPS_FP8_SM90_CONSUMERS), 2 (64 query rows
// each, 128 per CTA, in ping-pong) or 3 (192 rows per CTA; built for head_dim_padded 64 only:
// their registers cannot hold Dp 128's accumulators). Each consumer computes its 64 rows the
// same way whatever the count: the outputs are the same bits. ping_pong: 2 consumers take
// turns (true); 3 issue their GEMMs freely (false: bfloat16 and float16 output, the faster
// order) or in round robin (true: bfloat16 output only, the A/B measurement). Other
// combinations: cudaErrorInvalidValue.
cudaError_t fp8_attention_sm90_ws_tile_k_scale(const Fp8AttentionSm90Params& p, int batch,
                                               int head_dim_padded, DType out_dtype,
                                               int consumers, bool ping_pong,
                                               cudaStream_t stream);

// Its three-consumer kernels (fp8_attention_sm90_ws_tile3_kernels.cu; p non-empty).
cudaError_t fp8_attention_sm90_ws_tile_k_scale_3wg(const Fp8AttentionSm90Params& p, int batch,
                                                   int head_dim_padded, DType out_dtype,
                                                   bool ping_pong, cudaStream_t stream);

}  // namespace xdit_ops
