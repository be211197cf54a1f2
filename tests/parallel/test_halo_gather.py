"""The halo packing of halo_conv on one process: send buffers (``_take_rows``) and boundary slabs
(``_assemble``, own + received + fill rows) equal the rows of the padded full tensor, for every
padding mode, including slabs that read more peers than ``gather_rows`` takes sources.

The distributed halo_conv itself is tested in tests/models/test_vae.py (gloo, 3 ranks).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.utils import randn
from xdit_ops.ops.gather_rows import MAX_SOURCES
from xdit_ops.parallel.halo import (
    BandLayout,
    ConvRows,
    _assemble,
    _device_index,
    _rows_in_place,
    _slab_plan,
    _take_rows,
    plan_halo,
)

MODES = ("zeros", "constant", "replicate", "reflect", "circular")


def _check_rank(x, layout, geom, rank, fill):
    pad = (0, 0, geom.pad_top, geom.pad_bottom) + (0, 0) * (x.dim() - 4)  # H only
    if geom.mode in ("zeros", "constant"):
        padded = F.pad(x, pad, value=fill)
    else:
        padded = F.pad(x, pad, mode=geom.mode)
    plan = plan_halo(geom, layout, rank)
    first, last = layout.starts[rank], layout.starts[rank + 1]
    band = x[..., first:last, :].contiguous()
    for rows in plan.send_rows.values():
        sent = _take_rows(band, rows, first)
        assert sent.is_contiguous() and torch.equal(sent, x[..., list(rows), :])
    received = {p: (rows, x[..., list(rows), :].contiguous()) for p, rows in plan.recv_rows.items()}
    if plan.out_end == plan.out_begin:
        return None
    lo, _ = geom.window(plan.out_begin)
    _, hi = geom.window(plan.out_end - 1)
    slab = _assemble(band, first, lo, hi, layout.total, geom, received, fill)
    ref = padded[..., lo + geom.pad_top:hi + geom.pad_top, :]
    assert torch.equal(slab, ref), (layout, geom, rank)
    return _slab_plan(first, band.shape[-2], lo, hi, layout.total, geom.mode,
                      tuple((p, rows) for p, (rows, _) in received.items()))


@pytest.mark.parametrize("mode", MODES)
def test_slabs_and_send_buffers_match_padded_tensor(mode):
    x = randn(2, 3, 13, 5, dtype=torch.float64, seed=1)
    fill = 0.5 if mode == "constant" else 0.0
    plans = []
    for sizes in ((4, 5, 4), (1,) * 13, (2, 1, 3, 1, 6)):
        layout = BandLayout(sizes)
        for geom in (ConvRows(3, 1, 1, 1, 1, mode), ConvRows(5, 2, 3, 6, 6, mode),
                     ConvRows(4, 2, 1, 0, 2, mode)):
            for rank in range(layout.world):
                plans.append(_check_rank(x, layout, geom, rank, fill))
    plans = [p for p in plans if p is not None]
    # Both gather shapes occur: up to MAX_SOURCES - 1 peers, and more (buffers concatenated).
    assert any(not p.merged and len(p.peers) > 1 for p in plans)
    assert any(p.merged and len(p.peers) > MAX_SOURCES - 1 for p in plans)


def test_device_index_is_built_once():
    pairs = ((0, 1), (-1, 0), (1, 2))
    a = _device_index(pairs, torch.device("cpu"))
    b = _device_index(pairs, torch.device("cpu"))
    assert a is b and a.dtype == torch.int32 and a.tolist() == [[0, 1], [-1, 0], [1, 2]]


def test_rows_in_place_is_whether_gather_rows_reads_without_a_copy():
    # gather_rows views a source as [outer, h, W]; halo_conv makes a band contiguous first when
    # that view would be a copy (channels-last bands: a copy per gather otherwise)
    x = torch.zeros(2, 3, 4, 6, 5)
    cases = [x[0], x[:, 1], x[..., 1:3, :], x.narrow(-2, 1, 2), x[:, :, :, :, 1:3], x[:, :2],
             x[:, ::2], x[..., ::2], x.to(memory_format=torch.channels_last_3d),
             x[0].to(memory_format=torch.channels_last), x[:1, :1], x.transpose(0, 1)]
    for t in cases:
        flat = t.reshape(-1, t.shape[-2], t.shape[-1])
        in_place = flat.data_ptr() == t.data_ptr() and flat._base is not None and (
            t.shape[-1] == 1 or t.stride(-1) == 1)
        assert _rows_in_place(t) == in_place, (t.shape, t.stride())
    assert not _rows_in_place(x.to(memory_format=torch.channels_last_3d))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_gpu_slabs_match_padded_tensor(mode):
    import xdit_ops._extension as ext

    assert ext.has("_C"), ext.reason("_C")
    x = randn(2, 4, 3, 21, 40, dtype=torch.bfloat16, device="cuda", seed=2)
    fill = 0.5 if mode == "constant" else 0.0
    for sizes in ((7, 7, 7), (1,) * 11 + (10,)):
        layout = BandLayout(sizes)
        for geom in (ConvRows(3, 1, 1, 1, 1, mode), ConvRows(5, 2, 3, 6, 6, mode)):
            for rank in range(layout.world):
                _check_rank(x, layout, geom, rank, fill)
                _check_rank(x, layout, geom, rank, fill)  # second call: cached device index
