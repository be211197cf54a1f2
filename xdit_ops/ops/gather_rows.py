"""``xdit_ops::gather_rows``: rows of several tensors and fill rows into one tensor, one copy.

The halo packing of the patch-parallel VAE (``xdit_ops/parallel/halo.py``): the send buffer of
the rows a peer needs, and the input slab of a boundary row band assembled from own rows, rows
received from peers and padding rows. CUDA runs the native kernel
(``csrc/include/xdit_ops/gather_rows.cuh``, one launch); CPU runs the torch reference below.
"""

from __future__ import annotations

import torch

from xdit_ops import _extension
from xdit_ops.ops._lib import lib

OP = "gather_rows"
MAX_SOURCES = 8
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)

lib.define("gather_rows(Tensor[] sources, Tensor index, float fill=0.0) -> Tensor")


def check_inputs(sources, index) -> None:
    """Shapes, dtypes and devices (no index values: those are data, see ``check_index``)."""
    if not sources:
        raise ValueError(f"{OP}: needs at least one source")
    if len(sources) > MAX_SOURCES:
        raise ValueError(f"{OP}: at most {MAX_SOURCES} sources, got {len(sources)}")
    s0 = sources[0]
    if s0.dim() < 2:
        raise ValueError(f"{OP}: sources must be [..., h, W], got {tuple(s0.shape)}")
    if s0.dtype not in DTYPES:
        raise TypeError(f"{OP}: unsupported dtype {s0.dtype} (float64, float32, float16, "
                        "bfloat16 only)")
    for k, s in enumerate(sources):
        if s.device != s0.device:
            raise ValueError(f"{OP}: source {k} is on {s.device}, source 0 on {s0.device}")
        if s.dtype != s0.dtype:
            raise TypeError(f"{OP}: source {k} is {s.dtype}, source 0 is {s0.dtype}")
        if s.dim() != s0.dim() or s.shape[:-2] != s0.shape[:-2] or s.shape[-1] != s0.shape[-1]:
            raise ValueError(f"{OP}: source {k} {tuple(s.shape)} does not match source 0 "
                             f"{tuple(s0.shape)} outside dim -2")
    if index.dim() != 2 or index.shape[1] != 2:
        raise ValueError(f"{OP}: index must be [n, 2], got {tuple(index.shape)}")
    if index.dtype not in INDEX_DTYPES:
        raise TypeError(f"{OP}: index must be int32 or int64, got {index.dtype}")
    if index.device.type != "cpu" and index.device != s0.device:
        raise ValueError(f"{OP}: index is on {index.device}, sources on {s0.device}")


def check_index(sources, index: torch.Tensor) -> None:
    """Every non-fill index row names an existing source and one of its rows (host index only)."""
    src, row = index[:, 0].tolist(), index[:, 1].tolist()
    for i, (s, r) in enumerate(zip(src, row, strict=True)):
        if s < 0:
            continue
        if s >= len(sources):
            raise IndexError(f"{OP}: index row {i} names source {s} but there are "
                             f"{len(sources)} sources")
        h = sources[s].shape[-2]
        if not 0 <= r < h:
            raise IndexError(f"{OP}: index row {i} reads row {r} of source {s}, which has "
                             f"{h} rows")


def gather_rows_ref(sources, index: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """The reference: one ``index_select`` per source scattered into the output, then the fill.

    Works on any device (it is also the CUDA kernel when the native module is absent).
    """
    check_inputs(sources, index)
    if index.device.type == "cpu" and not torch.compiler.is_compiling():
        check_index(sources, index)  # (traced: the kernels check a host index at run time)
    s0 = sources[0]
    out = s0.new_empty((*s0.shape[:-2], index.shape[0], s0.shape[-1]))
    idx = index.to(device=s0.device, dtype=torch.long)
    src_id, row = idx[:, 0], idx[:, 1]
    for s, src in enumerate(sources):
        pos = (src_id == s).nonzero().squeeze(1)
        if pos.numel():
            out.index_copy_(-2, pos, src.index_select(-2, row[pos]))
    # Scalar-to-dtype conversion as in fill_: the native kernel encodes the fill the same way.
    out.index_fill_(-2, (src_id < 0).nonzero().squeeze(1), fill)
    return out


lib.impl(OP, gather_rows_ref, "CPU")


@torch.library.register_fake(f"xdit_ops::{OP}")
def _gather_rows_fake(sources, index, fill=0.0):
    check_inputs(sources, index)
    s0 = sources[0]
    return s0.new_empty((*s0.shape[:-2], index.shape[0], s0.shape[-1]))


def register_cuda_fallback() -> None:
    """CUDA tensors take the reference when no native CUDA kernel is registered (no ``_C``, or a
    ``_C`` built before this op existed)."""
    _extension.load_all()
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"xdit_ops::{OP}", "CUDA"):
        lib.impl(OP, gather_rows_ref, "CUDA")


register_cuda_fallback()


def gather_rows(
    sources: list[torch.Tensor] | tuple[torch.Tensor, ...],
    index: torch.Tensor,
    fill: float = 0.0,
) -> torch.Tensor:
    """Gather rows (dim -2) of up to 8 tensors, and fill rows, into one contiguous tensor.

    ``out[..., i, :] = sources[index[i, 0]][..., index[i, 1], :]``, or ``fill`` where
    ``index[i, 0] < 0`` (``index[i, 1]`` is ignored then).

    Parameters
    ----------
    sources : 1 to 8 tensors ``[..., h_k, W]``: the same leading dims, ``W``, dtype (float64,
        float32, float16 or bfloat16) and device; ``h_k`` may differ. Any strides: on CUDA a
        source whose leading dims flatten to one stride and whose rows are contiguous (a
        contiguous tensor, or its ``narrow`` along dim -2) is read in place, any other is
        copied first.
    index : ``[n, 2]`` int32 or int64, on the sources' device or on the CPU. A CPU index is
        range-checked (``IndexError`` naming the row) and, for CUDA sources, copied to the
        device on every call; a device index is trusted (no check: a bad entry reads out of
        bounds), which is what lets a cached device index make the call copy-free on the host
        and capturable in a CUDA graph.
    fill : the value of fill rows, converted to the dtype as ``Tensor.fill_`` does.

    Returns
    -------
    out : ``[..., n, W]``, contiguous, the sources' dtype and device.
    """
    sources = list(sources)
    if not sources or sources[0].device.type != "cpu":
        # Before the native kernel, so a bad call raises the reference's exception types (the
        # CPU kernel is the reference and checks for itself; a device index is trusted).
        check_inputs(sources, index)
        if index.device.type == "cpu" and not torch.compiler.is_compiling():
            check_index(sources, index)  # (traced: the kernel checks a host index at run time)
    return torch.ops.xdit_ops.gather_rows.default(sources, index, fill)
