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

import contextlib
import ctypes
import importlib
import os
import threading
import time
from types import SimpleNamespace

import pytest
import torch

import xdit_ops
from tests.utils import (
    max_abs_err,
    oracle_attention,
    randn,
    replay_copy2d,
    run_distributed,
    run_threads,
)
from xdit_ops.ops.stream_memops import WRITE, copy2d_template, rebased, run_copy2d_t
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


@pytest.mark.parametrize("U,r,C", [(2, 0, 2), (4, 2, 3), (8, 7, 2), (4, 1, 4), (4, 3, 8)])
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


def _plan(B, J, Jk, L, U, ch, r, h, front):
    return SimpleNamespace(B=B, J=J, Jk=Jk, L=L, U=U, chunks=len(ch), chunk_heads=tuple(ch),
                           u_rank=r, h_me=h, joint_front=front)


@pytest.mark.parametrize("J,Jk,front", [(0, 0, True), (3, 3, True), (2, 2, False)])
@pytest.mark.parametrize("U,r,ch", [(2, 1, (2, 2)), (4, 2, (2, 2, 2)), (2, 0, (1, 2, 2, 1)),
                                    (4, 3, (1, 4, 1)), (3, 1, (3, 1, 2))],
                         ids=["U2-2.2", "U4-2.2.2", "U2-1.2.2.1", "U4-1.4.1", "U3-3.1.2"])
def test_overlap_input_copies_tensor_path_equals_lists(U, r, ch, J, Jk, front):
    """The input templates (made from one call's q, k, v) applied to another call's tensors:
    the list path (rebased in Python) and the tensor path (rebased by copy2d_t) write the same
    bytes, and they are that call's rows r*L.. of each destination's heads of chunk c (the
    chunk's own head count, from its own first head of the share)."""
    B, L, D = 2, 5, 8
    C = len(ch)
    h = sum(ch)  # this rank's share
    start = [sum(ch[:c]) for c in range(C)]
    p = _plan(B, J, Jk, L, U, ch, r, h, front)
    first = [randn(B, L, U * h, D, seed=s) for s in (1, 2, 3)]
    bufs, in_dst = _dst(B, L, U, J, Jk, ch, D)
    tmpl = _in_templates(p, in_dst, first)
    assert [len(row) for row in tmpl] == [C - 1] * U
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
            assert qd.shape[2] == kvd.shape[3] == ch[c]
            hs = slice(d * h + start[c], d * h + start[c] + ch[c])
            if c == 0:  # chunk 0 is the push kernel's, not the copy engines'
                assert not qd.any() and not kvd.any()
                continue
            assert torch.equal(qd[:, J:][:, rows], later[0][:, :, hs])
            assert torch.equal(kvd[0, :, Jk:][:, rows], later[1][:, :, hs])
            assert torch.equal(kvd[1, :, Jk:][:, rows], later[2][:, :, hs])
    # nothing else written
    assert bufs.count_nonzero() == (h - ch[0]) * U * 3 * B * L * D


def _dst(B, L, U, J, Jk, ch, D):
    """Every destination's input region of each chunk, each sized for its chunk (a row of
    ``bufs`` as long as the largest)."""
    n = max(push_region_size(B, L, U, J, Jk, hc, D) for hc in ch)
    bufs = torch.zeros(len(ch), U, n)
    return bufs, [[push_regions(bufs[c, d], B, L, U, J, Jk, hc, D) for d in range(U)]
                  for c, hc in enumerate(ch)]


@pytest.mark.parametrize("J,front", [(0, True), (3, True), (3, False)])
@pytest.mark.parametrize("ch,c", [((2, 2), 0), ((1, 2, 1), 1), ((1, 3, 1), 1), ((3, 1), 1)],
                         ids=["2.2-c0", "1.2.1-c1", "1.3.1-c1", "3.1-c1"])
