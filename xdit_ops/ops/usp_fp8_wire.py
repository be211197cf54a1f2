"""FP8 on the wire for Ulysses ``usp_attention`` (``XDIT_OPS_USP_FP8_WIRE=1``, ``backend="fp8"``).

``usp_attention(..., backend="fp8")`` otherwise exchanges bf16/fp16 Q, K, V and quantizes each
rank's heads after the exchange. With the switch on (Ulysses only: no ring, no
``joint_lengths``), every rank quantizes its own tokens *before* the exchange and the
all-to-all carries the 1-byte codes plus fp32 per-token scales:

1. Statistics. The scheme (:mod:`xdit_ops.reference.fp8_attention`) has two quantities that
   depend on every key: the mean of the Hadamard-rotated K (``smooth_k``) and the per-channel
   amax of |V| (V's scale). Each rank sums its valid shard keys (``seq_len`` / ``shard_lengths``
   padding excluded) and takes their V amax, for all heads: ``[B, H, Dp]`` each.
2. One all-gather of those partials over the Ulysses group; every rank adds them in rank order,
   plus the joint (text) tokens' own sum and amax (replicated, so every rank computes them
   alike and they count once): the same K mean and V scale on every rank, those of one device
   on the gathered sequence up to the fp32 summation order of the mean.
3. Each rank quantizes its ``L`` shard tokens for all heads: Q INT8 with its per-token scale
   and LSE correction ``scale * q . mean(k)``, K INT8 (mean removed) with its per-token scale, V
   e4m3 with the global channel scale.
4. One ``all_to_all_single`` of a byte buffer moves to each rank its heads:
   ``[q codes | k codes | v codes | 3 fp32 scales]`` per (token, head), ``2 Dp + Dv + 12``
   bytes against ``6 D`` for bf16 (0.52 of the bytes at head dim 128, 0.53 at 64).
5. Each rank quantizes its own heads of the joint tokens locally (no wire), assembles a
   :class:`~xdit_ops.reference.fp8_attention.QuantizedQKV` over the whole sequence (joint rows
   first, valid keys only, keys padded to 64 at the end, V transposed) and runs the quantized
   attention kernel the ``fp8`` backend would run (CPU: the emulation). The bf16 output goes
   back through usp_attention's output exchange.

Per-token Q/K scales are local to a token, so the only cross-rank quantities are the K mean
and the V channel amax, 2 x B x H x Dp fp32 values per call.

On CUDA the statistics are Triton's ``kv_stats_kernel`` (the op's own) and the quantization
of the shard and joint tokens is the quantization pass's Triton kernels with ``STATS_GIVEN``
(:func:`xdit_ops.triton.fp8_attention.quantize_tokens_triton`), which take the reduced
statistics; the receive-side assembly is torch copies of byte tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from xdit_ops.reference.fp8_attention import (
    FP8,
    FP8_MAX,
    LOG2E,
    QuantizedQKV,
    _pv_gather_index,
    _quantize_rows,
    cached_hadamard,
    fp8_attention_quantized_ref,
    pad_to,
    padded_head_dim,
    round_k_scale,
    to_fp8,
)

OP = "usp_attention"
WIRE_ENV = "XDIT_OPS_USP_FP8_WIRE"
WIRE_VALUES = ("0", "1")
SCALES = 3  # fp32 values per (token, head) on the wire: q_scale, lse_corr, k_scale
KEY_BLOCK = 64  # QuantizedQKV pads the keys to a multiple of this (the scheme's block_n)


def wire_switch(switch: str | None) -> bool:
    """``XDIT_OPS_USP_FP8_WIRE`` (``switch``: its value): ``1`` on, ``0`` or unset off."""
    if switch is None or switch == "0":
        return False
    if switch == "1":
        return True
    raise ValueError(f"{OP}: {WIRE_ENV} must be one of {WIRE_VALUES}, got {switch!r}")


def wire_applies(switch: str | None, backend: str, U: int, R: int, L: int,
                 has_joint_lengths: bool, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether a call takes the FP8-wire path: the switch on, ``backend="fp8"``, a Ulysses
    group (U > 1) without a ring, no per-sample joint lengths, shard tokens, fp16/bf16 and a
    head dim the FP8 kernels take (anything else runs the default path, which raises where the
    fp8 backend cannot run)."""
    return (wire_switch(switch) and backend == "fp8" and U > 1 and R == 1 and L > 0
            and not has_joint_lengths and dtype in (torch.float16, torch.bfloat16)
            and 1 <= head_dim <= 128)


