"""The cached Triton launch (xdit_ops.triton.launch) and the FP8 pass's direct path.

On CPU: the cache key separates every case Triton specializes on, the parameters after the
positional ones come in signature order, the switch, and the tensors carved from one buffer.
On GPUs: the cached launches give the plain launches' bits, hit the cache, take a new entry
for a misaligned pointer, and the op under the fast launch replays from a CUDA graph.
"""

from __future__ import annotations

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


def _key(*args, **kw):
    return L.launch_key(_axpy, 0, args, kw)


def test_key_separates_what_triton_specializes_on():
    x = torch.randn(64)
    y = torch.empty(64)
    base = _key(x, y, 48, 1.5, BLOCK=64)
    assert base is not None
    # ints: another value of the same class shares the entry; 1, 0, multiples of 16 and
    # int64-range values are classes of their own
    assert _key(x, y, 32, 1.5, BLOCK=64) == base
    assert _key(x, y, 5, 1.5, BLOCK=64) != base
    assert _key(x, y, 5, 1.5, BLOCK=64) == _key(x, y, 7, 1.5, BLOCK=64)
    assert _key(x, y, 1, 1.5, BLOCK=64) != _key(x, y, 7, 1.5, BLOCK=64)
    assert _key(x, y, 0, 1.5, BLOCK=64) != _key(x, y, 16, 1.5, BLOCK=64)
    assert _key(x, y, 2**31, 1.5, BLOCK=64) != _key(x, y, 2**30, 1.5, BLOCK=64)
    # floats by type only; bools by value
    assert _key(x, y, 48, -3.0, BLOCK=64) == base
    assert _key(x, y, True, 1.5, BLOCK=64) != _key(x, y, False, 1.5, BLOCK=64)
    # tensors by dtype and 16-byte alignment of the address
    assert _key(x.double(), y, 48, 1.5, BLOCK=64) != base
    assert x.data_ptr() % 16 == 0
    assert _key(x[1:], y, 48, 1.5, BLOCK=64) != base
    assert _key(x[4:], y, 48, 1.5, BLOCK=64) == base
    # constexprs and options by value, in any order
    assert _key(x, y, 48, 1.5, BLOCK=32) != base
    assert (_key(x, y, 48, 1.5, BLOCK=64, num_warps=4)
            == _key(x, y, 48, 1.5, num_warps=4, BLOCK=64))
    assert _key(x, y, 48, 1.5, BLOCK=64, num_warps=8) != _key(x, y, 48, 1.5, BLOCK=64,
                                                                 num_warps=4)
    # another device, another entry
    assert L.launch_key(_axpy, 1, (x, y, 48, 1.5), {"BLOCK": 64}) != base


def test_key_declines_what_it_does_not_cover():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(64)
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
    assert L.launch_key(_axpy, 0, (fx, x, 48, 1.5), {"BLOCK": 64}) is None
    assert L.launch_key(_axpy, 0, (x, x, [48], 1.5), {"BLOCK": 64}) is None
    assert L.launch_key(_axpy, 0, (torch.nn.Parameter(x), x, 48, 1.5), {"BLOCK": 64}) is None


def test_tail_is_every_later_parameter_in_signature_order():
    assert L._tail(_axpy, 4, {"BLOCK": 64}) == (64, 2.0)
    assert L._tail(_axpy, 4, {"SCALE": 3.0, "BLOCK": 32}) == (32, 3.0)
    assert L._tail(_axpy, 3, {"alpha": 1.0, "BLOCK": 32}) == (1.0, 32, 2.0)
    with pytest.raises(TypeError, match=r"launch: .*misses argument 'BLOCK'"):
        L._tail(_axpy, 4, {})


def test_switch(monkeypatch):
    monkeypatch.setenv(L.FAST_ENV, "0")
    assert not L.fast_enabled()
    monkeypatch.setenv(L.FAST_ENV, "1")
    assert L.fast_enabled() is (not L.INTERPRET)
    monkeypatch.setenv(L.FAST_ENV, "yes")
    with pytest.raises(ValueError, match=rf"{L.FAST_ENV}='yes': expected 0 or 1"):
        L.fast_enabled()


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


def _pass_outputs(qq):
    return (qq.q, qq.q_scale, qq.k, qq.k_scale, qq.vt, qq.v_scale, qq.lse_corr)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_fast_launch_gives_the_plain_launch_bits_gpu(monkeypatch, D):
    from xdit_ops.reference.fp8_attention import dit_like_qkv
    from xdit_ops.triton import fp8_attention as tfa

    q, k, v = dit_like_qkv(1, 1000, 3, D, seed=1, dtype=torch.bfloat16, device="cuda")
    monkeypatch.setenv(L.FAST_ENV, "0")
    plain = tfa.quantize_qkv_triton(q, k, v, vt_pv_order=True, k_block=128)
    monkeypatch.setenv(L.FAST_ENV, "1")
    first = tfa._quantize_qkv(q, k, v, None, True, None, 128, direct=True)
    n = len(L._compiled)
    assert n >= 3  # the three kernels of the pass, each under its key
    again = tfa._quantize_qkv(q, k, v, None, True, None, 128, direct=True)  # from the cache
    assert len(L._compiled) == n
    for a, b, c in zip(_pass_outputs(plain), _pass_outputs(first), _pass_outputs(again),
                       strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        assert torch.equal(a.view(torch.uint8), c.view(torch.uint8))
    # a K whose address is 2 bytes past a 16-byte boundary: Triton specializes on alignment,
    # so the cache takes new entries, and the bits are the plain launch's
    buf = torch.empty(k.numel() + 1, device="cuda", dtype=k.dtype)
    k_odd = buf[1:].view(k.shape).copy_(k)
    assert k_odd.data_ptr() % 16 != 0
    odd = tfa._quantize_qkv(q, k_odd, v, None, True, None, 128, direct=True)
    assert len(L._compiled) > n
    for a, b in zip(_pass_outputs(plain), _pass_outputs(odd), strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.gpu
def test_op_under_the_fast_launch_matches_and_replays_from_a_graph_gpu(monkeypatch):
    import xdit_ops
    from xdit_ops.reference.fp8_attention import dit_like_qkv

    q, k, v = dit_like_qkv(2, 777, 4, 128, seed=2, dtype=torch.bfloat16, device="cuda")
    monkeypatch.setenv(L.FAST_ENV, "0")
    ref, ref_lse = xdit_ops.fp8_attention(q, k, v, return_lse=True)
    monkeypatch.setenv(L.FAST_ENV, "1")
    for _ in range(2):  # the first call fills the cache, the second launches from it
        out, lse = xdit_ops.fp8_attention(q, k, v, return_lse=True)
        assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    sq, sk, sv = (torch.empty_like(t) for t in (q, k, v))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
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
    assert torch.equal(gout, xdit_ops.fp8_attention(q2, k2, v2))
