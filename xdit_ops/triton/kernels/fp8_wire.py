"""Triton kernel of usp_attention's FP8 wire (``XDIT_OPS_USP_FP8_WIRE=1``; ``@triton.jit``
only, the launcher is ``quantize_tokens_triton`` in ``xdit_ops/triton/fp8_attention.py``).

``wire_quantize_kv_kernel`` quantizes K and V of some tokens given the K mean and V amax of
the whole sequence (reduced across ranks by the caller): the operations of
``quantize_kv_kernel`` (fp8_attention's kernels, same helpers, same fp32 order), except that
the statistics come in reduced and every token of the input is quantized (no valid-key
count: the receiver drops padded keys); the outputs are padded to whole tiles (the launcher
returns views of the S tokens). Q needs no kernel of its own: ``quantize_q_kernel``
takes the K mean as the sum of one chunk of two keys.
"""

from __future__ import annotations

import triton
import triton.language as tl

from xdit_ops.triton.kernels.fp8_attention import (
    _div,
    _int8_rows,
    _rotate,
    _round_k_scale,
    _this_head,
)


@triton.jit
def wire_quantize_kv_kernel(
    K, V, HAD, KMEAN, VAMAX, K8, KSCALE, VT8,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    H, S, S_pad,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_S: tl.constexpr, UPCAST: tl.constexpr,
):
    """Grid (P, B * H): program p quantizes the token tiles p, p + P, ... of one (batch, head).

    KMEAN, VAMAX [B * H, DP] fp32 (VAMAX without zeros). K8 [B, H, S_pad, DP] int8, KSCALE
    [B, H, S_pad] fp32 (22 significant bits), VT8 [B, H, DP, S_pad] e4m3; S_pad a multiple of
    BLOCK_S: every store is a whole tile, unmasked (masked stores along S, whose stride is not
    a multiple of 16 bytes, took 214 registers a thread instead of ~100 at head dim 128).
    Rows past S hold codes of zero inputs (the caller slices them off).
    """
    pid = tl.program_id(0)
    bh, b, h = _this_head(H)
    offs_d = tl.arange(0, DP)
    offs_s = tl.arange(0, BLOCK_S)
    d_ok = offs_d < D
    had = tl.load(HAD + offs_d[:, None] * DP + offs_d[None, :])
    k_mean = tl.load(KMEAN + bh * DP + offs_d)
    v_mul = _div(448.0, tl.load(VAMAX + bh * DP + offs_d))
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    k8_base = K8 + bh * S_pad * DP
    vt_base = VT8 + bh * DP * S_pad
    for t in tl.range(pid, tl.cdiv(S_pad, BLOCK_S), tl.num_programs(0)):
        rows = t * BLOCK_S + offs_s
        ok = rows < S
        ld_ok = ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + rows[:, None] * stride_ks + offs_d[None, :], mask=ld_ok, other=0.0)
        v = tl.load(v_base + rows[:, None] * stride_vs + offs_d[None, :], mask=ld_ok, other=0.0)
        vq = v.to(tl.float32) * v_mul[None, :]
        vq = tl.minimum(tl.maximum(vq, -448.0), 448.0)
        vq = vq.to(tl.float8e4nv, fp_downcast_rounding="rtne")
        tl.store(vt_base + offs_d[None, :] * S_pad + rows[:, None], vq)
        kr = _rotate(k, had, UPCAST) - k_mean[None, :]
        codes, amax = _int8_rows(kr)
        tl.store(k8_base + rows[:, None] * DP + offs_d[None, :], codes)
        tl.store(KSCALE + bh * S_pad + rows, _round_k_scale(_div(amax, 127.0)))


__all__ = ["triton", "wire_quantize_kv_kernel"]
