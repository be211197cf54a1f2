"""``XDIT_OPS_FP8_IMPL=auto`` (the default): which CUDA implementation of fp8_attention runs.

CPU: explicit settings pass through, an unknown one is refused with the variable's name, and
``auto`` without a GPU resolves to Triton. Hopper: ``auto`` runs the sm90ws kernel at padded head
dim 128 and Triton at 64, bit for bit the output of the explicitly chosen implementation.
Likewise ``XDIT_OPS_FP8_FORMAT`` and ``XDIT_OPS_FP8_K_SCALE`` (``auto``: one K scale per
128-key tile where sm90ws' per-tile variant runs, padded head dims 64 and 128; per key
elsewhere).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import xdit_ops
from xdit_ops.ops.fp8_attention import (
    IMPLS,
    cuda_scheme,
    resolve_impl,
    resolve_k_scale,
    sm90_kernel_loaded,
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
@pytest.mark.parametrize("D,expect,k_scale", [(128, "sm90ws", "tile"), (96, "sm90ws", "tile"),
                                              (64, "sm90ws", "tile"), (40, "sm90ws", "tile")])
def test_auto_on_hopper(monkeypatch, D, expect, k_scale):
    """Both switches at auto (their defaults): sm90ws with one K scale per 128-key tile at
    padded head dims 128 and 64 (its per-tile variant; 3 consumer warpgroups at 64), bit for
    bit the output of the explicit settings; the scheme the GPU tests compare with follows."""

    assert xdit_ops._extension.has("_C_sm90"), xdit_ops._extension.reason("_C_sm90")
    assert sm90_kernel_loaded("sm90ws", "tile"), "xdit_ops._C_sm90 has no sm90ws ktile kernel"
    monkeypatch.delenv("XDIT_OPS_FP8_IMPL", raising=False)
    monkeypatch.delenv("XDIT_OPS_FP8_K_SCALE", raising=False)
    dev = torch.device("cuda", torch.cuda.current_device())
    assert resolve_impl(dev, D) == expect
    assert resolve_impl(None, D) == expect
    assert resolve_k_scale(expect, D) == k_scale
    import xdit_ops.ops.fp8_attention as fa

    monkeypatch.delenv(fa.CONSUMERS_ENV, raising=False)
    assert fa.resolve_consumers(expect, D, k_scale) == (3 if D <= 64 else 2)
    # per-key K scales (usp_attention's FP8 wire and ring, or XDIT_OPS_FP8_K_SCALE=token): at
    # padded head dim 64 Triton is the faster, so auto takes it there
    want_per_key = "triton" if D <= 64 else expect
    assert resolve_impl(dev, D, per_key=True) == want_per_key
    monkeypatch.setenv("XDIT_OPS_FP8_K_SCALE", "token")
    assert resolve_impl(dev, D) == want_per_key
    monkeypatch.delenv("XDIT_OPS_FP8_K_SCALE")
    if expect == "sm90ws":
        assert cuda_scheme(D) == sm90_scheme("sm90ws", k_scale, D)
    assert cuda_scheme(D).k_block == (128 if k_scale == "tile" else 1)
    q, k, v = dit_like_qkv(2, 777, 3, D, seed=D, device="cuda")
    out, lse = xdit_ops.fp8_attention(q, k, v, return_lse=True)
    monkeypatch.setenv("XDIT_OPS_FP8_IMPL", expect)
    monkeypatch.setenv("XDIT_OPS_FP8_K_SCALE", k_scale)
    out_x, lse_x = xdit_ops.fp8_attention(q, k, v, return_lse=True)
    assert torch.equal(out, out_x) and torch.equal(lse, lse_x)
    if k_scale == "tile":  # and the per-key setting is another computation
        monkeypatch.setenv("XDIT_OPS_FP8_K_SCALE", "token")
        assert not torch.equal(xdit_ops.fp8_attention(q, k, v), out)


@pytest.mark.sm90
@pytest.mark.parametrize("D", [64, 40])
def test_auto_k_scale_on_sm90ws_head_dim_64(monkeypatch, D):
    """XDIT_OPS_FP8_IMPL=sm90ws at padded head dim 64 (auto's implementation there too):
    the K-scale default (auto) is its per-tile variant, bit for bit the output of the explicit
    tile setting, and another computation than the per-key one."""
    assert xdit_ops._extension.has("_C_sm90"), xdit_ops._extension.reason("_C_sm90")
    assert sm90_kernel_loaded("sm90ws", "tile"), "xdit_ops._C_sm90 has no sm90ws ktile kernel"
    monkeypatch.setenv("XDIT_OPS_FP8_IMPL", "sm90ws")
    monkeypatch.delenv("XDIT_OPS_FP8_K_SCALE", raising=False)
    assert resolve_k_scale("sm90ws", D) == "tile"
    assert cuda_scheme(D) == sm90_scheme("sm90ws", "tile", D)
    q, k, v = dit_like_qkv(2, 777, 3, D, seed=D, device="cuda")
    out, lse = xdit_ops.fp8_attention(q, k, v, return_lse=True)
    monkeypatch.setenv("XDIT_OPS_FP8_K_SCALE", "tile")
    out_x, lse_x = xdit_ops.fp8_attention(q, k, v, return_lse=True)
    assert torch.equal(out, out_x) and torch.equal(lse, lse_x)
    monkeypatch.setenv("XDIT_OPS_FP8_K_SCALE", "token")
    assert not torch.equal(xdit_ops.fp8_attention(q, k, v), out)


@pytest.mark.gpu
def test_auto_k_scale_is_token_off_sm90ws(monkeypatch):
    """On any CUDA GPU, the Triton implementation under XDIT_OPS_FP8_K_SCALE=auto is its
    per-key computation, bit for bit, at both padded head dims."""
    why = unusable_reason(torch.device("cuda"), torch.bfloat16, 128, "triton")
    if why is not None:
        pytest.skip(why)
    monkeypatch.setenv("XDIT_OPS_FP8_IMPL", "triton")
    for D in (64, 128):
        q, k, v = dit_like_qkv(1, 300, 2, D, seed=D, device="cuda")
        monkeypatch.setenv("XDIT_OPS_FP8_K_SCALE", "auto")
        out, lse = xdit_ops.fp8_attention(q, k, v, return_lse=True)
        monkeypatch.setenv("XDIT_OPS_FP8_K_SCALE", "token")
        out_t, lse_t = xdit_ops.fp8_attention(q, k, v, return_lse=True)
        assert torch.equal(out, out_t) and torch.equal(lse, lse_t), D


# ---------------------------------------------------------------------------------------------
# XDIT_OPS_FP8_FORMAT: e4m3fn (OCP) or e4m3fnuz (AMD MI300's FP8).


def test_auto_format_is_fnuz_on_rocm_gfx94x_only():
    from xdit_ops.ops.fp8_attention import auto_format
    from xdit_ops.reference.fp8_attention import E4M3FN, E4M3FNUZ

    for arch in ("gfx942", "gfx942:sramecc+:xnack-", "gfx940", "gfx941"):
        assert auto_format(True, arch) is E4M3FNUZ, arch
    for hip, arch in ((True, "gfx950"), (True, "gfx90a"), (True, "gfx1201"), (True, None),
                      (False, None), (False, "gfx942")):
        assert auto_format(hip, arch) is E4M3FN, (hip, arch)


def test_format_setting(monkeypatch):
    from xdit_ops.ops.fp8_attention import FORMAT_ENV, FORMAT_SETTINGS, resolve_format
    from xdit_ops.reference.fp8_attention import E4M3FN, E4M3FNUZ

    assert FORMAT_ENV == "XDIT_OPS_FP8_FORMAT"
    assert FORMAT_SETTINGS == ("auto", "e4m3fn", "e4m3fnuz")
    monkeypatch.delenv(FORMAT_ENV, raising=False)
    cpu = torch.device("cpu")
    assert resolve_format(cpu) is E4M3FN and resolve_format(cpu, "auto") is E4M3FN
    if torch.version.hip is None:  # a CUDA (or CPU) build: auto is e4m3fn on any device
        assert resolve_format(torch.device("cuda", 0)) is E4M3FN
    assert resolve_format(cpu, "e4m3fnuz") is E4M3FNUZ
    monkeypatch.setenv(FORMAT_ENV, "e4m3fnuz")
    assert resolve_format(cpu) is E4M3FNUZ and resolve_format(None) is E4M3FNUZ
    assert resolve_format(cpu, "e4m3fn") is E4M3FN
    monkeypatch.setenv(FORMAT_ENV, "fp8")
    with pytest.raises(ValueError, match="fp8_attention: XDIT_OPS_FP8_FORMAT='fp8' is not one"):
        resolve_format(cpu)
    why = unusable_reason(cpu, torch.bfloat16, 64, "auto")
    assert why is not None and "XDIT_OPS_FP8_FORMAT='fp8'" in why and "e4m3fnuz" in why


@pytest.mark.skipif(torch.version.hip is not None, reason="a ROCm build of torch")
def test_fnuz_refused_by_the_nvidia_kernels(monkeypatch):
    """On a CUDA build, forcing e4m3fnuz leaves only the emulation: the sm_90a kernels take
    e4m3fn only and Triton's NVIDIA backend has no float8e4b8. Decided before any GPU query, so
    it runs without a GPU."""
    monkeypatch.setenv("XDIT_OPS_FP8_FORMAT", "e4m3fnuz")
    dev = torch.device("cuda", 0)
    for impl in ("sm90", "sm90ws"):
        why = unusable_reason(dev, torch.bfloat16, 128, impl)
        assert why is not None and f"XDIT_OPS_FP8_IMPL={impl}" in why and "e4m3fn only" in why
        assert "XDIT_OPS_FP8_FORMAT='e4m3fnuz'" in why
    why = unusable_reason(dev, torch.bfloat16, 128, "triton")
    assert why is not None and "no e4m3fnuz (float8e4b8)" in why
    assert unusable_reason(dev, torch.bfloat16, 128, "emulation") is None


def test_cuda_scheme_follows_the_format(monkeypatch):
    from xdit_ops.reference.fp8_attention import E4M3FNUZ, SCHEME, with_format
    from xdit_ops.triton.fp8_attention import attn_config, config_scheme

    monkeypatch.setenv("XDIT_OPS_FP8_FORMAT", "e4m3fnuz")
    monkeypatch.setenv("XDIT_OPS_FP8_IMPL", "emulation")
    assert cuda_scheme(128) == with_format(SCHEME, E4M3FNUZ)
    monkeypatch.setenv("XDIT_OPS_FP8_IMPL", "triton")
    scheme = cuda_scheme(72)
    assert scheme == config_scheme(attn_config(128), E4M3FNUZ)
    assert scheme.fp8 is E4M3FNUZ and scheme.p_shift == 7.0
    monkeypatch.setenv("XDIT_OPS_FP8_IMPL", "sm90ws")
    # e4m3fn, the kernel's only format; the K-scale default (auto) is per tile where the
    # per-tile variant is built (a build with the sm_90a module), per key otherwise
    k_scale = resolve_k_scale("sm90ws", 128)
    assert k_scale == ("tile" if sm90_kernel_loaded("sm90ws", "tile") else "token")
    assert cuda_scheme(128) == sm90_scheme("sm90ws", k_scale)
    monkeypatch.setenv("XDIT_OPS_FP8_K_SCALE", "token")
    assert cuda_scheme(128) == sm90_scheme("sm90ws")


def test_rocm_attention_configs():
    """ROCm builds use their own attention launch table (chosen by compiling for gfx942):
    64-key tiles, the op's scheme."""
    pytest.importorskip("triton")
    from xdit_ops.reference.fp8_attention import SCHEME
    from xdit_ops.triton.fp8_attention import (
        DEFAULT_CONFIGS,
        INTERPRET,
        ROCM_CONFIGS,
        attn_config,
        config_scheme,
    )

    assert set(ROCM_CONFIGS) == set(DEFAULT_CONFIGS) == {64, 128}
    assert all(config_scheme(c) == SCHEME for c in ROCM_CONFIGS.values())
    if not INTERPRET and torch.version.hip is not None:
        assert attn_config(128) == ROCM_CONFIGS[128]


# ---------------------------------------------------------------------------------------------
# XDIT_OPS_FP8_K_SCALE: one K scale per key (token), per 128-key tile (tile), or auto (the
# default): tile exactly where sm90ws' per-tile variant runs, token elsewhere.


def test_k_scale_setting(monkeypatch):
    from xdit_ops.ops.fp8_attention import (
        K_SCALE_ENV,
        K_SCALE_SETTINGS,
        k_scale_setting,
        with_k_scale,
    )
    from xdit_ops.reference.fp8_attention import SCHEME, scheme_variant

    assert K_SCALE_ENV == "XDIT_OPS_FP8_K_SCALE"
    assert K_SCALE_SETTINGS == ("auto", "token", "tile")
    monkeypatch.delenv(K_SCALE_ENV, raising=False)
    assert k_scale_setting() == "auto"
    assert with_k_scale(SCHEME, "token") is SCHEME
    assert with_k_scale(SCHEME, "tile") == scheme_variant(k_block=128)
    with pytest.raises(ValueError, match="fp8_attention: with_k_scale takes a K-scale "
                                         "granularity, 'token' or 'tile', got 'auto'"):
        with_k_scale(SCHEME, "auto")
    monkeypatch.setenv(K_SCALE_ENV, "tile")
    assert k_scale_setting() == "tile" and k_scale_setting("token") == "token"
    monkeypatch.setenv(K_SCALE_ENV, "channel")
    with pytest.raises(ValueError, match="fp8_attention: XDIT_OPS_FP8_K_SCALE='channel' is not "
                                         r"one of \('auto', 'token', 'tile'\)"):
        k_scale_setting()
    for dev in (torch.device("cpu"), torch.device("cuda", 0)):
        why = unusable_reason(dev, torch.bfloat16, 128, "triton")
        assert why is not None and "XDIT_OPS_FP8_K_SCALE='channel'" in why and "auto" in why
    q, k, v = dit_like_qkv(1, 8, 1, 64, seed=0)
    # The CPU op keeps SCHEME (the switch is the CUDA op's), so a bad value does not reach it.
    xdit_ops.fp8_attention(q, k, v)


# (implementation, head dim, whether the per-tile variant is registered) -> auto's granularity:
# tile only for sm90ws (padded head dim 64 or 128) with the variant.
_AUTO_K_SCALE = [
    ("sm90ws", 128, True, "tile"), ("sm90ws", 96, True, "tile"), ("sm90ws", 72, True, "tile"),
    ("sm90ws", 64, True, "tile"), ("sm90ws", 40, True, "tile"),
    ("sm90ws", 128, False, "token"), ("sm90ws", 64, False, "token"),
    ("triton", 128, True, "token"), ("sm90", 128, True, "token"),
    ("emulation", 128, True, "token"), ("triton", 64, False, "token"),
    ("triton", 64, True, "token"),
]


@pytest.mark.parametrize("impl,D,loaded,want", _AUTO_K_SCALE)
def test_auto_k_scale_resolution(monkeypatch, impl, D, loaded, want):
    """resolve_k_scale: auto's choice from (implementation, head dim, the variant's kernel
    registered). The kernel's registration is a build fact that a CPU install cannot have:
    the check is replaced by the value under test. token and tile pass through everywhere."""
    import xdit_ops.ops.fp8_attention as fa

    monkeypatch.setattr(fa, "sm90_kernel_loaded",
                        lambda impl="sm90", k_scale="token", loaded=loaded: loaded)
    monkeypatch.delenv(fa.K_SCALE_ENV, raising=False)
    assert fa.resolve_k_scale(impl, D) == want
    assert fa.resolve_k_scale(impl, D, "auto") == want
    monkeypatch.setenv(fa.K_SCALE_ENV, "auto")
    assert fa.resolve_k_scale(impl, D) == want
    for setting in ("token", "tile"):
        assert fa.resolve_k_scale(impl, D, setting) == setting
        monkeypatch.setenv(fa.K_SCALE_ENV, setting)
        assert fa.resolve_k_scale(impl, D) == setting
    monkeypatch.setenv(fa.K_SCALE_ENV, "per-key")
    with pytest.raises(ValueError, match="fp8_attention: XDIT_OPS_FP8_K_SCALE='per-key'"):
        fa.resolve_k_scale(impl, D)


def test_auto_k_scale_in_the_cuda_scheme(monkeypatch):
    """cuda_scheme (what the GPU tests compare the op with) follows auto's resolution: k_block
    128 for sm90ws (padded head dim 64 or 128) when the variant is registered, 1 elsewhere;
    the variant's row sums of the e4m3 P at padded head dim 64."""
    import xdit_ops.ops.fp8_attention as fa
    from xdit_ops.reference.fp8_attention import scheme_variant

    pytest.importorskip("triton")
    from xdit_ops.triton.fp8_attention import attn_config, config_scheme

    monkeypatch.delenv(fa.K_SCALE_ENV, raising=False)
    for loaded in (False, True):
        monkeypatch.setattr(fa, "sm90_kernel_loaded",
                            lambda impl="sm90", k_scale="token", loaded=loaded: loaded)
        monkeypatch.setenv("XDIT_OPS_FP8_IMPL", "sm90ws")
        k_block = 128 if loaded else 1
        assert fa.cuda_scheme(128) == scheme_variant(block_n=128, k_block=k_block)
        assert fa.cuda_scheme(72) == scheme_variant(block_n=128, k_block=k_block)
        # the per-tile kernels at padded head dim 64 add the e4m3 P in their row sums
        assert fa.cuda_scheme(64) == scheme_variant(block_n=128, k_block=k_block,
                                                    p8_row_sum=loaded)
        assert fa.cuda_scheme(40) == scheme_variant(block_n=128, k_block=k_block,
                                                    p8_row_sum=loaded)
        monkeypatch.setenv("XDIT_OPS_FP8_IMPL", "triton")
        assert fa.cuda_scheme(128) == config_scheme(attn_config(128))
        monkeypatch.setenv("XDIT_OPS_FP8_IMPL", "sm90")
        assert fa.cuda_scheme(128) == fa.SCHEME
        monkeypatch.setenv("XDIT_OPS_FP8_IMPL", "emulation")
        assert fa.cuda_scheme(128) == fa.SCHEME


def test_sm90_entry_points_take_a_granularity():
    """attention_quantized_sm90 and sm90_scheme take the granularity of the K scales they are
    given, token or tile: auto is refused by name (it is resolved by the op)."""
    from xdit_ops.ops.fp8_attention import attention_quantized_sm90, sm90_scheme
    from xdit_ops.reference.fp8_attention import in_pv_order, quantize_qkv_ref

    qq = in_pv_order(quantize_qkv_ref(*dit_like_qkv(1, 8, 1, 64, seed=0)))
    with pytest.raises(ValueError, match="fp8_attention: attention_quantized_sm90 takes a "
                                         "K-scale granularity, 'token' or 'tile', got 'auto'"):
        attention_quantized_sm90(qq, torch.bfloat16, impl="sm90ws", k_scale="auto")
    with pytest.raises(ValueError, match="got 'auto'"):
        sm90_scheme("sm90ws", "auto")


def test_cuda_scheme_follows_the_k_scale_switch(monkeypatch):
    """token leaves every implementation's scheme as it was; tile sets k_block=128 on each
    (sm90ws: its tile variant's scheme)."""
    from xdit_ops.reference.fp8_attention import SCHEME, scheme_variant

    pytest.importorskip("triton")
    from xdit_ops.triton.fp8_attention import attn_config, config_scheme

    expect = {"emulation": SCHEME, "sm90": SCHEME, "sm90ws": scheme_variant(block_n=128),
              "triton": config_scheme(attn_config(128))}
    for setting in ("token", "tile"):
        monkeypatch.setenv("XDIT_OPS_FP8_K_SCALE", setting)
        for impl, scheme in expect.items():
            monkeypatch.setenv("XDIT_OPS_FP8_IMPL", impl)
            want = replace(scheme, k_block=128) if setting == "tile" else scheme
            assert cuda_scheme(128) == want, (setting, impl)
    assert sm90_scheme("sm90ws") == scheme_variant(block_n=128)
    assert sm90_scheme("sm90ws", "tile") == scheme_variant(block_n=128, k_block=128)
    assert sm90_scheme("sm90", "tile") == scheme_variant(k_block=128)


# ---------------------------------------------------------------------------------------------
# XDIT_OPS_FP8_SM90_CONSUMERS: the consumer warpgroups of sm90ws' per-tile K-scale kernel, 2 or
# 3 (padded head dim 64 only); auto is 3 where it can be, else 2.


def test_consumers_setting(monkeypatch):
    import xdit_ops.ops.fp8_attention as fa

    assert fa.CONSUMERS_ENV == "XDIT_OPS_FP8_SM90_CONSUMERS"
    assert fa.CONSUMERS_SETTINGS == ("auto", "2", "3")
    monkeypatch.delenv(fa.CONSUMERS_ENV, raising=False)
    assert fa.consumers_setting() == "auto"
    for setting in ("auto", "2", "3"):
        monkeypatch.setenv(fa.CONSUMERS_ENV, setting)
        assert fa.consumers_setting() == setting
    assert fa.consumers_setting("2") == "2"
    for bad in ("4", "1", "three", "", " 3"):
        monkeypatch.setenv(fa.CONSUMERS_ENV, bad)
        with pytest.raises(ValueError, match=f"fp8_attention: XDIT_OPS_FP8_SM90_CONSUMERS={bad!r} "
                                             r"is not one of \('auto', '2', '3'\)"):
            fa.consumers_setting()
        with pytest.raises(ValueError, match="XDIT_OPS_FP8_SM90_CONSUMERS"):
            fa.resolve_consumers("sm90ws", 64, "tile")
        for dev in (torch.device("cpu"), torch.device("cuda", 0)):
            why = unusable_reason(dev, torch.bfloat16, 64, "sm90ws")
            assert why is not None and f"XDIT_OPS_FP8_SM90_CONSUMERS={bad!r}" in why, why
    # The CPU op has no consumer warpgroups: the switch is the CUDA op's, so a bad value does
    # not reach it.
    q, k, v = dit_like_qkv(1, 8, 1, 64, seed=0)
    xdit_ops.fp8_attention(q, k, v)


# (implementation, head dim, K-scale granularity, setting) -> consumers, or the error's text
_CONSUMERS = [
    ("sm90ws", 64, "tile", "auto", 3), ("sm90ws", 40, "tile", "auto", 3),
    ("sm90ws", 64, "token", "auto", 2), ("sm90ws", 64, "tile", "2", 2),
    ("sm90ws", 64, "tile", "3", 3), ("sm90ws", 40, "tile", "3", 3),
    ("sm90ws", 48, "tile", "3", 3),
    ("sm90ws", 128, "tile", "auto", 2), ("sm90ws", 128, "tile", "2", 2),
    ("sm90ws", 128, "tile", "3", "built for padded head dim 64 only"),
    ("sm90ws", 72, "tile", "3", "built for padded head dim 64 only"),
    ("sm90ws", 64, "token", "3", "per-tile K-scale kernel, but the K scales are per key"),
    ("sm90ws", 64, "token", "2", 2),
    # kernels without consumer warpgroups ignore it
    ("triton", 64, "tile", "3", 2), ("triton", 128, "token", "3", 2),
    ("sm90", 64, "token", "3", 2), ("emulation", 128, "tile", "3", 2),
]


@pytest.mark.parametrize("impl,D,k_scale,setting,want", _CONSUMERS)
def test_resolve_consumers(monkeypatch, impl, D, k_scale, setting, want):
    import xdit_ops.ops.fp8_attention as fa

    monkeypatch.setenv(fa.CONSUMERS_ENV, setting)
    for call in (lambda: fa.resolve_consumers(impl, D, k_scale),
                 lambda: fa.resolve_consumers(impl, D, k_scale, setting)):
        if isinstance(want, int):
            assert call() == want
        else:
            with pytest.raises(ValueError, match=f"fp8_attention: XDIT_OPS_FP8_SM90_CONSUMERS="
                                                 f"'3' .*{want}"):
                call()
    if setting != "auto":  # the argument overrides the variable
        monkeypatch.setenv(fa.CONSUMERS_ENV, "auto")
        auto = 3 if (impl, k_scale) == ("sm90ws", "tile") and D <= 64 else 2
        assert fa.resolve_consumers(impl, D, k_scale) == auto


def test_sm90_entry_points_take_a_consumer_count():
    """attention_quantized_sm90's consumers and ping_pong: what the per-tile kernel is built
    for (3 consumers at padded head dim 64; free issue with 3 and bfloat16 output), checked
    before any kernel runs."""
    from xdit_ops.ops.fp8_attention import attention_quantized_sm90
    from xdit_ops.reference.fp8_attention import in_pv_order, quantize_qkv_ref, scheme_variant

    tile = scheme_variant(k_block=128)
    qq64 = in_pv_order(quantize_qkv_ref(*dit_like_qkv(1, 8, 1, 40, seed=0), scheme=tile))
    qq128 = in_pv_order(quantize_qkv_ref(*dit_like_qkv(1, 8, 1, 96, seed=0), scheme=tile))
    bf16 = torch.bfloat16
    with pytest.raises(ValueError, match="fp8_attention: consumers=4: 2, or 3 with sm90ws' "
                                         "per-tile K-scale kernel"):
        attention_quantized_sm90(qq64, bf16, impl="sm90ws", k_scale="tile", consumers=4)
    with pytest.raises(ValueError, match="consumers=3: 2, or 3 with sm90ws' per-tile"):
        attention_quantized_sm90(qq64, bf16, impl="sm90ws", k_scale="token", consumers=3)
    with pytest.raises(ValueError, match="consumers=3: 2, or 3 with sm90ws' per-tile"):
        attention_quantized_sm90(qq64, bf16, impl="sm90", k_scale="tile", consumers=3)
    with pytest.raises(ValueError, match="consumers=3 is built for padded head dim 64 only, "
                                         "got 128"):
        attention_quantized_sm90(qq128, bf16, impl="sm90ws", k_scale="tile", consumers=3)
    with pytest.raises(ValueError, match="ping_pong=False is built for consumers=3 only"):
        attention_quantized_sm90(qq64, bf16, impl="sm90ws", k_scale="tile", consumers=2,
                                 ping_pong=False)
    with pytest.raises(ValueError, match=r"consumers=3 with ping_pong=True \(round robin\) is "
                                         "built for bfloat16 output only"):
        attention_quantized_sm90(qq64, torch.float16, impl="sm90ws", k_scale="tile",
                                 consumers=3, ping_pong=True)


def test_stats_setting(monkeypatch):
    """XDIT_OPS_FP8_STATS: ``sample`` (default) or ``exact``, read per call by the CPU and CUDA
    ops (the CPU op computes the scheme it names; a changed value is another fast-path key); an
    unknown value is refused by name."""
    import xdit_ops.ops.fp8_attention as fa
    from xdit_ops.reference.fp8_attention import (
        EXACT_STATS_SCHEME,
        SCHEME,
        fp8_attention_ref,
    )

    assert fa.STATS_ENV == "XDIT_OPS_FP8_STATS" and fa.STATS_SETTINGS == ("sample", "exact")
    monkeypatch.delenv(fa.STATS_ENV, raising=False)
    assert fa.stats_setting() == "sample" and fa.stats_sample() == SCHEME.stats_sample == 1024
    assert fa.with_stats(SCHEME) is SCHEME
    assert fa.with_stats(SCHEME, "exact") == EXACT_STATS_SCHEME
    q, k, v = dit_like_qkv(1, 1500, 1, 64, seed=2)  # past 1024 keys: the settings differ
    sampled = xdit_ops.fp8_attention(q, k, v)
    assert torch.equal(sampled, fp8_attention_ref(q, k, v, scheme=SCHEME)[0])
    x = torch.randn(1, 8, 2, 16)
    key = fa._fast_key(x, x, x, None, False)
    monkeypatch.setenv(fa.STATS_ENV, "exact")
    assert fa.stats_sample() == 0 and fa._fast_key(x, x, x, None, False) != key
    exact = xdit_ops.fp8_attention(q, k, v)
    assert torch.equal(exact, fp8_attention_ref(q, k, v, scheme=EXACT_STATS_SCHEME)[0])
    assert not torch.equal(exact, sampled)
    for bad in ("all", "", "Exact"):
        monkeypatch.setenv(fa.STATS_ENV, bad)
        with pytest.raises(ValueError, match=f"fp8_attention: XDIT_OPS_FP8_STATS={bad!r} "
                                             r"is not one of \('sample', 'exact'\)"):
            xdit_ops.fp8_attention(q, k, v)
