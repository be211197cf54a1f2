"""The host path of usp's overlap Ulysses and flag ring (``XDIT_OPS_USP_HOST``): the per-plan
tensors of the default "tensors" path against run 43's per-call lists ("lists").

Stream memory operations need a GPU; what runs here is everything the two host paths compute:
the flag programs (tensor == list), the copy-engine input and output copies of the overlap
path (the list path's descriptors replayed in Python, the tensor path's through ``copy2d_t``'s
host-memory kernel, which runs the same C++ rebase and checks as on the GPU: both must copy the
same bytes, and the right ones, for sources at other addresses than the templates were made
from), and the ring's compiled schedule (it must be ``ring_flag_schedule`` operation for
operation). On GPUs, eager calls alternating both host paths must give equal outputs (the
overlap, the flag ring and the barrier ring). The other GPU tests of these paths are in
test_usp_attention.py (overlap, ceflags, ce; the default host path) and test_stream_memops.py
(the ops).
"""

from __future__ import annotations

import importlib
import os
from types import SimpleNamespace

import pytest
import torch

import xdit_ops
from tests.utils import randn, replay_copy2d, run_distributed
from xdit_ops.ops.stream_memops import copy2d_template, rebased, run_copy2d_t
from xdit_ops.ops.ulysses_pack import push_region_size, push_regions
from xdit_ops.ops.usp_attention import (
    _ATTEND,
    _FILL,
    _FLAGS,
    _JOIN_COMPUTE,
    _JOIN_SIDE,
    _PULL,
    HOST_ENV,
    _flag,
    _host_lists,
    _in_templates,
    _out_templates,
    overlap_flag_programs,
    overlap_tensor_programs,
    ring_flag_schedule,
    ring_host_steps,
)

_usp = importlib.import_module("xdit_ops.ops.usp_attention")  # xdit_ops.ops exports the op


@pytest.mark.parametrize("U,r,C", [(2, 0, 2), (4, 2, 3), (8, 7, 2)])
def test_overlap_tensor_programs_equal_the_lists(U, r, C):
    def addr(j, kind, c, i):  # distinct aligned addresses per rank and word
        return (1 << 20) * (j + 1) + 4 * _flag(kind, c, i, U)

    progs = overlap_flag_programs(U, r, C, addr)
    t = overlap_tensor_programs(progs)
    for name in ("start", "done"):
        assert t[name].dtype == torch.int64 and t[name].tolist() == progs[name]
    # chunk 0's signals, one batch: every peer's word, none to this rank itself
    assert t["sig_in0"].tolist() == sum(progs["sig_in"][0], [])
    assert all(progs["sig_in"][c][r] == [] for c in range(C))
    assert len(t["sig_in0"]) == 3 * (U - 1)
    assert t["end"].tolist() == progs["sig_out"] + progs["wait_out"]
    assert [x.tolist() for x in t["wait_in"]] == progs["wait_in"]
    assert [[x.tolist() for x in row] for row in t["sig_in"]] == progs["sig_in"]
    # every tensor is what stream_memops_t reads
    for x in [t["start"], t["end"], *t["wait_in"], *sum(t["sig_in"], [])]:
        assert x.is_contiguous() and x.dim() == 1 and x.device.type == "cpu"
    # start waits for U - 1 words then resets them: 2 (U - 1) triples
    assert len(progs["start"]) == 6 * (U - 1)


def _plan(B, J, Jk, L, U, C, r, h, front):
    return SimpleNamespace(B=B, J=J, Jk=Jk, L=L, U=U, chunks=C, u_rank=r, h_me=h,
                           joint_front=front)


