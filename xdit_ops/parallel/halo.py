"""Row bands and exact halo-exchange convolutions along the height axis.

A tensor ``[..., H, W]`` (height is always dim -2: ``[B, C, H, W]`` images, ``[B, C, T, H, W]``
videos) is split into contiguous row bands, one per rank of a process group, in rank order.
:class:`BandLayout` records every rank's band, so each rank can work out, without talking to
anybody, which rows every other rank needs from it for a convolution of a given kernel, stride,
dilation and padding along H.

:func:`halo_conv` computes a convolution on the bands exactly as on the full tensor:

* Output row ``o`` belongs to the rank that owns input row ``o * stride`` (its stride anchor),
  so strided convolutions split their output on the stride grid.
* Each rank receives only the rows of other ranks that its output rows read (normally
  ``kernel // 2`` rows from each neighbour; more hops only when a band is thinner than the
  halo), by point-to-point messages issued together with ``batch_isend_irecv`` (NCCL and gloo).
* The global border padding (zeros, a constant, replicate, reflect, circular) is applied only
  at the global top and bottom; interior band edges read real rows.
* Rows move by ``xdit_ops::gather_rows`` (one kernel launch on CUDA): each send buffer is one
  gather from the band, and each boundary slab one gather from the band, the received buffers
  and fill rows. The gather indices are derived from the plan once and cached per device.
* The rows that need nothing from other ranks are convolved while the halo is in flight, in
  chunks of bounded size written into the output, so a rank holds about its band's input and
  output plus one chunk: the full tensor is never gathered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.distributed as dist

from xdit_ops.ops.gather_rows import MAX_SOURCES

# The op itself, not the checking wrapper: every call here is built from a plan whose indices
# are valid by construction, and a decode makes thousands of them (host time).
_gather_rows = torch.ops.xdit_ops.gather_rows.default

__all__ = [
    "BandLayout",
    "ConvRows",
    "HaloPlan",
    "all_gather_rows",
    "balanced_sizes",
    "channels_last_band",
    "conv_rows",
    "gather_rows_to",
    "halo_conv",
    "plan_halo",
]

PAD_MODES = ("zeros", "constant", "replicate", "reflect", "circular")


def balanced_sizes(total: int, world: int) -> tuple[int, ...]:
    """Split ``total`` rows into ``world`` bands whose sizes differ by at most one (first ranks
    take the extra rows)."""
    base, extra = divmod(total, world)
    return tuple(base + (1 if r < extra else 0) for r in range(world))


@dataclass(frozen=True)
class BandLayout:
    """Every rank's band of rows: rank ``r`` owns global rows ``[starts[r], starts[r + 1])``."""

    sizes: tuple[int, ...]
    starts: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        starts = [0]
        for s in self.sizes:
            if s < 0:
                raise ValueError(f"BandLayout: negative band size in {self.sizes}")
            starts.append(starts[-1] + s)
        object.__setattr__(self, "starts", tuple(starts))

    @property
    def total(self) -> int:
        return self.starts[-1]

    @property
    def world(self) -> int:
        return len(self.sizes)

    def owner(self, row: int) -> int:
        for r in range(self.world):
            if self.starts[r] <= row < self.starts[r + 1]:
                return r
        raise IndexError(f"BandLayout: row {row} outside [0, {self.total})")


@dataclass(frozen=True)
class ConvRows:
    """A convolution's geometry along H: kernel, stride, dilation, global padding and its mode."""

    kernel: int
    stride: int = 1
    dilation: int = 1
    pad_top: int = 0
    pad_bottom: int = 0
    mode: str = "zeros"

    def __post_init__(self) -> None:
        if self.mode not in PAD_MODES:
            raise ValueError(f"halo_conv: padding mode {self.mode!r} is not one of {PAD_MODES}")
        if self.kernel < 1 or self.stride < 1 or self.dilation < 1:
            raise ValueError(f"halo_conv: bad geometry {self}")

    @property
    def span(self) -> int:
        """Rows one output row reads: dilation * (kernel - 1) + 1."""
        return self.dilation * (self.kernel - 1) + 1

    def out_rows(self, h: int) -> int:
        return (h + self.pad_top + self.pad_bottom - self.span) // self.stride + 1

    def window(self, o: int) -> tuple[int, int]:
        """Global input rows [lo, hi) that output row ``o`` reads (may stick out of the tensor)."""
        lo = o * self.stride - self.pad_top
        return lo, lo + self.span


