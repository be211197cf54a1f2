"""FP8 K/V around the ring of ``usp_attention`` (``XDIT_OPS_USP_FP8_WIRE=1``, ``backend="fp8"``).

``usp_attention(..., backend="fp8")`` on a ring otherwise passes bf16/fp16 K/V blocks around
the ring and quantizes every (query, block) pair separately: each block gets its own K mean
and V scales, and the query is quantized once per step. With the switch on a grid with a ring
(ring degree R > 1, no ``joint_lengths``), every rank quantizes once and the ring carries the
1-byte codes (ring-only grid: :meth:`RingFp8Call.ring_only`; hybrid Ulysses x ring grid:
:meth:`RingFp8Call.hybrid`, at the end):

1. Statistics, as the Ulysses FP8 wire (:mod:`xdit_ops.ops.usp_fp8_wire`) computes them: each
   rank sums the rotated K of its valid shard keys and takes their V channel amax; one
   all-gather over the ring group, the partials added in rank order plus the joint tokens'
   (replicated, counted once): the K mean and V scales of the whole sequence, the same bits on
   every rank. Every block then shares one K mean, so each block's LSE carries the same
   correction ``scale * q . mean(k)`` and the blocks' partial LSEs merge exactly.
2. Each rank quantizes its local ``[B, J + L, H, D]`` tokens once (Q INT8 per token with its
   LSE correction, K INT8 per token with the mean removed, V e4m3 with the global channel
   scale) and packs its shard's valid keys into one contiguous byte block (:func:`block_bytes`):
   ``[K codes [B, H, Lp, Dp] int8 | V^T codes [B, H, Dp, Lp] e4m3 | K scales [B, H, Lp] fp32]``,
   ``Lp`` = L rounded up to the 64-key tile, zero past the valid keys and past D: exactly the
   key fields of :class:`~xdit_ops.reference.fp8_attention.QuantizedQKV`, so a received block
   is attended in place (V^T already in the P.V key order where the sm90ws kernel runs).
   ``Dp + Dp + 4`` bytes per (key, head) against ``4 D`` for bf16 K and V (0.51 at head dim
   128, 0.52 at 64; at 72, padded to 128, 0.90).
3. The ring (NCCL P2P on any device, gloo on CPU; or the copy engines' symmetric-memory pull,
   ``XDIT_OPS_USP_RING``) passes the byte block; every step runs the quantized attention
   kernel on (the quantized Q, the block's valid keys) and keeps (out, natural-log LSE).
4. The joint keys, quantized with the same statistics, are one more partial; the partials are
   merged by ``merge_attention_partials`` as the bf16 ring merges them.

The quantized Q, its scales, the V scales and the K mean never travel: they are the same on
every step. The result equals one device's FP8 attention of the gathered sequence given these
statistics, up to the P rounding of the online softmax (its running max restarts per block)
and the rounding of each block's output to the input dtype before the merge.

On a hybrid grid the statistics are reduced over the Ulysses group, then over the ring group;
the FP8 wire's exchange (:mod:`xdit_ops.ops.usp_fp8_wire`) moves the codes of each rank's
heads, its assembly gives the query rows ``[joint; U * L gathered]`` and the Ulysses group's
valid keys, and those keys (``h`` heads, ``U * L`` keys padded to 64) are the ring block. The
ring partners share a Ulysses rank, so their blocks have the same heads and size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from xdit_ops.ops import usp_fp8_wire as _wire
from xdit_ops.ops.usp_fp8_wire import (
    KEY_BLOCK,
    WirePlan,
    attend_quantized,
    global_stats,
    make_wire_plan,
    pv_index,
    quantize_tokens,
    token_stats,
    wire_switch,
)
from xdit_ops.reference.fp8_attention import (
    FP8,
    FP8_MAX,
    QuantizedQKV,
    pad_to,
    padded_head_dim,
)


def ring_applies(switch: str | None, backend: str, U: int, R: int, L: int,
                 has_joint_lengths: bool, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether a call takes the FP8 ring (``switch``: the value of ``XDIT_OPS_USP_FP8_WIRE``):
    the switch on, ``backend="fp8"``, a ring (R > 1; with a Ulysses degree U > 1 the FP8 wire
    feeds it), no per-sample joint lengths, shard tokens, fp16/bf16 and a head dim the FP8
    kernels take (anything else runs the default path, which raises where the fp8 backend
    cannot run)."""
    return (wire_switch(switch) and backend == "fp8" and R > 1 and L > 0
            and not has_joint_lengths and dtype in (torch.float16, torch.bfloat16)
            and 1 <= head_dim <= 128)


def block_keys(L: int) -> int:
    """Keys per ring block: ``L`` rounded up to the scheme's 64-key tile."""
    return pad_to(L, KEY_BLOCK)