@pytest.mark.parametrize("J,Jk,front", [(0, 0, True), (3, 3, True), (2, 2, False)])
@pytest.mark.parametrize("U,r,C", [(2, 1, 2), (4, 2, 3)])
def test_overlap_input_copies_tensor_path_equals_lists(U, r, C, J, Jk, front):
    """The input templates (made from one call's q, k, v) applied to another call's tensors:
    the list path (rebased in Python) and the tensor path (rebased by copy2d_t) write the same
    bytes, and they are that call's rows r*L.. of each destination's heads of chunk c."""
    B, L, D = 2, 5, 8
    h = 2 * C  # this rank's share: C chunks of 2 heads
    hc = h // C
    p = _plan(B, J, Jk, L, U, C, r, h, front)
    n = push_region_size(B, L, U, J, Jk, hc, D)
    first = [randn(B, L, U * h, D, seed=s) for s in (1, 2, 3)]
    bufs, in_dst = _dst(B, L, U, J, Jk, hc, D, C, n)
    tmpl = _in_templates(p, in_dst, first)
    # a later call: the same strides at other addresses (q, k, v of a bigger batch, sliced)
    later = [randn(B + 1, L, U * h, D, seed=s)[1:] for s in (4, 5, 6)]
    bases = [t.data_ptr() for t in later]
    for d in range(U):
        for c in range(1, C):
            replay_copy2d(rebased(*tmpl[d][c - 1], bases))
    want = bufs.clone()
    bufs.zero_()
    for d in range(U):
        for c in range(1, C):
            t, which = copy2d_template(*tmpl[d][c - 1])
            run_copy2d_t(bufs, t, which, bases)
    assert torch.equal(bufs, want)
    rows = slice(r * L, (r + 1) * L)
    for d in range(U):
        for c in range(C):
            qd, kvd = in_dst[c][d]
            hs = slice(d * h + c * hc, d * h + (c + 1) * hc)
            if c == 0:  # chunk 0 is the push kernel's, not the copy engines'
                assert not qd.any() and not kvd.any()
                continue
            assert torch.equal(qd[:, J:][:, rows], later[0][:, :, hs])
            assert torch.equal(kvd[0, :, Jk:][:, rows], later[1][:, :, hs])
            assert torch.equal(kvd[1, :, Jk:][:, rows], later[2][:, :, hs])
    assert bufs.count_nonzero() == (C - 1) * U * 3 * B * L * hc * D  # nothing else written


def _dst(B, L, U, J, Jk, hc, D, C, n):
    bufs = torch.zeros(C, U, n)
    return bufs, [[push_regions(bufs[c, d], B, L, U, J, Jk, hc, D) for d in range(U)]
                  for c in range(C)]


@pytest.mark.parametrize("J,front", [(0, True), (3, True), (3, False)])
def test_overlap_output_copies_tensor_path_equals_lists(J, front):
    B, L, U, C, r, D = 2, 4, 3, 2, 1, 8
    h = 4
    hc = h // C
    H = U * h
    p = _plan(B, J, J, L, U, C, r, h, front)
    out = torch.zeros(U, B, J + L, H, D)
    o1 = randn(B, J + U * L, hc, D, seed=7)
    h_out = r * h  # chunk 0 of this rank's heads
    tmpl = _out_templates(p, list(out), o1, h_out)
    o2 = randn(B, J + U * L, hc, D, seed=8)
    for d in range(U):
        replay_copy2d(rebased(*tmpl[d], [o2.data_ptr()]))
    want = out.clone()
    out.zero_()
    for d in range(U):
        run_copy2d_t(out, *copy2d_template(*tmpl[d]), [o2.data_ptr()])
    assert torch.equal(out, want)
    seq0, j0 = (J, 0) if front else (0, L)
    for d in range(U):
        assert torch.equal(out[d, :, seq0:seq0 + L, h_out:h_out + hc],
                           o2[:, J + d * L:J + (d + 1) * L])
        if J:
            assert torch.equal(out[d, :, j0:j0 + J, h_out:h_out + hc], o2[:, :J])
    assert out.count_nonzero() == U * B * (J + L) * hc * D


