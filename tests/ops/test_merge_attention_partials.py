"""merge_attention_partials: N partial attentions over disjoint keys merge to the full one."""

from __future__ import annotations

import pytest
import torch

from tests.utils import max_abs_err, oracle_attention, randn
from xdit_ops.ops.merge_attention_states import MAX_PARTIALS, merge_attention_partials
from xdit_ops.reference import attention_ref


def _partials(q, k, v, cuts):
    outs, lses = [], []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        o, lse = attention_ref(q, k[:, a:b], v[:, a:b])
        outs.append(o)
        lses.append(lse.float())
    return outs, lses


@pytest.mark.parametrize("cuts", [[0, 50], [0, 7, 50], [0, 3, 20, 21, 40, 50]])
def test_cpu_partials_equal_full_attention(cuts):
    q, k, v = (randn(3, 13, 5, 24, seed=s) for s in (1, 2, 3))
    outs, lses = _partials(q, k, v, cuts)
    out, lse = merge_attention_partials(outs, lses)
    ref, ref_lse = oracle_attention(q, k, v)
    assert max_abs_err(out, ref) < 2e-6
    assert max_abs_err(lse, ref_lse) < 2e-5


def test_cpu_empty_partials_are_ignored_and_empty_rows_are_zero():
    q, k, v = (randn(2, 9, 3, 16, seed=s) for s in (4, 5, 6))
    outs, lses = _partials(q, k, v, [0, 10, 25])
    nan_part = torch.full_like(outs[0], float("nan"))
    empty_lse = torch.full_like(lses[0], float("-inf"))
    out, lse = merge_attention_partials([nan_part] + outs, [empty_lse] + lses, torch.float32)
    ref, _ = oracle_attention(q, k, v)
    assert max_abs_err(out, ref) < 2e-6
    out, lse = merge_attention_partials([nan_part, nan_part], [empty_lse, empty_lse])
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()


def test_bad_arguments():
    o = randn(1, 4, 2, 8, seed=1)
    lse = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match="same number"):
        merge_attention_partials([o, o], [lse])
    with pytest.raises(ValueError, match="at most 16"):
        merge_attention_partials([o] * 17, [lse] * 17)
    with pytest.raises(ValueError, match="lse 1"):
        merge_attention_partials([o, o], [lse, torch.zeros(1, 4, 2)])


def test_opcheck():
    o = [randn(2, 5, 3, 8, seed=s) for s in range(3)]
    lse = [randn(2, 3, 5, seed=10 + s) for s in range(3)]
    torch.library.opcheck(torch.ops.xdit_ops.merge_attention_partials.default,
                          (o, lse, torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [2, 4, 16])
def test_gpu_native_matches_reference(dtype, n):
    import xdit_ops._extension as ext

    assert ext.has("_C"), ext.reason("_C")
    B, S, H, D = 2, 1031, 6, 72
    outs = [randn(B, S, H, D, seed=i, dtype=dtype, device="cuda") for i in range(n)]
    lses = [randn(B, H, S, seed=100 + i, device="cuda", scale=4.0) for i in range(n)]
    # Partials with no keys in some rows: -inf LSE and NaN output there must be ignored.
    lses[0][:, :, :5] = float("-inf")
    outs[0][:, :5] = float("nan")
    for i in range(n):  # rows 5..7: no partial has a key
        lses[i][:, :, 5:8] = float("-inf")
    out, lse = merge_attention_partials(outs, lses, torch.bfloat16)
    ref, ref_lse = torch.ops.xdit_ops.merge_attention_partials.default(
        [o.cpu() for o in outs], [x.cpu() for x in lses], torch.float32)
    assert out.dtype == torch.bfloat16 and not torch.isnan(out).any()
    assert max_abs_err(out.cpu().float(), ref) <= 1e-2 * ref.abs().max().item() + 1e-3
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert max_abs_err(lse.cpu()[finite], ref_lse[finite]) < 1e-4
    assert torch.equal(out[:, 5:8].cpu(), torch.zeros_like(out[:, 5:8].cpu()))


# --------------------------------------------------------------- GPU: vector and scalar kernels
#
# On CUDA the op takes a vector kernel (16-byte accesses) where head_dim and the addresses allow
# it and the scalar kernel elsewhere; XDIT_OPS_MERGE_IMPL=scalar forces the scalar one. Both
# must match the reference and each other bit for bit (same fp32 expressions, same order).

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# |kernel - fp32 reference| for a result rounded to the output dtype (values of order 1).
OUT_TOLS = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _gpu_case(B, S, H, D, n, dtype, seed=0):
    """n partials on the GPU with masked rows: partial i has no keys (lse -inf, NaN data) in
    the rows s = i (mod n + 1), and no partial has a key in rows 1..2 (lse -inf everywhere)."""
    outs = [randn(B, S, H, D, seed=seed + i, dtype=dtype, device="cuda") for i in range(n)]
    lses = [randn(B, H, S, seed=seed + 100 + i, device="cuda", scale=4.0) for i in range(n)]
    for i in range(n):
        lses[i][:, :, i :: n + 1] = float("-inf")
        outs[i][:, i :: n + 1] = float("nan")
        lses[i][:, :, 1:3] = float("-inf")
        outs[i][:, 1:3] = float("nan")
    return outs, lses


def _merge_with(impl, outs, lses, out_dtype, monkeypatch):
    monkeypatch.setenv("XDIT_OPS_MERGE_IMPL", impl)
    out, lse = merge_attention_partials(outs, lses, out_dtype)
    torch.cuda.synchronize()
    return out, lse


def _check_against_reference(out, lse, outs, lses, out_dtype):
    ref, ref_lse = torch.ops.xdit_ops.merge_attention_partials.default(
        [o.cpu() for o in outs], [x.cpu() for x in lses], torch.float32)
    assert out.dtype == out_dtype and not torch.isnan(out).any()
    out, lse = out.cpu().float(), lse.cpu()
    tol = OUT_TOLS[out_dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=1e-5, atol=1e-4)
    # Rows 1..2: no keys anywhere -> 0 and -inf.
    assert torch.equal(out[:, 1:3], torch.zeros_like(out[:, 1:3]))
    assert torch.isneginf(lse[:, :, 1:3]).all()


def _assert_bit_equal(a, b):
    assert torch.equal(a[0], b[0]), (a[0].float() - b[0].float()).abs().max().item()
    assert torch.equal(a[1], b[1])


def _require_native():
    import xdit_ops._extension as ext

    assert ext.has("_C"), ext.reason("_C")


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 72, 80, 128, 256])
def test_gpu_head_dims_and_dtypes(D, in_dtype, out_dtype, monkeypatch):
    """B = 3, odd S, 3 partials: every head dim here takes the vector kernel (its rows are whole
    16-byte chunks); the scalar kernel gives the same bits."""
    _require_native()
    outs, lses = _gpu_case(3, 77, 5, D, 3, in_dtype, seed=D)
    vec = _merge_with("auto", outs, lses, out_dtype, monkeypatch)
    _check_against_reference(*vec, outs, lses, out_dtype)
    _assert_bit_equal(vec, _merge_with("scalar", outs, lses, out_dtype, monkeypatch))


