"""``xdit_ops::graph_call``: the native replay of usp_attention's call graphs.

One host call copies the sources into a graph's static inputs (contiguous sources and rows of
whole heads at one pitch by cudaMemcpy(2D)Async, anything else and host sources by copy_),
launches the graph and returns copies of its outputs; it declines (an empty list) while the
current stream is being captured, and names the input whose shape does not match.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import xdit_ops  # noqa: F401  (loads the extension)

_usp = importlib.import_module("xdit_ops.ops.usp_attention")


def _captured():
    """A graph over static inputs x [2, 6, 3, 8] bf16 and n [2] int32: (x * 2 + n.sum(),
    x.sum(-1) in fp32)."""
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
    return g, [x, n], outs


def _want(x, n):
    return x.cuda() * 2 + n.cuda().sum(), x.cuda().float().sum(-1)


@pytest.mark.gpu
def test_graph_call_copies_in_replays_and_returns_copies():
    g, statics, outs = _captured()
    exec_ = _usp._graph_exec(g)
    assert exec_ != 0, "no native graph_call or no raw_cuda_graph_exec: the fast path is off"
    call = torch.ops.xdit_ops.graph_call.default
    base = torch.randn(2, 6, 3, 3, 8, device="cuda").to(torch.bfloat16)
    sources = {
        "contiguous": base[:, :, :, 0].contiguous(),
        "rows at a pitch": base[:, :, :, 1],  # a fused projection's view: cudaMemcpy2DAsync
        # last dimension not unit-stride: copy_
        "strided": torch.randn(2, 6, 8, 3, device="cuda").to(torch.bfloat16).transpose(2, 3),
    }
    assert not sources["strided"].is_contiguous() and sources["strided"].stride(-1) != 1
    lengths = {"device": torch.tensor([3, 4], dtype=torch.int32, device="cuda"),
               "host": torch.tensor([5, 1], dtype=torch.int32)}
    results = []
    for name, x in sources.items():
        for where, n in lengths.items():
            res = call(statics, [x, n], outs, exec_)
            torch.cuda.synchronize()
            want = _want(x, n)
            assert len(res) == 2 and all(r is not o for r, o in zip(res, outs, strict=True))
            for r, w in zip(res, want, strict=True):
                assert r.shape == w.shape and r.dtype == w.dtype, (name, where)
                assert torch.equal(r, w), (name, where, (r.float() - w.float()).abs().max())
            results.append(res[0])
    # each call's result is its own tensor: later replays did not overwrite earlier results
    torch.testing.assert_close(results[0], _want(sources["contiguous"], lengths["device"])[0],
                               rtol=0, atol=0)


@pytest.mark.gpu
def test_graph_call_declines_under_capture_and_checks_shapes():
    g, statics, outs = _captured()
    exec_ = _usp._graph_exec(g)
    call = _usp.graph_call
    x = torch.randn(2, 6, 3, 8, device="cuda").to(torch.bfloat16)
    n = torch.ones(2, dtype=torch.int32, device="cuda")
    outer = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        outer.capture_begin()
        res = call(statics, [x, n], outs, exec_)
        outer.capture_end()
    torch.cuda.current_stream().wait_stream(side)
    assert res == []
    with pytest.raises(ValueError, match=r"graph_call: input 0 has shape \[2, 6, 3, 4\] and "
                                         r"dtype torch.bfloat16; the graph was captured for "
                                         r"\[2, 6, 3, 8\]"):
        call(statics, [x[..., :4], n], outs, exec_)
    with pytest.raises(ValueError, match=r"graph_call: input 1 has shape \[2\] and dtype "
                                         r"torch.int64"):
        call(statics, [x, n.long()], outs, exec_)
    with pytest.raises(ValueError, match=r"graph_call: 2 static inputs for 1 inputs"):
        call(statics, [x], outs, exec_)
    with pytest.raises(ValueError, match=r"graph_call: no instantiated graph"):
        call(statics, [x, n], outs, 0)