def block_bytes(B: int, H: int, L: int, head_dim: int) -> int:
    """Bytes of one ring block: K codes and V^T codes at the padded head dim, fp32 K scales."""
    Dp = padded_head_dim(head_dim)
    return B * H * block_keys(L) * (2 * Dp + 4)


def block_views(buf: torch.Tensor, B: int, H: int, Lp: int, Dp: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of one ring block ``buf`` (flat uint8, :func:`block_bytes`): K codes
    [B, H, Lp, Dp] int8, V^T [B, H, Dp, Lp] uint8 (e4m3 bits), K scales [B, H, Lp] fp32.
    Every field starts a multiple of 4096 bytes in (the sm90ws kernel's TMA needs 16)."""
    n = B * H * Lp * Dp
    return (buf[:n].view(torch.int8).view(B, H, Lp, Dp),
            buf[n:2 * n].view(B, H, Dp, Lp),
            buf[2 * n:2 * n + 4 * B * H * Lp].view(torch.float32).view(B, H, Lp))


def pack_keys(dst: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor, vt8: torch.Tensor,
              start: int, n: int, D: int, pv_order: bool) -> None:
    """Write keys ``[start, start + n)`` of quantized tokens into the block ``dst`` (flat
    uint8, :func:`block_views` layout): codes and scales, zero past the ``n`` keys and past D;
    V^T in the P.V key order if ``pv_order``.

    k8 : [B, H, S, Dp] int8. k_scale : [B, H, S] fp32. vt8 : [B, H, >= D, S] uint8 (e4m3 bits,
    keys in key order).
    """
    B, H, _, Dp = k8.shape
    Lp = dst.numel() // (B * H * (2 * Dp + 4))
    kb, vt, ks = block_views(dst, B, H, Lp, Dp)
    kb[:, :, :n] = k8[:, :, start:start + n]
    kb[:, :, n:].zero_()
    ks[:, :, :n] = k_scale[:, :, start:start + n]
    ks[:, :, n:].zero_()
    if pv_order:
        v = vt.new_zeros(B, H, Dp, Lp)
        v[:, :, :D, :n] = vt8[:, :, :D, start:start + n]
        torch.index_select(v, 3, pv_index(Lp, v.device), out=vt)
    else:
        vt[:, :, :D, :n] = vt8[:, :, :D, start:start + n]
        vt[:, :, D:].zero_()
        vt[:, :, :D, n:].zero_()


def _wants_pv_order(device: torch.device, head_dim: int) -> bool:
    """Whether the quantized attention that ``attend_quantized`` runs here takes V^T in the
    P.V key order (the sm90ws kernel)."""
    if device.type != "cuda":
        return False
    from xdit_ops.ops.fp8_attention import SM90_IMPLS, SM90_VT_PV_ORDER, resolve_impl

    impl = resolve_impl(device, head_dim, per_key=True)  # (the ring's K scales are per key)
    return impl in SM90_IMPLS and SM90_VT_PV_ORDER[impl]


@dataclass
class RingFp8Plan:
    """What one FP8-ring call shape needs, worked out by usp_attention's plan.

    n_me : valid keys of this rank's block (its shard; on a hybrid grid its Ulysses group's
    shards). count : valid keys of the whole sequence (joint tokens included).
    nbytes : :func:`block_bytes` of this rank's heads. wire : the Ulysses exchange's
    :class:`~xdit_ops.ops.usp_fp8_wire.WirePlan` on a hybrid grid, else None.
    """

    n_me: int
    count: int
    nbytes: int
    wire: WirePlan | None = None


def make_ring_plan(B: int, L: int, H: int, D: int, n_me: int, count: int,
                   heads: list[int] | None = None, h_me: int = 0,
                   mine: list[int] | None = None) -> RingFp8Plan:
    """The plan of a call with ``B``, ``L`` shard tokens, ``H`` heads, head dim ``D``; on a
    hybrid grid ``heads`` (per Ulysses rank), ``h_me`` and ``mine`` (valid tokens of each
    shard of this rank's Ulysses group) too: blocks of ``U * L`` keys of ``h_me`` heads."""
    if heads is None:
        return RingFp8Plan(n_me=n_me, count=count, nbytes=block_bytes(B, H, L, D))
    return RingFp8Plan(n_me=n_me, count=count,
                       nbytes=block_bytes(B, h_me, len(heads) * L, D),
                       wire=make_wire_plan(B, L, D, heads, h_me, mine))


class RingFp8Call:
    """One rank's quantized tokens for one call: the query fields, the packer of its own block
    and the attention of a block. Made by :meth:`ring_only` or :meth:`hybrid`."""

    def __init__(self, q8, q_scale, lse_corr, keys, start: int, n: int, joint_start: int,
                 J: int, v_amax: torch.Tensor, D: int, pv_order: bool):
        # keys: (k8 [B, h, S, Dp], k_scale [B, h, S], vt8 [B, h, >= D, S]) holding this
        # rank's block at [start, start + n) and the joint keys at [joint_start, + J)
        self.q8, self.q_scale, self.lse_corr = q8, q_scale, lse_corr
        self.keys, self.start, self.n, self.D, self.pv_order = keys, start, n, D, pv_order
        self.B, self.H, _, self.Dp = q8.shape
        self.v_scale = (v_amax / FP8_MAX).contiguous()
        self.joint = None
        if J:
            buf = q8.new_empty(block_bytes(self.B, self.H, J, D), dtype=torch.uint8)
            pack_keys(buf, *keys, joint_start, J, D, pv_order)
            self.joint = (buf, J)

    @classmethod
    def ring_only(cls, q, k, v, J: int, joint_front: bool, rp: RingFp8Plan,
                  group: dist.ProcessGroup, scale: float | None) -> RingFp8Call:
        """A ring-only grid. q, k, v : [B, T, H, D] the local tokens (``T = J + L``, joint
        rows front or back); ``group``: the ring group; ``scale``: None for 1/sqrt(D)."""
        B, T, H, D = q.shape
        L = T - J
        s0, j0 = (J, 0) if joint_front else (0, L)  # first shard / joint row of the tensors
        ksum, vmax = token_stats(k[:, s0:s0 + rp.n_me], v[:, s0:s0 + rp.n_me])
        joint_stats = token_stats(k[:, j0:j0 + J], v[:, j0:j0 + J]) if J else None
        k_mean, v_amax = global_stats(ksum, vmax, joint_stats, rp.count, group)
        # every local token at once: query rows in the local order (the output's)
        f = quantize_tokens(q, k, v, k_mean, v_amax, 1.0 / math.sqrt(D) if scale is None
                            else scale)
        return cls(f.q8, f.scales[0], f.scales[1], (f.k8, f.scales[2], f.vt8), s0, rp.n_me,
                   j0, J, v_amax, D, _wants_pv_order(q.device, D))

    @classmethod
    def hybrid(cls, q_s, k_s, v_s, q_j, k_j, v_j, heads: list[int], u_rank: int,
               ug: dist.ProcessGroup, rg: dist.ProcessGroup, rp: RingFp8Plan,
               scale: float | None) -> RingFp8Call:
        """A Ulysses x ring grid: the statistics reduced over the Ulysses then the ring group,
        the FP8 wire's exchange (:func:`~xdit_ops.ops.usp_fp8_wire.ulysses_fp8_wire`'s steps)
        and its assembly, whose keys (this Ulysses group's valid keys) become the ring block.
        q_s, k_s, v_s : [B, L, H, D] the shard; q_j, k_j, v_j : [B, J, H, D] or None. Query
        rows ``[joint; U * L gathered]`` of this rank's heads (``_ulysses_out``'s input)."""
        D = q_s.shape[3]
        J = 0 if q_j is None else q_j.shape[1]
        qq, v_amax = _wire.exchange_assemble(q_s, k_s, v_s, q_j, k_j, v_j, heads, u_rank, ug,
                                             rp.wire, scale, (ug, rg), rp.count)
        # keys [joint; this group's valid keys]: the block is the latter
        return cls(qq.q, qq.q_scale, qq.lse_corr, (qq.k, qq.k_scale, qq.vt.view(torch.uint8)),
                   J, rp.n_me, 0, J, v_amax, D, _wants_pv_order(q_s.device, D))

    def pack(self, dst: torch.Tensor) -> None:
        """This rank's block (its valid keys) into ``dst`` (flat uint8, the plan's nbytes)."""
        pack_keys(dst, *self.keys, self.start, self.n, self.D, self.pv_order)

    def attend(self, block: torch.Tensor, n: int, out_dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantized attention of every query row over the first ``n`` keys of ``block``
        (flat uint8): (out [B, T, h, D] ``out_dtype``, lse [B, h, T] fp32, natural log, the K
        mean's correction included)."""
        B, H, Dp = self.B, self.H, self.Dp
        Lp = block.numel() // (B * H * (2 * Dp + 4))
        k8, vt, ks = block_views(block, B, H, Lp, Dp)
        qq = QuantizedQKV(q=self.q8, q_scale=self.q_scale, k=k8, k_scale=ks, vt=vt.view(FP8),
                          v_scale=self.v_scale, lse_corr=self.lse_corr, seqlen_k=n,
                          head_dim=self.D, vt_pv_order=self.pv_order)
        return attend_quantized(qq, out_dtype, True)


__all__ = ["RingFp8Call", "RingFp8Plan", "block_bytes", "block_keys", "block_views",
           "make_ring_plan", "pack_keys", "ring_applies"]
