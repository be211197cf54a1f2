"""``xdit_ops::ulysses_pack_qkv``, ``::ulysses_unpack_out``: copies around Ulysses all-to-alls.

Ulysses attention trades a sequence shard of every head for the whole sequence of a few heads:
Q, K, V go out in one all-to-all (``heads[j]`` heads to rank ``j``, possibly uneven: 30 heads over
4 ranks are 8, 8, 7, 7) and the attention output comes back in another. These two ops are the
single-kernel copies on either side of that exchange:

* :func:`ulysses_pack_qkv`: ``q, k, v`` ``[B, L, H, D]`` (any strides with ``D`` contiguous, e.g.
  slices of a fused QKV projection) -> the flat send buffer, rank-major, rank ``j``'s block
  ``[3, B, L, heads[j], D]`` holding heads ``[start_j, start_j + heads[j])`` of q, k and v.
* :func:`ulysses_place_gathered`: what the input exchange delivered, ``[U, 3, B, L, h, D]``, plus
  this rank's heads of the joint (text) rows -> the query buffer ``[B, J + U*L, h, D]`` and the
  K/V buffer ``[2, B, Jk + U*L, h, D]`` attention reads (joint rows first).
* :func:`ulysses_unpack_out`: the flat receive buffer of the output exchange, source-rank-major,
  rank ``j``'s block ``[B, J + L, heads[j], D]`` (its J joint rows first) -> ``[B, J + L, H, D]``
  with the joint rows in front or behind.

The push variants do the pack and the exchange in one pass, for ranks whose buffers are mapped
into this process (symmetric memory over NVLink: ``usp_attention``'s ``XDIT_OPS_USP_ULYSSES=push``).
``dst`` lists one flat buffer per rank of the Ulysses group (this rank's own included):

* :func:`ulysses_push_qkv`: this rank's ``q, k, v`` ``[B, L, H, D]`` shard -> rank ``j``'s query
  buffer ``[B, J + U*L, heads[j], D]`` and K/V buffer ``[2, B, Jk + U*L, heads[j], D]``, stored
  one after the other at the start of ``dst[j]``: rows ``J + rank*L ..`` and ``Jk + rank*L ..``
  (the joint rows are left to their owner). Afterwards, once every rank has pushed, each
  rank's buffer holds what ``ulysses_place_gathered`` builds from the all-to-all.
* :func:`ulysses_push_out`: this rank's attention output ``o`` ``[B, J + U*L, h, D]`` (its heads
  ``[h0, h0 + h)``, joint rows first) -> every rank's output ``[B, J + L, H, D]`` at the start of
  ``dst[u]``: rank ``u`` gets its ``L`` rows and the joint rows (front or behind), i.e. what
  ``ulysses_unpack_out`` builds after the output all-to-all.
* :func:`ulysses_push_out_blocks`: the same rows into the output all-to-all's receive layout
  instead: this rank's block ``[B, J + L, h, D]`` (joint rows first) at element
  ``B * (J + L) * h0 * D`` of every ``dst[u]``, one contiguous run per destination; once every
  rank has pushed, ``ulysses_unpack_out`` of ``dst[u][:B * (J + L) * H * D]`` is
  :func:`ulysses_push_out`'s result.

CUDA runs the native kernels (``csrc/include/xdit_ops/ulysses_pack.cuh``: one launch, vectorised
up to 16 bytes); CPU runs the torch references below. Both are exact copies, any dtype.
``XDIT_OPS_PUSH_KERNEL`` picks the push kernels: ``v2`` (default: one tile of one destination's
rows per block, eight 16-byte loads in flight per thread) or ``v1`` (a row per block, the first
version, kept for one release to compare with); read on every call, results identical. ``v3``
runs v2's kernels in these ops; ``usp_attention`` then sends its output back with
:func:`ulysses_push_out_blocks` and :func:`ulysses_unpack_out` instead of
:func:`ulysses_push_out` and a copy (why: ``docs/usp_attention.md``).

The public functions check their arguments in Python before a native call (the CPU references
check for themselves), with the exceptions the references raise: on the GPU machine a failing
``TORCH_CHECK`` in the launchers killed the process with SIGSEGV instead of raising
(``benchmarks/results/2026-11-26-run31``). The launchers keep their checks for direct
``torch.ops`` callers; ``usp_attention`` calls the ops with arguments its plan has checked.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from xdit_ops.ops._lib import lib

PACK = "ulysses_pack_qkv"
UNPACK = "ulysses_unpack_out"
PLACE = "ulysses_place_gathered"
PUSH = "ulysses_push_qkv"
PUSH_OUT = "ulysses_push_out"
PUSH_OUT_BLOCKS = "ulysses_push_out_blocks"
MAX_PUSH_HEADS = 1024  # kMaxPushHeads in csrc/include/xdit_ops/ulysses_pack.h
MAX_RANKS = 64  # kMaxUlyssesRanks, ibid.
PUSH_KERNEL_ENV = "XDIT_OPS_PUSH_KERNEL"
PUSH_KERNELS = ("v1", "v2", "v3")

lib.define(f"{PACK}(Tensor q, Tensor k, Tensor v, int[] heads) -> Tensor")
lib.define(
    f"{UNPACK}(Tensor recv, int[] heads, int B, int J, int L, bool joint_front) -> Tensor"
)
lib.define(
    f"{PLACE}(Tensor recv, int U, int B, int L, int h, Tensor? q_j, Tensor? k_j, Tensor? v_j, "
    "int head_start, bool joint_kv) -> (Tensor, Tensor)"
)
lib.define(
    f"{PUSH}(Tensor q, Tensor k, Tensor v, int[] heads, Tensor(a!)[] dst, int rank, int J, "
    "int Jk, int[]? src_head_start=None) -> ()"
)
lib.define(
    f"{PUSH_OUT}(Tensor o, int[] heads, Tensor(a!)[] dst, int rank, int L, bool joint_front, "
    "int? head_offset=None) -> ()"
)
lib.define(f"{PUSH_OUT_BLOCKS}(Tensor o, int[] heads, Tensor(a!)[] dst, int rank, int L) -> ()")


def _check_heads(op: str, heads: Sequence[int], H: int | None) -> int:
    if not 1 <= len(heads) <= MAX_RANKS:
        raise ValueError(f"{op}: heads must list 1..{MAX_RANKS} per-rank counts, got "
                         f"{len(heads)}")
    if any(h < 0 for h in heads):
        raise ValueError(f"{op}: heads {list(heads)} has a negative count")
    total = sum(heads)
    if H is not None and total != H:
        raise ValueError(f"{op}: sum(heads) = {total} != H = {H} (heads {list(heads)})")
    return total


def _check_recv(op: str, recv: torch.Tensor) -> None:
    """recv of unpack and place: the flat buffer an all-to-all filled."""
    if recv.dim() != 1 or not recv.is_contiguous():
        raise ValueError(f"{op}: recv must be a flat contiguous buffer, got shape "
                         f"{tuple(recv.shape)}, strides {tuple(recv.stride())}")


def _recv_head_dim(op: str, recv: torch.Tensor, row: int, row_expr: str) -> int:
    """head_dim D of a recv holding ``row * D`` elements (row: the product named row_expr)."""
    if row == 0 or recv.numel() % row != 0:
        raise ValueError(f"{op}: recv has {recv.numel()} elements, not a multiple of "
                         f"{row_expr} = {row}")
    return recv.numel() // row


def check_pack(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: Sequence[int],
               op: str = PACK) -> None:
    """Checks q, k, v and heads of the pack (or of ``op``, which takes the same inputs)."""
    if q.dim() != 4:
        raise ValueError(f"{op}: q must be [B, L, H, D], got {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"{op}: q {tuple(q.shape)}, k {tuple(k.shape)} and v "
                         f"{tuple(v.shape)} must have one shape")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{op}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{op}: q, k, v are on {q.device}, {k.device}, {v.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{op}: head_dim of {name} must be contiguous, got strides "
                             f"{tuple(t.stride())}")
    _check_heads(op, heads, q.shape[2])


def check_unpack(recv: torch.Tensor, heads: Sequence[int], B: int, J: int, L: int) -> int:
    """Checks the arguments; returns D."""
    _check_recv(UNPACK, recv)
    if B < 0 or J < 0 or L < 0:
        raise ValueError(f"{UNPACK}: B, J, L must be >= 0, got {B}, {J}, {L}")
    H = _check_heads(UNPACK, heads, None)
    return _recv_head_dim(UNPACK, recv, B * (J + L) * H, f"B * (J + L) * H = {B} * {J + L} * {H}")


def check_place(recv: torch.Tensor, U: int, B: int, L: int, h: int, q_j: torch.Tensor | None,
                k_j: torch.Tensor | None, v_j: torch.Tensor | None,
                head_start: int) -> tuple[int, int]:
    """Checks the arguments; returns (D, J)."""
    _check_recv(PLACE, recv)
    if U < 1 or B < 0 or L < 0 or h < 1:
        raise ValueError(f"{PLACE}: need U >= 1, B >= 0, L >= 0, h >= 1, got U={U} B={B} L={L} "
                         f"h={h}")
    D = _recv_head_dim(PLACE, recv, U * 3 * B * L * h, "U * 3 * B * L * h")
    joint = (q_j, k_j, v_j)
    if any(t is None for t in joint):
        if any(t is not None for t in joint):
            raise ValueError(f"{PLACE}: pass all of q_j, k_j, v_j or none")
        return D, 0
    if q_j.dim() != 4 or q_j.shape[0] != B or q_j.shape[3] != D:
        raise ValueError(f"{PLACE}: q_j must be [B, J, H, D] = [{B}, J, H, {D}], got "
                         f"{tuple(q_j.shape)}")
    if head_start < 0 or head_start + h > q_j.shape[2]:
        raise ValueError(f"{PLACE}: heads [{head_start}, {head_start + h}) are outside the "
                         f"{q_j.shape[2]} joint heads")
    for i, t in enumerate(joint):
        if t.shape != q_j.shape or t.dtype != recv.dtype or t.device != recv.device:
            raise ValueError(f"{PLACE}: joint tensor {i} is {tuple(t.shape)} {t.dtype} on "
                             f"{t.device}; need {tuple(q_j.shape)} {recv.dtype} on {recv.device}")
        if D > 1 and t.stride(-1) != 1:
            raise ValueError(f"{PLACE}: head_dim of joint tensor {i} must be contiguous, got "
                             f"strides {tuple(t.stride())}")
    return D, q_j.shape[1]


def _pack_cpu(q, k, v, heads):
    """Reference: each rank's block is the stack of its head slice of q, k, v (``_ulysses_in``)."""
    check_pack(q, k, v, heads)
    blocks = []
    start = 0
    for h in heads:
        blocks.append(torch.stack([t[:, :, start:start + h] for t in (q, k, v)]).reshape(-1))
        start += h
    return torch.cat(blocks)


