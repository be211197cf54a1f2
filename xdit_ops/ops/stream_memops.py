"""Stream-ordered flags and copy-engine copies (CUDA only; internal to ``usp_attention``).

* ``xdit_ops::stream_memops(Tensor anchor, int[] program)``: ``(kind, address, value)``
  triples run in order on the current stream of ``anchor``'s device: kind 0 makes the stream
  wait until the 32-bit word at ``address`` equals ``value`` (``cuStreamWaitValue32``), kind 1
  writes ``value`` there after a memory fence (``cuStreamWriteValue32``), so every earlier write
  of the stream, copies included, is visible to whoever sees the value.
* ``xdit_ops::copy2d(Tensor anchor, int[] descs)``: ``(dst, dst_pitch, src, src_pitch, width,
  height)`` sextuples in bytes, one ``cudaMemcpy2DAsync`` each (the copy engines; either side
  may be a peer's memory mapped into this process).

* ``xdit_ops::stream_memops_t(Tensor anchor, Tensor program, bool batched, int stream)`` and
  ``xdit_ops::copy2d_t(Tensor anchor, Tensor descs, Tensor which, int[] bases, int stream)``:
  the same with the program / descriptors as a 1-D CPU int64 tensor made once per plan
  (:func:`program_tensor`, :func:`copy2d_template`: no list of Python ints converted per call),
  queued on ``stream`` (a ``cudaStream_t`` as an int, ``Stream.cuda_stream``; -1: the current
  stream), and for ``copy2d_t`` sources rebased in C++: ``which`` empty, the descriptors are
  absolute; else descriptor ``i``'s source is ``bases[which[i]]`` plus its offset.
  ``copy2d_t`` also runs on host memory (a CPU anchor; each row a ``memmove``), which is how
  the CPU tests check the rebase.

Neither takes a multiprocessor, which is the point: the Ulysses overlap path
(``XDIT_OPS_USP_ULYSSES=overlap``) signals and moves data while a full-GPU attention runs, and a
signalling kernel queued behind it would wait for a free SM. Addresses are raw; the helpers
below derive them from tensors and check them here, in Python, because a failing C++ check
takes the process down on the GPU machines (run 31).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

import torch

from ._lib import lib

WAIT, WRITE = 0, 1
BATCH_ENV = "XDIT_OPS_MEMOPS_BATCH"

lib.define("stream_memops(Tensor anchor, int[] program, bool batched=True) -> ()")
lib.define("copy2d(Tensor anchor, int[] descs) -> ()")
lib.define("stream_memops_t(Tensor anchor, Tensor program, bool batched, int stream) -> ()")
lib.define("copy2d_t(Tensor anchor, Tensor descs, Tensor which, int[] bases, int stream) -> ()")


def word_address(t: torch.Tensor, index: int) -> int:
    """The device address of int32 element ``index`` of the 1-D CUDA tensor ``t``."""
    if t.dtype != torch.int32 or t.dim() != 1 or not t.is_cuda or not 0 <= index < t.numel():
        raise ValueError(f"stream_memops: flag word {index} of a {t.dtype} tensor of shape "
                         f"{tuple(t.shape)} on {t.device} (need a 1-D int32 CUDA tensor)")
    return t.data_ptr() + 4 * index


def check_memops(program: Sequence[int]) -> None:
    """Raise unless ``program`` is flat ``(kind, address, value)`` triples of aligned words."""
    if len(program) % 3:
        raise ValueError(f"stream_memops: the program has {len(program)} integers, not triples")
    for i in range(0, len(program), 3):
        if program[i] not in (WAIT, WRITE) or program[i + 1] <= 0 or program[i + 1] % 4:
            raise ValueError(f"stream_memops: step {i // 3} = {tuple(program[i:i + 3])} is not a "
                             "wait (0) or write (1) of an aligned word")


def run_memops(anchor: torch.Tensor, program: Sequence[int], checked: bool = True) -> None:
    """Queue ``program`` (flat ``(kind, address, value)`` triples) on the current stream, as
    ``cuStreamBatchMemOp`` batches (``XDIT_OPS_MEMOPS_BATCH=0``: one driver call a triple).
    ``checked=False``: ``program`` passed :func:`check_memops` before (a precomputed one)."""
    if checked:
        check_memops(program)
    if program:
        torch.ops.xdit_ops.stream_memops.default(anchor, list(program),
                                                 os.environ.get(BATCH_ENV, "1") != "0")


def rows2d(dst: torch.Tensor, src: torch.Tensor) -> list[int]:
    """``copy2d`` descriptors that copy ``src`` into ``dst``: tensors of one shape and dtype
    ``[..., rows, heads, D]`` whose ``(heads, D)`` are dense (each row one contiguous span, rows
    at a fixed pitch; the stride of a dim of size 1 does not matter: attention's output of one
    head, a transposed ``[B, 1, rows, D]``, has its batch pitch there); one descriptor per index
    of the leading dims."""
    if dst.shape != src.shape or dst.dtype != src.dtype:
        raise ValueError(f"copy2d: dst {tuple(dst.shape)} {dst.dtype} and src {tuple(src.shape)} "
                         f"{src.dtype} must match")
    if dst.dim() < 3:
        raise ValueError("copy2d: tensors must be [..., rows, heads, D]")
    for name, t in (("dst", dst), ("src", src)):
        if (t.shape[-1] > 1 and t.stride(-1) != 1) or \
                (t.shape[-2] > 1 and t.stride(-2) != t.shape[-1]):
            raise ValueError(f"copy2d: {name} of shape {tuple(t.shape)} and strides {t.stride()} "
                             "has no dense (heads, D) rows")
    es = dst.element_size()
    width = dst.shape[-2] * dst.shape[-1] * es
    rows = dst.shape[-3]
    lead = dst.shape[:-3]
    out: list[int] = []
    for idx in itertools.product(*(range(n) for n in lead)):
        do = sum(i * st for i, st in zip(idx, dst.stride(), strict=False)) * es
        so = sum(i * st for i, st in zip(idx, src.stride(), strict=False)) * es
        out += [dst.data_ptr() + do, dst.stride(-3) * es, src.data_ptr() + so,
                src.stride(-3) * es, width, rows]
    return out


def check_copy2d(descs: Sequence[int]) -> None:
    """Raise unless ``descs`` are valid ``copy2d`` sextuples."""
    if len(descs) % 6:
        raise ValueError(f"copy2d: {len(descs)} integers are not sextuples")
    for i in range(0, len(descs), 6):
        d = descs[i:i + 6]
        if d[0] <= 0 or d[2] <= 0 or min(d[1], d[3], d[4], d[5]) < 0 or \
                (d[5] > 1 and (d[4] > d[1] or d[4] > d[3])):
            raise ValueError(f"copy2d: descriptor {i // 6} = {tuple(d)} is not a valid 2-D copy "
                             "(width within both pitches)")


def template(descs: Sequence[int], base: int) -> list[int]:
    """Checked ``copy2d`` descriptors with their source addresses made offsets from ``base``
    (a plan's copies, made once from one call's tensors; :func:`rebased` applies them)."""
    check_copy2d(descs)
    out = list(descs)
    for i in range(2, len(out), 6):
        out[i] -= base
    return out


def rebased(template: Sequence[int], sources: Sequence[int], bases: Sequence[int]) -> list[int]:
    """``copy2d`` descriptors from a template whose source addresses are offsets: descriptor
    ``i``'s source is ``bases[sources[i]]`` plus its offset (a plan's :func:`template`, made
    once, applied to this call's tensors; ``copy2d_t`` does the same in C++)."""
    out = list(template)
    for i, which in enumerate(sources):
        out[6 * i + 2] += bases[which]
    return out


