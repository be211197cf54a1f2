"""Triton launchers of FP8 attention: the quantization pass and the attention kernel.

Two ``torch.library.triton_op`` ops (visible to torch.compile down to the kernels):

* ``xdit_ops::fp8_quantize_triton(q, k, v, had, scale)`` -> the tensors of
  :class:`xdit_ops.reference.fp8_attention.QuantizedQKV`, same layouts.
* ``xdit_ops::fp8_attention_fwd_triton(q8, q_scale, k8, k_scale, vt8, v_scale, lse_corr,
  seqlen_k, head_dim, out_dtype_like, return_lse)`` -> (out [B, Sq, H, D], lse [B, H, Sq]).

:func:`fp8_attention_triton` chains them (the CUDA kernel of ``xdit_ops::fp8_attention``).
Under ``TRITON_INTERPRET=1`` the same launch code runs the kernels in Triton's CPU
interpreter (:func:`quantize_qkv_triton`, :func:`attention_quantized_triton` with CPU tensors).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
from torch.library import triton_op, wrap_triton

from xdit_ops.reference.fp8_attention import (
    FP8,
    LOG2E,
    SCHEME,
    QuantizedQKV,
    hadamard_matrix,
    pad_to,
    padded_head_dim,
)
from xdit_ops.triton.kernels import fp8_attention as kernels

BLOCK_N = SCHEME.block_n  # the numerics depend on it: the emulation uses the same tile
QUANT_BLOCK_S = 64
STATS_BLOCK_S = 64
STATS_TARGET_CHUNKS = 32
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Attention tile configs tried by the autotuner (BLOCK_N is fixed by the numerics). Read off
# ptxas -v for sm_90a (Triton 3.8): BLOCK_N = 128 spills 0.7-1 KB per thread at head dim 128,
# BLOCK_N = 64 with BLOCK_M = 128 over 8 warps spills 4 bytes (128) and none (64).
_ATTN_CONFIGS = [
    triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=3),
]
_attn_kernel = (
    kernels.attn_fwd_kernel if INTERPRET
    else triton.autotune(_ATTN_CONFIGS, key=["DP", "RETURN_LSE"])(kernels.attn_fwd_kernel)
)


def _launch(kernel, grid, *args, **kwargs) -> None:
    # wrap_triton makes the launch traceable; the interpreter's kernels are not JITFunctions.
    if INTERPRET:
        kernel[grid](*args, **kwargs)
    else:
        wrap_triton(kernel)[grid](*args, **kwargs)


def _quantize(q, k, v, had, scale):
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    DP = had.shape[0]
    Sk_pad = pad_to(max(Sk, 1), BLOCK_N)
    dev = q.device
    tokens_per_chunk = max(STATS_BLOCK_S,
                           pad_to(triton.cdiv(max(Sk, 1), STATS_TARGET_CHUNKS), STATS_BLOCK_S))
    num_chunks = triton.cdiv(max(Sk, 1), tokens_per_chunk)
    # ptxas -v (sm_90a): 4 warps need ~254 registers a thread at head dim 128, 8 warps 128-158.
    quant_warps = 8 if DP == 128 else 4
    ksum = torch.empty(B * H, num_chunks, DP, device=dev, dtype=torch.float32)
    vmax = torch.empty(B * H, num_chunks, DP, device=dev, dtype=torch.float32)
    _launch(kernels.kv_stats_kernel, (B * H, num_chunks),
            k, v, had, ksum, vmax,
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            H, Sk, tokens_per_chunk,
            D=D, DP=DP, BLOCK_S=STATS_BLOCK_S, UPCAST=INTERPRET, num_warps=quant_warps)
    q8 = torch.empty(B, H, Sq, DP, device=dev, dtype=torch.int8)
    q_scale = torch.empty(B, H, Sq, device=dev, dtype=torch.float32)
    lse_corr = torch.empty(B, H, Sq, device=dev, dtype=torch.float32)
    k8 = torch.empty(B, H, Sk_pad, DP, device=dev, dtype=torch.int8)
    k_scale = torch.empty(B, H, Sk_pad, device=dev, dtype=torch.float32)
    vt8 = torch.empty(B, H, DP, Sk_pad, device=dev, dtype=FP8)
    v_scale = torch.empty(B, H, DP, device=dev, dtype=torch.float32)
    grid = (triton.cdiv(max(Sq, Sk_pad), QUANT_BLOCK_S), B * H)
    _launch(kernels.quantize_kernel, grid,
            q, k, v, had, ksum, vmax,
            q8, q_scale, k8, k_scale, vt8, v_scale, lse_corr,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            H, Sq, Sk, Sk_pad, num_chunks,
            scale * LOG2E / DP, scale / DP,
            D=D, DP=DP, BLOCK_S=QUANT_BLOCK_S,
            NUM_CHUNKS_P2=triton.next_power_of_2(num_chunks), UPCAST=INTERPRET,
            num_warps=quant_warps)
    return q8, q_scale, k8, k_scale, vt8, v_scale, lse_corr


def _attention(q8, q_scale, k8, k_scale, vt8, v_scale, lse_corr, seqlen_k, head_dim,
               out_dtype_like, return_lse):
    B, H, Sq, DP = q8.shape
    Sk_pad = k8.shape[2]
    out = torch.empty(B, Sq, H, head_dim, device=q8.device, dtype=out_dtype_like.dtype)
    lse = torch.empty(B, H, Sq if return_lse else 0, device=q8.device, dtype=torch.float32)
    if INTERPRET:
        grid = (triton.cdiv(Sq, 64), B * H)
        extra = {"BLOCK_M": 64, "num_warps": 4}
    else:
        def grid(meta):
            return (triton.cdiv(Sq, meta["BLOCK_M"]), B * H)
        extra = {}
    # Without the LSE the kernel never touches its pointer; pass a live buffer all the same
    # (Triton's launcher validates every pointer, and an empty tensor's may be null).
    _launch(_attn_kernel, grid,
            q8, q_scale, k8, k_scale, vt8, v_scale, lse_corr, out, lse if return_lse else q_scale,
            out.stride(0), out.stride(1), out.stride(2),
            H, Sq, seqlen_k, Sk_pad,
            D=head_dim, DP=DP, BLOCK_N=BLOCK_N, RETURN_LSE=return_lse, **extra)
    return out, lse


@triton_op("xdit_ops::fp8_quantize_triton", mutates_args=())
def fp8_quantize_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, had: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """The quantization pass (see :class:`QuantizedQKV` for the outputs' layouts)."""
    return _quantize(q, k, v, had, scale)


@triton_op("xdit_ops::fp8_attention_fwd_triton", mutates_args=())
def fp8_attention_fwd_triton(
    q8: torch.Tensor, q_scale: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor,
    vt8: torch.Tensor, v_scale: torch.Tensor, lse_corr: torch.Tensor, seqlen_k: int,
    head_dim: int, out_dtype_like: torch.Tensor, return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention kernel on quantized inputs; out [B, Sq, H, head_dim] in
    ``out_dtype_like.dtype``, lse [B, H, Sq] fp32 (empty [B, H, 0] unless ``return_lse``)."""
    return _attention(q8, q_scale, k8, k_scale, vt8, v_scale, lse_corr, seqlen_k, head_dim,
                      out_dtype_like, return_lse)


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device, not the tensors' (seen on 4 H100s: with the
    current device cuda:0, tensors on cuda:1..3 failed with "Pointer argument ... cannot be
    accessed"). Every launch goes through the two public wrappers below, which enter this."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


_HAD: dict[tuple, torch.Tensor] = {}


def _hadamard(dp: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (dp, dtype, device)
    if key not in _HAD:
        _HAD[key] = hadamard_matrix(dp).to(device=device, dtype=dtype).contiguous()
    return _HAD[key]


def quantize_qkv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: float | None = None) -> QuantizedQKV:
    """The quantization pass in Triton, returning :class:`QuantizedQKV` (BSHD inputs)."""
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    had = _hadamard(padded_head_dim(D), q.dtype, q.device)
    fn = _quantize if INTERPRET else fp8_quantize_triton
    with _on_device(q.device):
        t = fn(q, k, v, had, scale)
    return QuantizedQKV(*t, seqlen_k=k.shape[1], head_dim=D)


def attention_quantized_triton(qq: QuantizedQKV, out_dtype: torch.dtype,
                               return_lse: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention kernel in Triton on :class:`QuantizedQKV`: (out BSHD, lse [B, H, Sq])."""
    like = qq.q_scale.new_empty(0, dtype=out_dtype)
    fn = _attention if INTERPRET else fp8_attention_fwd_triton
    with _on_device(qq.q.device):
        return fn(qq.q, qq.q_scale, qq.k, qq.k_scale, qq.vt, qq.v_scale, qq.lse_corr,
                  qq.seqlen_k, qq.head_dim, like, return_lse)


def fp8_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         scale: float | None, return_lse: bool
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantization pass + attention kernel: out [B, Sq, H, D] in q.dtype, lse [B, H, Sq]."""
    return attention_quantized_triton(quantize_qkv_triton(q, k, v, scale), q.dtype, return_lse)
