"""``XDIT_OPS_FP8_IMPL=auto`` (the default): which CUDA implementation of fp8_attention runs.

CPU: explicit settings pass through, an unknown one is refused with the variable's name, and
``auto`` without a GPU resolves to Triton. Hopper: ``auto`` runs the sm90ws kernel at padded head
dim 128 and Triton at 64, bit for bit the output of the explicitly chosen implementation.
"""

from __future__ import annotations

import pytest
import torch

import xdit_ops
from xdit_ops.ops.fp8_attention import (
    IMPLS,
    cuda_scheme,
    resolve_impl,
    sm90_scheme,
    unusable_reason,
)
from xdit_ops.reference.fp8_attention import dit_like_qkv


def test_explicit_settings_pass_through():
    for impl in IMPLS:
        if impl != "auto":
            assert resolve_impl(torch.device("cuda", 0), 128, impl) == impl
            assert resolve_impl(None, 64, impl) == impl


def test_unknown_setting_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("XDIT_OPS_FP8_IMPL", "fast")
    why = unusable_reason(torch.device("cpu"), torch.bfloat16, 128)
    assert why is not None and "XDIT_OPS_FP8_IMPL='fast'" in why and "auto" in why


def test_auto_without_a_gpu_is_triton(monkeypatch):
    monkeypatch.delenv("XDIT_OPS_FP8_IMPL", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible (see the sm90 test)")
    assert resolve_impl(None, 128) == "triton"
    assert resolve_impl(torch.device("cpu"), 128) == "triton"
    from xdit_ops.triton.fp8_attention import attn_config, config_scheme

    assert cuda_scheme(128) == config_scheme(attn_config(128))


@pytest.mark.sm90
@pytest.mark.parametrize("D,expect", [(128, "sm90ws"), (96, "sm90ws"), (64, "triton")])
def test_auto_on_hopper(monkeypatch, D, expect):
    assert xdit_ops._extension.has("_C_sm90"), xdit_ops._extension.reason("_C_sm90")
    monkeypatch.delenv("XDIT_OPS_FP8_IMPL", raising=False)
    dev = torch.device("cuda", torch.cuda.current_device())
    assert resolve_impl(dev, D) == expect
    assert resolve_impl(None, D) == expect
    if expect == "sm90ws":
        assert cuda_scheme(D) == sm90_scheme("sm90ws")
    q, k, v = dit_like_qkv(2, 777, 3, D, seed=D, device="cuda")
    out, lse = xdit_ops.fp8_attention(q, k, v, return_lse=True)
    monkeypatch.setenv("XDIT_OPS_FP8_IMPL", expect)
    out_x, lse_x = xdit_ops.fp8_attention(q, k, v, return_lse=True)
    assert torch.equal(out, out_x) and torch.equal(lse, lse_x)
