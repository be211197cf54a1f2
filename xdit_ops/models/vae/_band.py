"""Band-aware layers: what a VAE's leaf modules do while a band decode/encode is active.

Every activation inside a banded decode is a band of rows of the full activation, and every band
is the latent band scaled by the same factor on every rank (the latent is split once, at the
decoder entry; upsampling doubles every band, a stride-2 convolution halves it). So a rank finds
the layout of any activation from its own height alone: ``f = h / latent_band_rows`` and the
layout is ``f`` times the latent split. Nothing about shapes is ever communicated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from fractions import Fraction

import torch
import torch.distributed as dist
import torch.nn.functional as F

from xdit_ops.parallel.halo import BandLayout, ConvRows, halo_conv

OP = "parallelize_vae"
SCORE_BYTES = 1 << 30  # attention query chunks keep a [chunk, S] fp32 score matrix under this


class BandContext:
    """The band group and the latent split of one decode/encode call."""

    def __init__(self, group: dist.ProcessGroup, base: tuple[int, ...], chunk_bytes: int,
                 assemble_bytes: int = 0):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        if len(base) != self.world or min(base) < 1:
            raise ValueError(f"{OP}: latent bands {base} for a group of {self.world}")
        self.base = base
        self.base_total = sum(base)
        self.chunk_bytes = chunk_bytes
        self.assemble_bytes = assemble_bytes
        self._layouts: dict[int, BandLayout] = {}

    def layout(self, h: int, where: str) -> BandLayout:
        """The layout of an activation whose band on this rank has ``h`` rows."""
        got = self._layouts.get(h)
        if got is not None:
            return got
        f = Fraction(h, self.base[self.rank])
        sizes = []
        for c in self.base:
            v = f * c
            if v.denominator != 1:
                raise ValueError(
                    f"{OP}: {where}: an activation of {h} rows on rank {self.rank} is not the "
                    f"latent band ({self.base[self.rank]} of {self.base} rows) times a factor "
                    f"that keeps every band whole; this VAE changes height in a way row bands "
                    f"cannot follow"
                )
            sizes.append(int(v))
        got = BandLayout(tuple(sizes))
        self._layouts[h] = got
        return got

    def check_proportional(self, layout: BandLayout, where: str) -> None:
        pairs = zip(layout.sizes, self.base, strict=True)
        if any(s * self.base_total != layout.total * c for s, c in pairs):
            raise ValueError(
                f"{OP}: {where}: its output bands {layout.sizes} are not proportional to the "
                f"latent bands {self.base}; use a latent height the strides divide evenly"
            )


_ACTIVE: list[BandContext] = []


def active() -> BandContext | None:
    """The band context of the decode/encode running now, or None (modules behave serially)."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def activate(ctx: BandContext) -> Iterator[BandContext]:
    _ACTIVE.append(ctx)
    try:
        yield ctx
    finally:
        _ACTIVE.pop()


# ---------------------------------------------------------------------------------------------
# Convolution


def _pair_pad(module: torch.nn.Module, where: str) -> tuple[int, ...]:
    pad = module.padding
    if isinstance(pad, str):
        raise NotImplementedError(f"{OP}: module {where} ({type(module).__name__}) uses "
                                  f"padding={pad!r}; only explicit padding is supported")
    return tuple(pad)


def conv_needs_halo(module: torch.nn.Conv2d | torch.nn.Conv3d, extra: tuple[int, int]) -> bool:
    """False when the convolution reads exactly its own row (kernel, stride 1 along H, no pad)."""
    pad = module.padding if not isinstance(module.padding, str) else (1, 1, 1)
    return (module.kernel_size[-2], module.stride[-2], pad[-2], extra) != (1, 1, 0, (0, 0))