def test_overlap_output_copies_tensor_path_equals_lists(J, front, ch, c):
    """One chunk's output copies (its own head count, at its heads of the output row)."""
    B, L, U, r, D = 2, 4, 3, 1, 8
    h = sum(ch)
    hc = ch[c]
    H = U * h
    p = _plan(B, J, J, L, U, ch, r, h, front)
    out = torch.zeros(U, B, J + L, H, D)
    o1 = randn(B, J + U * L, hc, D, seed=7)
    h_out = r * h + sum(ch[:c])  # chunk c of this rank's heads
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
    def from_env():  # (the plan reads the switch with its key and decides once)
        return _host_lists(os.environ.get(HOST_ENV))

    monkeypatch.delenv(HOST_ENV, raising=False)
    assert not from_env()
    monkeypatch.setenv(HOST_ENV, "tensors")
    assert not from_env()
    monkeypatch.setenv(HOST_ENV, "lists")
    assert from_env()
    monkeypatch.setenv(HOST_ENV, "list")
    with pytest.raises(ValueError, match=r"XDIT_OPS_USP_HOST must be one of \('tensors', "
                                         r"'lists'\), got 'list'"):
        from_env()


def _worker_gpu_host_paths(rank, world, mode):
    """Eager calls alternating the two host paths (the same flag words and buffers, so each
    path must leave them as the other expects), on new input tensors each call (the templates'
    rebase) and on strided ones (a new template key): every output must equal the first.
    ``mode``: the overlap Ulysses (its default chunks: (1, 2, 1) on 2 GPUs, (1, 1) on 4;
    ``overlap-equal``: (2, 2), (1, 1)), or the ring over the copy engines with flags (ceflags)
    or barriers (ce)."""
    os.environ["XDIT_OPS_USP_GRAPH"] = "0"  # eager calls: a replayed graph has one host path
    overlap = mode.startswith("overlap")
    if overlap:
        os.environ["XDIT_OPS_USP_ULYSSES"] = "overlap"
        if mode == "overlap-equal":
            os.environ["XDIT_OPS_USP_CHUNKS"] = "equal"
    else:
        os.environ["XDIT_OPS_USP_RING"] = mode
    u = world if overlap else 1
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
    if overlap:
        assert {p.path for p in plans} == {"overlap"}
        want = _usp._overlap_chunks(H // world, "equal" if mode == "overlap-equal" else None)
        assert {p.chunk_heads for p in plans} == {want}
    else:
        assert {p.ring for p in plans} == {mode}
    xdit_ops.destroy_parallel()


@pytest.mark.multigpu(2)
@pytest.mark.parametrize("mode", ["overlap", "overlap-equal", "ceflags", "ce"])
@pytest.mark.parametrize("world", [2, 4])
def test_usp_gpu_host_paths_agree(world, mode):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    run_distributed(_worker_gpu_host_paths, world, mode, timeout=150, backend="nccl")


# ---------------------------------------------------------------------------------------------
# The overlap path's Python on CPU, both host paths: U ranks in threads of this process, plain
# tensors for the peer-mapped buffers and flag words, every stream op run at once in program
# order (one stream per rank: the strictest order the flag protocol must survive), the flag
# programs by a host interpreter of their (kind, address, value) triples, copies on host memory
# (the list path's descriptors replayed, the tensor path's through copy2d_t's host kernel), the
# push and push-out by their CPU references. What it checks: the chunk layout (regions sized per
# chunk, templates, the chunked push and push-out, each chunk's heads and LSE order) for uneven
# and equal chunks, the flag programs completing without a deadlock over three calls, the
# templates' rebase (new tensors, then strided ones).

class _Stream:
    cuda_stream = -1  # what copy2d_t's host kernel accepts

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass


class _Event:
    def record(self, stream=None):
        pass


class _Group:
    def __init__(self, rank, size):
        self.rank, self.size = rank, size


class _Handle:
    def __init__(self, bufs):
        self.bufs = bufs

    def get_buffer(self, rank, sizes, dtype, storage_offset=0):
        n = 1
        for x in sizes:
            n *= x
        return self.bufs[rank][storage_offset:storage_offset + n].view(sizes)


def _run_flags(program, stop) -> None:
    """Flag triples on host words: a write stores, a wait spins until the word holds the value
    (a wait that never ends fails the test)."""
    for i in range(0, len(program), 3):
        kind, addr, value = program[i:i + 3]
        word = ctypes.c_int32.from_address(addr)
        if kind == WRITE:
            word.value = value
            continue
        t0 = time.monotonic()
        while word.value != value:
            if stop.is_set() or time.monotonic() - t0 > 60:
                raise RuntimeError(f"flag wait never satisfied (word {addr:#x} == {value})")
            time.sleep(1e-4)


# (U, heads a rank, XDIT_OPS_USP_CHUNKS, its chunks, J, joint front, joint_lengths, shards)
OVERLAP_THREAD_CASES = [
    (3, 6, None, (1, 2, 2, 1), 3, True, False, None),
    (2, 6, "1,4,1", (1, 4, 1), 4, False, True, None),
    (4, 5, None, (1, 3, 1), 0, True, False, None),
    (3, 6, "2", (3, 3), 2, True, False, None),
    (2, 8, "3,1,4", (3, 1, 4), 3, True, False, [5, 2]),  # padding in the block: squeezed
]


@pytest.mark.parametrize("host", ["tensors", "lists"])
@pytest.mark.parametrize("case", range(len(OVERLAP_THREAD_CASES)),
                         ids=["U3-default", "U2-1.4.1-lengths", "U4-h5-default", "U3-c2",
                              "U2-3.1.4-shards"])
def test_overlap_in_threads(case, host, monkeypatch):
    U, h, switch, want, J, front, with_len, shard_lengths = OVERLAP_THREAD_CASES[case]
    B, L, D = 2, 5, 8
    H = U * h
    lens = shard_lengths or [L] * U
    starts = [sum(lens[:r]) for r in range(U)]
    S = sum(lens)
    lengths = torch.tensor([max(1, J // 2), J])[:B] if with_len else None
    calls = []  # per call: full q, k, v [B, S, H, D] and joint q, k, v [B, J, H, D]
    for c in range(3):
        calls.append(([randn(B, S, H, D, seed=100 * c + i) for i in range(3)],
                      [randn(B, J, H, D, seed=100 * c + 10 + i) + (i == 2) for i in range(3)]))
    refs = []
    for (q, k, v), (qj, kj, vj) in calls:
        mask = torch.ones(B, J + S, dtype=torch.bool)
        if lengths is not None:
            mask[:, :J] = torch.arange(J)[None, :] < lengths[:, None]
        refs.append(oracle_attention(*(torch.cat([a, b], 1) for a, b in
                                       ((qj, q), (kj, k), (vj, v))), key_mask=mask))

    bufs: dict = {}
    lock = threading.Lock()
    stop = threading.Event()

    def symm_buffer(group, tag, shape, dtype, device, init=None):
        with lock:
            if (tag, shape, dtype) not in bufs:
                ranks = [torch.full(shape, float("nan"), dtype=dtype) if dtype.is_floating_point
                         else torch.zeros(shape, dtype=dtype) for _ in range(U)]
                for t in ranks:
                    if init is not None:
                        init(t)
                bufs[(tag, shape, dtype)] = ranks
            ranks = bufs[(tag, shape, dtype)]
        return ranks[group.rank], _Handle(ranks)

    monkeypatch.setenv(HOST_ENV, host)
    monkeypatch.setattr(_usp, "_group_size", lambda g: 1 if g is None else g.size)
    monkeypatch.setattr(_usp, "_group_rank", lambda g: 0 if g is None else g.rank)
    monkeypatch.setattr(_usp, "ulysses_transport", lambda device, sw: "overlap")
    monkeypatch.setattr(_usp, "_peer_mapped", lambda *a, **k: True)
    monkeypatch.setattr(_usp, "_symm_buffer", symm_buffer)
    monkeypatch.setattr(_usp, "word_address", lambda t, i: t.data_ptr() + 4 * i)
    monkeypatch.setattr(_usp, "run_memops", lambda a, prog, checked=True: _run_flags(prog, stop))
    monkeypatch.setattr(_usp, "_MEMOPS_T", lambda a, prog, batched, s: _run_flags(prog.tolist(),
                                                                                   stop))
    monkeypatch.setattr(_usp, "run_copy2d", lambda a, descs, checked=True: replay_copy2d(descs))
    monkeypatch.setattr(_usp, "_side_stream", lambda device, which=0: _Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    for cache in ("_PLANS", "_OVERLAP"):
        monkeypatch.setattr(_usp, cache, {})
    switches = ("0", switch, None, "overlap", None, None, None, None)
    results, errors = {}, []

    def local(t, tj, r, strided):  # rank r's [B, J + L, H, D]: its shard padded, the joint rows
        mine = t[:, starts[r]:starts[r] + lens[r]]
        shard = torch.cat([mine, mine.new_zeros(B, L - lens[r], H, D)], 1)
        x = torch.cat([tj, shard] if front else [shard, tj], 1)
        if strided:  # the first H heads of 2H: rows at a wider pitch (new templates)
            x = torch.cat([x, x.flip(2)], dim=2)[:, :, :H]
        return x

    def rank_main(r):
        try:
            g = _Group(r, U)
            outs = []
            for c, (full, joint) in enumerate(calls):
                q, k, v = (local(t, tj, r, c == 2) for t, tj in zip(full, joint, strict=True))
                p = _usp._build_plan(q, k, v, lengths, J, front, -1 if shard_lengths else U * L,
                                     "auto", g, None, shard_lengths, switches)
                assert (p.path, p.chunk_heads, p.chunks) == ("overlap", want, len(want))
                parts = [t.split_with_sizes(p.split, 1) for t in (q, k, v)]
                seq = [x[1] if front else x[0] for x in parts]
                jnt = [x[0] if front else x[1] for x in parts] if J else [None] * 3

                def attend(qbuf, kv, kj, vj, p=p):
                    return _usp._attend(p, qbuf, kv, kj, vj, lengths, None, "auto",
                                        torch.float32)

                outs.append(_usp._ulysses_overlap(*seq, *jnt, p, attend))
            results[r] = outs
        except BaseException as exc:  # reported below with the rank
            stop.set()
            errors.append((r, exc))

    run_threads(rank_main, U)
    assert not errors, errors
    assert len(bufs) == 2  # one data buffer (regions per chunk, then the output), one flag set
    for r in range(U):
        hs = slice(r * h, (r + 1) * h)
        rows_s = slice(J, J + lens[r]) if front else slice(0, lens[r])
        rows_j = slice(0, J) if front else slice(L, L + J)
        for c, ((out, lse), (ref, ref_lse)) in enumerate(zip(results[r], refs, strict=True)):
            what = f"rank {r} call {c}"
            assert out.shape == (B, J + L, H, D) and lse.shape == (B, h, J + U * L), what
            got = out[:, rows_s]
            assert max_abs_err(got, ref[:, J + starts[r]:J + starts[r] + lens[r]]) < 2e-5, what
            if J:
                assert max_abs_err(out[:, rows_j], ref[:, :J]) < 2e-5, what
            # LSE rows: joint first, then each rank's valid rows (heads in chunk order)
            assert max_abs_err(lse[:, :, :J], ref_lse[:, hs, :J]) < 1e-4, what
            for u in range(U):
                got = lse[:, :, J + u * L:J + u * L + lens[u]]
                want_lse = ref_lse[:, hs, J + starts[u]:J + starts[u] + lens[u]]
                assert max_abs_err(got, want_lse) < 1e-4, (what, u)
