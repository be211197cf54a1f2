"""The native replay of usp_attention's call graphs (``xdit_ops._C.graph_call_*``).

A graph is registered once with its static inputs and outputs; ``graph_call_run(handle, n_out,
*srcs)`` copies the sources into the static inputs (contiguous sources and rows of whole heads
at one pitch by one row-copy kernel, anything else and host sources by copy_), launches the
graph and returns copies of its first ``n_out`` outputs; it declines (None) while the current
stream is being captured, and a source that does not match its static input is a ValueError
(set as a Python exception: a C++ exception crossing into Python segfaults the GPU machines'
processes, runs 7, 31 and 51, as this test's first version did there).
"""

from __future__ import annotations

import gc
import importlib

import pytest
import torch

import xdit_ops  # noqa: F401  (loads the extension)

_usp = importlib.import_module("xdit_ops.ops.usp_attention")


def _captured():
    """A graph over static inputs x [2, 6, 3, 8] bf16 and n [2] int32: (x * 2 + n.sum(),
    x.sum(-1) in fp32), registered."""
    x = torch.zeros(2, 6, 3, 8, dtype=torch.bfloat16, device="cuda")
    n = torch.zeros(2, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        g.capture_begin()
        outs = [x * 2 + n.sum(), x.float().sum(-1)]
        g.capture_end()
    torch.cuda.current_stream().wait_stream(side)
    state = _usp._CallGraph(g, [x, n], outs)
    assert state.handle, "no native graph_call_run handle"
    return state


def _want(x, n):
    return x.cuda() * 2 + n.cuda().sum(), x.cuda().float().sum(-1)


@pytest.mark.gpu
def test_graph_call_copies_in_replays_and_returns_copies():
    state = _captured()
    run = _usp._RUN
    base = torch.randn(2, 6, 3, 3, 8, device="cuda").to(torch.bfloat16)
    sources = {
        "contiguous": base[:, :, :, 0].contiguous(),
        "rows at a pitch": base[:, :, :, 1],  # a fused projection's view: the row copy
        # last dimension not unit-stride: copy_
        "strided": torch.randn(2, 6, 8, 3, device="cuda").to(torch.bfloat16).transpose(2, 3),
    }
    assert not sources["strided"].is_contiguous() and sources["strided"].stride(-1) != 1
    lengths = {"device": torch.tensor([3, 4], dtype=torch.int32, device="cuda"),
               "host": torch.tensor([5, 1], dtype=torch.int32)}
    first = None
    for name, x in sources.items():
        for where, n in lengths.items():
            res = run(state.handle, 2, x, n)
            torch.cuda.synchronize()
            want = _want(x, n)
            assert isinstance(res, tuple) and len(res) == 2
            assert all(r.data_ptr() != o.data_ptr()
                       for r, o in zip(res, state.outputs, strict=True))
            for r, w in zip(res, want, strict=True):
                assert r.shape == w.shape and r.dtype == w.dtype, (name, where)
                assert torch.equal(r, w), (name, where, (r.float() - w.float()).abs().max())
            first = res[0] if first is None else first
    # the first call's result is its own tensor: later replays did not overwrite it
    assert torch.equal(first, _want(sources["contiguous"], lengths["device"])[0])
    one = run(state.handle, 1, sources["contiguous"], lengths["device"])
    assert len(one) == 1 and torch.equal(one[0], first)
    # the op's path (_CallGraph.replay) gives the same
    out, lse = state.replay([sources["contiguous"], lengths["device"]], return_lse=False)
    assert torch.equal(out, first) and lse.numel() == 0


@pytest.mark.gpu
def test_graph_call_declines_under_capture_checks_inputs_and_releases():
    state = _captured()
    run = _usp._RUN
    x = torch.randn(2, 6, 3, 8, device="cuda").to(torch.bfloat16)
    n = torch.ones(2, dtype=torch.int32, device="cuda")
    outer = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        outer.capture_begin()
        res = run(state.handle, 1, x, n)
        outer.capture_end()
    torch.cuda.current_stream().wait_stream(side)
    assert res is None
    with pytest.raises(ValueError, match=r"graph_call_run: input 0 does not match"):
        run(state.handle, 1, x[..., :4], n)
    with pytest.raises(ValueError, match=r"graph_call_run: input 1 does not match"):
        run(state.handle, 1, x, n.long())
    with pytest.raises(ValueError, match=r"graph_call_run: 1 inputs and 1 outputs for a graph "
                                         r"of 2 inputs and 2 outputs"):
        run(state.handle, 1, x)
    with pytest.raises(ValueError, match=r"graph_call_run: 2 inputs and 3 outputs"):
        run(state.handle, 3, x, n)
    with pytest.raises(TypeError, match=r"graph_call_run: input 1 is not a tensor"):
        run(state.handle, 1, x, None)
    with pytest.raises(ValueError, match=r"graph_call_register: the static inputs must be "
                                         r"contiguous"):
        _usp._REGISTER([x.mT], [x], 1)
    handle = state.handle
    del state
    gc.collect()
    with pytest.raises(ValueError, match=rf"graph_call_run: no graph registered as {handle}"):
        run(handle, 1, x, n)


@pytest.mark.gpu
def test_graph_call_orders_replays_across_streams():
    """A replay on another stream waits for the replays queued on the last one: the static
    inputs are shared, so without that the second call's copy-in would overwrite them before
    the first call's graph (held back by a GPU sleep on its stream) read them."""
    state = _captured()
    run = _usp._RUN
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    xs = [torch.randn(2, 6, 3, 8, device="cuda").to(torch.bfloat16) for _ in range(2)]
    n = torch.ones(2, dtype=torch.int32, device="cuda")
    a.wait_stream(torch.cuda.current_stream())
    b.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(a):
        torch.cuda._sleep(int(2e8))  # ~0.1 s: the first call's copies and graph wait here
        first = run(state.handle, 1, xs[0], n)[0]
    with torch.cuda.stream(b):
        second = run(state.handle, 1, xs[1], n)[0]
    torch.cuda.synchronize()
    assert torch.equal(first, _want(xs[0], n)[0])
    assert torch.equal(second, _want(xs[1], n)[0])
