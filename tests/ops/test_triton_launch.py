"""Recorded Triton launches (xdit_ops.triton.launch) and the FP8 op's fast path.

On CPU: the parameters after the positional ones in signature order, the replay's bookkeeping
(which tensors it substitutes, when it declines), recording, the op's fast-path key and switch,
and the tensors carved from one buffer. On GPUs: the op's fast path (a replay of the first
call's launches) gives the slow path's bits, for other inputs of the key too, a misaligned
input is another key, and it replays from a CUDA graph.
"""

from __future__ import annotations

import sys

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from xdit_ops.triton import launch as L  # noqa: E402


@triton.jit
def _axpy(X, Y, n, alpha, BLOCK: tl.constexpr, SCALE: tl.constexpr = 2.0):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    x = tl.load(X + i, mask=ok)
    tl.store(Y + i, x * alpha * SCALE, mask=ok)


def test_tail_is_every_later_parameter_in_signature_order():
    assert L.tail_values(_axpy, 4, {"BLOCK": 64}) == (64, 2.0)
    assert L.tail_values(_axpy, 4, {"SCALE": 3.0, "BLOCK": 32}) == (32, 3.0)
    assert L.tail_values(_axpy, 3, {"alpha": 1.0, "BLOCK": 32}) == (1.0, 32, 2.0)
    with pytest.raises(TypeError, match=r"launch: .*misses argument 'BLOCK'"):
        L.tail_values(_axpy, 4, {})