def _unpack_cpu(recv, heads, B, J, L, joint_front):
    """Reference: concatenate the received head blocks, then move the joint rows behind."""
    D = check_unpack(recv, heads, B, J, L)
    pieces = recv.split([B * (J + L) * h * D for h in heads])
    full = torch.cat([p.view(B, J + L, h, D) for p, h in zip(pieces, heads, strict=True)], dim=2)
    if J and not joint_front:
        full = torch.cat([full[:, J:], full[:, :J]], dim=1)
    return full.contiguous()


def _place_cpu(recv, U, B, L, h, q_j, k_j, v_j, head_start, joint_kv):
    """Reference: the torch copies ``usp_attention`` made before this op (its former
    ``_place_gathered``)."""
    D, J = check_place(recv, U, B, L, h, q_j, k_j, v_j, head_start)
    Jk = J if joint_kv else 0
    hs = slice(head_start, head_start + h)
    g = recv.view(U, 3, B, L, h, D).permute(1, 2, 0, 3, 4, 5)  # [3, B, U, L, h, D]
    qbuf = recv.new_empty(B, J + U * L, h, D)
    qbuf[:, J:].view(B, U, L, h, D).copy_(g[0])
    kv = recv.new_empty(2, B, Jk + U * L, h, D)
    kv[:, :, Jk:].view(2, B, U, L, h, D).copy_(g[1:])
    if J:
        qbuf[:, :J] = q_j[:, :, hs]
    if Jk:
        kv[0, :, :Jk] = k_j[:, :, hs]
        kv[1, :, :Jk] = v_j[:, :, hs]
    return qbuf, kv


