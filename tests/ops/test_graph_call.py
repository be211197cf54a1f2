"""The native replay of usp_attention's call graphs (``xdit_ops._C.graph_call_*``).

A graph is registered once with its static inputs and outputs (``graph_call_register`` adds a
row-copy node before its roots and one after its leaves); ``graph_call_run(handle, n_out,
*srcs)`` points the copy-in node at the sources (contiguous ones and rows of whole heads at one
pitch; anything else and host sources are copied with copy_ first) and the copy-out node at
fresh outputs, launches the graph and returns its first ``n_out`` outputs. It declines (None)
while the current stream is being captured and for a source its static input does not take
(shape, dtype, device, last stride); a wrong number of arguments is a ValueError (set as a
Python exception: a C++ exception crossing into Python segfaults the GPU machines' processes,
runs 7, 31 and 51, as this test's first version did there).
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
    x.sum(-1) in fp32), captured and registered as usp_attention's are."""
    x = torch.zeros(2, 6, 3, 8, dtype=torch.bfloat16, device="cuda")
    n = torch.zeros(2, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        state = _usp._capture([x, n], lambda: [x * 2 + n.sum(), x.float().sum(-1)])
    torch.cuda.current_stream().wait_stream(side)
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
        # heads not at one pitch (a [B, H, S, D] tensor seen as BSHD): copy_
        "strided": torch.randn(2, 3, 6, 8, device="cuda").to(torch.bfloat16).transpose(1, 2),
    }
    assert not sources["strided"].is_contiguous() and sources["strided"].stride(-1) == 1
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
    # sources the graph does not take: declined (None), nothing launched
    declined = {
        "shape": (x[..., :4], n),
        "dtype": (x, n.long()),
        "last stride": (torch.randn(2, 6, 8, 3, device="cuda").to(torch.bfloat16).mT, n),
        "host Q": (x.cpu(), n),
    }
    if torch.cuda.device_count() > 1:
        declined["device"] = (x.to("cuda:1"), n)
    for what, srcs in declined.items():
        assert run(state.handle, 1, *srcs) is None, what
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
    with pytest.raises(ValueError, match=r"graph_call_register: at most 4 static inputs"):
        _usp._REGISTER([x] * 5, [x], 1)
    with pytest.raises(ValueError, match=r"graph_call_register: needs a captured graph"):
        _usp._REGISTER([x], [x], 0)
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


@pytest.mark.gpu
def test_graph_call_queued_replays_keep_their_own_inputs_and_outputs():
    """A replay sets the copy nodes' parameters of the graph's executable, which changes later
    launches only: calls queued behind a GPU sleep (none has run when the next one sets the
    nodes) each read their own sources and fill their own outputs, through the nodes or
    through copy_ (a source the node cannot copy, a host source, every other call)."""
    state = _captured()
    run = _usp._RUN
    xs, ns = [], []
    for i in range(8):
        x = torch.randn(2, 3, 6, 8, device="cuda").to(torch.bfloat16)
        xs.append(x.transpose(1, 2) if i % 2 else x.transpose(1, 2).contiguous())
        ns.append(torch.tensor([i, 2 * i], dtype=torch.int32,
                               device="cuda" if i % 3 else "cpu"))
    torch.cuda._sleep(int(2e8))  # ~0.1 s: every call below is queued before any runs
    res = [run(state.handle, 2, x, n) for x, n in zip(xs, ns, strict=True)]
    torch.cuda.synchronize()
    for i, (x, n, r) in enumerate(zip(xs, ns, res, strict=True)):
        for got, want in zip(r, _want(x, n), strict=True):
            assert torch.equal(got, want), i
