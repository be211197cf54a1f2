"""``xdit_ops.merge_attention_states_``: the merge of partial attentions.

CPU: merging the attentions over two halves of the keys equals attention over all keys.
GPU (``gpu`` marker): the native kernel against the reference, fp32/fp16/bf16 blocks, strided
inputs and -inf rows.
"""

from __future__ import annotations

import pytest
import torch
from utils import dtype_tols, oracle_attention, randn

import xdit_ops
from xdit_ops import _extension
from xdit_ops.reference import attention_ref, merge_attention_states_ref

NEG_INF = float("-inf")


def _empty_acc(B, S, H, D, device="cpu"):
    out = torch.zeros(B, S, H, D, dtype=torch.float32, device=device)
    lse = torch.full((B, H, S), NEG_INF, dtype=torch.float32, device=device)
    return out, lse


@pytest.mark.parametrize("block_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("split", [1, 40, 76], ids=lambda s: f"split{s}")
def test_merge_halves_equals_full_attention(block_dtype, split):
    B, Sq, Sk, H, D = 3, 33, 77, 5, 72
    q = randn(B, Sq, H, D, dtype=block_dtype, seed=1)
    k = randn(B, Sk, H, D, dtype=block_dtype, seed=2)
    v = randn(B, Sk, H, D, dtype=block_dtype, seed=3)
    ref, ref_lse = oracle_attention(q, k, v)
    out, lse = _empty_acc(B, Sq, H, D)
    for lo, hi in ((0, split), (split, Sk)):
        blk, blk_lse = xdit_ops.attention(q, k[:, lo:hi], v[:, lo:hi], return_lse=True)
        assert blk.dtype == block_dtype
        xdit_ops.merge_attention_states_(out, lse, blk, blk_lse)
    # The blocks were rounded to block_dtype, so the merged result carries that rounding.
    tol = dtype_tols(block_dtype)
    torch.testing.assert_close(out.double(), ref, rtol=tol["rtol"] * 4, atol=tol["atol"] * 4)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


def test_merge_keeps_empty_rows():
    B, S, H, D = 2, 6, 3, 8
    out = randn(B, S, H, D, seed=4)
    lse = randn(B, H, S, seed=5)
    blk = randn(B, S, H, D, seed=6)
    blk_lse = randn(B, H, S, seed=7)
    lse[0, 1, 2] = NEG_INF  # accumulator empty: takes the block
    blk_lse[1, 2, 3] = NEG_INF  # block empty: accumulator unchanged
    lse[1, 0, 5] = NEG_INF  # both empty: unchanged, stays -inf, no NaN
    blk_lse[1, 0, 5] = NEG_INF
    out0, lse0 = out.clone(), lse.clone()
    xdit_ops.merge_attention_states_(out, lse, blk, blk_lse)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out[0, 2, 1], blk[0, 2, 1])
    assert lse[0, 1, 2] == blk_lse[0, 1, 2]
    torch.testing.assert_close(out[1, 3, 2], out0[1, 3, 2])
    torch.testing.assert_close(lse[1, 2, 3], lse0[1, 2, 3])
    assert torch.equal(out[1, 5, 0], out0[1, 5, 0]) and lse[1, 0, 5] == NEG_INF


