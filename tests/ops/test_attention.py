"""``xdit_ops.attention`` against the fp64 oracle: dtypes, awkward shapes, LSE, every backend,
bad inputs, opcheck and torch.compile.

CPU cases stay small (the CPU kernel is the fp32 reference); the GPU cases (``gpu`` marker) run
every torch backend on DiT-like and awkward shapes, S = 4097 included.
"""

from __future__ import annotations

import pytest
import torch
from utils import (
    assert_attention_close,
    assert_lse_close,
    oracle_attention,
    poison_,
    randn,
    torch_attention,
)

import xdit_ops
from xdit_ops.ops.attention import backend_unusable_reason, select_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (B, Sq, Sk, H, D): 77 text tokens, 30 heads, head dim 72, batch 3, Sq != Sk.
CPU_SHAPES = [
    (1, 77, 77, 3, 72),
    (3, 33, 77, 30, 16),
    (2, 77, 45, 4, 64),
    (1, 1, 5, 1, 8),
]
GPU_SHAPES = [
    (1, 4097, 4097, 2, 128),
    (3, 77, 77, 30, 72),
    (2, 333, 1077, 24, 64),
    (1, 1101, 1101, 24, 128),
]
GPU_BACKENDS = ["cudnn", "flash", "efficient", "math", "auto"]


def make_qkv(B, Sq, Sk, H, D, dtype, device="cpu", seed=0, Dv=None):
    q = randn(B, Sq, H, D, dtype=dtype, device=device, seed=seed)
    k = randn(B, Sk, H, D, dtype=dtype, device=device, seed=seed + 1)
    v = randn(B, Sk, H, Dv or D, dtype=dtype, device=device, seed=seed + 2)
    return q, k, v


def poison_allocator(device: torch.device, nbytes: int) -> None:
    """Leave NaN-filled blocks in the CUDA caching allocator, so an output the kernel allocates
    and then fails to write shows up as NaN instead of as leftover zeros."""
    buf = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    poison_(buf)
    del buf


def check_against_oracle(q, k, v, backend, *, scale=None, what=""):
    ref, ref_lse = oracle_attention(q, k, v, scale=scale)
    yard = torch_attention(q, k, v, scale=scale)
    if q.is_cuda:
        poison_allocator(q.device, 4 * (q.numel() + v.numel()) + (1 << 20))
    out, lse = xdit_ops.attention(q, k, v, scale=scale, backend=backend, return_lse=True)
    assert out.dtype == q.dtype and out.device == q.device
    assert out.is_contiguous()
    assert_attention_close(out, ref, yard, what=f"{what} out")
    B, Sq, H, _ = q.shape
    assert tuple(lse.shape) == (B, H, Sq)
    assert_lse_close(lse, ref_lse, q.dtype, what=f"{what} lse")
    # Without the LSE a backend may pick another kernel configuration: judge it on its own.
    out_only = xdit_ops.attention(q, k, v, scale=scale, backend=backend)
    assert isinstance(out_only, torch.Tensor)
    assert_attention_close(out_only, ref, yard, what=f"{what} out (no lse)")


# ------------------------------------------------------------------------------------------ CPU


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_matches_oracle(shape, dtype):
    q, k, v = make_qkv(*shape, dtype=dtype)
    check_against_oracle(q, k, v, "auto", what=f"cpu {dtype} {shape}")


def test_cpu_scale_dv_and_strided_inputs():
    # q/k/v as views of one packed [B, S, 3, H, D] projection: strided, head_dim contiguous.
    B, S, H, D = 2, 77, 6, 40
    qkv = randn(B, S, 3, H, D, seed=3)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    check_against_oracle(q, k, v, "math", scale=0.37, what="strided")
    # Dv != D.
    q, k, v = make_qkv(1, 20, 31, 3, 24, torch.float32, Dv=40, seed=9)
    check_against_oracle(q, k, v, "math", what="dv")