@pytest.mark.parametrize("R", [2, 3, 4, 8])
def test_ring_host_steps_are_the_schedule(R):
    """The compiled steps, read back, are ring_flag_schedule(R) operation for operation, with
    each flag program and pull on the stream the schedule names."""
    progs = {name: [f"{name}{b}" for b in (0, 1)]
             for name in ("before_pull", "before_fill", "filled", "pulled", "last")}
    side = 12345
    steps = ring_host_steps(R, progs, ["pull0", "pull1"], side)
    back = []
    for code, a, b in steps:
        if code == _FLAGS:
            back.append(("side" if b == side else "compute", "flags", (a[:-1], int(a[-1]))))
            assert b in (side, -1)
        elif code == _PULL:
            assert b == side
            back.append(("side", "pull", int(a[-1])))
        elif code == _ATTEND:
            back.append(("compute", "attend", a))
        elif code == _FILL:
            back.append(("compute", "fill", 0))
        elif code == _JOIN_SIDE:
            back.append(("side", "join", "compute"))
        else:
            assert code == _JOIN_COMPUTE
            back.append(("compute", "join", "side"))
    assert tuple(back) == ring_flag_schedule(R)


def test_ring_pull_descriptor_copies_the_block():
    """The ring's pull as ``_ring_host`` makes it: one contiguous run, height 1."""
    src = randn(2, 3, 5, 4, 8, seed=9, dtype=torch.bfloat16)
    dst = torch.zeros_like(src)
    nbytes = src.numel() * src.element_size()
    run_copy2d_t(dst, *copy2d_template([dst.data_ptr(), nbytes, src.data_ptr(), nbytes,
                                        nbytes, 1]))
    assert torch.equal(dst, src)


def test_host_switch(monkeypatch):
    monkeypatch.delenv(HOST_ENV, raising=False)
    assert not _host_lists()
    monkeypatch.setenv(HOST_ENV, "tensors")
    assert not _host_lists()
    monkeypatch.setenv(HOST_ENV, "lists")
    assert _host_lists()
    monkeypatch.setenv(HOST_ENV, "list")
    with pytest.raises(ValueError, match=r"XDIT_OPS_USP_HOST must be one of \('tensors', "
                                         r"'lists'\), got 'list'"):
        _host_lists()


def _worker_gpu_host_paths(rank, world, mode):
    """Eager calls alternating the two host paths (the same flag words and buffers, so each
    path must leave them as the other expects), on new input tensors each call (the templates'
    rebase) and on strided ones (a new template key): every output must equal the first.
    ``mode``: the overlap Ulysses, or the ring over the copy engines with flags (ceflags) or
    barriers (ce)."""
    os.environ["XDIT_OPS_USP_GRAPH"] = "0"  # eager calls: a replayed graph has one host path
    if mode == "overlap":
        os.environ["XDIT_OPS_USP_ULYSSES"] = "overlap"
    else:
        os.environ["XDIT_OPS_USP_RING"] = mode
    u = world if mode == "overlap" else 1
    xdit_ops.init_parallel(ulysses_degree=u, ring_degree=world // u)
    B, S, H, D = 1, 1024, 8, 64
    base = [randn(B, S, H, D, seed=s, dtype=torch.bfloat16, device="cuda") for s in (1, 2, 3)]
    outs, keep = [], []
    for i, host in enumerate(["lists", "tensors", "tensors", "lists", "tensors", "lists"]):
        os.environ[HOST_ENV] = host
        if i >= 4:  # strided q, k, v (the first H heads of 2H: rows at a wider pitch)
            qkv = [torch.cat([t, t.flip(2)], dim=2)[:, :, :H] for t in base]
        else:
            qkv = [t.clone() for t in base]
        keep.append(qkv)
        outs.append(xdit_ops.usp_attention(*qkv, joint_tokens=16))
    torch.cuda.synchronize()
    for i, o in enumerate(outs[1:], 1):
        assert torch.equal(o, outs[0]), (i, (o.float() - outs[0].float()).abs().max())
    plans = list(_usp._PLANS.values())
    if mode == "overlap":
        assert {p.path for p in plans} == {"overlap"}
    else:
        assert {p.ring for p in plans} == {mode}
    xdit_ops.destroy_parallel()


@pytest.mark.multigpu(2)
@pytest.mark.parametrize("mode", ["overlap", "ceflags", "ce"])
@pytest.mark.parametrize("world", [2, 4])
def test_usp_gpu_host_paths_agree(world, mode):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    run_distributed(_worker_gpu_host_paths, world, mode, timeout=150, backend="nccl")
