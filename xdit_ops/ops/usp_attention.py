"""``xdit_ops::usp_attention``: Ulysses x Ring sequence-parallel attention in one custom op.

Each rank of the sequence-parallel group holds ``[B, J + L, H, D]``: ``J`` joint (text) tokens
replicated on every rank, and its shard of ``L`` tokens of the long sequence (shard index =
``ring_rank * U + ulysses_rank``). The result is attention over the whole gathered sequence
(joint tokens included), returned in the same local layout.

Per rank, in one op:

1. Ulysses (degree U): one all-to-all moves Q, K and V together: every rank sends each peer its
   L tokens for that peer's heads, and receives U*L tokens for its own heads. Heads that do not
   divide U are split unevenly (the first ``H % U`` ranks take one more), never padded.
2. Ring (degree R): the K/V block of U*L tokens travels around the ring on P2P sends posted
   before each step's attention (double-buffered), so the transfer overlaps the compute;
   partial results merge with their LSEs in fp32 (``merge_attention_states_``, a native kernel).
   With ``backend="fp8"`` and ``XDIT_OPS_USP_FP8_WIRE=1`` the blocks are FP8/INT8 codes,
   quantized once with the whole sequence's statistics (``usp_fp8_ring``).
3. The joint keys form their own partial when they must be counted once under a ring or masked
   per sample (``joint_lengths``); otherwise they sit in front of the gathered keys.
4. Padded keys (``seq_len`` < the padded length, or per-shard ``shard_lengths``) are cut off by
   slicing each block to its valid length: exact, and no masked work. Padding in the middle of
   a Ulysses block (uneven shards) is squeezed out of the gathered K/V with one copy first.
5. One all-to-all moves the outputs back (and the joint rows' heads to every rank).

The op takes process groups by name (str), like torch's functional collectives, so a block
that calls it compiles with ``fullgraph=True``; nothing in it reads device values on the host.
"""

from __future__ import annotations

import atexit
import functools
import math
import os
import socket
import threading
import warnings
import zlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.distributed_c10d import _resolve_process_group

from xdit_ops import _extension
from xdit_ops.ops._lib import lib, plain_call
from xdit_ops.ops.attention import (
    BACKENDS,
    attention_cuda_resolved,
    check_inputs,
    resolve_backend,
)
from xdit_ops.ops.fp8_attention import (
    FORMAT_ENV,
    FORMAT_SETTINGS,
    FP8_SETTING_ENVS,
    resolve_format,
)
from xdit_ops.ops.merge_attention_states import MAX_PARTIALS, _check_merge_impl
from xdit_ops.ops.stream_memops import (
    BATCH_ENV,
    WAIT,
    WRITE,
    check_memops,
    copy2d_template,
    program_tensor,
    rebased,
    rows2d,
    run_copy2d,
    run_memops,
    template,
    word_address,
)
from xdit_ops.ops.ulysses_pack import (  # (registers the pack ops)
    PUSH_KERNEL_ENV,
    PUSH_KERNELS,
    push_blocks,
    push_kernel,
    push_region_size,
    push_regions,
    ulysses_push_out,
    ulysses_push_qkv,
)
from xdit_ops.ops.usp_fp8_ring import RingFp8Call, make_ring_plan, ring_applies
from xdit_ops.ops.usp_fp8_wire import WIRE_ENV, make_wire_plan, ulysses_fp8_wire, wire_applies
from xdit_ops.parallel.state import get_parallel_state
from xdit_ops.reference.attention import attention_ref

OP = "usp_attention"

lib.define(
    "usp_attention(Tensor q, Tensor k, Tensor v, Tensor? joint_lengths, int joint_tokens, "
    "bool joint_front, int seq_len, float? scale, str backend, str ulysses_group, "
    "str ring_group, bool return_lse, int[]? shard_lengths=None) -> (Tensor, Tensor)"
)


# ---------------------------------------------------------------------------------------------
# groups


def _resolve_group(name: str) -> dist.ProcessGroup | None:
    return _resolve_process_group(name) if name else None


def _group_size(g: dist.ProcessGroup | None) -> int:
    return 1 if g is None else dist.get_world_size(g)


def _group_rank(g: dist.ProcessGroup | None) -> int:
    return 0 if g is None else dist.get_rank(g)


def head_split(num_heads: int, ulysses: int) -> list[int]:
    """Heads per Ulysses rank: as even as possible, the first ``H % U`` ranks one more."""
    base, extra = divmod(num_heads, ulysses)
    return [base + (1 if i < extra else 0) for i in range(ulysses)]


# ---------------------------------------------------------------------------------------------
# shape agreement: a rank with a different shape must fail with a message, not hang a collective

_CHECK_GROUPS: dict[tuple, dist.ProcessGroup] = {}


