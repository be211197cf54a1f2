"""``xdit_ops::attention``: local (single-device) attention on BSHD tensors with its LSE.

Backends
--------
``cudnn``      torch's cuDNN fused attention (``aten._scaled_dot_product_cudnn_attention``)
``flash``      torch's FlashAttention-2 (``aten._scaled_dot_product_flash_attention``)
``efficient``  torch's memory-efficient kernel (``aten._scaled_dot_product_efficient_attention``)
``math``       the fp32 reference (:func:`xdit_ops.reference.attention_ref`); the CPU kernel
``fp8``        INT8 Q K^T + FP8 P.V attention (:func:`xdit_ops.fp8_attention`); lossy, so
               ``auto`` never picks it
``auto``       the fastest usable one for the device, dtype and head dim (:func:`select_backend`)

The aten kernels take BHSD views of the BSHD inputs (a transpose, no copy) and write their
output in the inputs' memory order, so the BSHD result needs no copy either.
"""

from __future__ import annotations

import functools
import math

import torch

from xdit_ops.ops._lib import lib
from xdit_ops.reference.attention import attention_ref

OP = "attention"
BACKENDS = ("auto", "cudnn", "flash", "efficient", "math", "fp8")

lib.define(
    "attention(Tensor q, Tensor k, Tensor v, float? scale=None, str backend='auto', "
    "bool return_lse=False) -> (Tensor, Tensor)"
)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, op: str = OP) -> None:
    """Shape/dtype/device validation shared by every attention entry point."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{op}: {name} must be 4-D [batch, seq, heads, head_dim] (BSHD), "
                f"got shape {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be floating point, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: query/key/value dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"{op}: query/key/value are on different devices: {q.device}, {k.device}, {v.device}"
        )
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(
            f"{op}: batch sizes differ: query {q.shape[0]}, key {k.shape[0]}, value {v.shape[0]}"
        )
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"{op}: key has {k.shape[1]} tokens but value has {v.shape[1]}")
    if not (q.shape[2] == k.shape[2] == v.shape[2]):
        raise ValueError(
            f"{op}: head counts differ: query {q.shape[2]}, key {k.shape[2]}, value {v.shape[2]} "
            "(grouped-query attention is not supported; repeat K/V heads first)"
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"{op}: query head_dim {q.shape[3]} != key head_dim {k.shape[3]}")
    if q.shape[3] == 0:
        raise ValueError(f"{op}: head_dim must be positive, got 0")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"{op}: head_dim must be the contiguous (last, stride-1) dimension")


@functools.cache
def _device_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def backend_unusable_reason(
    backend: str, device: torch.device, dtype: torch.dtype, head_dim: int
) -> str | None:
    """Why ``backend`` cannot run on (device, dtype, head_dim); None when it can."""
    if backend == "math":
        return None
    if backend == "fp8":
        from xdit_ops.ops.fp8_attention import unusable_reason as fp8_unusable_reason

        return fp8_unusable_reason(device, dtype, head_dim)
    if device.type != "cuda":
        return f"{backend} needs a CUDA tensor, got device {device}"
    if torch.version.hip is not None and backend == "cudnn":
        return "cuDNN attention is not available on ROCm"
    half = dtype in (torch.float16, torch.bfloat16)
    if backend == "cudnn":
        if not half:
            return f"cuDNN attention takes float16/bfloat16, got {dtype}"
        if not torch.backends.cudnn.is_available() or torch.backends.cudnn.version() < 90000:
            return "cuDNN >= 9 is not available"
        if head_dim % 8 != 0 or head_dim > 256:
            return f"cuDNN attention needs head_dim % 8 == 0 and <= 256, got {head_dim}"
        if _device_capability(device.index or 0) < (8, 0):
            return "cuDNN attention needs sm_80 or newer"
        return None
    if backend == "flash":
        if not half:
            return f"flash attention takes float16/bfloat16, got {dtype}"
        if head_dim % 8 != 0 or head_dim > 256:
            return f"flash attention needs head_dim % 8 == 0 and <= 256, got {head_dim}"
        if _device_capability(device.index or 0) < (8, 0):
            return "flash attention needs sm_80 or newer"
        return None
    if backend == "efficient":
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"efficient attention takes float16/bfloat16/float32, got {dtype}"
        if head_dim % 8 != 0 and dtype != torch.float32:
            return f"efficient attention needs head_dim % 8 == 0 in half precision, got {head_dim}"
        return None
    return f"unknown backend {backend!r}; choose one of {BACKENDS}"


def select_backend(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The backend ``auto`` resolves to.

    Measured on H100 (GPU.md): cuDNN ~600-650 TFLOPS at head dim 128 and ~390 at 64, torch's
    flash ~350; so cuDNN first on sm_90, flash before it on older cards, then the
    memory-efficient kernel (fp32, odd head dims), then the reference.
    """
    if device.type != "cuda":
        return "math"
    order = ("cudnn", "flash", "efficient")
    if _device_capability(device.index or 0) < (9, 0):
        order = ("flash", "cudnn", "efficient")
    for b in order:
        if backend_unusable_reason(b, device, dtype, head_dim) is None:
            return b
    return "math"


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The backend that runs ``backend`` for ``q``; a ValueError naming the reason when it
    cannot run. Not cached: ``fp8``'s usability follows ``XDIT_OPS_FP8_IMPL`` at each call
    (``usp_attention`` resolves once per plan instead)."""
    if backend not in BACKENDS:
        raise ValueError(f"{OP}: unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return select_backend(q.device, q.dtype, q.shape[-1])
    why = backend_unusable_reason(backend, q.device, q.dtype, q.shape[-1])
    if why is not None:
        raise ValueError(f"{OP}: backend {backend!r} cannot run here: {why}")
    return backend


def _empty_lse(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty((0,), dtype=torch.float32)


def _attention_cuda(q, k, v, scale=None, backend="auto", return_lse=False):
    check_inputs(q, k, v)
    return attention_cuda_resolved(q, k, v, scale, resolve_backend(backend, q), return_lse)


def attention_cuda_resolved(q, k, v, scale, chosen: str, return_lse: bool):
    """The CUDA kernel of the op for a backend already resolved by ``resolve_backend`` and inputs
    already checked: what ``usp_attention`` calls per block, without another trip through the
    dispatcher and the checks."""
    if chosen == "fp8":
        return _attention_fp8(q, k, v, scale, return_lse)
    B, Sq, H, _ = q.shape
    if chosen == "math" or Sq == 0 or k.shape[1] == 0:
        return _attention_math(q, k, v, scale, return_lse)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if chosen == "cudnn":
        res = torch.ops.aten._scaled_dot_product_cudnn_attention.default(
            qt, kt, vt, None, return_lse, 0.0, False, False, scale=scale
        )
        out, lse = res[0], res[1]
    elif chosen == "flash":
        res = torch.ops.aten._scaled_dot_product_flash_attention.default(
            qt, kt, vt, 0.0, False, False, scale=scale
        )
        out, lse = res[0], res[1]
    else:  # efficient
        res = torch.ops.aten._scaled_dot_product_efficient_attention.default(
            qt, kt, vt, None, return_lse, 0.0, False, scale=scale
        )
        out, lse = res[0], res[1]
    out = out.transpose(1, 2).contiguous()  # a view of BSHD memory: no copy
    if not return_lse:
        return out, _empty_lse(q)
    # cuDNN may return [B, H, S, 1]; the efficient kernel pads S to a multiple of 32.
    lse = lse.reshape(B, H, -1)[:, :, :Sq].float().contiguous()
    return out, lse


def _attention_math(q, k, v, scale, return_lse):
    check_inputs(q, k, v)
    out, lse = attention_ref(q, k, v, scale=scale)
    if not return_lse:
        return out, _empty_lse(q)
    return out, lse.float()


def _attention_fp8(q, k, v, scale, return_lse):
    out, lse = torch.ops.xdit_ops.fp8_attention.default(q, k, v, scale, return_lse)
    return out, lse


def _attention_cpu(q, k, v, scale=None, backend="auto", return_lse=False):
    check_inputs(q, k, v)
    if backend not in ("auto", "math"):
        resolve_backend(backend, q)  # raises with the reason
    if backend == "fp8":
        return _attention_fp8(q, k, v, scale, return_lse)
    return _attention_math(q, k, v, scale, return_lse)


lib.impl("attention", _attention_cpu, "CPU")
lib.impl("attention", _attention_cuda, "CUDA")


@torch.library.register_fake("xdit_ops::attention")
def _attention_fake(q, k, v, scale=None, backend="auto", return_lse=False):
    check_inputs(q, k, v)
    B, Sq, H, _ = q.shape
    out = q.new_empty((B, Sq, H, v.shape[-1]))
    lse = q.new_empty((B, H, Sq), dtype=torch.float32) if return_lse else _empty_lse(q)
    return out, lse


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention on one device, BSHD in and out.

    Parameters
    ----------
    q : [B, Sq, H, D] float16/bfloat16/float32, head_dim contiguous.
    k, v : [B, Sk, H, D] and [B, Sk, H, Dv], same dtype and device as ``q``.
    scale : softmax scale; default ``1/sqrt(D)``.
    backend : ``auto`` | ``cudnn`` | ``flash`` | ``efficient`` | ``math`` (see module doc).
    return_lse : also return the natural-log LSE of each query row.

    Returns
    -------
    out : [B, Sq, H, Dv] in ``q.dtype``, contiguous.
    lse : [B, H, Sq] float32, only when ``return_lse``.
    """
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"{OP}: scale must be a finite number, got {scale!r}")
    if backend not in BACKENDS:
        raise ValueError(f"{OP}: unknown backend {backend!r}; choose one of {BACKENDS}")
    out, lse = torch.ops.xdit_ops.attention.default(
        q, k, v, None if scale is None else float(scale), backend, return_lse
    )
    return (out, lse) if return_lse else out
