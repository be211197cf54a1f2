"""usp_attention's eager calls replayed from a CUDA graph of their own (``XDIT_OPS_USP_GRAPH``).

On CPU the switch is parsed and ignored (a gloo call with it on equals one with it off). On
GPUs, for each transport (the push, NCCL all-to-all, the copy-engine ring with barriers and with
flags, the hybrid on 4), a sequence of eager calls on new inputs each call (contiguous and
strided, with joint tokens, ``joint_lengths`` and the LSE) must equal the same calls made with
the switch off, bit for bit where the inputs are contiguous (the graph runs the same kernels on
copies of them); the plan must hold a captured graph afterwards exactly where one may be made
(the replay really ran; none where it would hold NCCL kernels, which would block
``destroy_process_group``); a CUDA graph captured around the op by the caller still replays
correctly once the op has its own graph; and the workers tear their groups down (run 49 hung
there while a graph held NCCL kernels).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

import xdit_ops
from tests.utils import assert_cuda_graph_replays, max_abs_err, randn, run_distributed
from xdit_ops.ops.usp_attention import GRAPH_SETTINGS, graph_setting

_usp = importlib.import_module("xdit_ops.ops.usp_attention")  # xdit_ops.ops exports the op


def test_graph_setting(monkeypatch):
    monkeypatch.delenv("XDIT_OPS_USP_GRAPH", raising=False)
    assert graph_setting() == "auto"
    for value in GRAPH_SETTINGS:
        monkeypatch.setenv("XDIT_OPS_USP_GRAPH", value)
        assert graph_setting() == value
    monkeypatch.setenv("XDIT_OPS_USP_GRAPH", "yes")
    with pytest.raises(ValueError, match=r"usp_attention: XDIT_OPS_USP_GRAPH='yes' is not one "
                                         r"of \('auto', '0', '1'\)"):
        graph_setting()


def _worker_cpu(rank, world):
    xdit_ops.init_parallel(ulysses_degree=world, ring_degree=1, device_type="cpu")
    q, k, v = (randn(1, 12, 4, 8, seed=10 * i + rank) for i in range(3))
    outs = []
    for sw in ("0", "1", "1", "auto"):
        os.environ["XDIT_OPS_USP_GRAPH"] = sw
        outs.append(xdit_ops.usp_attention(q, k, v, joint_tokens=2, return_lse=True))
    for o, lse in outs[1:]:
        assert torch.equal(o, outs[0][0]) and torch.equal(lse, outs[0][1])
    assert all(not any(p.graphed) and not p.graphs for p in _usp._PLANS.values())
    os.environ["XDIT_OPS_USP_GRAPH"] = "on"
    try:
        xdit_ops.usp_attention(q, k, v)
    except ValueError as e:
        assert "XDIT_OPS_USP_GRAPH='on'" in str(e)
    else:
        raise AssertionError("a bad XDIT_OPS_USP_GRAPH was accepted")
    xdit_ops.destroy_parallel()


def test_usp_graph_switch_on_cpu_changes_nothing():
    run_distributed(_worker_cpu, 2, timeout=120)


# (name, ulysses degree or None for all ranks, ring degree, transport switches)
GPU_MODES = {
    "push": (None, 1, {"XDIT_OPS_USP_ULYSSES": "push"}),
    "overlap": (None, 1, {"XDIT_OPS_USP_ULYSSES": "overlap"}),
    "uce": (None, 1, {"XDIT_OPS_USP_ULYSSES": "ce"}),
    "nccl": (None, 1, {"XDIT_OPS_USP_ULYSSES": "nccl"}),
    "ce": (1, None, {"XDIT_OPS_USP_RING": "ce"}),
    "ceflags": (1, None, {"XDIT_OPS_USP_RING": "ceflags"}),
    "hybrid": (2, None, {}),
}


def _calls(rank, B, S, H, D, J):
    """Five calls' inputs: new values each call, the fourth strided (views of a fused
    projection), the others contiguous."""
    calls = []
    for i in range(5):
        q, k, v = (randn(B, J + S, H, D, seed=100 * i + 10 * rank + j, dtype=torch.bfloat16,
                         device="cuda") for j in range(3))
        if i == 3:
            qkv = torch.stack([q, k, v], dim=2)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        calls.append((q, k, v))
    return calls


def _worker_gpu(rank, world, mode):
    u, r, env = GPU_MODES[mode]
    u = u or world
    r = r or world // u
    os.environ.update(env)
    xdit_ops.init_parallel(ulysses_degree=u, ring_degree=r)
    B, S, H, D, J = 2, 256, 8, 64, 16
    lengths = torch.tensor([J, 5], dtype=torch.int32, device="cuda")
    for kwargs in ({"joint_tokens": J}, {"joint_tokens": J, "joint_lengths": lengths,
                                         "return_lse": True}):
        calls = _calls(rank, B, S, H, D, J)
        got, want = [], []
        fast = []  # fast-path calls made by each switch's five calls
        for sw, dst in (("1", got), ("0", want)):
            os.environ["XDIT_OPS_USP_GRAPH"] = sw
            before = _usp.FAST_CALLS[0]
            for q, k, v in calls:
                res = xdit_ops.usp_attention(q, k, v, **kwargs)
                dst.append(res if kwargs.get("return_lse") else (res, None))
            fast.append(_usp.FAST_CALLS[0] - before)
        torch.cuda.synchronize()
        assert not _usp.GRAPH_FAILURES, (mode, _usp.GRAPH_FAILURES)
        for i, ((o, lse), (o0, lse0)) in enumerate(zip(got, want, strict=True)):
            if i == 3:  # strided inputs: the graph reads contiguous copies of them
                assert max_abs_err(o, o0) <= 2e-2, (mode, i, max_abs_err(o, o0))
            else:
                assert torch.equal(o, o0), (mode, kwargs.keys(), i, max_abs_err(o, o0))
                if lse is not None:
                    assert torch.equal(lse, lse0), (mode, i, max_abs_err(lse, lse0))
        # the calls made outputs of their own (no aliasing of the graph's static output)
        assert not torch.equal(got[1][0], got[2][0])
        # a graph where it holds no NCCL kernel (_graph_eligible): the peer-mapped push and
        # the copy-engine rings (the hybrid: both), not the NCCL transports nor the LSE's NCCL
        # all-to-all
        eligible = (mode in ("push", "overlap", "uce", "ce", "ceflags", "hybrid")
                    and not (kwargs.get("return_lse") and u > 1))
        graphs = [g for p in _usp._PLANS.values() for g in p.graphs.values()]
        graphed = any(isinstance(g, _usp._CallGraph) for g in graphs)
        assert graphed == eligible, (mode, kwargs.keys(), graphs)
        # the public function's fast path (native graph_call) served the calls after the
        # capture (the 3rd to 5th) when a graph was made; the switch off took none
        assert fast == ([3, 0] if eligible else [0, 0]), (mode, kwargs.keys(), fast)
        if eligible:
            # a call with autograd to record takes the op (same result), not the fast path
            os.environ["XDIT_OPS_USP_GRAPH"] = "1"
            q, k, v = calls[0]
            before = _usp.FAST_CALLS[0]
            res = xdit_ops.usp_attention(q.requires_grad_(), k, v, **kwargs)
            q.requires_grad_(False)
            o = res[0] if kwargs.get("return_lse") else res
            assert _usp.FAST_CALLS[0] == before and torch.equal(o.detach(), got[0][0])
        _usp.release_call_graphs()
        assert not _usp._FAST
    if mode in ("push", "overlap", "uce", "ce", "ceflags", "hybrid"):
        # the cap on live call graphs: with MAX_CALL_GRAPHS = 1, a second signature (another
        # scale) stays eager (warned once, its reason kept), with the same results
        os.environ["XDIT_OPS_USP_GRAPH"] = "1"
        q, k, v = _calls(rank, B, S, H, D, J)[0]
        cap = _usp.MAX_CALL_GRAPHS
        _usp.MAX_CALL_GRAPHS = 1
        try:
            for _ in range(3):
                a = xdit_ops.usp_attention(q, k, v, joint_tokens=J)
            with pytest.warns(RuntimeWarning, match="MAX_CALL_GRAPHS"):
                b = [xdit_ops.usp_attention(q, k, v, joint_tokens=J, scale=0.1)
                     for _ in range(3)]
            states = [g for p in _usp._PLANS.values() for g in p.graphs.values()]
            assert sum(isinstance(g, _usp._CallGraph) for g in states) == 1, states
            assert any("MAX_CALL_GRAPHS" in why for why in _usp.GRAPH_FAILURES.values())
            os.environ["XDIT_OPS_USP_GRAPH"] = "0"
            assert torch.equal(a, xdit_ops.usp_attention(q, k, v, joint_tokens=J))
            want_b = xdit_ops.usp_attention(q, k, v, joint_tokens=J, scale=0.1)
            assert all(torch.equal(x, want_b) for x in b)
        finally:
            _usp.MAX_CALL_GRAPHS = cap
            _usp.release_call_graphs()
    # a graph captured by the caller around the op, once the op has a graph of its own
    os.environ["XDIT_OPS_USP_GRAPH"] = "1"
    q, k, v = _calls(rank, B, S, H, D, J)[0]
    fresh = tuple(t.flip(1).contiguous() for t in (q, k, v))
    assert_cuda_graph_replays(lambda: xdit_ops.usp_attention(q, k, v, joint_tokens=J),
                              (q, k, v), fresh)
    xdit_ops.destroy_parallel()


@pytest.mark.multigpu(2)
@pytest.mark.parametrize("mode", list(GPU_MODES))
@pytest.mark.parametrize("world", [2, 4])
def test_usp_gpu_graph_replay_equals_eager(world, mode):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    if mode == "hybrid" and world < 4:
        pytest.skip("the hybrid needs 4 ranks")
    run_distributed(_worker_gpu, world, mode, timeout=150, backend="nccl")


def _worker_ring_statics(rank, world):
    """The barrier ring's call graph without joint tokens: its static K and V are the ring's
    first buffer (no fill copy), and its calls equal eager ones bit for bit."""
    os.environ["XDIT_OPS_USP_RING"] = "ce"
    xdit_ops.init_parallel(ulysses_degree=1, ring_degree=world)
    B, S, H, D = 2, 256, 8, 64
    calls = _calls(rank, B, S, H, D, 0)
    got, want = [], []
    for sw, dst in (("1", got), ("0", want)):
        os.environ["XDIT_OPS_USP_GRAPH"] = sw
        before = _usp.FAST_CALLS[0]
        dst.extend(xdit_ops.usp_attention(q, k, v) for q, k, v in calls)
        if sw == "1":
            assert _usp.FAST_CALLS[0] - before == 3
            (graph,) = [g for p in _usp._PLANS.values() for g in p.graphs.values()
                        if isinstance(g, _usp._CallGraph)]
            ring = [t for key, (t, _, _) in _usp._SYMM.items() if "ring" in key]
            assert len(ring) == 1 and ring[0].shape == (2, 2, B, S, H, D), [
                t.shape for t in ring]
            k0, v0 = ring[0][0]
            assert graph.inputs[1].data_ptr() == k0.data_ptr()
            assert graph.inputs[2].data_ptr() == v0.data_ptr()
            assert graph.inputs[0].data_ptr() not in (k0.data_ptr(), v0.data_ptr())
    torch.cuda.synchronize()
    assert not _usp.GRAPH_FAILURES, _usp.GRAPH_FAILURES
    for i, (o, o0) in enumerate(zip(got, want, strict=True)):
        if i == 3:  # strided inputs: the graph reads contiguous copies of them
            assert max_abs_err(o, o0) <= 2e-2, (i, max_abs_err(o, o0))
        else:
            assert torch.equal(o, o0), (i, max_abs_err(o, o0))
    # the ring's first buffer is the graph's input: a replay after other calls still reads
    # this call's K and V (the eager calls above wrote that buffer since)
    os.environ["XDIT_OPS_USP_GRAPH"] = "1"
    q, k, v = calls[2]
    assert torch.equal(xdit_ops.usp_attention(q, k, v), want[2])
    xdit_ops.destroy_parallel()


@pytest.mark.multigpu(2)
@pytest.mark.parametrize("world", [2, 4])
def test_usp_gpu_ring_graph_statics_are_the_ring_buffer(world):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    run_distributed(_worker_ring_statics, world, timeout=150, backend="nccl")


def test_fast_key_covers_every_argument_and_switch(monkeypatch):
    """The eager fast path replays a remembered graph for an equal key, so every argument the
    plan or the call graph depends on must change the key (a field missing there would replay
    the wrong graph), and equal arguments must give equal keys (else the path never hits)."""
    for name in _usp._SWITCH_NAMES:
        monkeypatch.delenv(name, raising=False)
    q, k, v = (torch.zeros(2, 10, 4, 8) for _ in range(3))
    lengths = torch.tensor([3, 5], dtype=torch.int32)
    base = dict(q=q, k=k, v=v, joint_tokens=2, joint_position="front", joint_lengths=lengths,
                seq_len=16, scale=0.5, backend="auto", u="", r="", return_lse=False,
                shard_lengths=[8, 8])

    def key(**changes):
        a = base | changes
        return _usp._fast_key(a["q"], a["k"], a["v"], a["joint_tokens"], a["joint_position"],
                              a["joint_lengths"], a["seq_len"], a["scale"], a["backend"],
                              a["u"], a["r"], a["return_lse"], a["shard_lengths"])

    k0 = key()
    assert key() == k0 and hash(key(q=q.clone())) == hash(k0)
    variants = {
        "q shape": dict(q=torch.zeros(2, 11, 4, 8)),
        "q dtype": dict(q=q.to(torch.float64)),
        "joint_tokens": dict(joint_tokens=3),
        "joint_position": dict(joint_position="back"),
        "joint_lengths absent": dict(joint_lengths=None),
        "seq_len": dict(seq_len=15),
        "seq_len absent": dict(seq_len=None),
        "scale": dict(scale=0.25),
        "scale absent": dict(scale=None),
        "backend": dict(backend="cudnn"),
        "return_lse": dict(return_lse=True),
        "shard_lengths": dict(shard_lengths=[8, 7]),
        "shard_lengths absent": dict(shard_lengths=None),
    }
    # what the key leaves out, graph_call_run checks against the graph's static inputs (it
    # declines: test_graph_call.py); the key stays equal for these
    for same in (dict(v=v.to(torch.float64)), dict(joint_lengths=lengths.long()),
                 dict(q=torch.zeros(2, 10, 8, 4).transpose(2, 3)),
                 dict(k=torch.zeros(2, 10, 4, 16)), dict(v=torch.zeros(2, 10, 4, 16))):
        assert key(**same) == k0
    for what, changes in variants.items():
        assert key(**changes) != k0, what
    # the environment switches, read per call (os.environ's store, decoded when changed); a
    # call without a group reads none (no switch applies to one device)
    grouped = _usp._switches(True)
    assert grouped == (None,) * len(_usp._SWITCH_NAMES) and _usp._switches(False) == ()
    for name in _usp._SWITCH_NAMES:
        monkeypatch.setenv(name, "x")
        seen = _usp._switches(True)
        assert seen[_usp._SWITCH_NAMES.index(name)] == "x", name
        assert seen.count("x") == 1, name
        monkeypatch.delenv(name)
        assert _usp._switches(True) == grouped, name