def _check_group(ug: dist.ProcessGroup | None, rg: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """A gloo group over the whole ulysses x ring grid of this rank, for host-side metadata
    checks that must not synchronise the GPU. Created once per pair of groups (keyed by the
    group objects: torch hands out the same names again after destroy_process_group); every
    rank of the world takes part (the first call is collective anyway)."""
    key = (ug, rg)
    if key not in _CHECK_GROUPS:
        only = ug if rg is None else rg if ug is None else None
        if only is not None and dist.get_backend(only) == "gloo":
            _CHECK_GROUPS[key] = only
        else:
            me = dist.get_rank()
            mine = {me}
            for g in (ug, rg):
                if g is not None:
                    mine.update(dist.get_process_group_ranks(g))
            lists: list = [None] * dist.get_world_size()
            dist.all_gather_object(lists, sorted(mine))
            grids: list[set[int]] = []  # union of the sets that share a rank: the sp grids
            for ranks in lists:
                grid = set(ranks)
                for other in [x for x in grids if x & grid]:
                    grid |= other
                    grids.remove(other)
                grids.append(grid)
            for grid in sorted(grids, key=min):
                pg = dist.new_group(ranks=sorted(grid), backend="gloo")
                if me in grid:
                    _CHECK_GROUPS[key] = pg
    return _CHECK_GROUPS[key]


def _check_agreement(meta: list[int], ug, rg) -> None:
    """All ranks of the ulysses x ring grid agree on ``meta``, or all of them raise.

    One all-gather on a CPU group: it completes whatever the values are, so nobody is left
    waiting in a collective with mismatched sizes.
    """
    g = _check_group(ug, rg)
    t = torch.tensor(meta, dtype=torch.int64)
    got = [torch.empty_like(t) for _ in range(dist.get_world_size(g))]
    dist.all_gather(got, t, group=g)
    rows = [x.tolist() for x in got]
    if any(r != meta for r in rows):
        names = ("(query shape, key shape, value shape, dtypes, joint_tokens, seq_len, "
                 "joint_front, no joint_lengths, shard_lengths count/sum/weighted sum, "
                 "XDIT_OPS_USP_CHUNKS/_RING/_ULYSSES/_FP8_WIRE, XDIT_OPS_FP8_FORMAT, "
                 "XDIT_OPS_PUSH_KERNEL, XDIT_OPS_USP_GRAPH valid)")
        ranks = dist.get_process_group_ranks(g)
        detail = "; ".join(f"rank {ranks[i]}: {tuple(r)}" for i, r in enumerate(rows))
        raise ValueError(
            f"{OP}: the sequence-parallel ranks disagree on {names}: {detail}. Every rank "
            "must pass the same shapes (shard with xdit_ops.shard_sequence)."
        )


_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


# ---------------------------------------------------------------------------------------------
# local attention pieces


def _local_attention(q, k, v, scale, backend, resolved):
    """(out, lse) of one block; empty key blocks give lse = -inf. On CUDA (``resolved``: the
    plan's backend, resolved once) the attention op's kernel is called directly: the plan
    checked the shapes, so this saves the nested dispatch, checks and backend resolution of
    every block (~40 us of host time each, run 13's profile)."""
    if resolved is not None:
        return attention_cuda_resolved(q, k, v, scale, resolved, True)
    return torch.ops.xdit_ops.attention.default(q, k, v, scale, backend, True)


def _masked_joint_attention(q, kj, vj, joint_lengths, scale, backend):
    """Attention of q over the joint keys with keys >= joint_lengths[b] excluded (exactly)."""
    B, Sq, h, _ = q.shape
    J = kj.shape[1]
    keep = torch.arange(J, device=q.device)[None, :] < joint_lengths.to(q.device)[:, None]
    if q.device.type != "cuda" or backend == "math":
        out, lse = attention_ref(q, kj, vj, scale=scale, key_mask=keep)
        return out, lse.float()
    # torch's memory-efficient kernel takes an additive bias; its last dim must be aligned, so
    # pad the keys to a multiple of 16 with excluded (zero) keys.
    Jp = -(-J // 16) * 16
    if Jp != J:
        kj = torch.cat([kj, kj.new_zeros(B, Jp - J, h, kj.shape[-1])], dim=1)
        vj = torch.cat([vj, vj.new_zeros(B, Jp - J, h, vj.shape[-1])], dim=1)
        keep = torch.cat([keep, keep.new_zeros(B, Jp - J)], dim=1)
    bias = torch.zeros(B, 1, 1, Jp, device=q.device, dtype=q.dtype)
    bias.masked_fill_(~keep[:, None, None, :], float("-inf"))
    res = torch.ops.aten._scaled_dot_product_efficient_attention.default(
        q.transpose(1, 2), kj.transpose(1, 2), vj.transpose(1, 2),
        bias.expand(B, h, Sq, Jp), True, 0.0, False, scale=scale,
    )
    out = res[0].transpose(1, 2).contiguous()
    lse = res[1][:, :, :Sq].float().contiguous()
    # A sample with no valid joint key: its rows have no keys here (lse -inf, output ignored).
    empty = ~keep.any(dim=1)
    lse = lse.masked_fill(empty[:, None, None], float("-inf"))
    return out, lse


# ---------------------------------------------------------------------------------------------
# Ulysses exchange


def _all_to_all(recv: torch.Tensor, send: torch.Tensor, out_splits: list[int] | None,
                in_splits: list[int] | None, group: dist.ProcessGroup) -> None:
    """``dist.all_to_all_single`` (blocking) without its Python wrapper: the plan has checked
    the tensors and the group already, and the wrapper's checks and logging cost ~20 us of host
    time per call (run 13 profile). The process group's own method does the rest, as the
    wrapper would."""
    opts = dist.AllToAllOptions()
    if hasattr(opts, "asyncOp"):
        opts.asyncOp = False  # what the wrapper sets for a blocking call (torch >= 2.8)
    # torch's wrapper calls all_to_all_single where the group has it (newer torch), before
    # that alltoall_base
    method = getattr(group, "all_to_all_single", None) or group.alltoall_base
    work = method(recv, send, [] if out_splits is None else out_splits,
                  [] if in_splits is None else in_splits, opts)
    if work is not None:
        work.wait()


def _ulysses_in(q_s, k_s, v_s, p: _Plan):
    """All-to-all of Q, K, V together: [B, L, H, D] x3 -> the flat receive buffer
    ``[U(src), 3, B, L, h_me, D]`` (the gathered sequence in shard order).

    The send buffer is packed by one native kernel (``ulysses_pack_qkv``: any input strides,
    uneven heads) and one ``all_to_all_single`` moves all three tensors."""
    send = torch.ops.xdit_ops.ulysses_pack_qkv.default(q_s, k_s, v_s, p.heads)
    out_splits, in_splits, total = p.in_splits
    recv = q_s.new_empty(total)
    _all_to_all(recv, send, out_splits, in_splits, p.ug)
    return recv


def _place(recv, U, B, L, h, q_j, k_j, v_j, h0, J, Jk):
    """The received Q/K/V (flat ``[U, 3, B, L, h, D]``) plus this rank's heads ``[h0, h0 + h)``
    of the joint rows -> the query buffer ``[B, J + U*L, h, D]`` and the K/V buffer
    ``[2, B, Jk + U*L, h, D]`` (joint tokens first: key order does not matter, and query rows go
    back in place at the end), built by one native kernel (``ulysses_place_gathered``); plus the
    joint K/V when they are a partial of their own (``Jk == 0 < J``), else ``(None, None)``."""
    qbuf, kv = torch.ops.xdit_ops.ulysses_place_gathered.default(
        recv, U, B, L, h, q_j if J else None, k_j if J else None, v_j if J else None, h0,
        Jk > 0)
    hs = slice(h0, h0 + h)
    joint_kv = (k_j[:, :, hs], v_j[:, :, hs]) if J and not Jk else (None, None)
    return qbuf, kv, *joint_kv


def _chunked_out(out_recv, B, J, L, H, joint_front):
    """Outputs received per head chunk, ``[C, U(src), B, J + L, hc, D]`` -> ``[B, J + L, H, D]``
    (head ``(u * C + c) * hc + i``; joint rows in front or behind)."""
    C, U, _, _, hc, D = out_recv.shape
    out = out_recv.new_empty(B, J + L, H, D)
    src = out_recv.permute(2, 3, 1, 0, 4, 5)  # [B, J+L, U, C, hc, D]
    dst = out.view(B, J + L, U, C, hc, D)
    if joint_front or not J:
        dst.copy_(src)
    else:
        dst[:, L:].copy_(src[:, :J])
        dst[:, :L].copy_(src[:, J:])
    return out


def _rows_per_destination(dst, o, J, L):
    """``dst [U, B, J + L, h, D]`` <- this rank's output ``o [B, J + U*L, h, D]`` (joint rows
    first): destination ``u`` gets every joint row and its own ``L`` sequence rows."""
    U, B = dst.shape[:2]
    if J:
        dst[:, :, :J] = o[:, :J].unsqueeze(0)
    dst[:, :, J:] = o[:, J:].reshape(B, U, L, *o.shape[2:]).permute(1, 0, 2, 3, 4)


CHUNKS_ENV = "XDIT_OPS_USP_CHUNKS"


def parse_chunks(switch: str | None) -> int | str | tuple[int, ...]:
    """``XDIT_OPS_USP_CHUNKS`` (``switch``) as the paths read it: ``0`` where unset or empty
    (each path's default), an int (``N`` equal head chunks; ``<= 0``: the default), ``"equal"``
    (the overlap's equal default of sessions 10-11: 2 chunks, or 3 when 2 does not divide the
    share), or a tuple of head counts from a comma list such as ``1,4,4,1`` (the overlap's
    chunks in order, each >= 1, at least two). A list or ``equal`` is read by the overlap path
    only: the pipelined and copy-engine paths take their default under it. Anything else
    raises a ValueError naming the variable."""
    if switch is None or not switch.strip():
        return 0
    text = switch.strip()
    if text == "equal":
        return text
    try:
        if "," not in text:
            return int(text)
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        counts = ()
    if len(counts) < 2 or min(counts) < 1:
        raise ValueError(f"{OP}: {CHUNKS_ENV} must be an int, 'equal' or a comma list of two "
                         f"or more head counts >= 1 (e.g. 1,4,4,1), got {switch!r}")
    return counts


def _chunks_int(switch: str | None) -> int:
    """The int the pipelined and copy-engine paths read from ``XDIT_OPS_USP_CHUNKS``: 0 (their
    default) for ``equal`` or a list, which only the overlap path reads."""
    c = parse_chunks(switch)
    return c if isinstance(c, int) else 0


def _pipelined_chunks(H: int, U: int, R: int, switch: str | None) -> int:
    """Head chunks for the pipelined Ulysses path (``switch``: the value of
    ``XDIT_OPS_USP_CHUNKS``, default 1).

    With c > 1 chunks, chunk j's all-to-all runs on NCCL's stream while chunk j-1's attention
    computes. Only heads that split evenly over U x c qualify, only without a ring; every rank
    derives the same c from the shapes.
    """
    c = _chunks_int(switch) or 1
    if c <= 1 or R > 1 or H % (U * c) != 0:
        return 1
    return c


def _ulysses_pipelined(q_s, k_s, v_s, q_j, k_j, v_j, J, Jk, joint_front, heads, u_rank, ug,
                       chunks, attend):
    """Ulysses with the exchange of head chunk j+1 overlapping chunk j's attention (even heads).

    One copy packs Q, K, V for every (chunk, destination): [C, U, 3, B, L, hc, D]; each chunk's
    slice is one all-to-all, issued asynchronously, and each chunk's output goes back the same
    way while the next chunk computes.
    """
    B, L, H, D = q_s.shape
    U, C = len(heads), chunks
    h = heads[0]
    hc = h // C
    send = torch.stack([t.reshape(B, L, U, C, hc, D).permute(3, 2, 0, 1, 4, 5)
                        for t in (q_s, k_s, v_s)], dim=2)  # [C, U, 3, B, L, hc, D]
    recv = torch.empty_like(send)  # [C, U(src), 3, B, L, hc, D]
    works = [dist.all_to_all_single(recv[c], send[c], group=ug, async_op=True)
             for c in range(C)]
    out_send = q_s.new_empty(C, U, B, J + L, hc, D)
    out_recv = torch.empty_like(out_send)
    out_works = []
    lses = []
    h0 = u_rank * h
    for c in range(C):
        works[c].wait()
        o, lse = attend(*_place(recv[c].reshape(-1), U, B, L, hc, q_j, k_j, v_j, h0 + c * hc,
                                J, Jk))
        lses.append(lse)
        _rows_per_destination(out_send[c], o, J, L)
        out_works.append(dist.all_to_all_single(out_recv[c], out_send[c], group=ug,
                                                async_op=True))
    for w in out_works:
        w.wait()
    out = _chunked_out(out_recv, B, J, L, H, joint_front)
    return out, torch.cat(lses, dim=1) if C > 1 else lses[0]


def _ulysses_out(o_h, J, L, heads, ug, joint_front, splits):
    """All-to-all back: [B, J + U*L, h_me, D] (joint rows first) -> [B, J + L, H, D].
    ``splits``: ``_exchange_splits`` of this exchange (the plan's ``out_splits``/``lse_splits``)."""
    B, _, h_me, D = o_h.shape
    U = len(heads)
    # Send to each peer its L rows plus the joint rows (every rank needs all joint heads).
    if J == 0 and B == 1 and o_h.is_contiguous():
        send = o_h  # [1, U*L, h, D] is already [U, 1, L, h, D]: no copy
    else:
        send = o_h.new_empty(U, B, J + L, h_me, D)
        _rows_per_destination(send, o_h, J, L)
    out_splits, in_splits, total = splits
    recv = o_h.new_empty(total)
    _all_to_all(recv, send.reshape(-1), out_splits, in_splits, ug)
    # One kernel (a torch reference on CPU): heads interleaved back, joint rows front or back.
    return torch.ops.xdit_ops.ulysses_unpack_out.default(recv, heads, B, J, L, joint_front)


def _lse_out(lse_h, J, L, heads, ug, joint_front, splits):
    """LSE back to the local layout: [B, h_me, J + U*L] -> [B, H, J + L]."""
    # Reuse the output exchange with a head_dim of 1: [B, rows, h, 1].
    o = lse_h.transpose(1, 2).unsqueeze(-1).contiguous()
    back = _ulysses_out(o, J, L, heads, ug, joint_front, splits)  # [B, J+L, H, 1]
    return back.squeeze(-1).transpose(1, 2).contiguous()


# The auto transports take the stream-memory-flag paths (the flag ring, the overlapped
# Ulysses) from this many tokens of the gathered sequence (joint tokens included). Measured
# on 4 H100s (runs 44-45, bench_usp, ms eager / graph): at (1,16896,24,128) the flag ring
# 1.560-1.589 / 1.591-1.610 against the barrier ring's 1.662-1.700 / 1.555-1.580, the overlap
# (2 head chunks) 1.616 / 1.658 against the push's 1.648 / 1.666; at (1,32760,40,128) the flag
# ring 10.20-10.50 / 10.26-10.41 against 10.71-10.74 / 10.56-10.63, the overlap 10.19 / 10.48
# against 10.47 / 10.76. Below it they lose: at (1,4608,24,128) their host work (~0.7-0.8 ms
# a call) is longer than the call (0.21-0.24 ms from a graph) and their graphs are no faster.
# On 2 H100s (run 45) the flag ring still wins at 16896 (3.018 / 2.986 against 3.216 / 3.036)
# and ties at 32760; the overlap ties there (3.087 / 3.122 against 3.213 / 3.094 at 16896,
# 20.46 / 20.70 against 20.31 / 20.67 at 32760), so auto keeps the push below 4 ranks.
AUTO_FLAGS_MIN_TOKENS = 16384
AUTO_OVERLAP_MIN_RANKS = 4


def auto_ring(mapped: bool, tokens: int) -> str:
    """The ring transport ``auto`` takes: ``ceflags`` on peer-mapped ranks from
    ``AUTO_FLAGS_MIN_TOKENS`` gathered tokens, ``ce`` below, ``nccl`` without peer mapping."""
    if not mapped:
        return "nccl"
    return "ceflags" if tokens >= AUTO_FLAGS_MIN_TOKENS else "ce"


def auto_ulysses(mapped: bool, can_overlap: bool, U: int, tokens: int) -> str:
    """The Ulysses transport ``auto`` takes (``mapped``: a peer-mapped Ulysses group, without a
    ring or with a copy-engine one; ``can_overlap``: the overlap applies, see ``_build_plan``):
    ``overlap`` from
    ``AUTO_OVERLAP_MIN_RANKS`` ranks and ``AUTO_FLAGS_MIN_TOKENS`` gathered tokens, else
    ``push``; ``nccl`` without peer mapping."""
    if not mapped:
        return "nccl"
    big = U >= AUTO_OVERLAP_MIN_RANKS and tokens >= AUTO_FLAGS_MIN_TOKENS
    return "overlap" if can_overlap and big else "push"


RING_TRANSPORTS = ("auto", "nccl", "ce", "ceflags")
CE_RINGS = ("ce", "ceflags")  # the copy-engine rings (barrier kernels / stream-memory flags)


def ring_transport(device: torch.device, switch: str | None) -> str:
    """How K/V blocks travel around the ring, as asked (``switch``: the value of
    ``XDIT_OPS_USP_RING``):

    - ``nccl``: NCCL P2P send/recv kernels (any topology);
    - ``ce``: the copy engines pull the previous rank's block straight out of its
      symmetric-memory buffer over NVLink, taking no SMs from the attention (4 H200s, run 29:
      the (1, 16896, 24, 128) ring at 0.861 of linear against NCCL's 0.554);
    - ``ceflags``: the same pulls, synchronised by flag words in
      symmetric memory with stream memory operations (``_ring_ce_flags``) instead of a barrier
      kernel per step: a barrier kernel on the side stream waits for a free SM behind the
      attention (run 34's profile: ~0.6 ms of barrier waits per call at (1,32760,40,128));
    - ``auto`` (default): where every rank of the ring group can map the others' memory (one
      host, peer access) ``ceflags`` from ``AUTO_FLAGS_MIN_TOKENS`` gathered tokens and ``ce``
      below (``auto_ring``), else ``nccl``; the plan decides, once per group
      (``_peer_mapped``).

    The NCCL GPU test, which calls the op with several shapes in a row (a symmetric buffer per
    shape), deadlocked with ``ce`` on 2 GPUs in runs 5-7. The likely cause was torch 2.11
    zeroing a new symmetric block (signal pad included) asynchronously behind pending work, so a
    fast peer's signal could be wiped; ``_symm_buffer`` synchronises before the rendezvous since
    then, and the same test passed with the ``ce`` ring on 2 and 4 GPUs and the 2 x 2 hybrid
    (run 31). Off CUDA every choice is ``nccl`` (gloo on CPU)."""
    choice = switch or "auto"
    if choice not in RING_TRANSPORTS:
        raise ValueError(f"{OP}: XDIT_OPS_USP_RING must be one of {RING_TRANSPORTS}, got "
                         f"{choice!r}")
    return choice if device.type == "cuda" else "nccl"


_SIDE_STREAMS: dict[tuple[int, int], torch.cuda.Stream] = {}


def _ring_buffers(group: dist.ProcessGroup, shape: tuple, dtype: torch.dtype,
                  device: torch.device):
    """Two K/V block buffers in symmetric memory (peer-mapped), allocated once per shape."""
    return _symm_buffer(group, "ring", (2, *shape), dtype, device)


def _side_stream(device: torch.device, which: int = 0) -> torch.cuda.Stream:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if (idx, which) not in _SIDE_STREAMS:
        _SIDE_STREAMS[(idx, which)] = torch.cuda.Stream(device=idx)
    return _SIDE_STREAMS[(idx, which)]


# ---------------------------------------------------------------------------------------------
# Ulysses over the copy engines (XDIT_OPS_USP_ULYSSES=ce)

_SYMM: dict[tuple, tuple[torch.Tensor, object, dist.ProcessGroup]] = {}


def release_symmetric_buffers() -> None:
    """Forget the symmetric-memory buffers of the copy-engine and push paths
    (``destroy_parallel`` calls it before the groups they were rendezvoused with are
    destroyed)."""
    release_call_graphs()
    _SYMM.clear()
    _PUSH.clear()
    _OVERLAP.clear()
    _PEER_MAPPED.clear()


def release_call_graphs(sync: bool = True) -> None:
    """Drop the eager calls' own CUDA graphs (XDIT_OPS_USP_GRAPH) and the fast path's entries:
    a graph holds its private memory pool and the symmetric-memory buffers of the groups it
    was captured with, so it must go before they do (run 49's ranks hung in
    ``destroy_process_group`` while a graph still held NCCL kernels; such graphs are no longer
    made, ``_graph_eligible``). Called by ``release_symmetric_buffers`` (after a synchronize
    of their devices: no replay may still run on a freed pool) and at exit (without: a peer
    that died mid-call would leave the exit waiting forever); the next call of a plan starts
    over (eager, then a new capture)."""
    _FAST.clear()
    plans = [p for p in _PLANS.values() if p.graphs]
    if not plans:
        return
    if sync and torch.cuda.is_initialized():
        # no replay may still run when its graph (and its memory pool) goes: every device
        # that has one
        for dev in {key[2] for p in plans for key in p.graphs}:
            torch.cuda.synchronize(dev)
    for p in plans:
        p.graphs.clear()
    GRAPH_FAILURES.clear()
    _CAP_WARNED[0] = False


ULYSSES_TRANSPORTS = ("auto", "nccl", "ce", "push", "overlap")


def ulysses_transport(device: torch.device, switch: str | None) -> str:
    """How the Ulysses exchange moves, as asked (``switch``: the value of
    ``XDIT_OPS_USP_ULYSSES``):

    - ``auto`` (default): ``push`` where it works, ``overlap`` instead from
      ``AUTO_OVERLAP_MIN_RANKS`` ranks and ``AUTO_FLAGS_MIN_TOKENS`` gathered tokens where it
      applies (``auto_ulysses``), else ``nccl``; the plan decides, once per group
      (``_peer_mapped``);
    - ``nccl``: NCCL all-to-all kernels (any topology);
    - ``ce``: every rank pulls its pieces from the peers' symmetric-memory buffers with
      device-to-device copies on the copy engines, per head chunk, overlapped with the
      attention of the chunk before;
    - ``push``: one kernel packs Q, K, V and stores them straight into the peers'
      symmetric-memory buffers, in the layout attention reads; the output goes back the same
      way.
    - ``overlap``: the push for the first of C head chunks (``XDIT_OPS_USP_CHUNKS``, default
      ``overlap_default_chunks``: one head first and last, the rest between), the copy engines
      for the others while the first is attended, each chunk's output home on the copy engines
      while the next is attended, flags by stream memory operations (``_ulysses_overlap``).
      Where it cannot apply (a ring, uneven heads, one head a rank, N equal chunks that do not
      divide the share, no peer mapping, ``XDIT_OPS_PUSH_KERNEL=v1``) the call takes ``push``
      (or ``nccl``).

    Off CUDA every choice is ``nccl`` (gloo on CPU)."""
    choice = switch or "auto"
    if choice not in ULYSSES_TRANSPORTS:
        raise ValueError(f"{OP}: XDIT_OPS_USP_ULYSSES must be one of {ULYSSES_TRANSPORTS}, got "
                         f"{choice!r}")
    return choice if device.type == "cuda" else "nccl"


_PEER_MAPPED: dict[tuple, bool] = {}


def _peer_mapped(ug: dist.ProcessGroup | None, rg: dist.ProcessGroup | None,
                 which: str = "ulysses") -> bool:
    """Whether every rank of the Ulysses group ``ug`` (``which="ring"``: of the ring group
    ``rg``) can map the others' memory: all on one host, each seeing more than one GPU with
    peer access to every other GPU it sees. Decided once per group pair from one all-gather on
    the grid's CPU group, so every rank decides alike (a rank that went its own way would leave
    the others in a collective)."""
    key = (ug, rg, which)
    if key not in _PEER_MAPPED:
        dev = torch.cuda.current_device()
        n = torch.cuda.device_count()
        peer_ok = n > 1 and all(torch.cuda.can_device_access_peer(dev, e)
                                for e in range(n) if e != dev)
        g = _check_group(ug, rg)
        info: list = [None] * dist.get_world_size(g)
        dist.all_gather_object(info, (dist.get_rank(), socket.gethostname(), peer_ok), group=g)
        members = set(dist.get_process_group_ranks(ug if which == "ulysses" else rg))
        mine = [(host, ok) for rank, host, ok in info if rank in members]
        _PEER_MAPPED[key] = all(ok for _, ok in mine) and len({h for h, _ in mine}) == 1
    return _PEER_MAPPED[key]


def _symm_buffer(group: dist.ProcessGroup, tag: str, shape: tuple, dtype: torch.dtype,
                 device: torch.device, init=None):
    """A symmetric-memory buffer (peer-mapped on every rank of ``group``), one per key; the
    rendezvous is collective, so it happens on the first call with a shape, never in a graph.
    ``init(buf)``, if given, fills a new buffer before any peer can see it."""
    # Keyed by the group object (kept alive in the value, so its id is not reused), not its
    # name: torch reuses group names after destroy_process_group, and a buffer rendezvoused
    # with an old group's ranks would be signalled by the wrong peers.
    key = (id(group), tag, shape, dtype, device)
    if key in _SYMM and _SYMM[key][2] is not group:
        del _SYMM[key]
    if key not in _SYMM:
        if _capturing():
            raise RuntimeError(
                f"{OP}: the {tag} buffer of shape {shape} ({dtype}) is made on the first call with "
                "these shapes, which must be eager (its rendezvous is a host collective): call "
                "the op once outside the CUDA graph (a warm-up call) before capturing")
        import warnings

        import torch.distributed._symmetric_memory as symm_mem

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            symm_mem.enable_symm_mem_for_group(group.group_name)
        buf = symm_mem.empty(shape, dtype=dtype, device=device)
        if init is not None:
            init(buf)
        # torch 2.11 zeroes a new block (its signal pad included) with a plain cudaMemset on
        # the legacy stream: asynchronous to the host and queued behind everything on the
        # device. The rendezvous below is what lets the peers signal into the pad, so a peer
        # whose GPU got ahead could signal before the zeroing lands: the signal is wiped and
        # both ranks wait in the next barrier for ever. Finish the zeroing before any peer can
        # see the buffer (what pytorch/pytorch#192308 later did inside the allocator).
        torch.cuda.synchronize(device)
        _SYMM[key] = (buf, symm_mem.rendezvous(buf, group.group_name), group)
    return _SYMM[key][:2]


def _ce_chunks(h: int, switch: str | None) -> int:
    """Head chunks of the copy-engine Ulysses (``switch``: the value of ``XDIT_OPS_USP_CHUNKS``)."""
    c = _chunks_int(switch)
    if c <= 0:  # default: 3 or 2 head chunks when they divide, so two thirds / half is hidden
        c = 3 if h % 3 == 0 else 2 if h % 2 == 0 else 1
    return c if h % c == 0 else 1


def _ulysses_ce(q_s, k_s, v_s, q_j, k_j, v_j, J, Jk, joint_front, heads, u_rank, ug, C,
                attend):
    """Ulysses with the copy engines: [B, L, H, D] x3 -> ([B, J + L, H, D], lse [B, h, J + U*L]).

    Every rank packs Q, K, V once into its symmetric send buffer ``[C, U(dst), 3, B, L, hc, D]``
    (C head chunks of hc heads); after a device barrier, one side stream per peer pulls chunk
    by chunk what that peer packed for this rank, while the compute stream attends the chunks
    already here. Each chunk's output is written into the symmetric output buffer
    ``[C, U(dst), B, J + L, hc, D]`` (joint rows to every rank); after a barrier per chunk the
    peers pull their rows. A last barrier, which the compute stream waits for, marks both
    buffers free for the next call. No SM does any of the moving.
    """
    B, L, H, D = q_s.shape
    U = len(heads)
    h = heads[0]
    hc = h // C
    dev = q_s.device
    dt = q_s.dtype
    send, hin = _symm_buffer(ug, "ulysses_in", (C, U, 3, B, L, hc, D), dt, dev)
    osym, hout = _symm_buffer(ug, "ulysses_out", (C, U, B, J + L, hc, D), dt, dev)
    compute = torch.cuda.current_stream(dev)
    peers = [p for p in range(U) if p != u_rank]
    sides = [_side_stream(dev, 1 + i) for i in range(len(peers))]
    s0 = sides[0]
    # Pack: [B, L, (U, C, hc), D] -> [C, U, B, L, hc, D] for q, k and v.
    for i, t in enumerate((q_s, k_s, v_s)):
        send[:, :, i].copy_(t.reshape(B, L, U, C, hc, D).permute(3, 2, 0, 1, 4, 5))
    s0.wait_stream(compute)
    with torch.cuda.stream(s0):
        hin.barrier(channel=0)  # every rank's pack is in place
    recv = q_s.new_empty(C, U, 3, B, L, hc, D)
    chunk_in = 3 * B * L * hc * D
    arrived = []
    for s in sides[1:]:
        s.wait_stream(s0)
    for c in range(C):
        evs = []
        for p, s in zip(peers, sides, strict=True):
            with torch.cuda.stream(s):
                src = hin.get_buffer(p, (3, B, L, hc, D), dt, (c * U + u_rank) * chunk_in)
                recv[c, p].copy_(src)
                evs.append(torch.cuda.Event())
                evs[-1].record(s)
        arrived.append(evs)
    recv[:, u_rank].copy_(send[:, u_rank])
    chunk_out = B * (J + L) * hc * D
    out_recv = q_s.new_empty(C, U, B, J + L, hc, D)
    h0 = u_rank * h
    lses = []
    for c in range(C):
        for ev in arrived[c]:
            compute.wait_event(ev)
        o, lse = attend(*_place(recv[c].reshape(-1), U, B, L, hc, q_j, k_j, v_j, h0 + c * hc,
                                J, Jk))
        lses.append(lse)
        _rows_per_destination(osym[c], o, J, L)
        s0.wait_stream(compute)
        with torch.cuda.stream(s0):
            hout.barrier(channel=0)  # chunk c's output is in every rank's buffer
        for p, s in zip(peers, sides, strict=True):
            if s is not s0:
                s.wait_stream(s0)
            with torch.cuda.stream(s):
                src = hout.get_buffer(p, (B, J + L, hc, D), dt, (c * U + u_rank) * chunk_out)
                out_recv[c, p].copy_(src)
    out_recv[:, u_rank].copy_(osym[:, u_rank])
    for s in sides[1:]:
        s0.wait_stream(s)
    with torch.cuda.stream(s0):
        hin.barrier(channel=0)  # every pull of this call is done: the buffers are free
    compute.wait_stream(s0)
    out = _chunked_out(out_recv, B, J, L, H, joint_front)
    return out, torch.cat(lses, dim=1) if C > 1 else lses[0]


# ---------------------------------------------------------------------------------------------
# Ulysses by peer stores (XDIT_OPS_USP_ULYSSES=push)

# (group, shape key) -> own query buffer, own K/V buffer, own output, every rank's input and
# output regions (peer-mapped views), the symmetric-memory handle
_PUSH: dict[tuple, tuple] = {}


def _size_class(n: int) -> int:
    """``n`` rounded up to a step of 1/16 to 1/8 of its power of two, so that the push's
    buffers are shared by nearby sizes (at most 12.5% larger than asked) instead of one
    symmetric-memory allocation per distinct size."""
    step = 1 << max(0, n.bit_length() - 4)
    return -(-n // step) * step


def _push_buffers(p: _Plan, dtype: torch.dtype, device: torch.device):
    """The push's symmetric-memory buffer for plan ``p``: every rank's input region (its query
    buffer then its K/V buffer, sized for the largest head share) and output region, and the
    views of all ranks' regions, made on the plan's first call and then looked up by
    ``p.push_key``.

    One allocation per (group, input size class, output size class): shapes share a buffer
    only when both regions start where they did, so a rank's pushes of the next call never
    land in a region whose owner may still be reading the last call's data there (the
    two-barrier argument of ``_ulysses_push`` holds for every region separately)."""
    hit = _PUSH.get(p.push_key)
    if hit is not None:
        return hit
    B, J, Jk, L, U = p.B, p.J, p.Jk, p.L, p.U
    D = p.push_key[-1]  # the head dim
    H = sum(p.heads)
    n_in = _size_class(push_region_size(B, L, U, J, Jk, max(p.heads), D))
    n_out = _size_class(max(1, B * (J + L) * H * D))  # never an empty allocation
    buf, handle = _symm_buffer(p.ug, f"ulysses_push:{n_in}", (n_in + n_out,), dtype, device)
    ins = [handle.get_buffer(j, (n_in,), dtype, 0) for j in range(U)]
    outs = [handle.get_buffer(j, (n_out,), dtype, n_in) for j in range(U)]
    # (_SYMM keeps the group alive and is cleared with _PUSH: a key's group id is not reused
    # while its entry is here)
    hit = (*push_regions(buf, B, L, U, J, Jk, p.h_me, D),
           buf[n_in:n_in + B * (J + L) * H * D].view(B, J + L, H, D), ins, outs, handle)
    _PUSH[p.push_key] = hit
    return hit


def _joint_dst(qbuf, kv, J: int, Jk: int) -> tuple:
    """Where ``_own_joint_rows`` puts this rank's heads of the joint rows: views (q, k, v) of
    its query and K/V buffers, None where there are none (the overlap's tensor host path makes
    them once per plan)."""
    return (qbuf[:, :J] if J else None, kv[0, :, :Jk] if Jk else None,
            kv[1, :, :Jk] if Jk else None)


def _own_joint_rows(dst: tuple, q_j, k_j, v_j, hs: slice, J: int, Jk: int):
    """This rank's heads ``hs`` of the joint rows into ``dst`` (``_joint_dst``: its query
    buffer, and K/V buffer when the joint keys sit in front, ``Jk``); returns the joint K/V as
    their own partial's keys (``Jk == 0 < J``), else (None, None). The push and the overlap
    path place them so."""
    if J:
        dst[0].copy_(q_j[:, :, hs])
    if Jk:
        dst[1].copy_(k_j[:, :, hs])
        dst[2].copy_(v_j[:, :, hs])
    return (k_j[:, :, hs], v_j[:, :, hs]) if J and not Jk else (None, None)


def _ulysses_push(q_s, k_s, v_s, q_j, k_j, v_j, p: _Plan, attend):
    """Ulysses by peer stores: [B, L, H, D] x3 -> ([B, J + L, H, D], lse [B, h, J + U*L]).

    One kernel (``ulysses_push_qkv``) stores this rank's rows of every destination's heads
    straight into that rank's symmetric-memory query and K/V buffers, in the layout attention
    reads (no send buffer, no receive buffer, no placing copy); each rank places its own heads
    of the joint rows. After a device barrier attention runs on the local buffers, and
    ``ulysses_push_out`` stores each output row into its owner's ``[B, J + L, H, D]`` output;
    after a second barrier each rank copies its output out of the buffer (the buffer is
    written again by the next call).

    Why two barriers suffice across calls: a rank pushes the next call's inputs only after the
    output barrier of this call, which every rank passes after its attention on its input
    buffer; and it pushes the next outputs only after the next input barrier, which every
    rank passes after copying this call's output out. This needs the calls of a rank in one
    stream order (the same stream, or streams that wait for each other), as for NCCL's
    collectives; two calls running at once on unsynchronised streams would race on the
    buffers.
    """
    qbuf, kv, outbuf, ins, outs, handle = _push_buffers(p, q_s.dtype, q_s.device)
    J, Jk, L = p.J, p.Jk, p.L
    torch.ops.xdit_ops.ulysses_push_qkv.default(q_s, k_s, v_s, p.heads, ins, p.u_rank, J, Jk)
    kj, vj = _own_joint_rows(_joint_dst(qbuf, kv, J, Jk), q_j, k_j, v_j,
                             slice(p.h0, p.h0 + p.h_me), J, Jk)
    handle.barrier(channel=0)  # every rank's rows are in every buffer
    o, lse = attend(qbuf, _squeezed(p, kv) if p.squeeze else kv, kj, vj)
    if p.push_blocks:  # XDIT_OPS_PUSH_KERNEL unset or v3
        torch.ops.xdit_ops.ulysses_push_out_blocks.default(o, p.heads, outs, p.u_rank, L)
        handle.barrier(channel=0)  # every rank's block is home
        return torch.ops.xdit_ops.ulysses_unpack_out.default(
            outbuf.view(-1), p.heads, p.B, J, L, p.joint_front), lse
    torch.ops.xdit_ops.ulysses_push_out.default(o, p.heads, outs, p.u_rank, L, p.joint_front)
    handle.barrier(channel=0)  # every output row is home
    return outbuf.clone(), lse


# ---------------------------------------------------------------------------------------------
# Ulysses with the exchange under the attention (XDIT_OPS_USP_ULYSSES=overlap)
#
# The heads of every share are cut into C chunks of the plan's head counts (``p.chunk_heads``:
# uneven by default, a small first and last chunk, see ``overlap_default_chunks``). Chunk 0
# goes out by the push kernel (the only exposed input transfer: its heads' share of the
# bytes); chunks 1..C-1 go out on the copy engines (2-D copies from the strided shards into the
# peers' buffers, one side stream per destination) while chunk 0 is attended; chunk c's output
# goes home on the copy engines while chunk c+1 is attended, the last chunk's by the push-out
# kernel (exposed: its heads' share of the output bytes). Ranks tell each other what landed with
# stream memory operations on flag words in symmetric memory (cuStreamWriteValue32 after the
# copies, cuStreamWaitValue32 before the reads): neither takes an SM, so a signal never waits
# behind the attention for a free multiprocessor (a suspect for why run 30's push-per-chunk
# overlap, signalled by barrier kernels and stored by SM kernels, gained nothing).
#
# Flags of rank r (int32 words; every wait is "== 1" and is followed by a reset to 0 by the
# waiter, so a CUDA graph replays the same values):
#   IN_FULL[c][s]  peer s's rows of chunk c are in r's input region c  (written by s, waited by r)
#   OUT_FULL[s]    peer s's output columns (every chunk) are in r's output
#   CALL_DONE[d]   peer d has finished its call (attended every region, copied its output out):
#                  r may write d's buffers again. Starts at 1.
# A call waits for every peer's CALL_DONE first, and ends after every OUT_FULL. A rank's own
# rows and columns are ordered by events, not flags: a stream waiting on a flag blocks the
# hardware queue it may share with the rank's other streams, so on one device a wait must never
# be queued ahead of the write it waits for (run 41: a test that did so hung). Every write a
# peer waits for is queued before the writer's own next wait, so no cycle can form. The waits
# and writes of one step go to the driver as one batch (cuStreamBatchMemOp): run 41's profile
# put ~4 us of stream time on each single operation, ~90 of them a call.

MAX_OVERLAP_CHUNKS = 8
_OVERLAP: dict[tuple, object] = {}


def _flag(kind: int, c: int, j: int, U: int) -> int:
    """Word index of flag ``kind`` (0 IN_FULL[c][j], 1 OUT_FULL[j], 2 CALL_DONE[j])."""
    return c * U + j if kind == 0 else (MAX_OVERLAP_CHUNKS + kind - 1) * U + j


# The default chunking's middle chunks have at most this many heads (more chunks past it, up
# to MAX_OVERLAP_CHUNKS in all). A first guess, to be measured: chunk 1's copies must land
# while chunk 0 (one head) is attended. Run 40's figures per head on 4 H100s: at 16896 tokens
# ~0.21 ms of attention against ~0.065 ms of copy-engine input copies (so ~3 heads fit), at
# 32760 ~0.89 ms against ~0.105 ms (~8 heads).
OVERLAP_MIDDLE_MAX = 4


def overlap_default_chunks(h: int) -> tuple[int, ...]:
    """The overlap's default head chunks of a share of ``h`` heads: one head first and last
    (their transfers are the exposed ones: chunk 0's push before any attention, the last
    chunk's push-out after it), the ``h - 2`` between in one chunk up to 3 heads, else in the
    fewest near-equal chunks of at most ``OVERLAP_MIDDLE_MAX`` heads, at least two (the larger
    ones last): 6 heads (1, 2, 2, 1), 10 (1, 4, 4, 1), 12 (1, 3, 3, 4, 1). ``(h,)`` (no
    overlap possible) for one head."""
    if h < 2:
        return (h,)
    m = h - 2
    if m == 0:
        return (1, 1)
    k = 1 if m <= 3 else min(max(2, -(-m // OVERLAP_MIDDLE_MAX)), MAX_OVERLAP_CHUNKS - 2)
    base, extra = divmod(m, k)
    return (1, *(base + (i >= k - extra) for i in range(k)), 1)


def overlap_equal_chunks(h: int, c: int = 0) -> tuple[int, ...]:
    """``c`` equal head chunks of a share of ``h`` heads (``c <= 0``: 2, or 3 when 2 does not
    divide the share: the overlap's default of sessions 10-11); ``(h,)`` (no overlap) where
    ``c`` does not divide ``h`` or is outside ``2..MAX_OVERLAP_CHUNKS``."""
    if c <= 0:
        c = 2 if h % 2 == 0 else 3 if h % 3 == 0 else 1
    return (h // c,) * c if 1 < c <= MAX_OVERLAP_CHUNKS and h % c == 0 else (h,)


def _overlap_chunks(h: int, switch: str | None) -> tuple[int, ...]:
    """Head counts of the overlap path's chunks, in order, for a share of ``h`` heads
    (``switch``: ``XDIT_OPS_USP_CHUNKS``): unset, empty or ``<= 0``: ``overlap_default_chunks``;
    ``N``: N equal chunks (``overlap_equal_chunks``, ``(h,)`` where N does not divide the
    share: the call takes the push); ``equal``: the equal default (2, or 3); a comma list:
    those counts, which must add up to ``h`` in at most ``MAX_OVERLAP_CHUNKS`` chunks, else a
    ValueError naming the variable, the value and the share (a list is a request for this
    chunking: it is refused, not replaced). A length of 1 means no overlap."""
    c = parse_chunks(switch)
    if isinstance(c, tuple):
        if sum(c) != h or len(c) > MAX_OVERLAP_CHUNKS:
            raise ValueError(
                f"{OP}: {CHUNKS_ENV}={switch!r} must list at most {MAX_OVERLAP_CHUNKS} head "
                f"chunks adding up to this rank's share of {h} heads for the overlapped Ulysses "
                f"(XDIT_OPS_USP_ULYSSES=overlap, or auto's choice); its {len(c)} chunks add up "
                f"to {sum(c)}")
        return c
    if c == "equal":
        return overlap_equal_chunks(h)
    return overlap_default_chunks(h) if c <= 0 else overlap_equal_chunks(h, c)


def _overlap_can_chunk(h: int, switch: str | None) -> bool:
    """Whether the overlap has more than one chunk for a share of ``h`` heads under ``switch``
    (what ``_build_plan`` asks before choosing it): a comma list always (checked against the
    share by ``_overlap_chunks`` once the overlap is chosen), else ``_overlap_chunks``."""
    return isinstance(parse_chunks(switch), tuple) or len(_overlap_chunks(h, switch)) > 1


def overlap_flag_programs(U: int, r: int, C: int, addr) -> dict:
    """Rank ``r``'s flag programs of the overlap path (flat ``(kind, address, value)`` lists;
    ``addr(j, kind, c, i)`` is the address of word ``_flag(kind, c, i, U)`` of rank ``j``):
    ``start``, ``sig_in[c][d]``, ``wait_in[c]``, ``sig_out``, ``wait_out``, ``done`` (their
    use: ``_ulysses_overlap_lists``)."""
    peers = [d for d in range(U) if d != r]

    def wait_reset(kind, c):  # wait for every peer's word of this rank, then reset them
        return sum(([WAIT, addr(r, kind, c, s), 1] for s in peers), []) + \
            sum(([WRITE, addr(r, kind, c, s), 0] for s in peers), [])

    return {
        "start": wait_reset(2, 0),
        # chunk c of this rank's rows is in rank d's region (no flag to itself: an event)
        "sig_in": [[[WRITE, addr(d, 0, c, r), 1] if d != r else [] for d in range(U)]
                   for c in range(C)],
        "wait_in": [wait_reset(0, c) for c in range(C)],
        "sig_out": sum(([WRITE, addr(d, 1, 0, r), 1] for d in peers), []),
        "wait_out": wait_reset(1, 0),
        "done": sum(([WRITE, addr(d, 2, 0, r), 1] for d in peers), []),
    }


def _overlap_state(p: _Plan, dtype: torch.dtype, device: torch.device):
    """Buffers, flags and every flag program of plan ``p``'s overlap path, made on its first
    call (two symmetric-memory rendezvous: must be eager) and looked up by ``p.push_key``."""
    ch = p.chunk_heads
    key = (p.push_key, ch)
    hit = _OVERLAP.get(key)
    if hit is not None:
        return hit
    B, J, Jk, L, U, C, r = p.B, p.J, p.Jk, p.L, p.U, len(ch), p.u_rank
    D = p.push_key[-1]
    H = sum(p.heads)
    # chunk c's input region: its own size (its head count), one after the other
    n_chunk = [push_region_size(B, L, U, J, Jk, hc, D) for hc in ch]
    off = [sum(n_chunk[:c]) for c in range(C + 1)]
    n_out = max(1, B * (J + L) * H * D)
    tag = f"ulysses_overlap:{'-'.join(map(str, ch))}:{n_chunk[0] // ch[0]}"
    buf, handle = _symm_buffer(p.ug, tag, (off[C] + n_out,), dtype, device)
    n_flags = _flag(2, 0, U, U)

    def init(f):
        f.zero_()
        f[_flag(2, 0, 0, U):] = 1  # CALL_DONE

    flags, fhandle = _symm_buffer(p.ug, "ulysses_overlap_flags", (n_flags,), torch.int32,
                                  device, init=init)
    rflags = [fhandle.get_buffer(j, (n_flags,), torch.int32, 0) for j in range(U)]
    ins = [[handle.get_buffer(j, (n_chunk[c],), dtype, off[c]) for j in range(U)]
           for c in range(C)]
    outs = [handle.get_buffer(j, (n_out,), dtype, off[C]) for j in range(U)]
    local = [push_regions(buf[off[c]:off[c + 1]], B, L, U, J, Jk, ch[c], D) for c in range(C)]
    outbuf = buf[off[C]:off[C] + B * (J + L) * H * D].view(B, J + L, H, D)

    def addr(j, kind, c, i):  # the word of rank j
        return word_address(rflags[j], _flag(kind, c, i, U))

    progs = overlap_flag_programs(U, r, C, addr)
    # the copy-engine destinations: rank d's region c (its query and K/V buffers) and rank d's
    # output, viewed in its symmetric memory
    in_dst = [[push_regions(ins[c][d], B, L, U, J, Jk, ch[c], D) for d in range(U)]
              for c in range(C)]
    out_dst = [outs[d][:B * (J + L) * H * D].view(B, J + L, H, D) for d in range(U)]

    def check_all(x):  # programs, or lists of them
        if not x or isinstance(x[0], int):
            check_memops(x)
        else:
            for y in x:
                check_all(y)

    check_all(list(progs.values()))  # checked once here; the calls pass them unchecked
    progs["in_heads"], progs["out_heads"] = overlap_push_heads(p.heads, r, ch)
    # copy2d templates (sources as offsets), per source strides: {key: ...}; the first call
    # with a key builds and checks them
    hit = (local, outbuf, ins, outs, flags, in_dst, out_dst, progs, {})
    _OVERLAP[key] = hit
    return hit


def overlap_push_heads(heads: Sequence[int], r: int, ch: Sequence[int]) -> tuple:
    """The head arguments of rank ``r``'s overlap kernels (``heads``: every rank's share, all
    equal on this path; ``ch``: the share's chunk head counts): the chunked push's
    ``(counts, src_head_start)`` (chunk 0 of every share: ``ch[0]`` heads from each
    destination's first head) and the last chunk's push-out counts (this rank's entry
    ``ch[-1]``, the next rank's grown by the rest of the share, so the total stays ``H``)."""
    U, h = len(heads), heads[r]
    cnt = list(heads)
    cnt[r] = ch[-1]
    cnt[(r + 1) % U] += h - ch[-1]
    return ([ch[0]] * U, [d * h for d in range(U)]), cnt


def _chunk_starts(ch: Sequence[int]) -> list[int]:
    """Where each chunk's heads start in the share."""
    return [sum(ch[:c]) for c in range(len(ch))]


def _in_templates(p: _Plan, in_dst, srcs) -> list[list[tuple[list[int], list[int]]]]:
    """The copy-engine input copies of the overlap path for sources ``srcs`` = (q, k, v)
    ([B, L, H, D] each) as templates: ``[d][c - 1] = (descs, which)``, destination rank ``d``,
    chunk ``c`` (1..C-1, heads ``p.chunk_heads[c]`` of the share), sources offsets from
    ``srcs[which[i]]`` (made on the first call with these source strides)."""
    J, Jk, L, U, r = p.J, p.Jk, p.L, p.U, p.u_rank
    ch = p.chunk_heads
    C = len(ch)
    start = _chunk_starts(ch)
    h = p.h_me
    q_s, k_s, v_s = srcs
    rows = slice(r * L, (r + 1) * L)
    per = []
    for d in range(U):
        per.append([])
        for c in range(1, C):
            qd, kvd = in_dst[c][d]
            hs = slice(d * h + start[c], d * h + start[c] + ch[c])
            parts = [(rows2d(qd[:, J:][:, rows], q_s[:, :, hs]), 0),
                     (rows2d(kvd[0, :, Jk:][:, rows], k_s[:, :, hs]), 1),
                     (rows2d(kvd[1, :, Jk:][:, rows], v_s[:, :, hs]), 2)]
            per[-1].append((sum((template(x, srcs[i].data_ptr()) for x, i in parts), []),
                            [i for x, i in parts for _ in range(len(x) // 6)]))
    return per


def _out_templates(p: _Plan, out_dst, o: torch.Tensor,
                   h_out: int) -> list[tuple[list[int], list[int]]]:
    """The copy-engine output copies of one chunk's output ``o`` ([B, J + U*L, hc, D], heads
    from ``h_out`` of the full output) as templates, ``[d] = (descs, which)``, sources offsets
    from ``o``."""
    J, L, U = p.J, p.L, p.U
    hc = o.shape[2]
    per = []
    for d in range(U):
        dst = out_dst[d]
        seq0 = J if p.joint_front else 0
        descs = rows2d(dst[:, seq0:seq0 + L, h_out:h_out + hc],
                       o[:, J + d * L:J + (d + 1) * L])
        if J:
            j0 = 0 if p.joint_front else L
            descs += rows2d(dst[:, j0:j0 + J, h_out:h_out + hc], o[:, :J])
        per.append((template(descs, o.data_ptr()), [0] * (len(descs) // 6)))
    return per


def _overlap_push_in(q_s, k_s, v_s, p: _Plan, progs: dict, ins0, first: bool) -> None:
    """The overlap's chunk 0: the push kernel, every destination's first ``chunk_heads[0]``
    heads of its share (checked by the wrapper on a template's first call, then straight to
    the op)."""
    chunk, starts = progs["in_heads"]
    if first:
        ulysses_push_qkv(q_s, k_s, v_s, chunk, ins0, p.u_rank, p.J, p.Jk, src_head_start=starts)
    else:
        torch.ops.xdit_ops.ulysses_push_qkv.default(q_s, k_s, v_s, chunk, ins0, p.u_rank, p.J,
                                                    p.Jk, starts)


def _overlap_push_out(o, p: _Plan, progs: dict, outs, h_out: int, first: bool) -> None:
    """The overlap's last chunk output ``o`` (heads from ``h_out``) home by the push-out kernel
    (checked as ``_overlap_push_in``)."""
    cnt = progs["out_heads"]
    if first:
        ulysses_push_out(o, cnt, outs, p.u_rank, p.L, p.joint_front, head_offset=h_out)
    else:
        torch.ops.xdit_ops.ulysses_push_out.default(o, cnt, outs, p.u_rank, p.L, p.joint_front,
                                                    h_out)


def _ulysses_overlap_lists(q_s, k_s, v_s, q_j, k_j, v_j, p: _Plan, attend):
    """The overlap path (see the block comment above): [B, L, H, D] x3 -> ([B, J + L, H, D],
    lse [B, h, J + U*L]), with the host work of run 43 (``XDIT_OPS_USP_HOST=lists``): the flag
    programs and copy descriptors passed as lists of ints, stream contexts and events made per
    call. ``_ulysses_overlap`` queues the same copies, flags and kernels."""
    dev = q_s.device
    local, outbuf, ins, outs, flags, in_dst, out_dst, g, tmpl = _overlap_state(p, q_s.dtype,
                                                                                dev)
    J, Jk, U, r = p.J, p.Jk, p.U, p.u_rank
    ch = p.chunk_heads
    C = len(ch)
    start = _chunk_starts(ch)
    compute = torch.cuda.current_stream(dev)
    sides = [_side_stream(dev, 8 + d) for d in range(U)]
    srcs = (q_s, k_s, v_s)
    ikey = ("in",) + tuple(t.stride() for t in srcs)
    first = ikey not in tmpl
    if first:  # this call's source strides are new: templates of every input copy
        tmpl[ikey] = _in_templates(p, in_dst, srcs)
    bases = [t.data_ptr() for t in srcs]
    run_memops(flags, g["start"], checked=False)  # every peer is done with the last call
    _overlap_push_in(q_s, k_s, v_s, p, g, ins[0], first)
    run_memops(flags, sum(g["sig_in"][0], []), checked=False)
    # chunks 1..C-1 on the copy engines, one side stream per destination
    own = [None] * C  # events: this rank's own rows of chunk c are in place
    for d in range(U):
        s = sides[d]
        s.wait_stream(compute)
        with torch.cuda.stream(s):
            for c in range(1, C):
                t, which = tmpl[ikey][d][c - 1]
                run_copy2d(flags, rebased(t, which, bases), checked=False)
                if d == r:
                    own[c] = torch.cuda.Event()
                    own[c].record(s)
                run_memops(flags, g["sig_in"][c][d], checked=False)  # (none to itself)
    kept = []  # outputs the side streams still read
    lses = []
    for c in range(C):
        qbuf, kv = local[c]
        h_out = p.h0 + start[c]
        kj, vj = _own_joint_rows(_joint_dst(qbuf, kv, J, Jk), q_j, k_j, v_j,
                                 slice(h_out, h_out + ch[c]), J, Jk)
        if own[c] is not None:
            compute.wait_event(own[c])
        run_memops(flags, g["wait_in"][c], checked=False)
        o, lse = attend(qbuf, _squeezed(p, kv) if p.squeeze else kv, kj, vj)
        lses.append(lse)
        if c == C - 1:  # the last chunk's output: the push-out kernel, nothing left to hide it
            _overlap_push_out(o, p, g, outs, h_out, first)
            break
        if o.stride(-1) != 1 or o.stride(-2) != o.shape[-1]:
            o = o.contiguous()
        kept.append(o)
        okey = ("out", c, o.stride())
        if okey not in tmpl:
            tmpl[okey] = _out_templates(p, out_dst, o, h_out)
        obase = [o.data_ptr()]
        for d in range(U):
            s = sides[d]
            s.wait_stream(compute)
            with torch.cuda.stream(s):
                t, which = tmpl[okey][d]
                run_copy2d(flags, rebased(t, which, obase), checked=False)
    for s in sides:
        compute.wait_stream(s)  # every copy of this rank's is done (inputs and outputs)
    run_memops(flags, g["sig_out"] + g["wait_out"], checked=False)
    out = outbuf.clone()
    run_memops(flags, g["done"], checked=False)
    return out, torch.cat(lses, dim=1)


# Host work of the overlap path and the copy-engine rings (flags and barriers; XDIT_OPS_USP_HOST,
# default "tensors"):
# run 42/43 found both host-bound in eager mode (overlap at (1, 4608, 24, 128) on 4 GPUs: 1.29
# ms a call eager, 0.25 ms from a CUDA graph). "tensors" queues the same copies, flags and
# kernels on the same streams in the same order as "lists" (run 43's code, kept for an A/B), with
# what a call does not need to redo made once per plan: the flag programs and copy templates as
# CPU int64 tensors (``stream_memops_t`` / ``copy2d_t``: no list of ints converted per call,
# the copy sources rebased in C++), the side streams passed to the ops as handles (no stream
# context), events made once and reused (a fork is one event record on the compute stream that
# every side stream waits for, where ``wait_stream`` records a new event per side stream),
# peer views and pull descriptors of the rings made once (the barrier ring "ce" keeps its
# stream context: its barrier kernel and torch copy_ go on the current stream).
# The tensor path queues chunk 0's attention before the copies of chunks 1..C-1 (the GPU order
# is the same: the copies wait for an event recorded before it). Run 73 (4x H200,
# (1,32760,40,128), a call after a synchronize) saw the first attention start ~0.53 ms into the
# call, behind the host time of queueing 12 copies and their flags; run 74 measured the new
# order (10.83 -> 10.38 ms; `7c8dcae` had it behind a switch for that A/B; the list path keeps
# the old order). Its flag wait (the peers' chunk 0) is then queued ahead of this rank's flag
# writes for chunks 1..C-1, which peers wait for: no cycle, since every peer writes its chunk-0
# flags right after its push, before any wait of its own but the call's first (every peer done
# with the previous call).
HOST_ENV = "XDIT_OPS_USP_HOST"
HOST_PATHS = ("tensors", "lists")
_MEMOPS_T = torch.ops.xdit_ops.stream_memops_t.default
_COPY2D_T = torch.ops.xdit_ops.copy2d_t.default


def _host_lists(v: str | None) -> bool:
    """Whether ``XDIT_OPS_USP_HOST`` (``v``: its value, None where unset) asks for run 43's host
    path (``lists``); decided once per plan (``p.host_lists``), where a path reads it."""
    if v is None or v == "tensors":
        return False
    if v == "lists":
        return True
    raise ValueError(f"{OP}: {HOST_ENV} must be one of {HOST_PATHS}, got {v!r}")


def overlap_tensor_programs(progs: dict) -> dict:
    """The overlap path's flag programs (``_overlap_state``'s lists) as ``stream_memops_t``
    tensors, in the shape the calls use them: ``start``, ``sig_in0`` (chunk 0's ``sig_in`` to
    every peer, one batch as in the list path), ``sig_in[c][d]``, ``wait_in[c]``, ``end``
    (``sig_out`` then ``wait_out``, one batch as in the list path), ``done``."""
    return {
        "start": program_tensor(progs["start"]),
        "sig_in0": program_tensor(sum(progs["sig_in"][0], [])),
        "sig_in": [[program_tensor(x) for x in row] for row in progs["sig_in"]],
        "wait_in": [program_tensor(x) for x in progs["wait_in"]],
        "end": program_tensor(progs["sig_out"] + progs["wait_out"]),
        "done": program_tensor(progs["done"]),
    }


class _OverlapHost:
    """What ``_ulysses_overlap`` keeps per plan besides ``_overlap_state``."""

    __slots__ = ("state", "progs", "sides", "side_ids", "fork", "own", "joined", "hs", "jdst",
                 "tin", "tout")


def _overlap_host(p: _Plan, dtype: torch.dtype, device: torch.device) -> _OverlapHost:
    ch = p.chunk_heads
    key = ("host", p.push_key, ch)
    hit = _OVERLAP.get(key)
    if hit is not None:
        return hit
    st = _overlap_state(p, dtype, device)
    local, progs = st[0], st[7]
    U, C, J, Jk = p.U, len(ch), p.J, p.Jk
    f = _OverlapHost()
    f.state = st
    f.progs = overlap_tensor_programs(progs)
    f.sides = [_side_stream(device, 8 + d) for d in range(U)]
    f.side_ids = [s.cuda_stream for s in f.sides]
    f.fork = torch.cuda.Event()  # compute -> every side stream
    f.own = [torch.cuda.Event() for _ in range(C)]  # own rows of chunk c in place (c >= 1)
    f.joined = [torch.cuda.Event() for _ in range(U)]  # side stream d -> compute, at the end
    f.hs = [slice(p.h0 + s, p.h0 + s + n) for s, n in zip(_chunk_starts(ch), ch, strict=True)]
    f.jdst = [_joint_dst(qbuf, kv, J, Jk) for qbuf, kv in local]
    f.tin, f.tout = {}, {}  # copy2d_t templates per source strides, as in the list path
    _OVERLAP[key] = f
    return f


def _ulysses_overlap(q_s, k_s, v_s, q_j, k_j, v_j, p: _Plan, attend):
    """The overlap path (see the block comment above): [B, L, H, D] x3 -> ([B, J + L, H, D],
    lse [B, h, J + U*L]). The same copies, flags and kernels as ``_ulysses_overlap_lists``, with
    less host work a call (``HOST_ENV`` above)."""
    if p.host_lists:
        return _ulysses_overlap_lists(q_s, k_s, v_s, q_j, k_j, v_j, p, attend)
    dev = q_s.device
    f = _overlap_host(p, q_s.dtype, dev)
    local, outbuf, ins, outs, flags, in_dst, out_dst = f.state[:7]
    g = f.progs
    J, Jk, U, C, r = p.J, p.Jk, p.U, len(p.chunk_heads), p.u_rank
    batched = p.batched
    memops, copy = _MEMOPS_T, _COPY2D_T
    compute = torch.cuda.current_stream(dev)
    sides, side_ids, fork = f.sides, f.side_ids, f.fork
    ikey = (q_s.stride(), k_s.stride(), v_s.stride())
    tin = f.tin.get(ikey)
    first = tin is None
    if first:  # this call's source strides are new: templates of every input copy
        tin = [[copy2d_template(t, w) for t, w in row]
               for row in _in_templates(p, in_dst, (q_s, k_s, v_s))]
        f.tin[ikey] = tin
    bases = [q_s.data_ptr(), k_s.data_ptr(), v_s.data_ptr()]
    memops(flags, g["start"], batched, -1)  # every peer is done with the last call
    _overlap_push_in(q_s, k_s, v_s, p, f.state[7], ins[0], first)
    memops(flags, g["sig_in0"], batched, -1)
    fork.record(compute)  # chunks 1..C-1 go out from here
    kept = []  # outputs the side streams still read
    lses = []
    wait_in = g["wait_in"]

    def attend_chunk(c):
        qbuf, kv = local[c]
        kj, vj = _own_joint_rows(f.jdst[c], q_j, k_j, v_j, f.hs[c], J, Jk)
        if c:
            compute.wait_event(f.own[c])
        memops(flags, wait_in[c], batched, -1)
        o, lse = attend(qbuf, _squeezed(p, kv) if p.squeeze else kv, kj, vj)
        lses.append(lse)
        return o

    # Chunk 0's attention is queued before the copies of chunks 1..C-1 (host order only: the
    # copies wait for ``fork`` above, not for it), so a GPU that waits for this call does not
    # also wait for the host to queue (C - 1) x U copies and their flags first (HOST_ENV above)
    o = attend_chunk(0)
    # chunks 1..C-1 on the copy engines, one side stream per destination
    sig_in = g["sig_in"]
    for d in range(U):
        s, sid, td = sides[d], side_ids[d], tin[d]
        s.wait_event(fork)
        for c in range(1, C):
            t, which = td[c - 1]
            copy(flags, t, which, bases, sid)
            if d == r:
                f.own[c].record(s)
            else:  # (sig_in has no flag to this rank itself: the event)
                memops(flags, sig_in[c][d], batched, sid)
    for c in range(C):
        if c:
            o = attend_chunk(c)
        h_out = f.hs[c].start
        if c == C - 1:  # the last chunk's output: the push-out kernel, nothing left to hide it
            _overlap_push_out(o, p, f.state[7], outs, h_out, first)
            break
        if o.stride(-1) != 1 or o.stride(-2) != o.shape[-1]:
            o = o.contiguous()
        kept.append(o)
        okey = (c, o.stride())
        tout = f.tout.get(okey)
        if tout is None:
            tout = [copy2d_template(t, w) for t, w in _out_templates(p, out_dst, o, h_out)]
            f.tout[okey] = tout
        obase = [o.data_ptr()]
        fork.record(compute)
        for d in range(U):
            sides[d].wait_event(fork)
            t, which = tout[d]
            copy(flags, t, which, obase, side_ids[d])
    for d in range(U):  # every copy of this rank's is done (inputs and outputs)
        f.joined[d].record(sides[d])
        compute.wait_event(f.joined[d])
    memops(flags, g["end"], batched, -1)
    out = outbuf.clone()
    memops(flags, g["done"], batched, -1)
    return out, torch.cat(lses, dim=1)


# ---------------------------------------------------------------------------------------------
# the op: one plan per call signature
#
# Everything the op derives from its arguments' shapes and options (validation, the cross-rank
# agreement, the head split, the valid keys of each block, the path, the exchange sizes, the
# ring's peers) depends only on the plan key that _usp_impl builds. It is worked out by the
# first call with a key and kept in _PLANS; a later call with the same key resolves its group
# names, finds the plan and moves data. benchmarks/bench_usp.py reports the host time of a call
# next to the host time of the data-movement and attention calls it is made of (its floor).


def _shape4(t: torch.Tensor) -> list[int]:
    shape = list(t.shape)[:4]
    return shape + [-1] * (4 - len(shape))


def _lengths_digest(shard_lengths) -> list[int]:
    if shard_lengths is None:
        return [-1, 0, 0]
    return [len(shard_lengths), sum(shard_lengths),
            sum((i + 1) * n for i, n in enumerate(shard_lengths))]


_SWITCH_NAMES = ("XDIT_OPS_USP_CHECK", "XDIT_OPS_USP_CHUNKS", "XDIT_OPS_USP_RING",
                 "XDIT_OPS_USP_ULYSSES", WIRE_ENV, FORMAT_ENV, PUSH_KERNEL_ENV,
                 "XDIT_OPS_MERGE_IMPL", "XDIT_OPS_USP_GRAPH", HOST_ENV, BATCH_ENV,
                 # the FP8 op's other settings (its format is above): a call graph holds its
                 # launches ("XDIT_OPS_FP8_IMPL", "_K_SCALE", "_SM90_CONSUMERS", "_STATS")
                 *(n for n in FP8_SETTING_ENVS if n != FORMAT_ENV))
# os.environ's own store (encoded keys and values; os.environ's item assignment and deletion
# update it in place): 15 lookups there take ~1 us, against ~7 us through os.environ.get.
_ENV_DATA = getattr(os.environ, "_data", None)
try:
    _SWITCH_KEYS = tuple(os.environ.encodekey(n) for n in _SWITCH_NAMES)
except AttributeError:  # not CPython's os.environ: the plain lookups
    _ENV_DATA = None
_SWITCHES_SEEN: list = [None, ()]  # the last raw values read and their decoded tuple
# what _switches returns when no switch is set (the usual case), found by one set test: the
# environment's keys view against the switches' keys (~0.2 us against ~0.4 for the 14 lookups)
_NO_SWITCHES = (None,) * len(_SWITCH_NAMES)
if _ENV_DATA is not None:
    _ENV_KEYS = _ENV_DATA.keys()
    _SWITCH_KEY_SET = frozenset(_SWITCH_KEYS)


def _switches(grouped: bool) -> tuple:
    """The raw values of the op's environment switches, (``XDIT_OPS_USP_CHECK``, ``_CHUNKS``,
    ``_RING``, ``_ULYSSES``, ``_FP8_WIRE``, ``XDIT_OPS_FP8_FORMAT``, ``XDIT_OPS_PUSH_KERNEL``,
    ``XDIT_OPS_MERGE_IMPL``, ``XDIT_OPS_USP_GRAPH``, and the switches a call's body uses, which
    a call graph freezes (the plan holds the first two, ``host_lists`` and ``batched``; the FP8
    op reads the others per call): ``XDIT_OPS_USP_HOST``, ``XDIT_OPS_MEMOPS_BATCH``,
    ``XDIT_OPS_FP8_IMPL``, ``XDIT_OPS_FP8_K_SCALE``, ``XDIT_OPS_FP8_SM90_CONSUMERS``,
    ``XDIT_OPS_FP8_STATS``), None
    where unset: part of the plan key, so a switch changed between calls takes effect on the
    next call (and is validated by the new plan: the native launchers that read the push kernel
    and merge switches are called directly, past their Python checks), and what the plan is
    built from (the environment is read once per call). A call without a group reads none: no
    switch applies to a single device. Read from os.environ's store, decoded only when they
    changed."""
    if not grouped:
        return ()
    if _ENV_DATA is None:
        get = os.environ.get
        return tuple(get(n) for n in _SWITCH_NAMES)
    if _ENV_KEYS.isdisjoint(_SWITCH_KEY_SET):
        return _NO_SWITCHES
    raw = tuple(map(_ENV_DATA.get, _SWITCH_KEYS))
    if raw != _SWITCHES_SEEN[0]:
        decode = os.environ.decodevalue
        _SWITCHES_SEEN[:] = [raw, tuple(None if x is None else decode(x) for x in raw)]
    return _SWITCHES_SEEN[1]


def _chunks_code(switch: str | None) -> int:
    """``XDIT_OPS_USP_CHUNKS`` as one int of the cross-rank check (see ``_switch_codes``)."""
    if switch is None:
        return -1
    try:
        c = parse_chunks(switch)
    except ValueError:
        return 99
    if isinstance(c, tuple):
        return 1_000_000 + zlib.crc32(",".join(map(str, c)).encode())
    if c == "equal":
        return -2
    return c if -(1 << 31) < c < 1 << 31 else 99


def _switch_codes(chunks_sw: str | None, ring_sw: str | None,
                  ulysses_sw: str | None, wire_sw: str | None,
                  format_sw: str | None, push_sw: str | None = None) -> list[int]:
    """The transport switches as ints for the cross-rank check: ranks that would move data
    differently (one pushing into symmetric memory while another waits in an all-to-all, or
    one pushing its output by rank blocks, ``XDIT_OPS_PUSH_KERNEL=v3``, while another stores
    into the output rows) disagree there, with a message, instead of hanging or mixing
    layouts. -1: unset; 99: a value the op will refuse (then every rank refuses it alike, or
    the check names the rank). ``XDIT_OPS_USP_CHUNKS``: its int; -2 for ``equal``; a comma
    list ``1_000_000 +`` the CRC-32 of its counts (ranks with different lists would cut their
    shares differently)."""
    def code(value: str | None, choices: tuple[str, ...]) -> int:
        return -1 if value is None else choices.index(value) if value in choices else 99

    return [_chunks_code(chunks_sw), code(ring_sw, RING_TRANSPORTS),
            code(ulysses_sw, ULYSSES_TRANSPORTS), code(wire_sw, ("0", "1")),
            code(format_sw, FORMAT_SETTINGS), code(push_sw, PUSH_KERNELS)]


def _check_mode(switch: str | None) -> str:
    """``XDIT_OPS_USP_CHECK`` (``switch``): ``0`` never checks; ``always`` checks every call;
    anything else (default ``1``) checks the first call of each (groups, checked values): see
    _usp_impl."""
    return "off" if switch == "0" else "always" if switch == "always" else "first"


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# (ulysses group, ring group, checked values) that every rank of the grid has agreed on. Only
# ever added to, and always by every rank of the grid at the same call (after one all-gather
# that all of them passed), so the ranks' "already agreed?" answers stay the same: never
# cleared, since a rank that forgot an entry alone would start a collective the others skip.
_AGREED: set[tuple] = set()
_PLANS: dict[tuple, _Plan] = {}
_MAX_PLANS = 1024  # more distinct signatures than this: start over (a rebuild is local)
_CHECK_NONE, _CHECK_ALWAYS, _CHECK_PENDING = 0, 1, 2


class _Plan:
    """What a call with one plan key does: every shape-derived value, precomputed."""

    __slots__ = (
        "ug", "rg", "U", "R", "u_rank", "r_rank", "B", "J", "L", "joint_front", "split",
        "heads", "h0", "h_me", "Jk", "joint_inline", "ring_n", "n0", "cut0",
        "mine", "squeeze", "path", "chunks", "chunk_heads", "ring", "nxt", "prv", "in_splits",
        "out_splits", "lse_splits", "seq_len", "check",
        "agree_key", "attn_backend", "push_key", "push_blocks", "wire", "fp8ring",
        "graphed", "graphs", "host_lists", "batched",
    )


def _agree(meta: list[int], ug, rg, agree_key: tuple) -> None:
    _check_agreement(meta, ug, rg)
    _AGREED.add(agree_key)


def _exchange_splits(per_head: int, heads: list[int], h_me: int, inbound: bool):
    """``all_to_all_single`` sizes of a Ulysses exchange that moves ``per_head`` elements for
    each head: (output split sizes, input split sizes, elements received), the splits None when
    the heads are even. ``inbound`` (Q/K/V in, ``_ulysses_in``): every rank sends each peer
    ``j`` its ``heads[j]`` heads and receives its own ``h_me`` from each; otherwise (outputs
    back, ``_ulysses_out``) the reverse."""
    mine = [per_head * h_me] * len(heads)
    theirs = [per_head * hj for hj in heads]
    recv, send = (mine, theirs) if inbound else (theirs, mine)
    if all(h == heads[0] for h in heads):
        return None, None, sum(recv)
    return recv, send, sum(recv)


def _build_plan(q, k, v, joint_lengths, joint_tokens, joint_front, seq_len, backend, ug, rg,
                shard_lengths, switches) -> _Plan:
    """Validate a call signature (after the cross-rank agreement) and plan it; ``switches``:
    ``_switches()`` of this call."""
    (check_sw, chunks_sw, ring_sw, ulysses_sw, wire_sw, format_sw, push_sw, _, graph_sw,
     host_sw, batch_sw) = (tuple(switches or ()) + (None,) * 11)[:11]
    U, R = _group_size(ug), _group_size(rg)
    u_rank, r_rank = _group_rank(ug), _group_rank(rg)
    check = _CHECK_NONE
    agree_key = None
    if U > 1 or R > 1:
        mode = _check_mode(check_sw)
        if mode != "off":
            # Before any check that could raise on one rank only: afterwards every rank
            # validates the same arguments, so all raise or none does, and no collective is
            # left hanging.
            meta = (_shape4(q) + _shape4(k) + _shape4(v)
                    + [_DTYPE_CODES.get(t.dtype, 9) for t in (q, k, v)]
                    + [joint_tokens, seq_len, int(joint_front), int(joint_lengths is None)]
                    + _lengths_digest(shard_lengths)
                    + _switch_codes(chunks_sw, ring_sw, ulysses_sw, wire_sw, format_sw, push_sw)
                    # ranks may differ in XDIT_OPS_USP_GRAPH, but a value only one rank would
                    # refuse must fail every rank here, not leave the others waiting
                    + [0 if graph_sw is None or graph_sw in GRAPH_SETTINGS else 99])
            agree_key = (ug, rg, tuple(meta))
            due = mode == "always" or agree_key not in _AGREED
            capturing = _capturing()
            if due and not capturing:  # no host collective inside a CUDA graph
                _agree(meta, ug, rg, agree_key)
            # "always" stays "always" even when first planned under capture; a check due
            # under capture runs on the next eager call.
            check = (_CHECK_ALWAYS if mode == "always" else
                     _CHECK_PENDING if due and capturing else _CHECK_NONE)
    check_inputs(q, k, v, OP)
    B, T, H, D = q.shape
    J = joint_tokens
    L = T - J
    if not 0 <= J <= T:
        raise ValueError(f"{OP}: joint_tokens={J} is outside [0, {T}] (the local length)")
    if k.shape[1] != T:
        raise ValueError(f"{OP}: key has {k.shape[1]} tokens but query has {T}; self-attention "
                         "over the same sharded sequence needs equal lengths")
    total = L * U * R
    if shard_lengths is not None:
        lens = [int(n) for n in shard_lengths]
        if seq_len >= 0:
            raise ValueError(f"{OP}: pass seq_len or shard_lengths, not both")
        if len(lens) != U * R or any(not 0 <= n <= L for n in lens) or sum(lens) == 0:
            raise ValueError(
                f"{OP}: shard_lengths={lens} must give each of the {U * R} shards (in shard "
                f"order) between 0 and its {L} tokens, with at least one valid token"
            )
    else:
        if seq_len < 0:
            seq_len = total
        if not (total - L < seq_len <= total or (L == 0 and seq_len == 0)):
            raise ValueError(
                f"{OP}: seq_len={seq_len} does not match {U * R} shards of {L} tokens "
                f"(expected {total - L + 1}..{total}; shard with xdit_ops.shard_sequence)"
            )
        lens = [max(0, min(L, seq_len - i * L)) for i in range(U * R)]
    if H < U:
        raise ValueError(f"{OP}: {H} heads cannot be split over a Ulysses degree of {U}; "
                         f"use a Ulysses degree <= {H} and a ring for the rest")
    if backend not in BACKENDS:
        raise ValueError(f"{OP}: unknown backend {backend!r}; choose one of {BACKENDS}")
    if joint_lengths is not None and (joint_lengths.dim() != 1 or joint_lengths.shape[0] != B):
        raise ValueError(f"{OP}: joint_lengths must be an int tensor [B={B}], got shape "
                         f"{tuple(joint_lengths.shape)}")

    p = _Plan()
    p.ug, p.rg, p.U, p.R, p.u_rank, p.r_rank = ug, rg, U, R, u_rank, r_rank
    p.B, p.J, p.L, p.joint_front, p.seq_len = B, J, L, joint_front, seq_len
    p.split = [J, L] if joint_front else [L, J]
    p.check, p.agree_key = check, agree_key
    # The local kernel's backend, resolved once (the key holds backend, device, dtype, head
    # dim): an unusable one fails here, on every rank alike, before any exchange.
    p.attn_backend = resolve_backend(backend, q) if q.is_cuda else None
    heads = head_split(H, U)
    p.heads = heads
    p.h0 = sum(heads[:u_rank])
    p.h_me = heads[u_rank]
    # The joint keys go in front of the gathered keys unless they must be their own partial:
    # under a ring (counted once, not once per step) or with per-sample lengths (masked).
    p.joint_inline = J > 0 and R == 1 and joint_lengths is None
    p.Jk = Jk = J if p.joint_inline else 0
    # Valid keys of each ring block (U shards each). Within a block they are made a prefix:
    # padding that sits between shards of one block is squeezed out after the gather.
    block_valid = [sum(lens[r * U:(r + 1) * U]) for r in range(R)]
    p.ring_n = [block_valid[(r_rank - step) % R] for step in range(R)]
    p.n0 = Jk + block_valid[0]
    p.cut0 = p.n0 < Jk + U * L  # the R == 1 block has padded keys to cut off
    p.mine = mine = lens[r_rank * U:(r_rank + 1) * U]
    p.squeeze = any(n < L and any(mine[j + 1:]) for j, n in enumerate(mine))
    tokens = J + sum(lens)  # the gathered sequence's valid tokens (auto; the FP8 ring's count)
    graph_mode = graph_setting(graph_sw or "auto") if switches else "0"
    p.graphs = {}
    # the flag paths' per-call switch, read with the plan key (not again in the call body)
    p.batched = batch_sw != "0"
    p.ring = ring_transport(q.device, ring_sw) if R > 1 else "nccl"
    if p.ring == "auto":
        p.ring = auto_ring(_peer_mapped(ug, rg, "ring"), tokens)
    p.nxt = p.prv = -1
    if R > 1 and p.ring == "nccl":
        ring_ranks = dist.get_process_group_ranks(rg)
        p.nxt = ring_ranks[(r_rank + 1) % R]
        p.prv = ring_ranks[(r_rank - 1) % R]
    p.chunks = 1
    p.chunk_heads = ()  # the overlap's chunks (head counts, in order); () on other paths
    if switches:
        parse_chunks(chunks_sw)  # a malformed XDIT_OPS_USP_CHUNKS is refused on every path
    transport = ulysses_transport(q.device, ulysses_sw) if U > 1 else "nccl"
    if transport in ("auto", "overlap"):
        # every rank decides alike (the switches, shapes and peer mapping agree); where the
        # overlap cannot apply, what auto would take
        # (with a copy-engine ring too: the push then feeds the ring its assembled K/V block,
        # which the ring copies into its own buffer, and the call can replay a graph; the
        # NCCL ring keeps NCCL's exchange, the overlap stays ring-free)
        mapped = (R == 1 or p.ring in CE_RINGS) and _peer_mapped(ug, rg)
        can = (R == 1 and mapped and all(x == heads[0] for x in heads)
               and _overlap_can_chunk(heads[0], chunks_sw) and push_kernel(OP) != "v1")
        if transport == "auto":
            transport = auto_ulysses(mapped, can, U, tokens)
        else:
            transport = "overlap" if can else "push" if mapped else "nccl"
    if U == 1:
        p.path = "local"
    elif ((transport == "push" and (R == 1 or p.ring in CE_RINGS))
          or (R == 1 and transport == "overlap")):
        p.path = transport
        # what _push_buffers looks its buffers up by (dtype and device are in the plan's key)
        p.push_key = (id(ug), B, J, p.Jk, L, tuple(heads), q.dtype, q.device, D)
        if transport == "overlap":
            # (a comma list that does not add up to the share raises here, on every rank)
            p.chunk_heads = _overlap_chunks(heads[0], chunks_sw)
            p.chunks = len(p.chunk_heads)
    elif (not p.squeeze and R == 1 and transport == "ce"
          and all(x == heads[0] for x in heads)):
        p.path, p.chunks = "ce", _ce_chunks(heads[0], chunks_sw)
    elif not p.squeeze and (chunks := _pipelined_chunks(H, U, R, chunks_sw)) > 1:
        p.path, p.chunks = "pipelined", chunks
    else:
        p.path = "nccl"
    if q.device.type == "cuda" and switches:
        # the native push and merge launchers read these on every call; usp calls them past
        # their Python checks, so a bad value is refused here, by name, not in C++
        push_kernel(OP)
        _check_merge_impl(OP)
    if backend == "fp8" and wire_sw is not None and resolve_format(q.device, format_sw or "auto") \
            .name != "e4m3fn":
        # the FP8 wire and ring carry e4m3fn codes only: with e4m3fnuz (ROCm MI300) the calls
        # take the default path, which quantizes in the device's format
        wire_sw = None
    p.wire = None
    if U > 1 and wire_applies(wire_sw, backend, U, R, L, joint_lengths is not None, q.dtype, D):
        # FP8 on the wire (usp_fp8_wire): quantized before an all-to-all of 1-byte codes
        p.path = "fp8wire"
        p.wire = make_wire_plan(B, L, D, heads, p.h_me, mine)
    p.fp8ring = None
    if R > 1 and ring_applies(wire_sw, backend, U, R, L, joint_lengths is not None, q.dtype, D):
        # FP8 K/V around the ring (usp_fp8_ring): quantized once, blocks of 1-byte codes; on a
        # hybrid grid the FP8 wire's exchange first, its assembled keys the ring's block
        if U == 1:
            p.path = "fp8ring"
            p.fp8ring = make_ring_plan(B, L, H, D, mine[0], tokens)
        else:
            p.path = "fp8hybrid"
            p.fp8ring = make_ring_plan(B, L, H, D, sum(mine), tokens, heads, p.h_me, mine)
    # XDIT_OPS_PUSH_KERNEL unset or v3: the output goes back by rank blocks (contiguous stores
    # to each peer) and is unpacked locally in place of the copy out of the buffer
    p.push_blocks = p.path == "push" and push_blocks(push_sw)
    p.in_splits = _exchange_splits(3 * B * L * D, heads, p.h_me, True)  # [3, B, L, h, D]
    p.out_splits = _exchange_splits(B * (J + L) * v.shape[3], heads, p.h_me, False)
    p.lse_splits = _exchange_splits(B * (J + L), heads, p.h_me, False)
    # the host path of the paths that have two (the overlap, the copy-engine rings: the FP8
    # ring's too), decided (and a bad XDIT_OPS_USP_HOST refused) once here, not per call
    p.host_lists = (_host_lists(host_sw) if p.path == "overlap" or p.ring in CE_RINGS
                    else False)
    # whether its eager calls replay a graph of their own, without / with the LSE (decided
    # once here: the call only looks it up)
    on = q.device.type == "cuda" and (graph_mode == "1" or (
        graph_mode == "auto" and (U > 1 or R > 1) and tokens < AUTO_GRAPH_MAX_TOKENS))
    p.graphed = (on and _graph_eligible(p, False), on and _graph_eligible(p, True))
    return p


def _usp_impl(q, k, v, joint_lengths, joint_tokens, joint_front, seq_len, scale, backend,
              ulysses_group, ring_group, return_lse, shard_lengths=None):
    """The op's body (CPU and CUDA): look up or build the plan, then run it.

    The plan key is everything the validation and the plan read: the three tensors' shapes,
    dtypes, devices and last strides, the joint arguments (``joint_lengths`` by its shape: its
    values are only read on the device), ``seq_len``, ``shard_lengths``, the backend, the
    resolved groups (objects, not names: torch reuses group names after a re-initialisation)
    and the environment switches (``return_lse`` is not: the plan does not depend on it).

    Cross-rank agreement (``XDIT_OPS_USP_CHECK``, default on): every rank of the ulysses x ring
    grid all-gathers the checked values (shapes, dtypes, joint arguments, ``seq_len``, a digest
    of ``shard_lengths``) before it validates, so a rank with a different shape makes every
    rank raise the same error instead of leaving the others waiting in a collective. Agreement
    is remembered per (groups, checked values), so only the first call with them pays the
    all-gather (about 0.5-1 ms); the checked values are a function of the plan key, so a rank
    cannot reach a remembered agreement with other values than those agreed. What this cannot
    catch, unlike a check on every call: after the ranks agreed on values A and later on B, one
    rank passing A while the others pass B (each rank's values were agreed once, so none
    checks, and the collectives disagree). A rank whose values are new to it still checks; if
    the others do not (their values are remembered), that check waits for them until the
    group's timeout. ``XDIT_OPS_USP_CHECK=always`` restores the check on every call for
    debugging such a case; ``0`` turns it off. No check runs under CUDA-graph capture (a host
    collective cannot be captured): a plan first built there is checked on its next eager call.
    """
    ug = _resolve_group(ulysses_group)
    rg = _resolve_group(ring_group)
    switches = _switches(ug is not None or rg is not None)
    key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
           q.stride(-1), k.stride(-1), v.stride(-1),
           None if joint_lengths is None else joint_lengths.shape, joint_tokens, joint_front,
           seq_len, backend, ug, rg,
           None if shard_lengths is None else tuple(shard_lengths), switches)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _build_plan(q, k, v, joint_lengths, joint_tokens, joint_front, seq_len, backend,
                           ug, rg, shard_lengths, switches)
        if len(_PLANS) >= _MAX_PLANS:
            if not _capturing():  # (no synchronize inside a capture)
                release_call_graphs()  # after the replays using their memory have run
            _PLANS.clear()
            _FAST.clear()
        _PLANS[key] = plan
    elif plan.check != _CHECK_NONE and not _capturing():
        if plan.check == _CHECK_ALWAYS or plan.agree_key not in _AGREED:
            _agree(list(plan.agree_key[2]), ug, rg, plan.agree_key)
        if plan.check == _CHECK_PENDING:
            plan.check = _CHECK_NONE
    if plan.graphed[return_lse] and not _capturing():
        return _run_graphed(plan, q, k, v, joint_lengths, scale, backend, return_lse)
    return _run(plan, q, k, v, joint_lengths, scale, backend, return_lse)


# ---------------------------------------------------------------------------------------------
# Eager calls replayed from a graph of their own (XDIT_OPS_USP_GRAPH)
#
# Below AUTO_GRAPH_MAX_TOKENS gathered tokens an eager call is host-bound: its ~10-20 launches
# (pack/push kernels, barriers, the attention, the unpack; a ring's copies, waits and merge)
# take ~0.2-0.3 ms of host time against ~0.2 ms of GPU time at (1,4608,24,128) on 4 GPUs (runs
# 45 and 47). So, per plan and (scale, return_lse): the first call runs as usual (it makes the
# symmetric buffers, NCCL communicators and cuDNN plans, none of which may happen under
# capture); the second captures the same call on static copies of its inputs into a CUDA graph;
# that call and every later one copy their inputs into the static tensors, replay the graph on
# the current stream and return copies of its outputs. The GPU runs the same kernels in the same
# order as an eager call (plus the input copies and the output copy: nodes of the graph itself,
# csrc/cuda/graph_call.cpp), so results are identical
# and ranks may even differ in whether they replay (no host collective is involved). Not under
# an outer capture (that graph records the call itself), not on CPU, and only where the graph
# holds no NCCL kernel (_graph_eligible).

AUTO_GRAPH_MAX_TOKENS = 16384
GRAPH_ENV = "XDIT_OPS_USP_GRAPH"
GRAPH_SETTINGS = ("auto", "0", "1")
_GRAPH_OFF = object()  # its capture failed, or the cap was reached: eager from then on
# At most this many call graphs (a graph or its warm-up's static inputs, per plan x (scale,
# return_lse, device)) live at once: each keeps its static inputs and a private memory pool
# (~50 MB at (1,4608,24,128) on 4 GPUs), and a workload of ever new shapes would otherwise grow
# them until the plan cache's reset. Signatures past the cap run eagerly (once warned) until
# release_call_graphs (destroy_parallel) drops the graphs; none is evicted (dropping a graph
# that may still run needs a device synchronize).
MAX_CALL_GRAPHS = 32
_CAP_WARNED = [False]


def _live_call_graphs() -> int:
    return sum(1 for p in _PLANS.values() for s in p.graphs.values() if s is not _GRAPH_OFF)


def graph_setting(value: str | None = None) -> str:
    """``XDIT_OPS_USP_GRAPH`` (``value``, default the environment's): ``auto`` (unset) replays
    eager calls from a graph of their own below ``AUTO_GRAPH_MAX_TOKENS`` gathered tokens on
    CUDA, ``1`` at every size, ``0`` never. Another value is an error naming the variable."""
    if value is None:
        value = os.environ.get(GRAPH_ENV, "auto")
    if value not in GRAPH_SETTINGS:
        raise ValueError(f"{OP}: XDIT_OPS_USP_GRAPH={value!r} is not one of {GRAPH_SETTINGS}")
    return value


# the native replay (csrc/cuda/graph_call.cpp): call graphs need it (None where xdit_ops._C is
# not loaded, XDIT_OPS_DISABLE_EXTENSION=1 included)
_NATIVE = _extension.module("_C")
_REGISTER = getattr(_NATIVE, "graph_call_register", None)
_RELEASE = getattr(_NATIVE, "graph_call_release", None)
_RUN = getattr(_NATIVE, "graph_call_run", None)


class _CallGraph:
    """A captured call: the graph, its static inputs and outputs, and its handle in the native
    registry (``graph_call_register`` added the copy-in and copy-out nodes to the graph and
    instantiated it; ``graph_call_run`` replays it by that handle)."""

    __slots__ = ("graph", "inputs", "outputs", "handle")

    def __init__(self, graph, inputs, outputs):
        self.graph, self.inputs, self.outputs = graph, inputs, list(outputs)
        self.handle = _REGISTER(self.inputs, self.outputs, int(graph.raw_cuda_graph()))

    def __del__(self):
        if _RELEASE is not None and getattr(self, "handle", 0):
            _RELEASE(self.handle)

    def replay(self, srcs: list, return_lse: bool):
        """Copy ``srcs`` into the static inputs, replay, return copies of the outputs (the
        LSE only with ``return_lse``; else an empty one, as the op returns)."""
        res = _RUN(self.handle, 2 if return_lse else 1, *srcs)
        return res if return_lse else (res[0], self.outputs[1].new_empty((0,)))


def _capture(inputs: list, body) -> _CallGraph:
    """Capture ``body()`` (which reads the static ``inputs`` and returns its output tensors) on
    the current stream into a registered call graph. The graph is kept un-instantiated
    (``keep_graph=True``) so that ``graph_call_register`` can add its copy nodes first."""
    graph = torch.cuda.CUDAGraph(keep_graph=True)
    # thread_local: other threads' CUDA calls during the capture are not its concern
    graph.capture_begin(capture_error_mode="thread_local")
    try:
        outputs = body()
    finally:
        graph.capture_end()
    return _CallGraph(graph, inputs, outputs)


# why each key whose capture failed did (``str`` of the exception), for diagnostics
GRAPH_FAILURES: dict[tuple, str] = {}
# before torch's own teardown of the process groups at exit (atexit runs before the module
# globals holding them are collected)
atexit.register(release_call_graphs, sync=False)


def _graph_eligible(p: _Plan, return_lse: bool) -> bool:
    """Whether a call of plan ``p`` may run from a graph of its own: only where the graph
    would hold no NCCL kernel (a live graph holding NCCL kernels keeps its communicator busy,
    and ``destroy_process_group`` then waits on it: run 49's ranks hung there): the Ulysses
    transports over peer-mapped memory (push, overlap, copy engines) without the LSE (it goes
    back by an NCCL all-to-all) and the rings over the copy engines; not the NCCL transports,
    the hybrid's NCCL exchange, the NCCL ring or the FP8 wire and ring; and only with the
    native replay (``xdit_ops._C``'s ``graph_call_run``)."""
    if _RUN is None or p.wire is not None or p.fp8ring is not None:
        return False
    if p.R > 1 and p.ring not in CE_RINGS:
        return False
    if p.U > 1:
        return p.path in ("push", "overlap", "ce") and not return_lse
    return p.path == "local"


def _ring_statics(p: _Plan, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The static K and V of a ring-only call graph over the barrier ring (``ce``, without
    joint tokens): the K and V slots of the ring's first buffer themselves, so that the graph's
    copy-in node writes the call's K and V where the ring starts from and the ring's fill finds
    them in place (``_attend``'s ``fill``: no copy). That saves its two memcpy nodes (one
    launch's worth of host time; run 73: the ring's graph launch took 13.0 us of host time
    against Ulysses' 3.8) and a pass over K and V. The ring writes that buffer at the same
    point of the stream (first, after the previous call's last barrier: no peer reads it any
    more), so the order of writes and reads is unchanged. None elsewhere (another ring, joint
    tokens, an inference-mode buffer, which the static inputs of a later call outside inference
    mode could not be copied into)."""
    if not (p.path == "local" and p.R > 1 and p.ring == "ce" and p.J == 0 and k.is_cuda):
        return None
    # the ring's own per-shape state (_ring_ce's call, with its block shape): the same buffers
    bufs = _ring_ce_host(p, (2, *k.shape), k.dtype, k.device)[1]
    if bufs.is_inference():
        return None
    return bufs[0][0], bufs[0][1]


def _capture_call(p: _Plan, key: tuple, static: list, jl, scale, backend, return_lse):
    """Capture ``_run`` on the static inputs into a CUDA graph (on a side stream that waits for
    the current one: nothing runs during a capture, and the replay on the current stream comes
    after the static copies). Returns the ``_CallGraph``, or None after a failed capture (the
    key is marked eager, the reason kept in ``GRAPH_FAILURES`` and warned)."""
    device = static[0].device
    current = torch.cuda.current_stream(device)
    side = _side_stream(device, 63)
    side.wait_stream(current)
    try:
        # the stream context is left whatever happens, so a failed capture does not leave
        # the caller's later work on the capture stream
        with torch.cuda.stream(side):
            state = _capture(static, lambda: _run(p, static[0], static[1], static[2], jl,
                                                  scale, backend, return_lse))
    except Exception as e:  # noqa: BLE001 - any capture failure: this key stays eager
        p.graphs[key] = _GRAPH_OFF
        GRAPH_FAILURES[(id(p),) + key] = repr(e)
        warnings.warn(f"{OP}: capturing the call graph failed ({e!r}); this call signature "
                      "runs eagerly (XDIT_OPS_USP_GRAPH=0 skips the attempt)", RuntimeWarning,
                      stacklevel=4)
        current.wait_stream(side)
        return None
    current.wait_stream(side)
    p.graphs[key] = state
    return state


def _run_graphed(p: _Plan, q, k, v, joint_lengths, scale, backend, return_lse):
    """``_run`` through the plan's call graph for (scale, return_lse) (see the block above).
    The first call runs eagerly on the static copies the capture will read, so the capture
    meets exactly the layouts (and cuDNN plans, kernel specialisations) that call warmed up.
    The static copies are contiguous, ``joint_lengths``' on ``q``'s device (a host-to-device
    copy cannot be captured), and made outside inference mode, so a graph first made under
    ``torch.inference_mode()`` still takes the inputs of later calls made without it."""
    key = (scale, bool(return_lse), q.device)
    state = p.graphs.get(key)
    if state is _GRAPH_OFF:
        return _run(p, q, k, v, joint_lengths, scale, backend, return_lse)
    srcs = [q, k, v] + ([joint_lengths] if joint_lengths is not None else [])
    if isinstance(state, _CallGraph):
        _LAST_GRAPH.entry = (p, state)  # the public function's fast path may take it
        return state.replay(srcs, return_lse)
    if state is None and _live_call_graphs() >= MAX_CALL_GRAPHS:
        p.graphs[key] = _GRAPH_OFF
        GRAPH_FAILURES[(id(p),) + key] = f"MAX_CALL_GRAPHS ({MAX_CALL_GRAPHS}) graphs exist"
        if not _CAP_WARNED[0]:
            _CAP_WARNED[0] = True
            warnings.warn(f"{OP}: {MAX_CALL_GRAPHS} call graphs exist (MAX_CALL_GRAPHS); new "
                          "call signatures run eagerly until release_call_graphs()",
                          RuntimeWarning, stacklevel=4)
        return _run(p, q, k, v, joint_lengths, scale, backend, return_lse)
    if state is None:  # first call with this key: eager on new static inputs
        with torch.inference_mode(False):
            static = [torch.empty(t.shape, dtype=t.dtype, device=q.device) for t in srcs]
        ring = _ring_statics(p, k)
        if ring is not None:
            static[1:3] = ring
    else:  # the static inputs of the warm-up
        static = state
    torch._foreach_copy_(static, srcs)
    jl = static[3] if joint_lengths is not None else None
    if state is None:
        p.graphs[key] = static  # warm: capture on the next call
        return _run(p, static[0], static[1], static[2], jl, scale, backend, return_lse)
    # warm: capture now, on the same static tensors
    state = _capture_call(p, key, static, jl, scale, backend, return_lse)
    if state is None:  # the capture failed: eager from now on (warned)
        return _run(p, q, k, v, joint_lengths, scale, backend, return_lse)
    _LAST_GRAPH.entry = (p, state)
    # the static inputs hold this call's values already (they are the sources: copies onto
    # themselves)
    return state.replay(static, return_lse)


# ---------------------------------------------------------------------------------------------
# The eager fast path: the public function replays a call graph without the op's dispatch
#
# Once a call signature replays a call graph, ``usp_attention`` remembers the graph under the
# signature of its own arguments (``_fast_key``: everything the plan key and the graph key are
# made of, the environment switches included) and later calls with that signature go straight
# to the native ``graph_call_run`` (csrc/cuda/graph_call.cpp): no custom-op dispatch, no plan
# lookup, no Python replay. Only for plain eager calls (CUDA tensors of class Tensor, no
# autograd to record, no dispatch or function mode, no functorch transform, not under
# torch.compile); graph_call_run itself declines during a capture (the op then records the
# call). Anything else takes the op as before (whose replays go through graph_call_run too).
# The key is computed only once some signature has a graph. ``FAST_PATH = False`` turns the
# path off (the benchmark's A/B).

FAST_PATH = True
FAST_CALLS = [0]  # calls served by the fast path (the tests' evidence that it ran)
_FAST: dict[tuple, _CallGraph] = {}
_LAST_GRAPH = threading.local()  # (plan, graph) of the last replay in this thread
_C = torch._C


def _fast_key(q, k, v, joint_tokens, joint_position, joint_lengths, seq_len, scale, backend,
              u: str, r: str, return_lse, shard_lengths) -> tuple:
    """The signature of a call, from its arguments as passed (before any validation or
    normalisation: a signature seen before passed them). What it leaves out, graph_call_run
    checks against the graph's static inputs and declines on a difference (the shapes and
    dtypes of K and V, the devices of K, V and joint_lengths, joint_lengths' shape and dtype,
    last strides): the key only has to tell apart the graphs a program uses, the native check
    makes it exact. (``k`` and ``v`` are not read: ``(k, v)`` differing alone from a remembered
    signature's, the replay declines and the op's own call replaces the entry.)"""
    del k, v
    return (q.shape, q.dtype, q.get_device(), joint_tokens, joint_position,
            joint_lengths is None, seq_len, scale, backend, return_lse,
            None if shard_lengths is None else tuple(shard_lengths),
            _resolve_group(u), _resolve_group(r), _switches(bool(u or r)))


def _remember_fast(key_of) -> None:
    """After an op call: remember the graph it replayed, if any, under the call's key
    (``key_of()``, computed only then)."""
    got = getattr(_LAST_GRAPH, "entry", None)
    if got is None:
        return
    _LAST_GRAPH.entry = None
    p, state = got
    # a plan that still checks (XDIT_OPS_USP_CHECK=always) keeps the op's path
    if p.check == _CHECK_NONE and len(_FAST) < _MAX_PLANS:
        _FAST[key_of()] = state


def _squeezed(p: _Plan, kv: torch.Tensor) -> torch.Tensor:
    """[2, B, Jk + U*L, h, D] with this block's valid keys moved to the front of the U*L."""
    Jk, L = p.Jk, p.L
    pieces = [kv[:, :, :Jk]] + [kv[:, :, Jk + j * L:Jk + j * L + n]
                                for j, n in enumerate(p.mine) if n]
    pad = list(kv.shape)
    pad[2] = p.U * L - sum(p.mine)
    return torch.cat(pieces + [kv.new_zeros(pad)], dim=2)


def _ring_ce(p: _Plan, shape: tuple, dtype: torch.dtype, device: torch.device, fill,
             attend_block, parts: list, part_lses: list) -> None:
    """The ring over the copy engines: this rank's block (``fill(buf)`` writes it into a
    symmetric buffer of ``shape``/``dtype``) and every other rank's, each attended by
    ``attend_block(block, n)`` -> (out, lse) over its ``n`` valid keys, appended to
    ``parts``/``part_lses``.

    Pull model over symmetric memory: at step t every rank computes on its buffer t % 2 while
    its side stream copies the previous rank's buffer t % 2 into its own buffer (t + 1) % 2 (a
    device-to-device memcpy: the copy engine, over NVLink), then a barrier marks every copy of
    step t done. Hazards: a buffer is overwritten only after this rank's attention on it (side
    waits for the compute stream) and after the next rank has pulled it (the barrier of the
    step before). Host: buffers, the peer's views and events made once per shape
    (``_ring_ce_host``); ``XDIT_OPS_USP_HOST=lists``: run 43's ``_ring_ce_lists``."""
    if p.ring == "ceflags":
        _ring_ce_flags(p, shape, dtype, device, fill, attend_block, parts, part_lses)
        return
    if p.host_lists:
        _ring_ce_lists(p, shape, dtype, device, fill, attend_block, parts, part_lses)
        return
    _, bufs, handle, side, peer, to_side, to_compute = _ring_ce_host(p, shape, dtype, device)
    fill(bufs[0])
    compute = torch.cuda.current_stream(device)
    R, ring_n = p.R, p.ring_n
    for step in range(R):
        if step + 1 < R:
            to_side.record(compute)  # side.wait_stream(compute), with a reused event
            side.wait_event(to_side)
            with torch.cuda.stream(side):
                if step == 0:
                    handle.barrier(channel=0)  # every rank's first block is in place
                bufs[(step + 1) % 2].copy_(peer[step % 2])
                handle.barrier(channel=0)
        n = ring_n[step]
        if n > 0:
            o, lse = attend_block(bufs[step % 2], n)
            parts.append(o)
            part_lses.append(lse)
        if step + 1 < R:
            to_compute.record(side)
            compute.wait_event(to_compute)


def _ring_ce_host(p: _Plan, shape: tuple, dtype: torch.dtype, device: torch.device):
    """Per ring group and block shape, for ``_ring_ce``: (group, ring buffers, their handle, the
    side stream, the previous rank's two buffers viewed here, events compute -> side and side ->
    compute)."""
    key = ("ringce", id(p.rg), p.r_rank, p.R, shape, dtype, device)
    hit = _OVERLAP.get(key)
    if hit is not None and hit[0] is p.rg:
        return hit
    bufs, handle = _ring_buffers(p.rg, shape, dtype, device)
    prev = (p.r_rank - 1) % p.R
    numel = math.prod(shape)
    peer = [handle.get_buffer(prev, shape, dtype, b * numel) for b in (0, 1)]
    hit = (p.rg, bufs, handle, _side_stream(device), peer, torch.cuda.Event(),
           torch.cuda.Event())
    _OVERLAP[key] = hit
    return hit


def _ring_ce_lists(p: _Plan, shape: tuple, dtype: torch.dtype, device: torch.device, fill,
                   attend_block, parts: list, part_lses: list) -> None:
    """``_ring_ce`` with the host work of run 43 (``XDIT_OPS_USP_HOST=lists``): buffers looked
    up, the peer's buffer viewed and ``wait_stream`` events made per step."""
    R, r_rank = p.R, p.r_rank
    bufs, handle = _ring_buffers(p.rg, shape, dtype, device)
    fill(bufs[0])
    side = _side_stream(device)
    compute = torch.cuda.current_stream(device)
    prev = (r_rank - 1) % R
    numel = math.prod(shape)
    for step in range(R):
        if step + 1 < R:
            side.wait_stream(compute)
            with torch.cuda.stream(side):
                if step == 0:
                    handle.barrier(channel=0)  # every rank's first block is in place
                src = handle.get_buffer(prev, shape, dtype, (step % 2) * numel)
                bufs[(step + 1) % 2].copy_(src)
                handle.barrier(channel=0)
        n = p.ring_n[step]
        if n > 0:
            o, lse = attend_block(bufs[step % 2], n)
            parts.append(o)
            part_lses.append(lse)
        if step + 1 < R:
            compute.wait_stream(side)


# Flags of the copy-engine ring (XDIT_OPS_USP_RING=ceflags), int32 words of rank r, per ring
# buffer b (0, 1): FILLED[b] (written by the previous rank: its buffer b holds the block r pulls
# next) and PULLED[b] (written by the next rank after it pulled r's buffer b, or by r itself
# for the last block of a call, which nobody pulls: r may overwrite its buffer b). PULLED starts
# at 1. Every wait is "== 1" and is followed by the waiter's reset, so a CUDA graph replays the
# same values. The waits are for other ranks' writes, or for r's own write queued earlier on
# the same stream (the last block's PULLED), never ahead of a same-device write.
_RING_FILLED, _RING_PULLED = 0, 2


def ring_flag_programs(R: int, r: int) -> dict[str, list[list[tuple]]]:
    """Rank ``r``'s flag programs of the ring, symbolic: ``name -> [program for buffer b]``,
    each a list of ``(kind, rank, word, value)`` (kind ``WAIT`` or ``WRITE``; ``word`` an index
    into that rank's four flag words). ``_ring_flags`` turns them into addresses."""
    nxt, prv = (r + 1) % R, (r - 1) % R
    F, P = _RING_FILLED, _RING_PULLED
    return {
        # before pulling the previous rank's buffer b into mine (1 - b): its block is there,
        # and my buffer 1 - b is no longer needed by the next rank
        "before_pull": [[(WAIT, r, F + b, 1), (WAIT, r, P + 1 - b, 1), (WRITE, r, F + b, 0),
                         (WRITE, r, P + 1 - b, 0)] for b in (0, 1)],
        # before the fill of buffer 0 (the call's first block): the next rank is done with it
        "before_fill": [[(WAIT, r, P, 1), (WRITE, r, P, 0)]],
        # after the fill, or a pull into my buffer b whose block the next rank pulls later
        "filled": [[(WRITE, nxt, F + b, 1)] for b in (0, 1)],
        # after my pull of the previous rank's buffer b
        "pulled": [[(WRITE, prv, P + b, 1)] for b in (0, 1)],
        # the call's last block (in my buffer b) is pulled by nobody: free it myself
        "last": [[(WRITE, r, P + b, 1)] for b in (0, 1)],
    }


def _ring_flags(p: _Plan, device: torch.device):
    """The ring group's flag words and rank ``p.r_rank``'s programs as addresses:
    (flags, programs), programs[name][b] (``ring_flag_programs``)."""
    key = ("ringflags", id(p.rg), p.r_rank, p.R)
    hit = _OVERLAP.get(key)
    if hit is not None:
        return hit

    def init(f):
        f.zero_()
        f[_RING_PULLED:] = 1

    flags, handle = _symm_buffer(p.rg, "ring_flags", (4,), torch.int32, device, init=init)
    words = [handle.get_buffer(j, (4,), torch.int32, 0) for j in range(p.R)]
    progs = {name: [sum(([kind, word_address(words[j], w), v] for kind, j, w, v in prog), [])
                    for prog in per_b]
             for name, per_b in ring_flag_programs(p.R, p.r_rank).items()}
    for v in progs.values():
        for prog in v:
            check_memops(prog)
    hit = (flags, progs)
    _OVERLAP[key] = hit
    return hit


@functools.lru_cache(maxsize=64)
def ring_flag_schedule(R: int) -> tuple[tuple, ...]:
    """The flag ring's program for one call of one rank, as data: ``(stream, op, arg)`` in the
    order they are queued, ``stream`` "compute" or "side". Ops: ``("join", other)`` the stream
    waits for everything queued on ``other`` so far; ``("flags", name, b)`` runs the flag
    program ``name`` for buffer ``b`` (``_ring_flags``); ``("fill", 0)`` writes this rank's
    block into buffer 0; ``("pull", b)`` copies the previous rank's buffer ``b`` into this
    rank's buffer ``1 - b``; ``("attend", step)`` attends buffer ``step % 2``.
    ``_ring_ce_flags`` runs it on the GPU; ``tests/ops/test_usp_flag_protocols.py`` runs it for
    every rank of a simulated ring under random interleavings (order, data, no deadlock)."""
    ops: list[tuple] = [("compute", "flags", ("before_fill", 0)), ("compute", "fill", 0),
                        ("compute", "flags", ("filled", 0))]
    for step in range(R):
        if step + 1 < R:
            b = step % 2
            after = "filled" if step + 1 <= R - 2 else "last"
            ops += [("side", "join", "compute"), ("side", "flags", ("before_pull", b)),
                    ("side", "pull", b), ("side", "flags", ("pulled", b)),
                    ("side", "flags", (after, 1 - b))]
        ops.append(("compute", "attend", step))
        if step + 1 < R:
            ops.append(("compute", "join", "side"))
    return tuple(ops)  # cached: built once per ring size, not per call


def _ring_ce_flags_lists(p: _Plan, shape: tuple, dtype: torch.dtype, device: torch.device,
                         fill, attend_block, parts: list, part_lses: list) -> None:
    """``_ring_ce_flags`` with the host work of run 43 (``XDIT_OPS_USP_HOST=lists``): the
    schedule walked per call with a stream context per operation, the flag programs passed as
    lists of ints, the peer's buffer viewed and copied by torch per pull.

    ``_ring_ce`` with flag words instead of barrier kernels (``XDIT_OPS_USP_RING=ceflags``),
    running ``ring_flag_schedule``.

    Step t: the side stream waits for FILLED[t % 2] (the previous rank's buffer t % 2 holds
    this step's block) and PULLED[(t + 1) % 2] (the next rank has pulled my buffer (t + 1) % 2,
    which I now overwrite), pulls, then tells the previous rank PULLED[t % 2] and, when the
    block will be pulled in turn (t + 1 <= R - 2), the next rank FILLED[(t + 1) % 2]; the last
    block's PULLED is this rank's own. The compute stream attends buffer t % 2 and waits for the
    side stream before the next step, as in ``_ring_ce``; the side stream waits for the compute
    stream before overwriting a buffer the attention may still read."""
    flags, g = _ring_flags(p, device)
    bufs, handle = _ring_buffers(p.rg, shape, dtype, device)
    streams = {"side": _side_stream(device), "compute": torch.cuda.current_stream(device)}
    prev = (p.r_rank - 1) % p.R
    numel = math.prod(shape)
    for name, op, arg in ring_flag_schedule(p.R):
        st = streams[name]
        with torch.cuda.stream(st):
            if op == "join":
                st.wait_stream(streams[arg])
            elif op == "flags":
                run_memops(flags, g[arg[0]][arg[1]], checked=False)
            elif op == "fill":
                fill(bufs[0])
            elif op == "pull":
                bufs[1 - arg].copy_(handle.get_buffer(prev, shape, dtype, arg * numel))
            elif p.ring_n[arg] > 0:  # attend
                o, lse = attend_block(bufs[arg % 2], p.ring_n[arg])
                parts.append(o)
                part_lses.append(lse)


_FLAGS, _FILL, _PULL, _ATTEND, _JOIN_SIDE, _JOIN_COMPUTE = range(6)


def ring_host_steps(R: int, progs: dict, pulls: list, side: int) -> list[tuple]:
    """``ring_flag_schedule(R)`` compiled for ``_ring_ce_flags``: ``(code, a, b)`` per
    operation, in order. ``_FLAGS``: run program ``a`` (``progs[name][b]``) on stream ``b``
    (``side`` or -1, the compute stream); ``_PULL``: ``copy2d_t`` of ``a`` (``pulls[b]``,
    ``(descs, which)``) on stream ``b`` (``side``); ``_ATTEND``: step ``a``; ``_FILL``;
    ``_JOIN_SIDE``: the side stream waits for the compute stream; ``_JOIN_COMPUTE``: the
    reverse."""
    steps: list[tuple] = []
    for name, op, arg in ring_flag_schedule(R):
        if op == "flags":
            steps.append((_FLAGS, progs[arg[0]][arg[1]], side if name == "side" else -1))
        elif op == "join":
            steps.append((_JOIN_SIDE if name == "side" else _JOIN_COMPUTE, None, None))
        elif op == "fill":
            steps.append((_FILL, None, None))
        elif op == "pull":
            steps.append((_PULL, pulls[arg], side))
        else:
            steps.append((_ATTEND, arg, None))
    return steps


def _ring_host(p: _Plan, shape: tuple, dtype: torch.dtype, device: torch.device):
    """Per ring group and block shape: (group, ring buffers, flags, compiled steps, side stream,
    events compute -> side and side -> compute, the previous rank's two buffers), the buffers,
    views, stream and events those of ``_ring_ce_host``."""
    key = ("ringhost", id(p.rg), p.r_rank, p.R, shape, dtype, device)
    hit = _OVERLAP.get(key)
    if hit is not None and hit[0] is p.rg:
        return hit
    flags, progs = _ring_flags(p, device)
    _, bufs, _, side, peer, to_side, to_compute = _ring_ce_host(p, shape, dtype, device)
    nbytes = bufs[0].numel() * bufs.element_size()
    # pull b: the previous rank's buffer b into mine 1 - b, one contiguous run (what copy_ does)
    pulls = [copy2d_template([bufs[1 - b].data_ptr(), nbytes, peer[b].data_ptr(), nbytes,
                              nbytes, 1]) for b in (0, 1)]
    tprogs = {name: [program_tensor(x) for x in per_b] for name, per_b in progs.items()}
    steps = ring_host_steps(p.R, tprogs, pulls, side.cuda_stream)
    hit = (p.rg, bufs, flags, steps, side, to_side, to_compute, peer)
    _OVERLAP[key] = hit
    return hit


def _ring_ce_flags(p: _Plan, shape: tuple, dtype: torch.dtype, device: torch.device, fill,
                   attend_block, parts: list, part_lses: list) -> None:
    """``_ring_ce`` with flag words instead of barrier kernels (``XDIT_OPS_USP_RING=ceflags``),
    running ``ring_flag_schedule`` as compiled once per shape by ``ring_host_steps`` (the same
    operations as ``_ring_ce_flags_lists``, with less host work a call: ``HOST_ENV``)."""
    if p.host_lists:
        _ring_ce_flags_lists(p, shape, dtype, device, fill, attend_block, parts, part_lses)
        return
    _, bufs, flags, steps, side, to_side, to_compute, _ = _ring_host(p, shape, dtype, device)
    batched = p.batched
    compute = torch.cuda.current_stream(device)
    ring_n = p.ring_n
    for code, a, b in steps:
        if code == _FLAGS:
            _MEMOPS_T(flags, a, batched, b)
        elif code == _PULL:
            _COPY2D_T(flags, a[0], a[1], [], b)
        elif code == _ATTEND:
            if ring_n[a] > 0:
                o, lse = attend_block(bufs[a % 2], ring_n[a])
                parts.append(o)
                part_lses.append(lse)
        elif code == _JOIN_SIDE:
            to_side.record(compute)
            side.wait_event(to_side)
        elif code == _JOIN_COMPUTE:
            to_compute.record(side)
            compute.wait_event(to_compute)
        else:
            fill(bufs[0])


def _ring_nccl(p: _Plan, cur: torch.Tensor, attend_block, parts: list, part_lses: list) -> None:
    """The ring over NCCL P2P (gloo on CPU): this rank's contiguous block ``cur`` and every
    other rank's, each attended by ``attend_block(block, n)`` -> (out, lse) over its ``n``
    valid keys while the next block is in flight, appended to ``parts``/``part_lses``."""
    R, rg, nxt, prv = p.R, p.rg, p.nxt, p.prv
    for step in range(R):
        reqs = []
        if step + 1 < R:  # post the next block's transfer before this block's attention
            nxt_buf = torch.empty_like(cur)
            reqs = dist.batch_isend_irecv([
                dist.P2POp(dist.isend, cur, nxt, group=rg),
                dist.P2POp(dist.irecv, nxt_buf, prv, group=rg),
            ])
        n = p.ring_n[step]
        if n > 0:
            o, lse = attend_block(cur, n)
            parts.append(o)
            part_lses.append(lse)
        for r in reqs:
            r.wait()
        if step + 1 < R:
            cur = nxt_buf


def _merge_parts(p: _Plan, parts: list, part_lses: list, dtype: torch.dtype):
    """The partial results merged by their LSEs (one native pass per ``MAX_PARTIALS``)."""
    if not parts:  # every key was padding: not reachable with a valid seq_len
        raise ValueError(f"{OP}: no valid keys (seq_len={p.seq_len})")
    if len(parts) == 1:
        return parts[0], part_lses[0]
    merge = torch.ops.xdit_ops.merge_attention_partials.default
    while len(parts) > MAX_PARTIALS:  # rings longer than one merge pass takes
        o, lse = merge(parts[:MAX_PARTIALS], part_lses[:MAX_PARTIALS], torch.float32)
        parts = [o.to(parts[-1].dtype)] + parts[MAX_PARTIALS:]
        part_lses = [lse] + part_lses[MAX_PARTIALS:]
    return merge(parts, part_lses, dtype)  # 2..MAX_PARTIALS partials left


def _attend(p: _Plan, qbuf, kv, kj, vj, joint_lengths, scale, backend, dtype):
    """Attention of qbuf over every key of the sequence (ring steps + joint partial).

    Each block's partial result is kept and all are merged once, at the end, by one native
    pass over them (instead of an fp32 read-modify-write of the accumulator per step).
    """
    parts: list[torch.Tensor] = []
    part_lses: list[torch.Tensor] = []
    if p.R == 1:
        kk, vv = kv.unbind(0) if isinstance(kv, torch.Tensor) else kv
        if p.cut0:
            kk, vv = kk[:, :p.n0], vv[:, :p.n0]
        o, lse = _local_attention(qbuf, kk, vv, scale, backend, p.attn_backend)
        parts.append(o)
        part_lses.append(lse)
    else:
        def attend_block(cur, n):
            return _local_attention(qbuf, cur[0, :, :n], cur[1, :, :n], scale, backend,
                                    p.attn_backend)

        if p.ring in CE_RINGS:
            # kv: this rank's block [2, B, n, h, D], or (k, v) each [B, n, h, D] (a ring-only
            # grid: copied straight into the ring buffer, no stacked copy first)
            def fill(buf):
                for dst, src in zip(buf, kv, strict=True):
                    # (a call graph's static K and V are these slots already: _ring_statics)
                    if dst.data_ptr() != src.data_ptr():
                        dst.copy_(src)

            _ring_ce(p, (2, *kv[0].shape), kv[0].dtype, qbuf.device, fill, attend_block,
                     parts, part_lses)
        else:
            _ring_nccl(p, kv, attend_block, parts, part_lses)
    if kj is not None:
        if joint_lengths is not None:
            o, lse = _masked_joint_attention(qbuf, kj, vj, joint_lengths, scale, backend)
        else:
            o, lse = _local_attention(qbuf, kj, vj, scale, backend, p.attn_backend)
        parts.append(o)
        part_lses.append(lse)
    return _merge_parts(p, parts, part_lses, dtype)


def _attend_fp8_ring(p: _Plan, call: RingFp8Call, device: torch.device, dtype: torch.dtype):
    """The FP8 ring (``usp_fp8_ring``) on ``call``'s quantized tokens (quantized once with the
    statistics of the whole sequence): pass the quantized K/V blocks (one byte buffer each)
    around the ring, attend each with the quantized attention kernel, add the joint keys'
    partial, merge. Returns (out [B, rows, h, D], lse [B, h, rows]) in ``call``'s query rows."""
    parts: list[torch.Tensor] = []
    part_lses: list[torch.Tensor] = []

    def attend_block(block, n):
        return call.attend(block, n, dtype)

    nbytes = p.fp8ring.nbytes
    if p.ring in CE_RINGS:
        _ring_ce(p, (nbytes,), torch.uint8, device, call.pack, attend_block, parts,
                 part_lses)
    else:
        block = torch.empty(nbytes, dtype=torch.uint8, device=device)
        call.pack(block)
        _ring_nccl(p, block, attend_block, parts, part_lses)
    if call.joint is not None:
        o, lse = call.attend(*call.joint, dtype)
        parts.append(o)
        part_lses.append(lse)
    return _merge_parts(p, parts, part_lses, dtype)


def _run(p: _Plan, q, k, v, joint_lengths, scale, backend, return_lse):
    """The data movement and attention of one call with plan ``p``."""
    J, L, joint_front = p.J, p.L, p.joint_front
    if J:
        qa, qb = q.split_with_sizes(p.split, 1)
        ka, kb = k.split_with_sizes(p.split, 1)
        va, vb = v.split_with_sizes(p.split, 1)
        if joint_front:
            q_j, k_j, v_j, q_s, k_s, v_s = qa, ka, va, qb, kb, vb
        else:
            q_s, k_s, v_s, q_j, k_j, v_j = qa, ka, va, qb, kb, vb
    else:
        q_s, k_s, v_s = q, k, v
        q_j = k_j = v_j = None
    dtype = q.dtype

    def attend(qbuf, kv, kj, vj):
        return _attend(p, qbuf, kv, kj, vj, joint_lengths, scale, backend, dtype)

    if p.path == "fp8ring":
        call = RingFp8Call.ring_only(q, k, v, J, joint_front, p.fp8ring, p.rg, scale)
        out, lse = _attend_fp8_ring(p, call, q.device, dtype)  # local row order already
    elif p.path == "local":
        qbuf = q if (joint_front or J == 0) else torch.cat([q_j, q_s], dim=1)
        if p.R > 1:
            # NCCL sends one contiguous block; the copy-engine ring copies K and V into its
            # symmetric buffer itself (run 34: the stack and the copy after it were two passes,
            # 110 + 111 us of a 10.42 ms call at (1,32760,40,128) on 4 H100s)
            kv = (k_s, v_s) if p.ring in CE_RINGS else torch.stack([k_s, v_s])
        elif p.Jk:
            kv = (k, v) if joint_front else (torch.cat([k_j, k_s], 1), torch.cat([v_j, v_s], 1))
        else:
            kv = (k_s, v_s)
        jk = (k_j, v_j) if J and not p.joint_inline else (None, None)
        out_h, lse_h = attend(qbuf, kv, *jk)
        if joint_front or J == 0:
            out, lse = out_h, lse_h
        else:  # rows were [joint; seq]: put the joint rows back behind
            out = torch.cat([out_h[:, J:], out_h[:, :J]], dim=1)
            lse = torch.cat([lse_h[:, :, J:], lse_h[:, :, :J]], dim=2) if return_lse else None
    else:
        if p.path == "ce":
            out, lse_h = _ulysses_ce(q_s, k_s, v_s, q_j, k_j, v_j, J, p.Jk, joint_front,
                                     p.heads, p.u_rank, p.ug, p.chunks, attend)
        elif p.path == "push":
            out, lse_h = _ulysses_push(q_s, k_s, v_s, q_j, k_j, v_j, p, attend)
        elif p.path == "overlap":
            out, lse_h = _ulysses_overlap(q_s, k_s, v_s, q_j, k_j, v_j, p, attend)
        elif p.path == "fp8wire":
            out_h, lse_h = ulysses_fp8_wire(q_s, k_s, v_s, q_j, k_j, v_j, p.heads, p.u_rank,
                                            p.ug, p.wire, scale, return_lse)
            out = _ulysses_out(out_h, J, L, p.heads, p.ug, joint_front, p.out_splits)
        elif p.path == "fp8hybrid":
            # the FP8 wire's exchange, then its assembled keys around the ring
            call = RingFp8Call.hybrid(q_s, k_s, v_s, q_j, k_j, v_j, p.heads, p.u_rank, p.ug,
                                      p.rg, p.fp8ring, scale)
            out_h, lse_h = _attend_fp8_ring(p, call, q.device, dtype)
            out = _ulysses_out(out_h, J, L, p.heads, p.ug, joint_front, p.out_splits)
        elif p.path == "pipelined":
            out, lse_h = _ulysses_pipelined(q_s, k_s, v_s, q_j, k_j, v_j, J, p.Jk, joint_front,
                                            p.heads, p.u_rank, p.ug, p.chunks, attend)
        else:
            recv = _ulysses_in(q_s, k_s, v_s, p)  # [U, 3, B, L, h, D], flat
            qbuf, kv, kj, vj = _place(recv, p.U, p.B, L, p.h_me, q_j, k_j, v_j, p.h0, J, p.Jk)
            if p.squeeze:
                kv = _squeezed(p, kv)
            out_h, lse_h = attend(qbuf, kv, kj, vj)
            out = _ulysses_out(out_h, J, L, p.heads, p.ug, joint_front, p.out_splits)
        # The LSE goes back like the output (a head_dim of 1), whichever path computed it.
        lse = _lse_out(lse_h, J, L, p.heads, p.ug, joint_front, p.lse_splits) \
            if return_lse else None
    if not return_lse:
        return out.contiguous(), q.new_empty((0,), dtype=torch.float32)
    return out.contiguous(), lse.float().contiguous()


lib.impl(OP, _usp_impl, "CPU")
lib.impl(OP, _usp_impl, "CUDA")


@torch.library.register_fake("xdit_ops::usp_attention")
def _usp_fake(q, k, v, joint_lengths, joint_tokens, joint_front, seq_len, scale, backend,
              ulysses_group, ring_group, return_lse, shard_lengths=None):
    check_inputs(q, k, v, OP)
    B, T, H, D = q.shape
    out = q.new_empty((B, T, H, v.shape[-1]))
    lse = q.new_empty((B, H, T), dtype=torch.float32) if return_lse else \
        q.new_empty((0,), dtype=torch.float32)
    return out, lse


# ---------------------------------------------------------------------------------------------
# public API

_USP_OP = torch.ops.xdit_ops.usp_attention.default


def _group_name(g) -> str:
    if g is None:
        return ""
    if isinstance(g, str):
        return g
    if isinstance(g, dist.ProcessGroup):
        return "" if dist.get_world_size(g) == 1 else g.group_name
    raise TypeError(f"{OP}: groups are ProcessGroup or group-name str, got {type(g).__name__}")


_MESH_GROUPS: list = [None, ("", "")]  # the last mesh asked about and its group names


def _groups_from(mesh: DeviceMesh | None) -> tuple[str, str]:
    """The (ulysses, ring) group names of ``mesh`` (default: the ``init_parallel`` mesh),
    remembered for the last mesh object: a mesh's groups never change, and a new
    ``init_parallel`` makes a new mesh object (the cached one is held, so its id is not reused)."""
    if mesh is None:
        state = get_parallel_state(required=False)
        if state is None:
            return "", ""
        mesh = state.mesh
    if _MESH_GROUPS[0] is mesh:
        return _MESH_GROUPS[1]
    names = mesh.mesh_dim_names or ()
    if not names or not ({"ulysses", "ring"} & set(names)):
        raise ValueError(f"{OP}: the mesh needs a 'ulysses' and/or 'ring' dimension, has {names}")
    u = _group_name(mesh.get_group("ulysses")) if "ulysses" in names else ""
    r = _group_name(mesh.get_group("ring")) if "ring" in names else ""
    _MESH_GROUPS[:] = [mesh, (u, r)]
    return u, r


def usp_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    joint_tokens: int = 0,
    joint_position: str = "front",
    joint_lengths: torch.Tensor | None = None,
    seq_len: int | None = None,
    scale: float | None = None,
    mesh: DeviceMesh | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    ulysses_group: dist.ProcessGroup | str | None = None,
    ring_group: dist.ProcessGroup | str | None = None,
    shard_lengths: Sequence[int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sequence-parallel attention (Ulysses x Ring) equal to attention over the full sequence.

    Parameters
    ----------
    query, key, value : [B, joint_tokens + S_local, H, D] on each rank of the sequence-parallel
        group (BSHD, head_dim contiguous; float16/bfloat16/float32). ``S_local`` is this rank's
        shard (``xdit_ops.shard_sequence``), equal on every rank.
    joint_tokens : number of joint (text) tokens, replicated on every rank.
    joint_position : ``"front"`` (before the shard: Flux) or ``"back"`` (after: SD3, HunyuanVideo).
    joint_lengths : optional int tensor [B]: valid joint tokens per sample; the others are not
        attended to (padded prompts). Their query rows are still computed.
    seq_len : valid length of the full sharded sequence when ``shard_sequence`` padded it;
        padded keys are excluded exactly. Default: no padding.
    shard_lengths : instead of ``seq_len``, the valid tokens of every shard in shard order
        (``ring_rank * U + ulysses_rank``), for shards padded unevenly (e.g. the row bands of a
        VAE image: padding at the end of each shard, not only of the sequence). Padded keys are
        excluded exactly; padded query rows give rows to ignore.
    scale : softmax scale, default ``1/sqrt(D)``.
    mesh : DeviceMesh with ``ulysses``/``ring`` dimensions; default the ``init_parallel`` mesh.
        Without either, a single-device attention.
    backend : local attention kernel (``xdit_ops.attention``'s backends).
    return_lse : also return the fp32 natural-log LSE [B, H, joint_tokens + S_local].
    ulysses_group, ring_group : ProcessGroup or group name, for engines that manage their own
        groups (instead of ``mesh``). Shard ``i`` of the sequence must sit on the rank with
        ``ring_rank * ulysses_size + ulysses_rank == i``.

    Returns
    -------
    out : [B, joint_tokens + S_local, H, D] in the input dtype (same local layout as ``query``).
    lse : [B, H, joint_tokens + S_local] float32, only with ``return_lse``.

    Notes
    -----
    The first call with a new combination of shapes and options plans the call (validation,
    the head split, the exchange sizes) and, on a group, checks that every rank passes the same
    shapes (a CPU all-gather, ~1 ms): a rank with another shape makes every rank raise instead
    of hanging. Later calls with the same combination reuse the plan and skip the check, so
    they are host-cheap; ``XDIT_OPS_USP_CHECK=always`` checks every call, ``0`` never (the op
    body's docstring, ``_usp_impl``, says what the remembered check cannot catch).
    """
    if ulysses_group is not None or ring_group is not None:
        if mesh is not None:
            raise ValueError(f"{OP}: pass either mesh or ulysses_group/ring_group, not both")
        u, r = _group_name(ulysses_group), _group_name(ring_group)
    else:
        u, r = _groups_from(mesh)
    fast = FAST_PATH and query.is_cuda and not torch.compiler.is_compiling()
    if fast:

        def key_of():  # (of the arguments as passed)
            return _fast_key(query, key, value, joint_tokens, joint_position, joint_lengths,
                             seq_len, scale, backend, u, r, return_lse, shard_lengths)

        # (the key costs ~1-5 us: only computed once some signature has a graph; an argument
        # that cannot be hashed is a miss, and the checks below reject it)
        try:
            state = _FAST.get(key_of()) if _FAST else None
        except TypeError:
            state = None
        if state is not None and plain_call(query, key, value):
            n_out = 2 if return_lse else 1
            res = (_RUN(state.handle, n_out, query, key, value) if joint_lengths is None
                   else _RUN(state.handle, n_out, query, key, value, joint_lengths))
            # (None under a capture, or for sources the graph does not take: the op below
            # records or runs the call)
            if res is not None:
                FAST_CALLS[0] += 1
                return res if return_lse else res[0]
        _LAST_GRAPH.entry = None
    if joint_position not in ("front", "back"):
        raise ValueError(f"{OP}: joint_position must be 'front' or 'back', got {joint_position!r}")
    if not isinstance(joint_tokens, int) or joint_tokens < 0:
        raise ValueError(f"{OP}: joint_tokens must be a non-negative int, got {joint_tokens!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"{OP}: scale must be a finite number, got {scale!r}")
    if joint_lengths is not None:
        if joint_tokens == 0:
            raise ValueError(f"{OP}: joint_lengths given but joint_tokens is 0")
        if joint_lengths.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{OP}: joint_lengths must be int32/int64, got {joint_lengths.dtype}")
    out, lse = _USP_OP(
        query, key, value, joint_lengths, joint_tokens, joint_position == "front",
        -1 if seq_len is None else int(seq_len), None if scale is None else float(scale),
        backend, u, r, return_lse,
        None if shard_lengths is None else [int(n) for n in shard_lengths],
    )
    if fast:
        _remember_fast(key_of)
    return (out, lse) if return_lse else out