# ---------------------------------------------------------------------------------------------
# the byte layout on the wire


def v_channels(head_dim: int) -> int:
    """V code bytes per (token, head) on the wire: the true head dim rounded up to 4 (V is not
    rotated, so its channels past D are zero and need not travel; 4 keeps the scales that follow
    fp32-aligned)."""
    return pad_to(head_dim, 4)


def token_bytes(head_dim: int) -> int:
    """Bytes per (token, head) on the wire: Q and K codes at the padded head dim (the Hadamard
    rotation fills every padded channel), V codes, three fp32 scales."""
    return 2 * padded_head_dim(head_dim) + v_channels(head_dim) + 4 * SCALES


@dataclass
class WireFields:
    """One rank's quantized tokens, BHSD (all heads of its shard, or its heads of the joint
    tokens).

    q8, k8 : [B, H, S, Dp] int8. vt8 : [B, H, Dv, S] uint8, V^T's e4m3 bits (keys contiguous,
        the layout of ``QuantizedQKV.vt``), Dv = :func:`v_channels`.
    scales : [3, B, H, S] fp32: q_scale (dequant x softmax scale x log2 e / Dp), lse_corr
        (natural log), k_scale (22 significant bits).
    """

    q8: torch.Tensor
    k8: torch.Tensor
    vt8: torch.Tensor
    scales: torch.Tensor


def _segments(B: int, h: int, L: int, Dp: int, Dv: int) -> list[tuple[int, int]]:
    """(byte offset, byte length) of the four fields in one destination's chunk of ``h``
    heads: q codes [B, h, L, Dp], k codes [B, h, L, Dp], V^T codes [B, h, Dv, L], scales
    [3, B, h, L] fp32."""
    n = B * h * L
    sizes = [n * Dp, n * Dp, n * Dv, SCALES * n * 4]
    offs = [sum(sizes[:i]) for i in range(4)]
    return list(zip(offs, sizes, strict=True))


def _chunk_views(buf: torch.Tensor, B: int, h: int, L: int, Dp: int, Dv: int):
    """Views of one destination's (or source's) chunk ``buf`` (flat uint8): q [B, h, L, Dp]
    int8, k [B, h, L, Dp] int8, V^T [B, h, Dv, L] uint8, scales [3, B, h, L] fp32."""
    (oq, nq), (ok, nk), (ov, nv), (os_, ns) = _segments(B, h, L, Dp, Dv)
    return (buf[oq:oq + nq].view(torch.int8).view(B, h, L, Dp),
            buf[ok:ok + nk].view(torch.int8).view(B, h, L, Dp),
            buf[ov:ov + nv].view(B, h, Dv, L),
            buf[os_:os_ + ns].view(torch.float32).view(SCALES, B, h, L))


def pack_send(f: WireFields, heads: list[int]) -> torch.Tensor:
    """The send buffer of the exchange: flat uint8, one contiguous chunk per destination ``j``
    (its ``heads[j]`` heads of every field, :func:`_segments` layout), in rank order."""
    B, H, L, Dp = f.q8.shape
    Dv = f.vt8.shape[2]
    W = 2 * Dp + Dv + 4 * SCALES
    send = torch.empty(B * H * L * W, dtype=torch.uint8, device=f.q8.device)
    U = len(heads)
    if all(x == heads[0] for x in heads):  # one copy per field for every destination
        h = heads[0]
        per = send.view(U, B * h * L * W)
        for (off, n), src in zip(_segments(B, h, L, Dp, Dv), (f.q8, f.k8, f.vt8, f.scales),
                                 strict=True):
            dst = per[:, off:off + n].view(src.dtype)
            if src.dtype == torch.float32:  # [3, B, H, L] -> [U, 3, B, h, L]
                dst.view(U, SCALES, B, h, L).copy_(
                    src.view(SCALES, B, U, h, L).permute(2, 0, 1, 3, 4))
            else:  # [B, H, x, y] -> [U, B, h, x, y]
                dst.view(U, B, h, *src.shape[2:]).copy_(
                    src.view(B, U, h, *src.shape[2:]).permute(1, 0, 2, 3, 4))
        return send
    start = h0 = 0
    for h in heads:
        size = B * h * L * W
        q, k, v, s = _chunk_views(send[start:start + size], B, h, L, Dp, Dv)
        hs = slice(h0, h0 + h)
        q.copy_(f.q8[:, hs])
        k.copy_(f.k8[:, hs])
        v.copy_(f.vt8[:, hs])
        s.copy_(f.scales[:, :, hs])
        start += size
        h0 += h
    return send


