"""``xdit_ops::merge_attention_states_``: fold a partial attention into an fp32 accumulator.

The combine step of ring attention: ``out``/``lse`` hold the attention over the keys seen so
far, ``block_out``/``block_lse`` the attention over one more block of keys; afterwards
``out``/``lse`` hold the attention over both. ``xdit_ops::merge_attention_partials`` merges N
partials in one pass. CUDA runs the native kernels
(``csrc/include/xdit_ops/merge_attention_states.cuh``); CPU runs the reference.

On CUDA each op has two kernels with bit-identical results: a vector kernel (16-byte accesses,
taken where head_dim and every address allow them, e.g. bf16 partials with head_dim a multiple
of 8 at 16-byte aligned addresses) and a scalar one (one warp per row: any head_dim, stride or
alignment). ``XDIT_OPS_MERGE_IMPL=scalar`` forces the scalar kernels (the baseline of
``benchmarks/bench_merge.py``); the default ``auto`` picks per call. The launcher reads the
variable on every call.
"""

from __future__ import annotations

import os

import torch

from xdit_ops import _extension
from xdit_ops.ops._lib import lib
from xdit_ops.reference.attention import merge_attention_states_ref

OP = "merge_attention_states_"

lib.define(
    "merge_attention_states_(Tensor(a!) out, Tensor(b!) lse, Tensor block_out, "
    "Tensor block_lse) -> ()"
)


lib.define(
    "merge_attention_partials(Tensor[] outs, Tensor[] lses, ScalarType? out_dtype=None) "
    "-> (Tensor, Tensor)"
)
MAX_PARTIALS = 16


def check_inputs(out, lse, block_out, block_lse) -> None:
    if out.dim() != 4 or block_out.dim() != 4:
        raise ValueError(
            f"{OP}: out and block_out must be [B, S, H, D], got {tuple(out.shape)} and "
            f"{tuple(block_out.shape)}"
        )
    if out.shape != block_out.shape:
        raise ValueError(
            f"{OP}: out {tuple(out.shape)} and block_out {tuple(block_out.shape)} differ"
        )
    B, S, H, _ = out.shape
    if tuple(lse.shape) != (B, H, S) or tuple(block_lse.shape) != (B, H, S):
        raise ValueError(
            f"{OP}: lse and block_lse must be [B, H, S] = {(B, H, S)}, got {tuple(lse.shape)} "
            f"and {tuple(block_lse.shape)}"
        )
    if out.dtype != torch.float32 or lse.dtype != torch.float32 or block_lse.dtype != torch.float32:
        raise TypeError(
            f"{OP}: out, lse and block_lse must be float32, got {out.dtype}, {lse.dtype}, "
            f"{block_lse.dtype}"
        )


def _merge_cpu(out, lse, block_out, block_lse):
    check_inputs(out, lse, block_out, block_lse)
    merge_attention_states_ref(out, lse, block_out, block_lse)


lib.impl(OP, _merge_cpu, "CPU")


def check_partials(outs, lses) -> None:
    op = "merge_attention_partials"
    if not outs or len(outs) != len(lses):
        raise ValueError(f"{op}: got {len(outs)} outputs and {len(lses)} LSEs "
                         "(need the same number, at least 1)")
    if len(outs) > MAX_PARTIALS:
        raise ValueError(f"{op}: at most {MAX_PARTIALS} partials, got {len(outs)}")
    o0 = outs[0]
    if o0.dim() != 4:
        raise ValueError(f"{op}: outputs must be [B, S, H, D], got {tuple(o0.shape)}")
    B, S, H, _ = o0.shape
    for i, (o, lse) in enumerate(zip(outs, lses, strict=True)):
        if o.shape != o0.shape or o.dtype != o0.dtype:
            raise ValueError(f"{op}: partial {i} is {tuple(o.shape)} {o.dtype}, partial 0 is "
                             f"{tuple(o0.shape)} {o0.dtype}")
        if tuple(lse.shape) != (B, H, S) or lse.dtype != torch.float32:
            raise ValueError(f"{op}: lse {i} must be float32 [B, H, S] = {(B, H, S)}, got "
                             f"{tuple(lse.shape)} {lse.dtype}")


def _partials_cpu(outs, lses, out_dtype=None):
    check_partials(outs, lses)
    acc = outs[0].float().clone()
    lse = lses[0].clone()
    for o, block_lse in zip(outs[1:], lses[1:], strict=True):
        merge_attention_states_ref(acc, lse, o, block_lse)
    # Rows no partial saw a key for hold undefined values: define them as 0.
    acc = torch.where(torch.isinf(lse).transpose(1, 2).unsqueeze(-1), 0.0, acc)
    return acc.to(out_dtype or outs[0].dtype).contiguous(), lse.contiguous()