def run_copy2d(anchor: torch.Tensor, descs: Sequence[int], checked: bool = True) -> None:
    """Queue the ``copy2d`` descriptors on the current stream (copy engines); ``checked=False``:
    they passed :func:`check_copy2d` before (descriptors rebased from checked templates)."""
    if checked:
        check_copy2d(descs)
    if descs:
        torch.ops.xdit_ops.copy2d.default(anchor, list(descs))


def program_tensor(program: Sequence[int]) -> torch.Tensor:
    """``program`` checked (:func:`check_memops`) and made the CPU int64 tensor that
    ``stream_memops_t`` reads (once per plan; a call passes it as is)."""
    check_memops(program)
    return torch.tensor(list(program), dtype=torch.int64)


def copy2d_template(descs: Sequence[int],
                    which: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(descs, which)`` as the CPU int64 tensors ``copy2d_t`` reads. ``which`` None: ``descs``
    are absolute (checked here); else ``descs`` is a template whose sources are offsets (made by
    :func:`template`, which checked the absolute descriptors) and ``which[i]`` picks descriptor
    ``i``'s base."""
    if which is None:
        check_copy2d(descs)
        which = []
    elif len(which) * 6 != len(descs) or any(w < 0 for w in which):
        raise ValueError(f"copy2d: {len(which)} source indices for {len(descs) // 6} "
                         "descriptors (need one index >= 0 each)")
    return (torch.tensor(list(descs), dtype=torch.int64),
            torch.tensor(list(which), dtype=torch.int64))


def check_words(t: torch.Tensor, name: str) -> None:
    """Raise unless ``t`` is what the tensor ops read (1-D contiguous CPU int64)."""
    if t.dtype != torch.int64 or t.dim() != 1 or t.device.type != "cpu" or \
            not t.is_contiguous():
        raise ValueError(f"{name}: need a contiguous 1-D CPU int64 tensor, got {t.dtype} of shape "
                         f"{tuple(t.shape)} on {t.device}")


def run_memops_t(anchor: torch.Tensor, program: torch.Tensor, batched: bool = True,
                 stream: int = -1) -> None:
    """Queue a :func:`program_tensor` on ``stream`` (``cuda_stream`` handle; -1: current)."""
    check_words(program, "stream_memops_t")
    torch.ops.xdit_ops.stream_memops_t.default(anchor, program, batched, stream)


def run_copy2d_t(anchor: torch.Tensor, descs: torch.Tensor, which: torch.Tensor,
                 bases: Sequence[int] = (), stream: int = -1) -> None:
    """Queue :func:`copy2d_template` descriptors, rebased onto ``bases``, on ``stream``."""
    check_words(descs, "copy2d_t")
    check_words(which, "copy2d_t")
    if which.numel() and (which.numel() * 6 != descs.numel()
                          or int(which.max()) >= len(bases)):
        raise ValueError(f"copy2d_t: source indices {which.tolist()} for {descs.numel() // 6} "
                         f"descriptors and {len(bases)} bases")
    torch.ops.xdit_ops.copy2d_t.default(anchor, descs, which, list(bases), stream)