def push_region_size(B: int, L: int, U: int, J: int, Jk: int, h: int, D: int) -> int:
    """Elements of a push destination's input region: its query buffer
    ``[B, J + U*L, h, D]`` then its K/V buffer ``[2, B, Jk + U*L, h, D]``."""
    return B * (J + U * L) * h * D + 2 * B * (Jk + U * L) * h * D


def push_regions(d: torch.Tensor, B: int, L: int, U: int, J: int, Jk: int, h: int,
                 D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The query buffer and the K/V buffer of a push destination, as views at the start of its
    flat buffer ``d`` (the layout ``ulysses_push_qkv`` writes)."""
    nq = B * (J + U * L) * h * D
    return (d[:nq].view(B, J + U * L, h, D),
            d[nq:push_region_size(B, L, U, J, Jk, h, D)].view(2, B, Jk + U * L, h, D))


def check_push(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: Sequence[int],
               dst: Sequence[torch.Tensor], rank: int, J: int, Jk: int,
               src_head_start: Sequence[int] | None = None) -> list[int]:
    """Checks the arguments of the input push; returns every destination's first source head
    (``src_head_start``, or the running sum of ``heads``)."""
    if src_head_start is None:
        check_pack(q, k, v, heads, PUSH)
    else:  # a head chunk of every share: the counts need not add up to H
        check_pack(q, k, v, [q.shape[2]], PUSH)
        _check_heads(PUSH, heads, None)
        if len(src_head_start) != len(heads) or any(
                s < 0 or s + h > q.shape[2] for s, h in zip(src_head_start, heads, strict=False)):
            raise ValueError(f"{PUSH}: src_head_start={list(src_head_start)} must give each of "
                             f"the {len(heads)} destinations a source range [start, start + "
                             f"heads[j]) inside the {q.shape[2]} heads (heads={list(heads)})")
    if q.shape[2] > MAX_PUSH_HEADS:
        raise ValueError(f"{PUSH}: at most {MAX_PUSH_HEADS} heads, got H = {q.shape[2]}")
    U = len(heads)
    if not 0 <= rank < U:
        raise ValueError(f"{PUSH}: rank {rank} is outside [0, {U})")
    if J < 0 or Jk not in (0, J):
        raise ValueError(f"{PUSH}: need J >= 0 and Jk in {{0, J}}, got J={J} Jk={Jk}")
    B, L, _, D = q.shape
    _check_push_dst(PUSH, dst, q, [push_region_size(B, L, U, J, Jk, h, D) for h in heads])
    if src_head_start is not None:
        return list(src_head_start)
    return [sum(heads[:j]) for j in range(U)]


def check_push_out(o: torch.Tensor, heads: Sequence[int], dst: Sequence[torch.Tensor],
                   rank: int, L: int, head_offset: int | None = None,
                   op: str = PUSH_OUT) -> tuple[int, int, int]:
    """Checks the arguments of the output push (or of ``op``, which takes the same ones: the
    rank-block push); returns (J, H, h0): h0 is where o's heads go in an output row
    (``head_offset``, or this rank's place in ``heads``)."""
    H = _check_heads(op, heads, None)
    U = len(heads)
    if not 0 <= rank < U:
        raise ValueError(f"{op}: rank {rank} is outside [0, {U})")
    if o.dim() != 4 or o.shape[2] != heads[rank] or L < 0 or o.shape[1] < U * L:
        raise ValueError(f"{op}: o must be [B, J + U*L, h, D] with U={U} L={L} "
                         f"h=heads[{rank}]={heads[rank]}, got {tuple(o.shape)}")
    if o.shape[-1] > 1 and o.stride(-1) != 1:
        raise ValueError(f"{op}: head_dim of o must be contiguous, got strides "
                         f"{tuple(o.stride())}")
    B, T, _, D = o.shape
    J = T - U * L
    _check_push_dst(op, dst, o, [B * (J + L) * H * D] * U)
    if head_offset is None:
        return J, H, sum(heads[:rank])
    if not 0 <= head_offset <= H - heads[rank]:
        raise ValueError(f"{op}: head_offset={head_offset} puts o's {heads[rank]} heads "
                         f"outside the {H} heads of an output row")
    return J, H, head_offset


def push_kernel(op: str = PUSH) -> str:
    """The push kernel ``XDIT_OPS_PUSH_KERNEL`` selects for CUDA: ``"v2"`` (also when unset or
    empty), ``"v1"`` or ``"v3"`` (v2's kernels); anything else raises (named after ``op``).
    ``usp_attention`` sends its output back by rank blocks unless ``v1`` or ``v2`` is set
    (:func:`push_blocks`)."""
    value = os.environ.get(PUSH_KERNEL_ENV) or "v2"
    if value not in PUSH_KERNELS:
        raise ValueError(f"{op}: {PUSH_KERNEL_ENV} must be one of {PUSH_KERNELS}, got {value!r}")
    return value


def push_blocks(value: str | None) -> bool:
    """Whether ``usp_attention``'s push sends its output back by rank blocks (contiguous stores
    to each peer, unpacked locally: ``ulysses_push_out_blocks``) for the
    ``XDIT_OPS_PUSH_KERNEL`` value ``value``: yes when unset, empty or ``v3``; ``v1`` and ``v2``
    keep the output push into the output rows. The default since run 44 (4 H100s: the
    multigpu usp tests pass with it; run 41: the push-out alone 21.5 / 62.2 / 184 us against
    the rows' 29.1 / 88.1 / 186, a flat copy 21.0 / 61.6)."""
    return (value or "v3") == "v3"


def _check_push_dst(op: str, dst: Sequence[torch.Tensor], like: torch.Tensor,
                    need: list[int]) -> None:
    if len(dst) != len(need):
        raise ValueError(f"{op}: dst has {len(dst)} buffers for {len(need)} ranks")
    for j, (d, n) in enumerate(zip(dst, need, strict=True)):
        if d.device != like.device or d.dtype != like.dtype:
            raise ValueError(f"{op}: dst[{j}] is {d.dtype} on {d.device}; need {like.dtype} on "
                             f"{like.device}")
        if d.dim() != 1 or not d.is_contiguous():
            raise ValueError(f"{op}: dst[{j}] must be a flat contiguous buffer, got shape "
                             f"{tuple(d.shape)}")
        if d.numel() < n:
            raise ValueError(f"{op}: dst[{j}] has {d.numel()} elements, the push needs {n}")


def _push_cpu(q, k, v, heads, dst, rank, J, Jk, src_head_start=None):
    """Reference: rank j's query and K/V buffers, viewed in dst[j], get this rank's rows."""
    starts = check_push(q, k, v, heads, dst, rank, J, Jk, src_head_start)
    B, L, _, D = q.shape
    U = len(heads)
    rows = slice(rank * L, (rank + 1) * L)
    for d, h, start in zip(dst, heads, starts, strict=True):
        qbuf, kv = push_regions(d, B, L, U, J, Jk, h, D)
        hs = slice(start, start + h)
        qbuf[:, J:][:, rows] = q[:, :, hs]
        kv[0, :, Jk:][:, rows] = k[:, :, hs]
        kv[1, :, Jk:][:, rows] = v[:, :, hs]


def _push_out_cpu(o, heads, dst, rank, L, joint_front, head_offset=None):
    """Reference: every rank's [B, J + L, H, D] output, viewed in dst[u], gets this rank's
    heads of its rows."""
    J, H, h0 = check_push_out(o, heads, dst, rank, L, head_offset)
    B, _, h, D = o.shape
    hs = slice(h0, h0 + h)
    for u, d in enumerate(dst):
        out = d[:B * (J + L) * H * D].view(B, J + L, H, D)
        seq = o[:, J + u * L:J + (u + 1) * L]
        if joint_front:
            out[:, :J, hs] = o[:, :J]
            out[:, J:, hs] = seq
        else:
            out[:, :L, hs] = seq
            out[:, L:, hs] = o[:, :J]


def _push_out_blocks_cpu(o, heads, dst, rank, L):
    """Reference: rank u's receive buffer, viewed in dst[u], gets this rank's block: its joint
    rows, then rank u's L rows."""
    J, H, h0 = check_push_out(o, heads, dst, rank, L, op=PUSH_OUT_BLOCKS)
    B, _, h, D = o.shape
    start = B * (J + L) * h0 * D
    for u, d in enumerate(dst):
        block = d[start:start + B * (J + L) * h * D].view(B, J + L, h, D)
        block[:, :J] = o[:, :J]
        block[:, J:] = o[:, J + u * L:J + (u + 1) * L]


lib.impl(PACK, _pack_cpu, "CPU")
lib.impl(PLACE, _place_cpu, "CPU")
lib.impl(UNPACK, _unpack_cpu, "CPU")
lib.impl(PUSH, _push_cpu, "CPU")
lib.impl(PUSH_OUT, _push_out_cpu, "CPU")
lib.impl(PUSH_OUT_BLOCKS, _push_out_blocks_cpu, "CPU")


@torch.library.register_fake(f"xdit_ops::{PACK}")
def _pack_fake(q, k, v, heads):
    check_pack(q, k, v, heads)
    return q.new_empty((3 * q.numel(),))


@torch.library.register_fake(f"xdit_ops::{UNPACK}")
def _unpack_fake(recv, heads, B, J, L, joint_front):
    D = check_unpack(recv, heads, B, J, L)
    return recv.new_empty((B, J + L, sum(heads), D))


@torch.library.register_fake(f"xdit_ops::{PLACE}")
def _place_fake(recv, U, B, L, h, q_j, k_j, v_j, head_start, joint_kv):
    D, J = check_place(recv, U, B, L, h, q_j, k_j, v_j, head_start)
    Jk = J if joint_kv else 0
    return recv.new_empty((B, J + U * L, h, D)), recv.new_empty((2, B, Jk + U * L, h, D))


@torch.library.register_fake(f"xdit_ops::{PUSH}")
def _push_fake(q, k, v, heads, dst, rank, J, Jk, src_head_start=None):
    check_push(q, k, v, heads, dst, rank, J, Jk, src_head_start)


@torch.library.register_fake(f"xdit_ops::{PUSH_OUT}")
def _push_out_fake(o, heads, dst, rank, L, joint_front, head_offset=None):
    check_push_out(o, heads, dst, rank, L, head_offset)


@torch.library.register_fake(f"xdit_ops::{PUSH_OUT_BLOCKS}")
def _push_out_blocks_fake(o, heads, dst, rank, L):
    check_push_out(o, heads, dst, rank, L, op=PUSH_OUT_BLOCKS)


def _register_cuda_fallback() -> None:
    """Without the native kernels (module absent, disabled, or built before these sources),
    CUDA tensors take the references: the same copies as several torch kernels."""
    for op, fn in ((PACK, _pack_cpu), (UNPACK, _unpack_cpu), (PLACE, _place_cpu),
                   (PUSH, _push_cpu), (PUSH_OUT, _push_out_cpu),
                   (PUSH_OUT_BLOCKS, _push_out_blocks_cpu)):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"xdit_ops::{op}", "CUDA"):
            lib.impl(op, fn, "CUDA")


_register_cuda_fallback()


def ulysses_pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     heads: Sequence[int]) -> torch.Tensor:
    """Pack Q, K, V into the send buffer of one Ulysses all-to-all, in one kernel.

    Parameters
    ----------
    q, k, v : [B, L, H, D], BSHD, one shape, dtype and device; ``D`` contiguous, other strides
        free (e.g. ``qkv[:, :, i]`` of a fused projection output ``[B, L, 3, H, D]``).
    heads : per-destination head counts, ``sum(heads) == H``; may be uneven.

    Returns
    -------
    Flat contiguous ``[3 * B * L * H * D]`` tensor of q's dtype: for destination ``j`` a block
    ``[3, B, L, heads[j], D]`` (q, k, v) holding heads ``[start_j, start_j + heads[j])``, blocks
    in ``j`` order. Pass it to ``all_to_all_single`` with
    ``input_split_sizes=[3 * B * L * h * D for h in heads]``.
    """
    if q.device.type != "cpu":  # before the native kernel (see the module docstring)
        check_pack(q, k, v, heads)
    return torch.ops.xdit_ops.ulysses_pack_qkv.default(q, k, v, list(heads))