lib.impl("merge_attention_partials", _partials_cpu, "CPU")


@torch.library.register_fake("xdit_ops::merge_attention_partials")
def _partials_fake(outs, lses, out_dtype=None):
    check_partials(outs, lses)
    B, S, H, D = outs[0].shape
    return (outs[0].new_empty((B, S, H, D), dtype=out_dtype or outs[0].dtype),
            lses[0].new_empty((B, H, S)))


def register_cuda_fallback() -> None:
    """Without the native module, CUDA tensors take the reference (still one kernel per key)."""
    if not _extension.has("_C"):
        lib.impl(OP, _merge_cpu, "CUDA")
        lib.impl("merge_attention_partials", _partials_cpu, "CUDA")


# The public functions check in Python before a native call what the kernel's launcher checks,
# with the reference's exceptions: on the GPU machine a failing TORCH_CHECK in a launcher killed
# the process with SIGSEGV instead of raising (benchmarks/results/2026-11-26-run31). The ring
# inside usp_attention calls the ops with tensors it made itself.
MERGE_IMPLS = ("auto", "scalar")


def _check_merge_impl(op: str) -> None:
    impl = os.environ.get("XDIT_OPS_MERGE_IMPL", "auto") or "auto"
    if impl not in MERGE_IMPLS:
        raise ValueError(f"{op}: XDIT_OPS_MERGE_IMPL={impl} is not auto or scalar")


def _check_native_inputs(out, lse, block_out, block_lse) -> None:
    check_inputs(out, lse, block_out, block_lse)
    _check_merge_impl(OP)
    devices = {t.device for t in (out, lse, block_out, block_lse)}
    if len(devices) > 1:
        raise ValueError(f"{OP}: tensors are on different devices: {sorted(map(str, devices))}")
    if out.stride(-1) != 1 or block_out.stride(-1) != 1:
        raise ValueError(f"{OP}: head_dim must be the contiguous dimension of out and block_out, "
                         f"got strides {tuple(out.stride())} and {tuple(block_out.stride())}")


def _check_native_partials(outs, lses) -> None:
    op = "merge_attention_partials"
    check_partials(outs, lses)
    _check_merge_impl(op)
    for i, (o, lse) in enumerate(zip(outs, lses, strict=True)):
        if o.device != outs[0].device or lse.device != outs[0].device:
            raise ValueError(f"{op}: partial {i} is not on {outs[0].device}")
        if not (o.is_contiguous() and lse.is_contiguous()):
            raise ValueError(f"{op}: partial {i} and its lse must be contiguous")


@torch.library.register_fake("xdit_ops::merge_attention_states_")
def _merge_fake(out, lse, block_out, block_lse):
    check_inputs(out, lse, block_out, block_lse)


def merge_attention_partials(
    outs: list[torch.Tensor], lses: list[torch.Tensor], out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine N partial attentions (each over a disjoint set of keys) in one pass.

    Parameters
    ----------
    outs : N (1..16) contiguous [B, S, H, D] tensors of one float dtype, each normalised by its
        own softmax denominator.
    lses : their natural-log LSEs, N contiguous float32 [B, H, S]; -inf where a partial saw no key.
    out_dtype : dtype of the result (default: the partials' dtype).

    Returns
    -------
    out : [B, S, H, D] in ``out_dtype``; rows that no partial saw a key for are 0.
    lse : [B, H, S] float32, -inf for those rows.
    """
    if outs and outs[0].device.type != "cpu":
        _check_native_partials(outs, lses)
    return torch.ops.xdit_ops.merge_attention_partials.default(list(outs), list(lses), out_dtype)


def merge_attention_states_(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> None:
    """Merge a partial attention into an accumulator, in place.

    Parameters
    ----------
    out : [B, S, H, D] float32, updated in place (head_dim contiguous).
    lse : [B, H, S] float32 natural-log LSE of ``out``, updated in place; -inf for "no keys yet".
    block_out : [B, S, H, D] float32/float16/bfloat16, the partial attention to fold in.
    block_lse : [B, H, S] float32, its LSE.
    """
    if out.device.type != "cpu":
        _check_native_inputs(out, lse, block_out, block_lse)
    torch.ops.xdit_ops.merge_attention_states_.default(out, lse, block_out, block_lse)
