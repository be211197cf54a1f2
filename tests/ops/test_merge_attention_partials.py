"""merge_attention_partials: N partial attentions over disjoint keys merge to the full one."""

from __future__ import annotations

import pytest
import torch

from tests.utils import max_abs_err, oracle_attention, randn
from xdit_ops.ops.merge_attention_states import merge_attention_partials
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