@pytest.mark.gpu
@pytest.mark.parametrize("n", list(range(2, MAX_PARTIALS + 1)))
def test_gpu_number_of_partials(n, monkeypatch):
    """2..MAX_PARTIALS partials (the vector kernel loads them in groups of 4), bf16."""
    _require_native()
    outs, lses = _gpu_case(2, 333, 4, 128, n, torch.bfloat16, seed=7 * n)
    vec = _merge_with("auto", outs, lses, torch.bfloat16, monkeypatch)
    _check_against_reference(*vec, outs, lses, torch.bfloat16)
    _assert_bit_equal(vec, _merge_with("scalar", outs, lses, torch.bfloat16, monkeypatch))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_misaligned_partials_take_the_scalar_kernel(dtype, monkeypatch):
    """Contiguous partials starting one element past a 16-byte boundary cannot take 16-byte
    accesses: the op falls back to the scalar kernel, with the aligned (vector) result's bits."""
    _require_native()
    B, S, H, D = 3, 129, 5, 128
    outs, lses = _gpu_case(B, S, H, D, 4, dtype, seed=3)
    shifted = []
    for o in outs:
        buf = torch.empty(o.numel() + 1, dtype=dtype, device="cuda")
        view = buf[1:].view(B, S, H, D)
        view.copy_(o)
        assert view.is_contiguous() and view.data_ptr() % 16 != 0
        shifted.append(view)
    got = _merge_with("auto", shifted, lses, dtype, monkeypatch)
    _check_against_reference(*got, shifted, lses, dtype)
    _assert_bit_equal(got, _merge_with("auto", outs, lses, dtype, monkeypatch))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, D", [(torch.bfloat16, 36), (torch.float16, 20),
                                      (torch.float32, 6), (torch.bfloat16, 1)], ids=str)
def test_gpu_head_dims_without_whole_chunks(dtype, D, monkeypatch):
    """Rows that are not whole 16-byte chunks (36 x bf16 = 72 bytes) take the scalar kernel."""
    _require_native()
    outs, lses = _gpu_case(3, 41, 3, D, 2, dtype, seed=D)
    got = _merge_with("auto", outs, lses, torch.float32, monkeypatch)
    _check_against_reference(*got, outs, lses, torch.float32)


@pytest.mark.gpu
def test_gpu_unknown_merge_impl_is_refused(monkeypatch):
    _require_native()
    outs, lses = _gpu_case(1, 8, 2, 64, 2, torch.bfloat16)
    monkeypatch.setenv("XDIT_OPS_MERGE_IMPL", "vector")
    with pytest.raises(ValueError, match="XDIT_OPS_MERGE_IMPL=vector is not auto or scalar"):
        merge_attention_partials(outs, lses)