class _Compiled:
    """Stands in for Triton's CompiledKernel (which needs a GPU) in the replay's bookkeeping
    test: ``self[grid](*args, stream=...)`` runs ``fn`` on the arguments."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    def __getitem__(self, grid):
        def runner(*args, stream=None):
            self.calls.append((grid, stream))
            self.fn(*args)
        return runner


def test_replay_substitutes_the_call_tensors(monkeypatch):
    monkeypatch.setattr(L, "raw_stream", lambda index: 7)
    dev = torch.device("cpu")
    specs = (((4,), torch.float32), ((2, 2), torch.float32))
    x = torch.arange(4.0)
    const = torch.full((4,), 10.0)

    def carve_like(specs, device):
        return [torch.empty(shape, dtype=dt) for shape, dt in specs]

    def add(a, c, out, n, scale):  # out = (a + c) * scale over n elements
        out.view(-1)[:n] = (a[:n] + c[:n]) * scale

    ck = _Compiled(add)
    made = carve_like(specs, dev)
    log = [L.Alloc(specs, tuple(made)), L.Launch(ck, (1, 1, 1), (x, const, made[0], 4), (2.0,)),
           L.Launch(ck, (2, 1, 1), (made[0], x, made[1], 4), (1.0,))]
    rep = L.Replay.build(log, (x,), (const,), (made[1], made[0]), dev)
    assert rep is not None
    y = torch.tensor([1.0, -1.0, 0.5, 3.0])
    out1, out0 = rep.run((y,), carve_like)
    assert torch.equal(out0, (y + const) * 2.0)
    assert torch.equal(out1.view(-1), out0 + y)
    assert [c[0] for c in ck.calls] == [(1, 1, 1), (2, 1, 1)] and ck.calls[0][1] == 7
    # no replay: a tensor that is neither a source, nor made, nor a constant; a launch that
    # could not be recorded; not exactly one allocation; an output not made by the allocation
    stranger = torch.zeros(4)
    bad = [log[0], L.Launch(ck, (1, 1, 1), (x, stranger, made[0], 4), (2.0,))]
    assert L.Replay.build(bad, (x,), (const,), (made[0],), dev) is None
    assert L.Replay.build(log + [None], (x,), (const,), (made[0],), dev) is None
    assert L.Replay.build(log[1:], (x,), (const,), (made[0],), dev) is None
    assert L.Replay.build(log + [log[0]], (x,), (const,), (made[0],), dev) is None
    assert L.Replay.build(log, (x,), (const,), (x,), dev) is None


def test_recording_logs_allocations_and_nests():
    with L.recording() as outer:
        L.note_alloc(((2,), torch.float32), [torch.empty(2)])
        with L.recording() as inner:
            L.note_alloc(((3,), torch.float32), [torch.empty(3)])
        L.note_alloc(((4,), torch.float32), [torch.empty(4)])
    assert [e.specs for e in outer] == [((2,), torch.float32), ((4,), torch.float32)]
    assert [e.specs for e in inner] == [((3,), torch.float32)]
    L.note_alloc(((5,), torch.float32), [torch.empty(5)])  # not recording: nothing, no error


def test_fast_path_switch_names_the_variable(monkeypatch):
    from xdit_ops.ops import fp8_attention as ofa

    x = torch.randn(1, 8, 2, 16)
    monkeypatch.setenv(ofa.FAST_PATH_ENV, "0")
    assert ofa._fast_key(x, x, x, None, False) is None
    monkeypatch.setenv(ofa.FAST_PATH_ENV, "1")
    key = ofa._fast_key(x, x, x, None, False)
    assert key is not None and key != ofa._fast_key(x, x, x, 0.5, False)
    assert key != ofa._fast_key(x, x, x, None, True)
    assert key != ofa._fast_key(x[:, :4], x[:, :4], x[:, :4], None, False)
    y, z = x.clone(), x.clone()
    assert ofa._fast_key(x, y, z, None, False) != key  # one tensor as q, k and v is another key
    assert ofa._fast_key(x, y, z, None, False) != ofa._fast_key(x, y, y, None, False)
    monkeypatch.setenv(ofa.K_SCALE_ENV, "token")
    assert key != ofa._fast_key(x, x, x, None, False)  # a setting is part of the key
    monkeypatch.setenv(ofa.FAST_PATH_ENV, "yes")
    with pytest.raises(ValueError, match=rf"fp8_attention: {ofa.FAST_PATH_ENV}='yes'"):
        ofa._fast_key(x, x, x, None, False)


def test_tensors_carved_from_one_buffer():
    from xdit_ops.triton.fp8_attention import CARVE_ALIGN, _empty_tensors

    specs = (((3, 5, 7), torch.float32), ((2, 9), torch.int8), ((4, 3, 11), torch.float8_e4m3fn),
             ((0, 4), torch.float32), ((6,), torch.float32))
    sep = _empty_tensors(specs, torch.device("cpu"), one_buffer=False)
    one = _empty_tensors(specs, torch.device("cpu"), one_buffer=True)
    base = one[0].untyped_storage().data_ptr()
    for t, s, (shape, dt) in zip(one, sep, specs, strict=True):
        assert t.shape == s.shape == shape and t.dtype == s.dtype == dt
        assert t.is_contiguous()
        assert t.untyped_storage().data_ptr() == base  # one allocation
        assert t.storage_offset() * t.element_size() % CARVE_ALIGN == 0
    # no two overlap: fill each with its own byte, then every one still holds its own
    for i, t in enumerate(one):
        t.view(torch.uint8).fill_(i + 1)
    for i, t in enumerate(one):
        assert bool((t.view(torch.uint8) == i + 1).all())


# ---------------------------------------------------------------------------------------------
# GPU


def _bits(t):
    return t.view(torch.uint8) if t.numel() else t


@pytest.mark.gpu
@pytest.mark.parametrize("B,S,H,D", [(2, 777, 4, 128), (1, 1000, 3, 64), (1, 300, 2, 72)])
def test_op_fast_path_gives_the_slow_path_bits_gpu(monkeypatch, B, S, H, D):
    import xdit_ops
    from xdit_ops.ops import fp8_attention as ofa
    from xdit_ops.reference.fp8_attention import dit_like_qkv

    q, k, v = dit_like_qkv(B, S, H, D, seed=1, dtype=torch.bfloat16, device="cuda")
    monkeypatch.setenv(ofa.FAST_PATH_ENV, "0")
    ref, ref_lse = xdit_ops.fp8_attention(q, k, v, return_lse=True)
    monkeypatch.setenv(ofa.FAST_PATH_ENV, "1")
    ofa._FAST.clear()
    out, lse = xdit_ops.fp8_attention(q, k, v, return_lse=True)  # records
    key = ofa._fast_key(q, k, v, None, True)
    sm90 = ofa.resolve_impl(q.device, D) in ofa.SM90_IMPLS
    assert (key in ofa._FAST) == sm90  # the fast path covers the native kernels' path
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    for _ in range(2):  # replays
        out, lse = xdit_ops.fp8_attention(q, k, v, return_lse=True)
        assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    # other inputs of the same key: the replay reads this call's tensors
    q2, k2, v2 = dit_like_qkv(B, S, H, D, seed=2, dtype=torch.bfloat16, device="cuda")
    got = xdit_ops.fp8_attention(q2, k2, v2)  # the output alone (return_lse=False)
    monkeypatch.setenv(ofa.FAST_PATH_ENV, "0")
    want = xdit_ops.fp8_attention(q2, k2, v2)
    assert torch.equal(got, want)
    # one tensor as q, k and v first, then three: the replay reads each input where it belongs
    x3 = (q2, q2, q2)
    monkeypatch.setenv(ofa.FAST_PATH_ENV, "1")
    for args in (x3, (q2, k2, v2), x3, (q2, k2, v2)):
        assert torch.equal(xdit_ops.fp8_attention(*args), want if args[1] is k2 else
                           xdit_ops.fp8_attention(q2, q2.clone(), q2.clone()))
    # a K 2 bytes past a 16-byte boundary is another key (Triton specializes on alignment)
    monkeypatch.setenv(ofa.FAST_PATH_ENV, "1")
    buf = torch.empty(k.numel() + 1, device="cuda", dtype=k.dtype)
    k_odd = buf[1:].view(k.shape).copy_(k)
    assert ofa._fast_key(q, k_odd, v, None, True) != key
    for _ in range(2):
        out, lse = xdit_ops.fp8_attention(q, k_odd, v, return_lse=True)
        assert torch.equal(out, ref) and torch.equal(lse, ref_lse)


@pytest.mark.gpu
def test_op_fast_path_replays_from_a_cuda_graph_gpu(monkeypatch):
    import xdit_ops
    from xdit_ops.ops import fp8_attention as ofa
    from xdit_ops.reference.fp8_attention import dit_like_qkv

    monkeypatch.setenv(ofa.FAST_PATH_ENV, "1")
    q, k, v = dit_like_qkv(2, 777, 4, 128, seed=2, dtype=torch.bfloat16, device="cuda")
    sq, sk, sv = (t.clone() for t in (q, k, v))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # record, then the fast path
            xdit_ops.fp8_attention(sq, sk, sv)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gout = xdit_ops.fp8_attention(sq, sk, sv)
    q2, k2, v2 = dit_like_qkv(2, 777, 4, 128, seed=3, dtype=torch.bfloat16, device="cuda")
    for a, b in ((sq, q2), (sk, k2), (sv, v2)):
        a.copy_(b)
    g.replay()
    torch.cuda.synchronize()
    monkeypatch.setenv(ofa.FAST_PATH_ENV, "0")
    assert torch.equal(gout, xdit_ops.fp8_attention(q2, k2, v2))


@pytest.mark.gpu
def test_public_fast_path_skips_only_plain_calls_gpu(monkeypatch):
    """With a replay for the key, xdit_ops.fp8_attention skips the op's dispatch for a plain
    call (the same bits), and not under a dispatch mode (which then sees the op)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import xdit_ops
    from xdit_ops.ops import fp8_attention as ofa
    from xdit_ops.reference.fp8_attention import dit_like_qkv

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    monkeypatch.setenv(ofa.FAST_PATH_ENV, "1")
    q, k, v = dit_like_qkv(1, 500, 2, 128, seed=4, dtype=torch.bfloat16, device="cuda")
    first = xdit_ops.fp8_attention(q, k, v, scale=0.1)  # the op: records
    assert ofa._fast_key(q, k, v, 0.1, False) in ofa._FAST
    callers = []
    real = ofa._fast_call

    def spy(*a):
        callers.append(sys._getframe(1).f_code.co_name)
        return real(*a)

    monkeypatch.setattr(ofa, "_fast_call", spy)
    assert torch.equal(xdit_ops.fp8_attention(q, k, v, scale=0.1), first)
    assert callers == ["fp8_attention"]  # the public function's replay, no op dispatch
    with Seen() as mode:
        out = xdit_ops.fp8_attention(q, k, v, scale=0.1)
    assert torch.ops.xdit_ops.fp8_attention.default in mode.ops
    assert callers == ["fp8_attention", "_fp8_attention_cuda"]  # the op's own fast path
    assert torch.equal(out, first)