def conv_rows(geom: ConvRows, layout: BandLayout) -> BandLayout:
    """The output layout: row ``o`` goes to the rank owning input row ``o * stride``."""
    h_out = geom.out_rows(layout.total)
    if h_out < 1:
        raise ValueError(f"halo_conv: {geom} on {layout.total} rows gives no output rows")
    cuts = [min(h_out, -(-s // geom.stride)) for s in layout.starts[:-1]] + [h_out]
    return BandLayout(tuple(cuts[r + 1] - cuts[r] for r in range(layout.world)))


def _source_row(i: int, h: int, mode: str) -> int | None:
    """The input row that padded index ``i`` reads, or None for a fill value."""
    if 0 <= i < h:
        return i
    if mode in ("zeros", "constant"):
        return None
    if mode == "replicate":
        return min(max(i, 0), h - 1)
    if mode == "circular":
        return i % h
    # reflect (no edge repeat), as torch's reflection padding
    if h == 1:
        return 0
    period = 2 * (h - 1)
    i = i % period
    return i if i < h else period - i


@dataclass(frozen=True)
class HaloPlan:
    """What one rank does for one convolution on one layout (all of it derived locally)."""

    out_layout: BandLayout
    out_begin: int  # this rank's first output row (global)
    out_end: int
    interior: tuple[int, int]  # output rows computable from own rows only (global, may be empty)
    recv_rows: dict[int, tuple[int, ...]]  # peer rank -> global rows received from it (sorted)
    send_rows: dict[int, tuple[int, ...]]  # peer rank -> global rows sent to it (sorted)


def _needed_rows(geom: ConvRows, layout: BandLayout, out: BandLayout, r: int) -> set[int]:
    o0, o1 = out.starts[r], out.starts[r + 1]
    if o0 == o1:
        return set()
    lo, _ = geom.window(o0)
    _, hi = geom.window(o1 - 1)
    rows = (_source_row(i, layout.total, geom.mode) for i in range(lo, hi))
    return {i for i in rows if i is not None}


@lru_cache(maxsize=4096)
def plan_halo(geom: ConvRows, layout: BandLayout, rank: int) -> HaloPlan:
    """The halo plan of ``rank`` for convolution ``geom`` on bands ``layout`` (cached)."""
    out = conv_rows(geom, layout)
    if geom.mode == "reflect" and max(geom.pad_top, geom.pad_bottom) >= layout.total:
        raise ValueError(f"halo_conv: reflect padding {geom} needs more than {layout.total} rows")
    starts = layout.starts

    def split(rows: set[int], exclude: int) -> dict[int, tuple[int, ...]]:
        by_rank: dict[int, tuple[int, ...]] = {}
        for p in range(layout.world):
            if p == exclude:
                continue
            mine = tuple(sorted(i for i in rows if starts[p] <= i < starts[p + 1]))
            if mine:
                by_rank[p] = mine
        return by_rank

    recv = split(_needed_rows(geom, layout, out, rank), rank)
    send: dict[int, tuple[int, ...]] = {}
    for q in range(layout.world):
        if q == rank:
            continue
        theirs = _needed_rows(geom, layout, out, q)
        mine = tuple(sorted(i for i in theirs if starts[rank] <= i < starts[rank + 1]))
        if mine:
            send[q] = mine
    o0, o1 = out.starts[rank], out.starts[rank + 1]
    a, b = starts[rank], starts[rank + 1]
    inner = [o for o in range(o0, o1) if a <= geom.window(o)[0] and geom.window(o)[1] <= b]
    interior = (inner[0], inner[-1] + 1) if inner else (o0, o0)
    return HaloPlan(out, o0, o1, interior, recv, send)


@lru_cache(maxsize=4096)
def _device_index(pairs: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    """``gather_rows``'s ``[n, 2]`` int32 index on ``device``, one tensor per (pairs, device):
    steady-state calls copy nothing from the host and can be captured in a CUDA graph. The per-
    call paths reach it through caches keyed on the small plan inputs (``_send_index``,
    ``_slab``), so ``pairs``, a pair per slab row, is neither built nor hashed per call."""
    # A blocking copy (.to() synchronises its stream): the index is complete before any stream
    # reads it.
    return torch.tensor(pairs, dtype=torch.int32).reshape(-1, 2).to(device)


@lru_cache(maxsize=4096)
def _send_index(rows: tuple[int, ...], first: int, device: torch.device) -> torch.Tensor:
    return _device_index(tuple((0, i - first) for i in rows), device)


def _take_rows(x: torch.Tensor, rows: tuple[int, ...], first: int) -> torch.Tensor:
    """Rows ``rows`` (global, sorted) of band ``x`` starting at global row ``first``, contiguous:
    one ``gather_rows`` launch (the send buffer of one peer)."""
    return _gather_rows([x], _send_index(rows, first, x.device), 0.0)


@dataclass(frozen=True)
class _SlabPlan:
    """Where each row of a boundary slab comes from (see ``_slab_plan``)."""

    peers: tuple[int, ...]  # received buffers the slab reads, in source order (sources 1, 2, ..)
    merged: bool  # too many peers for one gather: their buffers are concatenated into source 1
    pairs: tuple[tuple[int, int], ...]  # (source, row) per slab row; source -1: a fill row


def _slab_plan(
    first: int,
    n_own: int,
    lo: int,
    hi: int,
    h_total: int,
    mode: str,
    received: tuple[tuple[int, tuple[int, ...]], ...],
) -> _SlabPlan:
    """The gather of input rows [lo, hi) (global, padded index space) from own rows (source 0),
    the received rows of each peer (``received``: peer rank -> its global rows) and fill rows."""
    rows_of = dict(received)
    where: list[tuple[int | None, int]] = []  # (peer or None for own, row); fill as (-1, 0)
    for i in range(lo, hi):
        src = _source_row(i, h_total, mode)
        if src is None:
            where.append((-1, 0))
        elif first <= src < first + n_own:
            where.append((None, src - first))
        else:
            p = next(p for p, rows in received if src in rows)
            where.append((p, rows_of[p].index(src)))
    peers = tuple(p for p, _ in received if any(w[0] == p for w in where))
    merged = 1 + len(peers) > MAX_SOURCES
    offset, source = {}, {}
    for k, p in enumerate(peers):
        source[p] = 1 if merged else 1 + k
        offset[p] = sum(len(rows_of[q]) for q in peers[:k]) if merged else 0
    pairs = tuple(
        (0, r) if p is None else (-1, 0) if p == -1 else (source[p], offset[p] + r)
        for p, r in where
    )
    return _SlabPlan(peers, merged, pairs)


@lru_cache(maxsize=4096)
def _slab(first: int, n_own: int, lo: int, hi: int, h_total: int, mode: str,
          received: tuple[tuple[int, tuple[int, ...]], ...],
          device: torch.device) -> tuple[_SlabPlan, torch.Tensor]:
    """``_slab_plan`` and its device index, built once per slab geometry and device."""
    plan = _slab_plan(first, n_own, lo, hi, h_total, mode, received)
    return plan, _device_index(plan.pairs, device)


def _gather_slab(x: torch.Tensor, slab: tuple[_SlabPlan, torch.Tensor],
                 received: dict[int, torch.Tensor], fill: float) -> torch.Tensor:
    """The slab ``slab`` (from ``_slab``) gathered from band ``x`` and the received buffers
    (peer -> buffer): one ``gather_rows`` launch."""
    plan, index = slab
    bufs = [received[p] for p in plan.peers]
    if plan.merged:
        bufs = [torch.cat(bufs, dim=-2)]
    return _gather_rows([x, *bufs], index, float(fill))


def _assemble(
    x: torch.Tensor,
    first: int,
    lo: int,
    hi: int,
    h_total: int,
    geom: ConvRows,
    received: dict[int, tuple[tuple[int, ...], torch.Tensor]],
    fill: float,
) -> torch.Tensor:
    """Input rows [lo, hi) (global, padded index space) from own rows, received rows (peer ->
    (its global rows, buffer)) and fill, contiguous. ``halo_conv`` reaches the same gather
    through its cached ``_Exchange``."""
    slab = _slab(first, x.shape[-2], lo, hi, h_total, geom.mode,
                 tuple((p, rows) for p, (rows, _) in received.items()), x.device)
    return _gather_slab(x, slab, {p: buf for p, (_, buf) in received.items()}, fill)


class _Exchange:
    """Everything of one convolution's halo exchange that follows from (geometry, layout, group,
    device) alone, worked out on its first call (``_exchange``) instead of on every one: the
    plan, the peers' global ranks, the send indices, the boundary windows and their slab
    gathers. A decode runs the same few geometries thousands of times."""

    def __init__(self, geom: ConvRows, layout: BandLayout, group: dist.ProcessGroup,
                 device: torch.device):
        self.rank = rank = dist.get_rank(group)
        self.plan = plan = plan_halo(geom, layout, rank)
        self.first = first = layout.starts[rank]
        self.n_own = n_own = layout.sizes[rank]
        self.geom, self.h_total, self.device = geom, layout.total, device
        self.sends = tuple((dist.get_global_rank(group, q), _send_index(rows, first, device))
                           for q, rows in plan.send_rows.items())
        self.recvs = tuple((p, dist.get_global_rank(group, p), len(rows))
                           for p, rows in plan.recv_rows.items())
        self._received = tuple(plan.recv_rows.items())
        self._slabs: dict[tuple[int, int], tuple[_SlabPlan, torch.Tensor]] = {}
        self.n_out = n_out = plan.out_end - plan.out_begin
        # input rows [lo, hi) of the whole output band (the assembled path)
        self.window = (geom.window(plan.out_begin)[0], geom.window(plan.out_end - 1)[1]) \
            if n_out > 0 else (0, 0)
        # zero rows standing in for the halo when it is as wide above as below: the band is
        # convolved at once and only the boundary rows are recomputed
        self.whole = None
        if n_out > 0:
            top = first - self.window[0]
            bottom = self.window[1] - (first + n_own)
            if top == bottom >= 0 and geom.out_rows(n_own + 2 * top - geom.pad_top
                                                    - geom.pad_bottom) == n_out:
                self.whole = top
        i0, i1 = plan.interior
        edges = [(plan.out_begin, i0), (i1, plan.out_end)] if i1 > i0 else [(i0, plan.out_end)]
        self.edges = tuple((b0, geom.window(b0)[0], geom.window(b1 - 1)[1])
                           for b0, b1 in edges if b1 > b0)

    def assemble(self, x: torch.Tensor, lo: int, hi: int,
                 received: dict[int, torch.Tensor], fill: float) -> torch.Tensor:
        """Input rows [lo, hi) (global, padded index space) from own rows, received rows and
        fill, contiguous: one ``gather_rows`` launch."""
        got = self._slabs.get((lo, hi))
        if got is None:
            got = self._slabs[(lo, hi)] = _slab(self.first, self.n_own, lo, hi, self.h_total,
                                                self.geom.mode, self._received, self.device)
        return _gather_slab(x, got, received, fill)


@lru_cache(maxsize=1024)
def _exchange(geom: ConvRows, layout: BandLayout, group: dist.ProcessGroup,
              device: torch.device) -> _Exchange:
    return _Exchange(geom, layout, group, device)


def _rows_in_place(x: torch.Tensor) -> bool:
    """Whether ``gather_rows`` reads ``x [..., h, W]`` in place: unit stride along W and leading
    dims that flatten into one (a contiguous tensor or its narrow along dim -2). Otherwise the
    native kernel copies the whole tensor first."""
    if x.dim() < 2 or (x.shape[-1] > 1 and x.stride(-1) != 1):
        return False
    lead = [(n, st) for n, st in zip(x.shape[:-2], x.stride()[:-2], strict=True) if n != 1]
    return all(lead[i][1] == lead[i + 1][1] * lead[i + 1][0] for i in range(len(lead) - 1))


def channels_last_band(x: torch.Tensor) -> bool:
    """Whether ``x [B, C, h, W]`` is a channels-last band that is not also in row order: its
    rows are then the rows of the contiguous ``[B, h, W * C]`` view (``_as_rows``)."""
    return (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous())


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """A channels-last ``[B, C, h, W]`` band as the row-order ``[B, h, W * C]`` view (no copy)."""
    return x.permute(0, 2, 3, 1).flatten(2)


def _from_rows(r: torch.Tensor, channels: int) -> torch.Tensor:
    """Rows ``[B, h, W * C]`` (from ``gather_rows``) as the channels-last ``[B, C, h, W]`` view."""
    return r.unflatten(2, (-1, channels)).permute(0, 3, 1, 2)


# Bands halo_conv had to copy into row order (a test counts them: a decode should need none).
BAND_COPIES = [0]


def halo_conv(
    x: torch.Tensor,
    layout: BandLayout,
    geom: ConvRows,
    conv_fn: Callable[[torch.Tensor, int], torch.Tensor],
    group: dist.ProcessGroup,
    *,
    fill: float = 0.0,
    chunk_bytes: int = 256 << 20,
    assemble_bytes: int = 0,
) -> tuple[torch.Tensor, BandLayout]:
    """Convolve this rank's band exactly as the full tensor would be convolved along H.

    Parameters
    ----------
    x : this rank's band, ``[..., h, W]`` with ``h == layout.sizes[rank]``: float64, float32,
        float16 or bfloat16 (``gather_rows``'s dtypes), any device.
    layout : every rank's band of the input.
    geom : kernel, stride, dilation, global top/bottom padding and mode along H.
    conv_fn : ``conv_fn(t, pad_h)`` convolves the rows ``t`` with ``pad_h`` rows of zeros on
        each side along H (it pads the other axes itself). Called with ``pad_h = 0`` on slabs
        that hold every row their outputs read, and on the whole band with the local halo width
        (see below).
    group : the band group (rank ``r`` of the group owns band ``r``).
    fill : the value of padded rows in ``constant`` mode (0 for ``zeros``).
    chunk_bytes : the rows needing no halo are convolved in slabs of about this many input bytes
        when the band cannot be convolved whole (below).
    assemble_bytes : a band of at most this many bytes is convolved in one call on the slab
        ``[halo above; band; halo below]``, built by one ``gather_rows`` once the halo is here
        (one copy of the band, no boundary recompute: the fewest launches, for small bands whose
        convolutions are launch-bound). Default 0: never.

    Notes
    -----
    When this rank's halo is as wide above as below (stride-1 convolutions with symmetric
    padding, the common case), the whole band is convolved at once with zero rows in place of
    the halo: the result is this rank's output band, right everywhere but in the few rows that
    read the halo, which are recomputed from the received rows and written over it. The band
    is not copied and the output is not assembled: memory as in a serial convolution.

    Returns
    -------
    (y, out_layout) : this rank's output band ``[..., h_out, W_out]`` and every rank's output band.
    """
    ex = _exchange(geom, layout, group, x.device)
    plan = ex.plan
    # The rows gather_rows moves: the band itself in row order, or the [B, h, W * C] view of a
    # channels-last band (cuDNN's preferred layout for half-precision convolutions: an NCHW
    # convolution transposes through a workspace of twice its input, which set the peak of a
    # Flux 4096^2 decode in run 18). Received rows and slabs are built in the same form.
    cl = channels_last_band(x)
    if not cl and not _rows_in_place(x):
        # Any other layout would be copied by every gather_rows below: once here instead.
        BAND_COPIES[0] += 1
        x = x.contiguous()
    xr = _as_rows(x) if cl else x
    channels = x.shape[1]

    def slab(t: torch.Tensor) -> torch.Tensor:
        return _from_rows(t, channels) if cl else t

    if x.shape[-2] != ex.n_own:
        raise ValueError(
            f"halo_conv: rank {ex.rank} holds {x.shape[-2]} rows but its band has {ex.n_own}"
        )
    # 1. Post the halo messages first so they travel while the interior is computed.
    ops, received = [], {}
    for peer, index in ex.sends:
        ops.append(dist.P2POp(dist.isend, _gather_rows([xr], index, 0.0), peer, group))
    shape = list(xr.shape)
    for p, peer, n in ex.recvs:
        shape[-2] = n
        received[p] = buf = xr.new_empty(shape)
        ops.append(dist.P2POp(dist.irecv, buf, peer, group))
    works = dist.batch_isend_irecv(ops) if ops else []

    out: torch.Tensor | None = None

    def put(o_lo: int, y: torch.Tensor) -> None:
        nonlocal out
        if out is None:
            shape = list(y.shape)
            shape[-2] = ex.n_out
            out = torch.empty(shape, dtype=y.dtype, device=y.device,
                              memory_format=torch.channels_last if cl else
                              torch.contiguous_format)
        out.narrow(-2, o_lo - plan.out_begin, y.shape[-2]).copy_(y)

    if ex.n_out > 0 and x.numel() * x.element_size() <= assemble_bytes:
        for w in works:
            w.wait()
        return conv_fn(slab(ex.assemble(xr, *ex.window, received, fill)), 0), plan.out_layout
    # 2. Interior rows, while the halo travels.
    first = ex.first
    if ex.whole is not None:  # the band at once, zeros standing in for the halo
        out = conv_fn(x, ex.whole)
    else:  # slabs of own rows (views of the band), written into the output
        i0, i1 = plan.interior
        row_bytes = max(1, x.numel() // max(1, x.shape[-2]) * x.element_size())
        step = max(1, (chunk_bytes // row_bytes) // geom.stride)
        for o in range(i0, i1, step):
            o_end = min(i1, o + step)
            lo, _ = geom.window(o)
            _, hi = geom.window(o_end - 1)
            put(o, conv_fn(x.narrow(-2, lo - first, hi - lo), 0))
    # 3. Boundary rows, once the halo has arrived.
    for w in works:
        w.wait()
    for b0, lo, hi in ex.edges:
        put(b0, conv_fn(slab(ex.assemble(xr, lo, hi, received, fill)), 0))
    if out is None:  # this rank owns no output rows: an empty band of the right shape
        shape = list(x.shape)
        shape[-2] = geom.span
        out = conv_fn(x.new_zeros(shape), 0).narrow(-2, 0, 0)
    return out, plan.out_layout


def _padded_gather(x: torch.Tensor, layout: BandLayout, group: dist.ProcessGroup, dst: int | None):
    rank = dist.get_rank(group)
    world = layout.world
    longest = max(layout.sizes)
    shape = list(x.shape)
    if x.shape[-2] < longest:
        pad = list(shape)
        pad[-2] = longest - x.shape[-2]
        send = torch.cat([x, x.new_zeros(pad)], dim=-2)
    else:
        send = x.contiguous()
    if dst is None:
        bufs = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(bufs, send, group=group)
    else:
        bufs = [torch.empty_like(send) for _ in range(world)] if rank == dst else None
        dist.gather(send, bufs, dst=dist.get_global_rank(group, dst), group=group)
        if rank != dst:
            shape[-2] = 0
            return x.new_empty(shape)
    return torch.cat([b.narrow(-2, 0, layout.sizes[r]) for r, b in enumerate(bufs)], dim=-2)


def all_gather_rows(x: torch.Tensor, layout: BandLayout, group: dist.ProcessGroup) -> torch.Tensor:
    """The full ``[..., H, W]`` tensor on every rank from the bands (uneven bands allowed)."""
    return _padded_gather(x, layout, group, None)


def gather_rows_to(
    x: torch.Tensor, layout: BandLayout, group: dist.ProcessGroup, dst: int = 0
) -> torch.Tensor:
    """The full tensor on group rank ``dst``; other ranks get an empty ``[..., 0, W]`` tensor."""
    return _padded_gather(x, layout, group, dst)