# ---------------------------------------------------------------------------------------------
# statistics and quantization (torch: the exact emulation on CPU)

def _rotated(x: torch.Tensor, Dp: int) -> torch.Tensor:
    """[B, S, H, D] -> the Hadamard-rotated fp32 [B, H, S, Dp] (the reference's operations)."""
    xf = x.float().transpose(1, 2)
    if Dp != x.shape[-1]:
        xf = torch.nn.functional.pad(xf, (0, Dp - x.shape[-1]))
    return xf @ cached_hadamard(Dp, torch.float32, x.device)


def token_stats_ref(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the rotated K over the tokens of ``k`` and amax of |V| per channel.

    Parameters
    ----------
    k, v : [B, S, H, D] (the valid tokens only).

    Returns
    -------
    ksum, vmax : [B, H, Dp] fp32 (vmax zero past D and where S == 0).
    """
    B, S, H, D = k.shape
    Dp = padded_head_dim(D)
    ksum = _rotated(k, Dp).sum(dim=2)
    vmax = v.new_zeros(B, H, Dp, dtype=torch.float32)
    if S:
        vmax[..., :D] = v.abs().amax(dim=1).float()
    return ksum, vmax


def token_stats(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_stats_ref`, by the Triton ``kv_stats_kernel`` on CUDA."""
    if k.is_cuda and k.shape[1] > 0:
        from xdit_ops.triton.fp8_attention import kv_stats_triton

        return kv_stats_triton(k, v)
    return token_stats_ref(k, v)


def quantize_tokens_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        k_mean: torch.Tensor, v_amax: torch.Tensor, scale: float,
                        fp8_cast: Callable[[torch.Tensor], torch.Tensor] = to_fp8
                        ) -> WireFields:
    """The scheme's quantization of some tokens given the K mean and V amax of the whole
    sequence (the operations of ``quantize_qkv_ref``, in the same order).

    Parameters
    ----------
    q, k, v : [B, S, H, D] float16/bfloat16.
    k_mean : [B, H, Dp] fp32, the mean of the rotated K over every valid key of the sequence.
    v_amax : [B, H, Dp] fp32, amax of |V| per channel over those keys (zero -> 1).
    scale : the softmax scale.
    fp8_cast : V's fp32 -> e4m3 conversion (to mirror Triton's CPU interpreter in its tests).

    Returns
    -------
    :class:`WireFields` of these tokens, all heads.
    """
    B, S, H, D = q.shape
    Dp = padded_head_dim(D)
    Dv = v_channels(D)
    qf = _rotated(q, Dp)
    kf = _rotated(k, Dp) - k_mean[:, :, None, :]
    score_scale = scale * LOG2E
    score_scale /= Dp
    lse_corr = (qf * k_mean[:, :, None, :]).sum(-1) * (scale / Dp)
    q_codes, q_deq = _quantize_rows(qf, 1, "int8")
    k_codes, k_deq = _quantize_rows(kf, 1, "int8")
    vf = v.float().transpose(1, 2)
    amax = v_amax[..., :D]
    v_codes = fp8_cast((vf * (FP8_MAX / amax)[:, :, None, :]).clamp_(-FP8_MAX, FP8_MAX))
    vt8 = torch.zeros(B, H, Dv, S, dtype=torch.uint8, device=q.device)
    vt8[:, :, :D] = v_codes.view(torch.uint8).transpose(-1, -2)
    scales = torch.stack([q_deq * score_scale, lse_corr, round_k_scale(k_deq)])
    return WireFields(q_codes.contiguous(), k_codes.contiguous(), vt8, scales.contiguous())