def band_conv(
    module: torch.nn.Conv2d | torch.nn.Conv3d,
    x: torch.Tensor,
    ctx: BandContext,
    where: str,
    *,
    pad_h: tuple[int, int] | None = None,
    pad_other: tuple[int, ...] | None = None,
    mode: str | None = None,
) -> torch.Tensor:
    """``module``'s convolution of band ``x`` (``[B, C, H, W]`` or ``[B, C, T, H, W]``).

    pad_h : global (top, bottom) padding along H; default the module's own.
    pad_other : padding of the other spatial axes in ``module.padding`` order with H left out
        (``(pw,)`` for 2-D, ``(pt, pw)`` for 3-D); default the module's own.
    mode : the padding mode; default the module's ``padding_mode``.
    """
    pads = _pair_pad(module, where)
    if pad_h is None:
        pad_h = (pads[-2], pads[-2])
    if pad_other is None:
        pad_other = pads[:-2] + pads[-1:]
    mode = mode or module.padding_mode
    weight, bias = module.weight, module.bias
    stride, dilation, groups = module.stride, module.dilation, module.groups
    conv = F.conv2d if x.dim() == 4 else F.conv3d
    if mode == "zeros":

        def conv_fn(t: torch.Tensor, pad_h: int) -> torch.Tensor:
            return conv(t, weight, bias, stride, pad_other[:-1] + (pad_h, pad_other[-1]),
                        dilation, groups)
    else:
        # F.pad lists the last axis first: (w, w, h, h[, t, t]); H comes from the halo, and the
        # zero rows conv_fn may add stand in for rows that halo_conv recomputes.
        torch_pad = (pad_other[-1], pad_other[-1], 0, 0)
        if len(pad_other) == 2:
            torch_pad += (pad_other[0], pad_other[0])
        zero = (0,) * (len(stride) - 2)

        def conv_fn(t: torch.Tensor, pad_h: int) -> torch.Tensor:
            return conv(F.pad(t, torch_pad, mode=mode), weight, bias, stride,
                        zero + (pad_h, 0), dilation, groups)

    geom = ConvRows(module.kernel_size[-2], stride[-2], dilation[-2], pad_h[0], pad_h[1], mode)
    layout = ctx.layout(x.shape[-2], where)
    y, out_layout = halo_conv(x, layout, geom, conv_fn, ctx.group, chunk_bytes=ctx.chunk_bytes,
                              assemble_bytes=ctx.assemble_bytes)
    ctx.check_proportional(out_layout, where)
    return y


# ---------------------------------------------------------------------------------------------
# Group normalisation with whole-tensor statistics


def _local_moments(xg: torch.Tensor, chunk_elems: int = 1 << 24) -> tuple[torch.Tensor, ...]:
    """fp32 mean and sum of squared deviations of ``xg [R, L]`` over L (Chan merge of chunks,
    so a half-precision band is never copied to fp32 whole)."""
    rows, length = xg.shape
    step = max(1, chunk_elems // max(1, rows))
    mean = m2 = None
    n = 0
    for s in range(0, length, step):
        piece = xg[:, s:s + step].float()
        var_p, mean_p = torch.var_mean(piece, dim=1, correction=0)
        k = piece.shape[1]
        if mean is None:
            mean, m2, n = mean_p, var_p * k, k
            continue
        delta = mean_p - mean
        tot = n + k
        mean = mean + delta * (k / tot)
        m2 = m2 + var_p * k + delta.square() * (n * k / tot)
        n = tot
    return mean, m2


def band_group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    ctx: BandContext,
) -> torch.Tensor:
    """``F.group_norm`` of the whole tensor whose band (any layout ``[B, C, ...]``) is ``x``.

    Per rank: fp32 mean and centred sum of squares of each (sample, group) over its band; one
    all-gather of ``[count, mean, M2]``; Chan's parallel merge in fp64 (exact weighting of uneven
    bands, no E[x^2] - E[x]^2 cancellation); then one fused normalisation (batch_norm's inference
    kernel with the merged statistics per (sample, channel)), computed in fp32 inside the kernel.
    """
    b, c = x.shape[0], x.shape[1]
    xg = x.reshape(b * num_groups, -1)
    count = xg.shape[1]
    mean, m2 = _local_moments(xg)
    stats = torch.stack([torch.full_like(mean, float(count)), mean, m2])
    gathered = [torch.empty_like(stats) for _ in range(ctx.world)]
    dist.all_gather(gathered, stats, group=ctx.group)
    allst = torch.stack(gathered).double()  # [world, 3, B*G]
    n_i, mean_i, m2_i = allst[:, 0], allst[:, 1], allst[:, 2]
    n = n_i.sum(0)
    g_mean = (n_i * mean_i).sum(0) / n
    g_m2 = (m2_i + n_i * (mean_i - g_mean).square()).sum(0)
    g_var = g_m2 / n
    per = c // num_groups
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    mean_c = g_mean.to(stat_dtype).repeat_interleave(per)
    var_c = g_var.to(stat_dtype).repeat_interleave(per)
    w = None if weight is None else weight.to(stat_dtype).repeat(b)
    bb = None if bias is None else bias.to(stat_dtype).repeat(b)
    y = F.batch_norm(x.reshape(1, b * c, -1), mean_c, var_c, w, bb, False, 0.0, eps)
    return y.reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# Attention over all bands' tokens