def test_merge_of_masked_halves():
    # A key mask can empty one half for some batch entries: their rows must merge to the
    # attention over the other half alone.
    B, Sq, Sk, H, D = 2, 9, 20, 2, 16
    q, k, v = (randn(B, n, H, D, seed=s) for n, s in ((Sq, 1), (Sk, 2), (Sk, 3)))
    mask = torch.ones(B, Sk, dtype=torch.bool)
    mask[1, :10] = False
    ref, ref_lse = oracle_attention(q, k, v, key_mask=mask)
    out, lse = _empty_acc(B, Sq, H, D)
    for lo, hi in ((0, 10), (10, Sk)):
        blk, blk_lse = attention_ref(q, k[:, lo:hi], v[:, lo:hi], key_mask=mask[:, lo:hi])
        xdit_ops.merge_attention_states_(out, lse, blk, blk_lse)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "args, exc, pattern",
    [
        (lambda: (torch.zeros(1, 2, 3), torch.zeros(1, 3, 2), torch.zeros(1, 2, 3),
                  torch.zeros(1, 3, 2)), ValueError, r"merge_attention_states_: out and block_out"),
        (lambda: (torch.zeros(1, 2, 3, 4), torch.zeros(1, 3, 2), torch.zeros(1, 2, 3, 5),
                  torch.zeros(1, 3, 2)), ValueError, r"\(1, 2, 3, 5\) differ"),
        (lambda: (torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3), torch.zeros(1, 2, 3, 4),
                  torch.zeros(1, 3, 2)), ValueError,
         r"must be \[B, H, S\] = \(1, 3, 2\), got \(1, 2, 3\)"),
        (lambda: (torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16), torch.zeros(1, 3, 2),
                  torch.zeros(1, 2, 3, 4), torch.zeros(1, 3, 2)), TypeError,
         r"merge_attention_states_: out, lse and block_lse must be float32, got torch.bfloat16"),
    ],
    ids=["3d", "shape", "lse_shape", "dtype"],
)
def test_merge_bad_inputs(args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        xdit_ops.merge_attention_states_(*args())


def _merge_args(B, S, H, D, block_dtype, device, seed=0):
    out = randn(B, S, H, D, device=device, seed=seed)
    lse = randn(B, H, S, device=device, seed=seed + 1, scale=3.0)
    blk = randn(B, S, H, D, dtype=block_dtype, device=device, seed=seed + 2)
    blk_lse = randn(B, H, S, device=device, seed=seed + 3, scale=3.0)
    return out, lse, blk, blk_lse


def test_opcheck_cpu():
    torch.library.opcheck(torch.ops.xdit_ops.merge_attention_states_.default,
                          _merge_args(2, 5, 3, 8, torch.float32, "cpu"))


# ------------------------------------------------------------------------------------------ GPU


def _require_native():
    assert _extension.has("_C"), (
        f"the native merge kernel is not loaded on this GPU machine: {_extension.reason('_C')}"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("block_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shape", [(1, 4097, 24, 128), (3, 77, 30, 72), (2, 333, 5, 40), (1, 1, 1, 1)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_gpu_native_matches_reference(shape, block_dtype):
    _require_native()
    B, S, H, D = shape
    out, lse, blk, blk_lse = _merge_args(B, S, H, D, block_dtype, "cuda", seed=7)
    # -inf rows: accumulator empty, block empty, both empty.
    lse[:, :, ::5] = NEG_INF
    blk_lse[:, :, ::7] = NEG_INF
    ref_out, ref_lse = out.clone(), lse.clone()
    merge_attention_states_ref(ref_out, ref_lse, blk, blk_lse)
    xdit_ops.merge_attention_states_(out, lse, blk, blk_lse)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("block_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_native_strided(block_dtype):
    _require_native()
    B, S, H, D = 2, 300, 6, 64
    dev = "cuda"
    # out: a slice of a wider head_dim buffer; lse: a [B, S, H] buffer viewed as [B, H, S];
    # block_out: one third of a packed [B, S, 3, H, D] tensor; block_lse: a strided slice.
    out_buf = randn(B, S, H, D + 32, device=dev, seed=1)
    out = out_buf[..., 16 : 16 + D]
    lse = randn(B, S, H, device=dev, seed=2).transpose(1, 2)
    blk = randn(B, S, 3, H, D, dtype=block_dtype, device=dev, seed=3)[:, :, 1]
    blk_lse = randn(B, H, 2 * S, device=dev, seed=4)[:, :, ::2]
    lse[:, :, :3] = NEG_INF
    assert not (out.is_contiguous() or lse.is_contiguous() or blk.is_contiguous()
                or blk_lse.is_contiguous())
    ref_out, ref_lse = out.clone(), lse.clone()
    merge_attention_states_ref(ref_out, ref_lse, blk, blk_lse)
    guard = out_buf[..., :16].clone(), out_buf[..., 16 + D :].clone()
    xdit_ops.merge_attention_states_(out, lse, blk, blk_lse)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    # Nothing outside the view was written.
    assert torch.equal(out_buf[..., :16], guard[0])
    assert torch.equal(out_buf[..., 16 + D :], guard[1])


@pytest.mark.gpu
def test_gpu_merge_halves_equals_full_attention():
    _require_native()
    B, S, H, D = 1, 4097, 8, 128
    q, k, v = (randn(B, S, H, D, dtype=torch.bfloat16, device="cuda", seed=s) for s in (1, 2, 3))
    ref, ref_lse = oracle_attention(q, k, v)
    out, lse = _empty_acc(B, S, H, D, device="cuda")
    for lo, hi in ((0, 2000), (2000, S)):
        blk, blk_lse = xdit_ops.attention(q, k[:, lo:hi], v[:, lo:hi], return_lse=True)
        xdit_ops.merge_attention_states_(out, lse, blk, blk_lse)
    full = xdit_ops.attention(q, k, v)
    # The merged result is as close to the fp64 oracle as one full-length call, within 2x.
    err_merged = (out.double() - ref).abs().max().item()
    err_full = (full.double() - ref).abs().max().item()
    assert err_merged <= 2 * err_full + 1e-3, (err_merged, err_full)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=5e-2)


@pytest.mark.gpu
def test_gpu_bad_dtype_and_device():
    """The public functions check in Python ahead of the native launchers (a failing TORCH_CHECK
    there crashed the process on the GPU machine in run 31): the reference's exception types."""
    _require_native()
    out, lse, blk, blk_lse = _merge_args(1, 4, 2, 8, torch.float32, "cuda")
    with pytest.raises(TypeError, match="merge_attention_states_: out, lse and block_lse"):
        xdit_ops.merge_attention_states_(out.half(), lse, blk, blk_lse)
    with pytest.raises(ValueError, match="merge_attention_states_: tensors are on different"):
        xdit_ops.merge_attention_states_(out, lse, blk.cpu(), blk_lse)
    strided = torch.zeros(1, 4, 8, 2, device="cuda").transpose(2, 3)
    with pytest.raises(ValueError, match="merge_attention_states_: head_dim must be the"):
        xdit_ops.merge_attention_states_(out, lse, strided, blk_lse)
    outs, lses = [blk, blk], [blk_lse, blk_lse]
    with pytest.raises(ValueError, match="merge_attention_partials: partial 1 is not on"):
        xdit_ops.merge_attention_partials(outs, [blk_lse, blk_lse.cpu()])
    with pytest.raises(ValueError, match="merge_attention_partials: partial 1 and its lse must"):
        xdit_ops.merge_attention_partials([blk, strided], lses)
    with pytest.raises(ValueError, match="merge_attention_partials: lse 1 must be float32"):
        xdit_ops.merge_attention_partials(outs, [blk_lse, blk_lse.half()])


@pytest.mark.gpu
def test_opcheck_gpu():
    _require_native()
    torch.library.opcheck(torch.ops.xdit_ops.merge_attention_states_.default,
                          _merge_args(2, 65, 3, 64, torch.bfloat16, "cuda"))


# --------------------------------------------------- GPU: the vector and the scalar kernels
#
# The native op takes a vector kernel (16-byte accesses) where head_dim, addresses and strides
# allow it and the scalar kernel elsewhere; XDIT_OPS_MERGE_IMPL=scalar forces the scalar one.
# Both must match the reference, and each other bit for bit.


def _masked_merge_args(B, S, H, D, block_dtype, seed):
    """Merge arguments with every -inf case: an empty accumulator (NaN in it), an empty block
    (NaN in it) and rows where both are empty."""
    out, lse, blk, blk_lse = _merge_args(B, S, H, D, block_dtype, "cuda", seed=seed)
    lse[:, :, ::5] = NEG_INF
    out[:, ::5] = float("nan")
    blk_lse[:, :, ::7] = NEG_INF
    blk[:, ::7] = float("nan")
    return out, lse, blk, blk_lse


def _check_impls(make_acc, blk, blk_lse, monkeypatch):
    """Both kernels against the reference and each other. ``make_acc()`` returns a fresh
    accumulator ``(out, lse)``, the same values in the same layout at every call."""
    ref_out, ref_lse = make_acc()
    ref_out, ref_lse = ref_out.clone(), ref_lse.clone()
    empty_acc = torch.isneginf(ref_lse)
    merge_attention_states_ref(ref_out, ref_lse, blk, blk_lse)
    got = {}
    for impl in ("auto", "scalar"):
        monkeypatch.setenv("XDIT_OPS_MERGE_IMPL", impl)
        out, lse = make_acc()
        xdit_ops.merge_attention_states_(out, lse, blk, blk_lse)
        torch.cuda.synchronize()
        got[impl] = out, lse
    out, lse = got["auto"]
    # NaN survives only where accumulator and block are both empty (the row is left as it was).
    if torch.isnan(make_acc()[0]).any():
        both_empty = (empty_acc & torch.isneginf(blk_lse)).transpose(1, 2)
        assert torch.equal(torch.isnan(out).any(-1), both_empty)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, got["scalar"][0], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(lse, got["scalar"][1])


@pytest.mark.gpu
@pytest.mark.parametrize("block_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [64, 72, 80, 128, 256])
def test_gpu_head_dims_vector_and_scalar(D, block_dtype, monkeypatch):
    """B = 3, odd S: each head dim here takes the vector kernel (D / 8 or D / 4 threads a row:
    9 or 10 at 72 and 80, rows spanning warps)."""
    _require_native()
    out, lse, blk, blk_lse = _masked_merge_args(3, 77, 5, D, block_dtype, seed=D)
    _check_impls(lambda: (out.clone(), lse.clone()), blk, blk_lse, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("block_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("offset", [16, 1], ids=["aligned", "misaligned"])
def test_gpu_strided_views_vector_and_scalar(block_dtype, offset, monkeypatch):
    """Non-contiguous views: at a 16-element offset (64 bytes of fp32, strides multiples of 16
    bytes: the vector kernel) and at a 1-element offset (the scalar kernel)."""
    _require_native()
    B, S, H, D = 3, 101, 6, 128
    dev = "cuda"
    # out: a slice of a wider head_dim buffer; lse: a [B, S, H] buffer viewed as [B, H, S];
    # block_out: a slice of one third of a packed [B, S, 3, H, D + 8] tensor; block_lse: a
    # strided slice.
    out_buf = randn(B, S, H, D + 32, device=dev, seed=1)
    lse_buf = randn(B, S, H, device=dev, seed=2, scale=3.0)
    lse_buf.transpose(1, 2)[:, :, ::5] = NEG_INF
    blk_buf = randn(B, S, 3, H, D + 8, dtype=block_dtype, device=dev, seed=3)
    blk = blk_buf[:, :, 1, :, offset % 8 : offset % 8 + D]
    blk_lse = randn(B, H, 2 * S, device=dev, seed=4, scale=3.0)[:, :, ::2]
    blk_lse[:, :, ::7] = NEG_INF
    bufs = []

    def make_acc():
        bufs.append(out_buf.clone())
        return bufs[-1][..., offset : offset + D], lse_buf.clone().transpose(1, 2)

    out, lse = make_acc()
    assert not (out.is_contiguous() or lse.is_contiguous() or blk.is_contiguous()
                or blk_lse.is_contiguous())
    assert (out.data_ptr() % 16 == 0) == (offset == 16)
    assert (blk.data_ptr() % 16 == 0) == (offset == 16)
    _check_impls(make_acc, blk, blk_lse, monkeypatch)
    # Nothing outside the views was written (by either kernel).
    for buf in bufs:
        assert torch.equal(buf[..., :offset], out_buf[..., :offset])
        assert torch.equal(buf[..., offset + D :], out_buf[..., offset + D :])


@pytest.mark.gpu
def test_gpu_unknown_merge_impl_is_refused(monkeypatch):
    _require_native()
    monkeypatch.setenv("XDIT_OPS_MERGE_IMPL", "vector")
    with pytest.raises(ValueError, match="XDIT_OPS_MERGE_IMPL=vector is not auto or scalar"):
        xdit_ops.merge_attention_states_(*_merge_args(1, 4, 2, 8, torch.float32, "cuda"))
