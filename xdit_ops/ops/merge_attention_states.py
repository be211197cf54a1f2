"""``xdit_ops::merge_attention_states_``: fold a partial attention into an fp32 accumulator.

The combine step of ring attention: ``out``/``lse`` hold the attention over the keys seen so
far, ``block_out``/``block_lse`` the attention over one more block of keys; afterwards
``out``/``lse`` hold the attention over both. CUDA runs the native kernel
(``csrc/include/xdit_ops/merge_attention_states.cuh``); CPU runs the reference.
"""

from __future__ import annotations

import torch

from xdit_ops import _extension
from xdit_ops.ops._lib import lib
from xdit_ops.reference.attention import merge_attention_states_ref

OP = "merge_attention_states_"

lib.define(
    "merge_attention_states_(Tensor(a!) out, Tensor(b!) lse, Tensor block_out, "
    "Tensor block_lse) -> ()"
)


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


def register_cuda_fallback() -> None:
    """Without the native module, CUDA tensors take the reference (still one kernel per key)."""
    if not _extension.has("_C"):
        lib.impl(OP, _merge_cpu, "CUDA")


@torch.library.register_fake("xdit_ops::merge_attention_states_")
def _merge_fake(out, lse, block_out, block_lse):
    check_inputs(out, lse, block_out, block_lse)


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
    torch.ops.xdit_ops.merge_attention_states_.default(out, lse, block_out, block_lse)