def band_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ctx: BandContext,
    counts: tuple[int, ...],
    mask_fn: Callable[[int, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention of this rank's queries over every rank's keys: ``[B, S_local, heads, D]`` (BSHD).

    ``counts`` gives every rank's number of tokens (uneven bands); the keys are ordered rank by
    rank. ``mask_fn(i0, i1)`` returns the boolean mask (True = attend) of local queries
    ``[i0, i1)`` against all keys, broadcastable to ``[B, heads, i1 - i0, S_total]``: built per
    query chunk, so a frame-causal mask (HunyuanVideo) never exists whole.

    This is the one call site of attention inside the banded VAE. Without a mask it is
    ``usp_attention`` as a ring over the band group: each band, padded at its end to the
    longest, is one shard of ``shard_lengths=counts``, so padded keys are cut off exactly, the
    K/V blocks travel around the ring while the current block is attended, and no rank holds
    more than two blocks of keys. With a mask (frame-causal HunyuanVideo) it gathers K and V
    and attends in query chunks, since ``usp_attention`` takes no mask.
    """
    if mask_fn is None:
        from xdit_ops.ops.usp_attention import usp_attention

        n = q.shape[1]
        longest = max(counts)
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        if n < longest:
            def padded(t: torch.Tensor) -> torch.Tensor:
                return torch.cat([t, t.new_zeros(t.shape[0], longest - n, *t.shape[2:])], 1)

            q, k, v = padded(q), padded(k), padded(v)
        out = usp_attention(q, k, v, ring_group=ctx.group, shard_lengths=counts)
        return out[:, :n]
    kv = torch.stack([k, v])  # [2, B, S_local, H, D]
    longest = max(counts)
    if kv.shape[2] < longest:
        pad = list(kv.shape)
        pad[2] = longest - kv.shape[2]
        kv = torch.cat([kv, kv.new_zeros(pad)], dim=2)
    bufs = [torch.empty_like(kv) for _ in range(ctx.world)]
    dist.all_gather(bufs, kv.contiguous(), group=ctx.group)
    full = torch.cat([buf[:, :, :n] for buf, n in zip(bufs, counts, strict=True)], dim=2)
    del bufs
    qh, kh, vh = q.transpose(1, 2), full[0].transpose(1, 2), full[1].transpose(1, 2)
    # Queries go in chunks whose fp32 score matrix stays under SCORE_BYTES: a VAE mid-block at
    # 4096^2 has 262144 tokens of head dim 512, above what the flash kernels take, and a math
    # fallback on the whole band would need tens of GB for the scores.
    b, heads, s_q, _ = qh.shape
    step = max(1, SCORE_BYTES // max(1, 4 * b * heads * kh.shape[2]))
    if step >= s_q:
        m = None if mask_fn is None else mask_fn(0, s_q)
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=m).transpose(1, 2)
    out = qh.new_empty(qh.shape[:-1] + (vh.shape[-1],))
    for i in range(0, s_q, step):
        j = min(s_q, i + step)
        m = None if mask_fn is None else mask_fn(i, j)
        out[:, :, i:j] = F.scaled_dot_product_attention(qh[:, :, i:j], kh, vh, attn_mask=m)
    return out.transpose(1, 2)