def ulysses_unpack_out(recv: torch.Tensor, heads: Sequence[int], B: int, J: int, L: int,
                       joint_front: bool) -> torch.Tensor:
    """Unpack the receive buffer of the Ulysses output all-to-all, in one kernel.

    Parameters
    ----------
    recv : flat contiguous buffer; for source rank ``j`` a block ``[B, J + L, heads[j], D]`` (the
        J joint rows first, then its L sequence rows), blocks in ``j`` order.
        ``D = recv.numel() / (B * (J + L) * sum(heads))``.
    heads : per-rank head counts (rank ``j`` computed heads ``[start_j, start_j + heads[j])``).
    B, J, L : batch, joint (text) rows, local sequence rows.
    joint_front : the joint rows go first (``[J; L]``, the received order) or behind (``[L; J]``).

    Returns
    -------
    Contiguous ``[B, J + L, H, D]`` of recv's dtype, ``H = sum(heads)``.
    """
    if recv.device.type != "cpu":
        check_unpack(recv, heads, B, J, L)
    return torch.ops.xdit_ops.ulysses_unpack_out.default(recv, list(heads), B, J, L, joint_front)


def ulysses_place_gathered(
    recv: torch.Tensor, U: int, B: int, L: int, h: int, q_j: torch.Tensor | None,
    k_j: torch.Tensor | None, v_j: torch.Tensor | None, head_start: int, joint_kv: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Build attention's query and K/V buffers from the received Q/K/V, in one kernel.

    Parameters
    ----------
    recv : flat contiguous buffer of the input exchange, ``[U, 3, B, L, h, D]`` (source rank
        major: the gathered sequence in shard order; q, k, v), ``D = recv.numel() / (3*U*B*L*h)``.
    U, B, L, h : Ulysses ranks, batch, local sequence rows, this rank's head count.
    q_j, k_j, v_j : the joint (text) rows ``[B, J, H, D]`` of every head (any strides, ``D``
        contiguous), or all None when there are none (J = 0).
    head_start : this rank's first head: it takes heads ``[head_start, head_start + h)`` of the
        joint rows.
    joint_kv : the joint K/V rows go in front of the K/V buffer (``Jk = J``); False leaves them
        out (``Jk = 0``) for a caller that attends to them as a partial of their own.

    Returns
    -------
    qbuf : ``[B, J + U*L, h, D]``, joint rows first, then the gathered sequence.
    kv : ``[2, B, Jk + U*L, h, D]`` (K, V), joint rows first when ``joint_kv``.
    """
    if recv.device.type != "cpu":
        check_place(recv, U, B, L, h, q_j, k_j, v_j, head_start)
    return torch.ops.xdit_ops.ulysses_place_gathered.default(
        recv, U, B, L, h, q_j, k_j, v_j, head_start, joint_kv)


def ulysses_push_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: Sequence[int],
                     dst: Sequence[torch.Tensor], rank: int, J: int, Jk: int,
                     src_head_start: Sequence[int] | None = None) -> None:
    """Pack and send Q, K, V in one pass: store this rank's rows straight into every rank's
    query and K/V buffers (one kernel on CUDA; ``dst`` are usually symmetric-memory buffers of
    the peers, mapped into this process).

    Parameters
    ----------
    q, k, v : this rank's shard ``[B, L, H, D]``, as for :func:`ulysses_pack_qkv`.
    heads : per-rank head counts of the Ulysses group (``sum(heads) == H``; may be uneven).
    dst : one flat buffer per rank (this rank's own included), of q's dtype and device. Rank
        ``j``'s query buffer ``[B, J + U*L, heads[j], D]`` starts at ``dst[j][0]``, its K/V buffer
        ``[2, B, Jk + U*L, heads[j], D]`` right after it.
    rank : this rank's index in ``heads``.
    J, Jk : joint rows in front of the query buffer and of the K/V buffer (``Jk`` is ``J`` or
        0); they are not written here (the owner places its joint rows itself).
    src_head_start : optional, per destination: its ``heads[j]`` heads are source heads
        ``[src_head_start[j], + heads[j])`` instead of the running sum of ``heads`` (a head chunk
        of every share; then ``sum(heads)`` need not be ``H``). Version 2 of the kernel only.

    Afterwards (once every rank has pushed and synchronised), rank ``j``'s buffers equal
    :func:`ulysses_place_gathered` of the all-to-all that :func:`ulysses_pack_qkv` feeds,
    outside the joint rows.
    """
    if q.device.type != "cpu":
        check_push(q, k, v, heads, dst, rank, J, Jk, src_head_start)
        if push_kernel(PUSH) == "v1" and src_head_start is not None:
            raise ValueError(f"{PUSH}: src_head_start needs the v2 kernel, but "
                             f"{PUSH_KERNEL_ENV}=v1")
    torch.ops.xdit_ops.ulysses_push_qkv.default(
        q, k, v, list(heads), list(dst), rank, J, Jk,
        None if src_head_start is None else list(src_head_start))


def ulysses_push_out(o: torch.Tensor, heads: Sequence[int], dst: Sequence[torch.Tensor],
                     rank: int, L: int, joint_front: bool, head_offset: int | None = None) -> None:
    """Send this rank's attention output back in one pass: store its heads of every row straight
    into every rank's ``[B, J + L, H, D]`` output (one kernel on CUDA).

    Parameters
    ----------
    o : ``[B, J + U*L, h, D]``: the J joint rows, then the gathered sequence (shard ``u`` at rows
        ``J + u*L ..``), for this rank's heads ``[h0, h0 + h)``, ``h = heads[rank]``,
        ``h0 = sum(heads[:rank])``; any strides with ``D`` contiguous.
    heads, rank : as for :func:`ulysses_push_qkv`.
    dst : one flat buffer per rank of o's dtype and device; rank ``u``'s output
        ``[B, J + L, H, D]`` starts at ``dst[u][0]``.
    L : local sequence rows; ``J = o.shape[1] - U*L``.
    joint_front : the joint rows go first in the output, or behind the L rows.
    head_offset : optional: o's heads land at ``[head_offset, + h)`` of an output row instead of
        at ``h0`` (a head chunk of this rank's share).

    Rank ``u`` gets its L sequence rows and every joint row, for this rank's heads: once every
    rank has pushed, each output equals :func:`ulysses_unpack_out` after the output all-to-all.
    """
    if o.device.type != "cpu":
        check_push_out(o, heads, dst, rank, L, head_offset)
        push_kernel(PUSH_OUT)
    torch.ops.xdit_ops.ulysses_push_out.default(o, list(heads), list(dst), rank, L, joint_front,
                                                head_offset)


def ulysses_push_out_blocks(o: torch.Tensor, heads: Sequence[int], dst: Sequence[torch.Tensor],
                            rank: int, L: int) -> None:
    """Send this rank's attention output back in one pass, into the output all-to-all's receive
    layout: store its block of every rank's rows straight into that rank's buffer (one kernel
    on CUDA, one contiguous run per destination).

    Parameters
    ----------
    o, heads, rank, L : as for :func:`ulysses_push_out`.
    dst : one flat buffer per rank of o's dtype and device, at least ``B * (J + L) * H * D``
        elements. Rank ``u``'s buffer holds one block ``[B, J + L, heads[j], D]`` per rank
        ``j`` (the J joint rows, then rank ``u``'s L rows, of rank ``j``'s heads), blocks in
        ``j`` order from ``dst[u][0]``; this rank writes block ``rank``, at element
        ``B * (J + L) * h0 * D``.

    Once every rank has pushed, ``ulysses_unpack_out(dst[u][:B * (J + L) * H * D], heads, B, J,
    L, joint_front)`` equals what :func:`ulysses_push_out` leaves in ``dst[u]`` (and what the
    output all-to-all plus :func:`ulysses_unpack_out` give). ``XDIT_OPS_PUSH_KERNEL`` picks the
    kernel as for :func:`ulysses_push_out`.
    """
    if o.device.type != "cpu":
        check_push_out(o, heads, dst, rank, L, op=PUSH_OUT_BLOCKS)
        push_kernel(PUSH_OUT_BLOCKS)
    torch.ops.xdit_ops.ulysses_push_out_blocks.default(o, list(heads), list(dst), rank, L)