def quantize_tokens(q, k, v, k_mean, v_amax, scale) -> WireFields:
    """:func:`quantize_tokens_ref`, by :func:`~xdit_ops.triton.fp8_attention.quantize_tokens_triton`
    on CUDA."""
    if q.is_cuda and q.shape[1] > 0:
        from xdit_ops.triton.fp8_attention import quantize_tokens_triton

        return WireFields(*quantize_tokens_triton(q, k, v, k_mean, v_amax, scale))
    return quantize_tokens_ref(q, k, v, k_mean, v_amax, scale)


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup) -> None:
    # all_gather_single is torch's newer name (all_gather_into_tensor warns as deprecated)
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def global_stats(ksum: torch.Tensor, vmax: torch.Tensor, joint: tuple | None, count: int,
                 group: dist.ProcessGroup | tuple[dist.ProcessGroup, ...]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The K mean and V amax of the whole sequence from every rank's shard partials.

    ``ksum``/``vmax`` [B, H, Dp] fp32: this rank's; ``joint``: the joint tokens' (the same on
    every rank; None without joint tokens); ``count``: valid keys of the whole sequence. One
    all-gather per group (``group``: one, or several to reduce over in turn, e.g. the Ulysses
    then the ring group of a hybrid grid); the partials are added in rank order, so every rank
    gets the same bits. Returns (k_mean, v_amax) [B, H, Dp] fp32, v_amax with zeros replaced
    by 1.
    """
    total, amax = ksum, vmax
    for g in group if isinstance(group, tuple) else (group,):
        U = dist.get_world_size(g)
        mine = torch.stack([total, amax])
        everyone = mine.new_empty(U * mine.numel())
        _all_gather(everyone, mine.reshape(-1), g)
        everyone = everyone.view(U, *mine.shape)
        total = everyone[0, 0]
        for i in range(1, U):
            total = total + everyone[i, 0]
        amax = everyone[:, 1].amax(dim=0)
    if joint is not None:
        total = total + joint[0]
        amax = torch.maximum(amax, joint[1])
    k_mean = total / count
    v_amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    return k_mean, v_amax


# ---------------------------------------------------------------------------------------------
# receive side


@dataclass
class WirePlan:
    """What one FP8-wire call shape needs, worked out by usp_attention's plan.

    sizes : ``all_to_all_single``'s (output split sizes, input split sizes, bytes received).
    mine : valid tokens of each Ulysses shard (source order).
    """

    sizes: tuple
    mine: list[int]


def make_wire_plan(B: int, L: int, head_dim: int, heads: list[int], h_me: int,
                   mine: list[int]) -> WirePlan:
    """The exchange's byte split sizes (the heads may be uneven) and the valid shard lengths."""
    per_head = B * L * token_bytes(head_dim)
    recv = [per_head * h_me] * len(heads)
    send = [per_head * hj for hj in heads]
    if all(x == heads[0] for x in heads):
        sizes = (None, None, sum(recv))
    else:
        sizes = (recv, send, sum(recv))
    return WirePlan(sizes=sizes, mine=list(mine))


def _all_to_all(recv, send, out_splits, in_splits, group) -> None:
    dist.all_to_all_single(recv, send, output_split_sizes=out_splits,
                           input_split_sizes=in_splits, group=group)


def assemble(recv: torch.Tensor, joint: WireFields | None, v_amax: torch.Tensor,
             U: int, B: int, L: int, h: int, D: int, mine: list[int]) -> QuantizedQKV:
    """The received chunks (flat uint8 ``[U(src)]`` x the :func:`_segments` layout of ``h``
    heads) and this rank's heads of the joint tokens -> :class:`QuantizedQKV` over the whole
    sequence: query rows ``[joint; U * L gathered]``, keys ``[joint; valid keys of each
    source]`` padded to a multiple of 64 with zero codes and scales, V^T ``[B, h, Dp,
    Sk_pad]`` zero past D and past the keys. ``v_amax``: [B, h, Dp] fp32 of these heads."""
    Dp = padded_head_dim(D)
    Dv = v_channels(D)
    J = 0 if joint is None else joint.q8.shape[2]
    T = J + U * L
    n_valid = sum(mine)
    Sk = J + n_valid
    Sk_pad = pad_to(Sk, KEY_BLOCK)
    dev = recv.device
    per = recv.view(U, -1)
    # per-source views of every field (the offsets of _segments)
    (oq, nq), (ok, nk), (ov, nv), (os_, ns) = _segments(B, h, L, Dp, Dv)
    rq = per[:, oq:oq + nq].view(torch.int8).view(U, B, h, L, Dp)
    rk = per[:, ok:ok + nk].view(torch.int8).view(U, B, h, L, Dp)
    rv = per[:, ov:ov + nv].view(U, B, h, Dv, L)
    rs = per[:, os_:os_ + ns].view(torch.float32).view(U, SCALES, B, h, L)

    q8 = torch.empty(B, h, T, Dp, dtype=torch.int8, device=dev)
    # q_scale, lse_corr: allocations of their own (aligned base pointers for the kernels)
    qs = [torch.empty(B, h, T, dtype=torch.float32, device=dev) for _ in range(2)]
    q8[:, :, J:].view(B, h, U, L, Dp).copy_(rq.permute(1, 2, 0, 3, 4))
    for i in range(2):
        qs[i][:, :, J:].view(B, h, U, L).copy_(rs[:, i].permute(1, 2, 0, 3))
    k8 = torch.empty(B, h, Sk_pad, Dp, dtype=torch.int8, device=dev)
    ks = torch.empty(B, h, Sk_pad, dtype=torch.float32, device=dev)
    vt = torch.empty(B, h, Dp, Sk_pad, dtype=torch.uint8, device=dev)
    if J:
        q8[:, :, :J] = joint.q8
        qs[0][:, :, :J] = joint.scales[0]
        qs[1][:, :, :J] = joint.scales[1]
        k8[:, :, :J] = joint.k8
        ks[:, :, :J] = joint.scales[2]
        vt[:, :, :D, :J] = joint.vt8[:, :, :D]
    if all(n == L for n in mine):  # every shard full: one copy per field
        k8[:, :, J:Sk].view(B, h, U, L, Dp).copy_(rk.permute(1, 2, 0, 3, 4))
        ks[:, :, J:Sk].view(B, h, U, L).copy_(rs[:, 2].permute(1, 2, 0, 3))
        vt[:, :, :D, J:Sk].view(B, h, D, U, L).copy_(rv[:, :, :, :D].permute(1, 2, 3, 0, 4))
    else:  # padded shards: each source's valid prefix
        at = J
        for j, n in enumerate(mine):
            if n:
                k8[:, :, at:at + n] = rk[j, :, :, :n]
                ks[:, :, at:at + n] = rs[j, 2, :, :, :n]
                vt[:, :, :D, at:at + n] = rv[j, :, :, :D, :n]
                at += n
    k8[:, :, Sk:].zero_()
    ks[:, :, Sk:].zero_()
    vt[:, :, :, Sk:].zero_()
    if D < Dp:
        vt[:, :, D:, :Sk].zero_()
    return QuantizedQKV(q=q8, q_scale=qs[0], k=k8, k_scale=ks, vt=vt.view(FP8),
                        v_scale=(v_amax / FP8_MAX).contiguous(), lse_corr=qs[1],
                        seqlen_k=Sk, head_dim=D)


_PV_INDEX: dict[tuple, torch.Tensor] = {}


def pv_index(n: int, device: torch.device) -> torch.Tensor:
    """The P.V key-order gather index of ``n`` keys, kept per (n, device): made on the first
    (eager) call of a shape, so a CUDA-graph capture of a later call copies nothing from the
    host. Used by the wire's receiver and the FP8 ring's packer."""
    key = (n, device)
    if key not in _PV_INDEX:
        _PV_INDEX[key] = _pv_gather_index(n, False, device)
    return _PV_INDEX[key]


def _in_pv_order(qq: QuantizedQKV) -> QuantizedQKV:
    """``in_pv_order`` with the cached :func:`pv_index`."""
    vt = qq.vt.view(torch.uint8)[..., pv_index(qq.vt.shape[-1], qq.vt.device)].view(FP8)
    return replace(qq, vt=vt, vt_pv_order=True)


def attend_quantized(qq: QuantizedQKV, out_dtype: torch.dtype, return_lse: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantized attention kernel that ``backend="fp8"`` runs on this device (CPU: the
    emulation; CUDA: ``XDIT_OPS_FP8_IMPL`` resolved as the op does): (out [B, T, h, D], lse
    [B, h, T] fp32; without ``return_lse`` the CUDA kernels return it empty)."""
    dev = qq.q.device
    if dev.type != "cuda":
        return fp8_attention_quantized_ref(qq, out_dtype)
    from xdit_ops.ops.fp8_attention import (
        SM90_IMPLS,
        SM90_VT_PV_ORDER,
        attention_quantized_sm90,
        resolve_impl,
    )

    impl = resolve_impl(dev, qq.head_dim, per_key=True)  # (the wire's K scales are per key)
    if impl == "emulation":
        return fp8_attention_quantized_ref(qq, out_dtype)
    if impl in SM90_IMPLS:
        if SM90_VT_PV_ORDER[impl] and not qq.vt_pv_order:
            qq = _in_pv_order(qq)
        return attention_quantized_sm90(qq, out_dtype, return_lse, impl)
    from xdit_ops.triton.fp8_attention import attention_quantized_triton

    return attention_quantized_triton(qq, out_dtype, return_lse)


def exchange_assemble(q_s, k_s, v_s, q_j, k_j, v_j, heads: list[int], u_rank: int,
                      group: dist.ProcessGroup, wp: WirePlan, scale: float | None,
                      stats_groups: tuple[dist.ProcessGroup, ...] | None = None,
                      count: int | None = None) -> tuple[QuantizedQKV, torch.Tensor]:
    """The FP8 wire's statistics, quantization, exchange and assembly for one rank.

    Parameters as :func:`ulysses_fp8_wire`; ``stats_groups``: the groups the statistics are
    reduced over (default: ``group``; the FP8 ring's hybrid grid passes the Ulysses then the
    ring group); ``count``: the valid keys of the whole sequence (default: the joint tokens
    and every Ulysses shard's valid keys).

    Returns
    -------
    qq : :class:`QuantizedQKV` of this rank's heads over the group's gathered sequence.
    v_amax : [B, h, Dp] fp32, this rank's heads' V channel amax.
    """
    B, L, H, D = q_s.shape
    U = len(heads)
    h = heads[u_rank]
    hs = slice(sum(heads[:u_rank]), sum(heads[:u_rank]) + h)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    n_me = wp.mine[u_rank]
    ksum, vmax = token_stats(k_s[:, :n_me], v_s[:, :n_me])
    J = 0 if q_j is None else q_j.shape[1]
    joint_stats = token_stats(k_j, v_j) if J else None
    if count is None:
        count = J + sum(wp.mine)
    k_mean, v_amax = global_stats(ksum, vmax, joint_stats, count,
                                  group if stats_groups is None else stats_groups)
    send = pack_send(quantize_tokens(q_s, k_s, v_s, k_mean, v_amax, scale), heads)
    out_splits, in_splits, total = wp.sizes
    recv = send.new_empty(total)
    _all_to_all(recv, send, out_splits, in_splits, group)
    joint = None
    if J:
        joint = quantize_tokens(q_j[:, :, hs], k_j[:, :, hs], v_j[:, :, hs],
                                k_mean[:, hs].contiguous(), v_amax[:, hs].contiguous(), scale)
    return assemble(recv, joint, v_amax[:, hs], U, B, L, h, D, wp.mine), v_amax[:, hs]


def ulysses_fp8_wire(q_s, k_s, v_s, q_j, k_j, v_j, heads: list[int], u_rank: int,
                     group: dist.ProcessGroup, wp: WirePlan, scale: float | None,
                     return_lse: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8-wire Ulysses exchange and attention of one rank.

    Parameters
    ----------
    q_s, k_s, v_s : [B, L, H, D] this rank's shard (fp16/bf16).
    q_j, k_j, v_j : [B, J, H, D] the joint tokens (the same on every rank), or None.
    heads : heads per Ulysses rank; ``u_rank``: this rank's index; ``group``: the Ulysses group.
    wp : the plan's :class:`WirePlan`. scale : softmax scale (None: ``1/sqrt(D)``).
    return_lse : compute the LSE (else the CUDA kernels skip it and ``lse`` may be empty).

    Returns
    -------
    out : [B, J + U*L, h, D] this rank's heads, joint rows first (what ``_ulysses_out`` takes).
    lse : [B, h, J + U*L] fp32.
    """
    qq, _ = exchange_assemble(q_s, k_s, v_s, q_j, k_j, v_j, heads, u_rank, group, wp, scale)
    return attend_quantized(qq, q_s.dtype, return_lse)


__all__ = ["WIRE_ENV", "WireFields", "WirePlan", "assemble", "attend_quantized",
           "exchange_assemble", "global_stats", "make_wire_plan", "pack_send", "pv_index",
           "quantize_tokens",
           "quantize_tokens_ref", "token_bytes", "token_stats", "token_stats_ref",
           "ulysses_fp8_wire", "wire_applies", "wire_switch"]