def test_cpu_backends_resolve():
    dev = torch.device("cpu")
    assert select_backend(dev, torch.bfloat16, 128) == "math"
    assert backend_unusable_reason("math", dev, torch.float32, 72) is None
    for b in ("cudnn", "flash", "efficient"):
        why = backend_unusable_reason(b, dev, torch.bfloat16, 128)
        assert why is not None and "cpu" in why
    # Any backend refused on the CPU raises with its reason instead of running something else.
    q, k, v = make_qkv(1, 4, 4, 1, 8, torch.float32)
    for b in ("cudnn", "flash", "efficient", "fp8"):
        why = backend_unusable_reason(b, dev, torch.float32, 8)
        if why is None:
            continue
        with pytest.raises(ValueError, match=f"attention: backend '{b}' cannot run here"):
            xdit_ops.attention(q, k, v, backend=b)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_empty_sequences(device):
    # No queries: an empty output. No keys: a zero output and an LSE of -inf (the value
    # merge_attention_states_ treats as "nothing seen").
    q, k, v = make_qkv(2, 0, 7, 3, 16, torch.float32, device=device)
    out, lse = xdit_ops.attention(q, k, v, return_lse=True)
    assert out.shape == (2, 0, 3, 16) and lse.shape == (2, 3, 0)
    q, k, v = make_qkv(2, 5, 0, 3, 16, torch.float32, device=device)
    out, lse = xdit_ops.attention(q, k, v, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert lse.shape == (2, 3, 5) and bool((lse == float("-inf")).all())


def _bad(shape=(1, 4, 2, 8), dtype=torch.float32):
    return randn(*shape, dtype=dtype)


@pytest.mark.parametrize(
    "args, kwargs, exc, pattern",
    [
        ((_bad((4, 2, 8)), _bad(), _bad()), {}, ValueError,
         r"attention: query must be 4-D.*\(4, 2, 8\)"),
        ((_bad(), _bad(), _bad(dtype=torch.float16)), {}, TypeError,
         r"attention: query/key/value dtypes differ.*float16"),
        ((_bad(), _bad((2, 4, 2, 8)), _bad((2, 4, 2, 8))), {}, ValueError,
         r"attention: batch sizes differ: query 1, key 2"),
        ((_bad(), _bad((1, 5, 2, 8)), _bad()), {}, ValueError,
         r"attention: key has 5 tokens but value has 4"),
        ((_bad(), _bad((1, 4, 3, 8)), _bad((1, 4, 3, 8))), {}, ValueError,
         r"attention: head counts differ: query 2, key 3"),
        ((_bad(), _bad((1, 4, 2, 16)), _bad()), {}, ValueError,
         r"attention: query head_dim 8 != key head_dim 16"),
        ((torch.ones(1, 4, 2, 8, dtype=torch.int32),) * 3, {}, TypeError,
         r"attention: query must be floating point, got torch.int32"),
        ((_bad(), _bad(), _bad()), {"backend": "bogus"}, ValueError,
         r"attention: unknown backend 'bogus'"),
        ((_bad(), _bad(), _bad()), {"scale": float("nan")}, ValueError,
         r"attention: scale must be a finite number, got nan"),
        ((_bad((1, 4, 8, 2)).transpose(2, 3), _bad(), _bad()), {}, ValueError,
         r"attention: head_dim must be the contiguous"),
    ],
    ids=["3d", "dtype", "batch", "kv_len", "heads", "head_dim", "int", "backend", "scale",
         "stride"],
)
def test_bad_inputs(args, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        xdit_ops.attention(*args, **kwargs)


def test_opcheck_cpu():
    q, k, v = make_qkv(2, 9, 13, 3, 24, torch.float32)
    for return_lse in (True, False):
        torch.library.opcheck(
            torch.ops.xdit_ops.attention.default, (q, k, v, None, "auto", return_lse)
        )
    torch.library.opcheck(torch.ops.xdit_ops.attention.default, (q, k, v, 0.5, "math", True))


def _compiled_fn(q, k, v):
    # One pointwise op after the custom op: the fake kernel's shapes/dtypes must flow into
    # inductor's generated code (a single C++ kernel keeps the cold compile short on CI).
    out, lse = xdit_ops.attention(q, k, v, return_lse=True)
    return out * 2.0 + 1.0, lse


def _check_compile(q, k, v):
    torch._dynamo.reset()
    eager = _compiled_fn(q, k, v)
    compiled = torch.compile(_compiled_fn, fullgraph=True)(q, k, v)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_compile_cpu():
    _check_compile(*make_qkv(2, 17, 23, 3, 16, torch.float32))


# ------------------------------------------------------------------------------------------ GPU


def _gpu_cases():
    cases = []
    for shape in GPU_SHAPES:
        for dtype in DTYPES:
            for backend in GPU_BACKENDS:
                if dtype == torch.float32 and shape[1] > 2000 and backend == "math":
                    continue  # covered at the smaller shapes; the fp64 oracle is the slow part
                cases.append(pytest.param(shape, dtype, backend,
                                          id=f"{'x'.join(map(str, shape))}-{dtype}-{backend}"))
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize("shape, dtype, backend", _gpu_cases())
def test_gpu_backend_matches_oracle(shape, dtype, backend):
    dev = torch.device("cuda")
    q, k, v = make_qkv(*shape, dtype=dtype, device=dev, seed=11)
    why = None if backend == "auto" else backend_unusable_reason(backend, dev, dtype, shape[-1])
    if why is not None:
        # An unusable combination must refuse with the reason, never run something else.
        with pytest.raises(ValueError, match=f"attention: backend '{backend}' cannot run here"):
            xdit_ops.attention(q, k, v, backend=backend)
        return
    check_against_oracle(q, k, v, backend, what=f"{backend} {dtype} {shape}")


@pytest.mark.gpu
def test_gpu_cudnn_lse_is_natural_log_bhs():
    dev = torch.device("cuda")
    if backend_unusable_reason("cudnn", dev, torch.bfloat16, 128) is not None:
        pytest.skip(backend_unusable_reason("cudnn", dev, torch.bfloat16, 128))
    B, S, H, D = 2, 1000, 4, 128
    q, k, v = make_qkv(B, S, S, H, D, torch.bfloat16, device=dev, seed=5)
    _, ref_lse = oracle_attention(q, k, v)
    res = torch.ops.aten._scaled_dot_product_cudnn_attention.default(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, False, False
    )
    raw = res[1]
    assert raw.numel() == B * H * S, f"cuDNN LSE has shape {tuple(raw.shape)}"
    raw = raw.reshape(B, H, S).float()
    # Natural log: a log2 LSE would be off by a factor 1/ln 2 (~1.44), far beyond 5e-2.
    assert_lse_close(raw, ref_lse.float(), torch.bfloat16, what="raw cuDNN lse (natural log)")
    _, lse = xdit_ops.attention(q, k, v, backend="cudnn", return_lse=True)
    assert tuple(lse.shape) == (B, H, S) and lse.dtype == torch.float32 and lse.is_contiguous()
    torch.testing.assert_close(lse, raw, rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_gpu_auto_prefers_fast_backends():
    dev = torch.device("cuda")
    chosen = select_backend(dev, torch.bfloat16, 128)
    assert chosen in ("cudnn", "flash"), chosen
    assert select_backend(dev, torch.float32, 72) in ("efficient", "math")


@pytest.mark.gpu
def test_gpu_device_mismatch():
    q, k, v = make_qkv(1, 4, 4, 2, 8, torch.bfloat16)
    with pytest.raises(ValueError, match="attention: query/key/value are on different devices"):
        xdit_ops.attention(q.cuda(), k, v.cuda())


@pytest.mark.gpu
def test_opcheck_gpu():
    q, k, v = make_qkv(2, 65, 130, 4, 64, torch.bfloat16, device="cuda")
    torch.library.opcheck(torch.ops.xdit_ops.attention.default, (q, k, v, None, "auto", True),
                          atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
def test_compile_gpu():
    _check_compile(*make_qkv(2, 257, 300, 4, 64, torch.float32, device="cuda"))
    q, k, v = make_qkv(1, 1024, 1024, 8, 128, torch.bfloat16, device="cuda")
    torch._dynamo.reset()
    eager = xdit_ops.attention(q, k, v)
    compiled = torch.compile(lambda a, b, c: xdit_ops.attention(a, b, c), fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled, eager)
