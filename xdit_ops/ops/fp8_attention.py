"""``xdit_ops::fp8_attention``: FP8/INT8 attention at SageAttention2-grade accuracy, BSHD.

The numerics (the quantization scheme) are defined once, in
:mod:`xdit_ops.reference.fp8_attention`, whose exact CPU emulation is the CPU kernel and the
oracle of the GPU kernels; docs/fp8_attention.md explains the scheme.

CUDA implementations, chosen by ``XDIT_OPS_FP8_IMPL`` (read per call):

``auto`` (default)    ``sm90ws`` where it can run and is the faster one: a Hopper (sm_90) GPU,
                      ``xdit_ops._C_sm90`` loaded with its kernel, padded head dim 128, and 64
                      with its per-tile K-scale kernel (3 consumer warpgroups; run 60, H100:
                      378.0 TFLOPS with quantization at (2,4250,24,64) against Triton's
                      326.7; not with per-key K scales, where Triton is the faster at 64).
                      ``triton`` otherwise.
``triton``            the Triton quantization pass + attention kernel
                      (:mod:`xdit_ops.triton.fp8_attention`).
``sm90``              the Triton quantization pass + the native sm_90a attention kernel
                      (``xdit_ops::fp8_attention_sm90_fwd`` from ``xdit_ops._C_sm90``; one
                      warpgroup, 64-key tiles; an error where it cannot run).
``sm90ws``            the Triton quantization pass + the warp-specialised sm_90a kernel
                      (``xdit_ops::fp8_attention_sm90ws_fwd``: TMA producer warp, two consumer
                      warpgroups in ping-pong, 128-key tiles; an error where it cannot run).
                      Its numerics are the scheme with ``block_n=128`` (:func:`sm90_scheme`),
                      as the Triton kernel's at head dim 128. It takes V^T with its keys in
                      the P.V key order (P.V reads P from registers), which the quantization
                      pass writes for it (``vt_pv_order=True``).
``emulation``         the CPU emulation's torch ops run on the GPU (slow; for debugging).

The FP8 format of V and P, chosen by ``XDIT_OPS_FP8_FORMAT`` (read per call,
:func:`resolve_format`): ``auto`` (default) is e4m3fnuz (AMD MI300's ``float8_e4m3fnuz``, max
240) on a ROCm gfx94x GPU and e4m3fn (OCP, max 448) everywhere else, the CPU included;
``e4m3fn`` or ``e4m3fnuz`` force one. The CPU kernel and ``emulation`` compute the scheme in
that format, the Triton kernels take it as a constexpr; the native sm_90a kernels take e4m3fn
only (e4m3fnuz is refused there), and Triton's NVIDIA backend has no e4m3fnuz type.

The K scale's granularity, chosen by ``XDIT_OPS_FP8_K_SCALE`` (read per call,
:func:`k_scale_setting`, resolved per call by :func:`resolve_k_scale`; the CUDA op only, the
CPU op keeps ``SCHEME``): ``token`` one scale per key, the op's scheme; ``tile`` one scale per
128-key tile from key 0 (the scheme with ``k_block=128``, :func:`cuda_scheme`): the
quantization pass writes it per key, equal within a tile, so every kernel computes it, and
``sm90ws`` (padded head dims 64 and 128) runs its variant that reads one scale per tile
(``xdit_ops::fp8_attention_sm90ws_ktile_fwd``: no per-score K-scale multiply; H100, run 44:
860/861 against 704/731 TFLOPS kernel-only at (1,16896,24,128)/(1,32760,40,128), rel L1 0.0086
against 0.0082; at (2,4250,24,64), run 49 on an H200: 370.4 against 325.7 kernel-only,
325.0 against 292.7 with quantization, below Triton's 331.1). ``auto`` (default) is ``tile``
exactly where that variant runs (the implementation resolves to ``sm90ws``, which ``auto``
picks at padded head dims 128 and 64, and ``xdit_ops._C_sm90`` has
``fp8_attention_sm90ws_ktile_fwd``) and ``token`` everywhere else (the Triton kernel,
``sm90``, ``emulation``). usp_attention's FP8 wire and ring quantize per key whatever the
setting (their kernels are called with per-key scales). An unknown setting is an error naming
the variable.

The statistics of the pass (the K mean and V's per-channel amax), chosen by
``XDIT_OPS_FP8_STATS`` (read per call, :func:`stats_setting`; the CPU and CUDA ops): ``sample``
(default since session 20) takes them from a strided sample of ~1024 keys past 1024 keys, V
with 4x headroom and each (batch, head) where a key exceeds it requantized with its exact
amax (the scheme's ``stats_sample``: the pass reads K and V once, not twice); ``exact`` from
every key (``stats_sample=0``, the scheme of sessions 1-19; usp_attention's FP8 wire and ring
always compute these, reduced across ranks). Both compute attention exactly up to
quantization error: any vector subtracted from the keys leaves the softmax unchanged and the
LSE correction adds it back, and no V value is clipped. An unknown value is an error naming the
variable.

The consumer warpgroups of sm90ws' per-tile K-scale kernel, chosen by
``XDIT_OPS_FP8_SM90_CONSUMERS`` (read per call, :func:`resolve_consumers`): ``2`` (128 query
rows per CTA, the two consumers in ping-pong) or ``3`` (192 rows, issuing freely; padded head
dim 64 only, as FlashAttention-3 at head dim 64: the kernel is bound by the exponentials there,
not the GEMMs); ``auto`` (default) is 3 at padded head dim 64 (run 60, H100: 446.5 against 372.3
TFLOPS kernel-only at (2,4250,24,64)) and 2 at 128. The outputs are the same bits either way.
Other kernels ignore it; ``3`` where the sm90ws kernel runs with per-key scales or at padded
head dim 128 is an error, and so is an unknown value.

The op is lossy by design (INT8 Q K^T, FP8 P.V), so ``attention(..., backend="auto")`` never
chooses it; ask for it with ``backend="fp8"`` or call :func:`fp8_attention`.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import replace

import torch

from xdit_ops import _extension
from xdit_ops.ops._lib import lib, plain_call
from xdit_ops.reference.fp8_attention import (
    E4M3FN,
    E4M3FNUZ,
    FP8_FORMATS,
    SCHEME,
    Fp8AttentionScheme,
    Fp8Format,
    cached_hadamard,
    fp8_attention_ref,
    padded_head_dim,
    with_format,
)

OP = "fp8_attention"
IMPLS = ("auto", "triton", "sm90", "sm90ws", "emulation")
# The native kernels and the xdit_ops::<op> each runs (same schema, same inputs).
SM90_IMPLS = {"sm90": "fp8_attention_sm90_fwd", "sm90ws": "fp8_attention_sm90ws_fwd"}
DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128
IMPL_ENV = "XDIT_OPS_FP8_IMPL"
FORMAT_ENV = "XDIT_OPS_FP8_FORMAT"
FORMAT_SETTINGS = ("auto", *FP8_FORMATS)
K_SCALE_ENV = "XDIT_OPS_FP8_K_SCALE"
K_SCALE_SETTINGS = ("auto", "token", "tile")
# Keys per K scale of each granularity (the scheme's k_block); "tile" is the sm90ws key tile.
K_SCALE_K_BLOCK = {"token": 1, "tile": 128}
# The sm90ws kernel with one K scale per 128-key tile (XDIT_OPS_FP8_K_SCALE=tile), built for
# the padded head dims below, both of the kernels' (csrc/cuda/sm90/
# fp8_attention_sm90_ws_tile_kernels.cu).
SM90WS_KTILE_OP = "fp8_attention_sm90ws_ktile_fwd"
SM90WS_KTILE_HEAD_DIMS = (64, 128)
# The consumer warpgroups of that kernel, chosen by XDIT_OPS_FP8_SM90_CONSUMERS (read per call,
# :func:`consumers_setting`, resolved by :func:`resolve_consumers`): 2 (128 query rows per
# CTA, in ping-pong) or 3 (192 rows, issuing freely; FlashAttention-3's count at head dim 64),
# built at the padded head dims below (csrc/cuda/sm90/fp8_attention_sm90_ws_tile3_kernels.cu).
# auto is 3 there (run 60, H100, (2,4250,24,64): 446.5 TFLOPS kernel-only against 372.3 with 2;
# 429.8 with 3 in round robin), 2 elsewhere.
STATS_ENV = "XDIT_OPS_FP8_STATS"
STATS_SETTINGS = ("sample", "exact")
CONSUMERS_ENV = "XDIT_OPS_FP8_SM90_CONSUMERS"
CONSUMERS_SETTINGS = ("auto", "2", "3")
# Every setting that decides what the op computes and launches (read per call): whatever keeps
# its launches (the fast path's key below, usp_attention's plan key: its call graphs hold the
# op) keys on these.
FP8_SETTING_ENVS = (IMPL_ENV, FORMAT_ENV, K_SCALE_ENV, CONSUMERS_ENV, STATS_ENV)
SM90WS_KTILE_C3_HEAD_DIMS = (64,)

lib.define(
    "fp8_attention(Tensor q, Tensor k, Tensor v, float? scale=None, bool return_lse=False) "
    "-> (Tensor, Tensor)"
)
# The sm_90a kernel on the quantization pass's output (QuantizedQKV); its CUDA kernel lives in
# xdit_ops._C_sm90 (csrc/cuda/sm90/fp8_attention_sm90.cpp).
# fp8_attention_sm90ws_fwd: the warp-specialised kernel (csrc/include/xdit_ops/
# fp8_attention_sm90_ws.cuh), same inputs and outputs, except that vt8 holds V^T in the P.V key
# order (xdit_ops.reference.fp8_attention.vt_to_pv_order).
# fp8_attention_sm90ws_ktile_fwd: the same with k_scale equal within every 128-key tile, and
# the number of its kernel's consumer warpgroups (2, or 3 at padded head dim 64) and whether
# they issue in turn (2: always; 3: freely, ping_pong=False, or in round robin for bfloat16
# output only, the A/B measurement).
_SM90_ARGS = ("Tensor q8, Tensor q_scale, Tensor k8, Tensor k_scale, Tensor vt8, "
              "Tensor v_scale, Tensor lse_corr, int seqlen_k, int head_dim, Tensor out_like, "
              "bool return_lse")
for _name in SM90_IMPLS.values():
    lib.define(f"{_name}({_SM90_ARGS}) -> (Tensor, Tensor)")
lib.define(f"{SM90WS_KTILE_OP}({_SM90_ARGS}, int consumers=2, bool ping_pong=True) "
           "-> (Tensor, Tensor)")


def _sm90_op_name(impl: str) -> str:
    """The xdit_ops op of the native kernel ``impl``; an error naming the op if there is none."""
    if impl not in SM90_IMPLS:
        raise ValueError(f"{OP}: unknown sm90 kernel {impl!r}; one of {tuple(SM90_IMPLS)}")
    return SM90_IMPLS[impl]


def sm90_kernel_loaded(impl: str = "sm90", k_scale: str = "token") -> bool:
    """Whether xdit_ops._C_sm90 registered the CUDA kernel of ``impl``'s op (``sm90``:
    ``fp8_attention_sm90_fwd``, ``sm90ws``: ``fp8_attention_sm90ws_fwd``; ``sm90ws`` with
    ``k_scale="tile"``: ``fp8_attention_sm90ws_ktile_fwd``)."""
    name = _sm90_op_name(impl)
    if k_scale == "tile" and impl == "sm90ws":
        name = SM90WS_KTILE_OP
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"xdit_ops::{name}", "CUDA")


def _setting(env: str, allowed: tuple[str, ...], setting: str | None) -> str:
    """``setting``, or the environment variable ``env`` (its default: ``allowed[0]``), checked
    against ``allowed``: anything else is a ValueError naming the op, the variable and the
    value."""
    if setting is None:
        setting = os.environ.get(env, allowed[0])
    if setting not in allowed:
        raise ValueError(f"{OP}: {env}={setting!r} is not one of {allowed}")
    return setting


def k_scale_setting(setting: str | None = None) -> str:
    """``XDIT_OPS_FP8_K_SCALE`` (read per call; ``setting`` overrides it): ``auto`` (default:
    :func:`resolve_k_scale` decides), ``token`` (one K scale per key) or ``tile`` (one per
    128-key tile); anything else is an error naming the op, the variable and the value."""
    return _setting(K_SCALE_ENV, K_SCALE_SETTINGS, setting)


def stats_setting(setting: str | None = None) -> str:
    """``XDIT_OPS_FP8_STATS`` (read per call; ``setting`` overrides it): ``sample`` (default:
    the scheme's strided sample past ``SCHEME.stats_sample`` keys) or ``exact`` (every key);
    anything else is an error naming the op, the variable and the value."""
    return _setting(STATS_ENV, STATS_SETTINGS, setting)


def stats_sample(setting: str | None = None) -> int:
    """The scheme's ``stats_sample`` under :func:`stats_setting`: ``SCHEME``'s, or 0
    (every key)."""
    return SCHEME.stats_sample if stats_setting(setting) == "sample" else 0


def with_stats(scheme: Fp8AttentionScheme, setting: str | None = None) -> Fp8AttentionScheme:
    """``scheme`` with the statistics of :func:`stats_setting` (``exact``: ``stats_sample``
    0)."""
    n = stats_sample(setting)
    return scheme if n == scheme.stats_sample else replace(scheme, stats_sample=n)


def _granularity(k_scale: str, what: str) -> str:
    """``k_scale`` if it is a granularity (``token`` or ``tile``); else an error naming the op,
    ``what`` takes it and the value (``auto`` is a setting, resolved by
    :func:`resolve_k_scale`)."""
    if k_scale_setting(k_scale) == "auto":
        raise ValueError(f"{OP}: {what} takes a K-scale granularity, 'token' or 'tile', got "
                         "'auto' (resolve_k_scale resolves the setting)")
    return k_scale


def resolve_k_scale(impl: str, head_dim: int, setting: str | None = None) -> str:
    """The K-scale granularity, ``token`` or ``tile``, that the CUDA op uses with the resolved
    implementation ``impl`` (:func:`resolve_impl`) at ``head_dim`` under ``setting`` (default:
    the current ``XDIT_OPS_FP8_K_SCALE``): ``token`` and ``tile`` as set; ``auto`` is ``tile``
    exactly where sm90ws' per-tile variant runs (``impl`` ``sm90ws``, padded head dim 64 or
    128, ``xdit_ops._C_sm90`` registered ``fp8_attention_sm90ws_ktile_fwd``), ``token``
    elsewhere. An unknown setting is an error naming the op, the variable and the value."""
    setting = k_scale_setting(setting)
    if setting != "auto":
        return setting
    if (impl == "sm90ws" and padded_head_dim(head_dim) in SM90WS_KTILE_HEAD_DIMS
            and sm90_kernel_loaded("sm90ws", "tile")):
        return "tile"
    return "token"


def consumers_setting(setting: str | None = None) -> str:
    """``XDIT_OPS_FP8_SM90_CONSUMERS`` (read per call; ``setting`` overrides it): ``auto``
    (default), ``2`` or ``3``; anything else is an error naming the op, the variable and the
    value."""
    return _setting(CONSUMERS_ENV, CONSUMERS_SETTINGS, setting)


def resolve_consumers(impl: str, head_dim: int, k_scale: str, setting: str | None = None
                      ) -> int:
    """The consumer warpgroups of sm90ws' per-tile K-scale kernel when the resolved
    implementation ``impl`` runs at ``head_dim`` with the K-scale granularity ``k_scale``
    (:func:`resolve_k_scale`) under ``setting`` (default: the current
    ``XDIT_OPS_FP8_SM90_CONSUMERS``): ``auto`` is 3 where that kernel runs at padded head dim
    64 (the faster count there, run 60) and 2 elsewhere, ``2`` and ``3`` as set. The setting
    is that kernel's only: the other kernels (Triton, ``sm90``, sm90ws with per-key scales)
    have no consumer count and ignore it (2 is returned), except that ``3`` with ``impl``
    sm90ws and per-key scales is an error, and so is ``3`` where the kernel runs at padded
    head dim 128 (3 consumers are built at 64 only).
    Errors name the op, the variable and the value."""
    setting = consumers_setting(setting)
    if setting == "auto":
        return 3 if (impl == "sm90ws" and _granularity(k_scale, "resolve_consumers") == "tile"
                     and padded_head_dim(head_dim) in SM90WS_KTILE_C3_HEAD_DIMS) else 2
    if setting != "3" or impl != "sm90ws":
        return 2
    if _granularity(k_scale, "resolve_consumers") != "tile":
        raise ValueError(f"{OP}: {CONSUMERS_ENV}='3' is a setting of sm90ws' per-tile K-scale "
                         f"kernel, but the K scales are per key here ({K_SCALE_ENV}="
                         f"{os.environ.get(K_SCALE_ENV, 'auto')!r})")
    dp = padded_head_dim(head_dim)
    if dp not in SM90WS_KTILE_C3_HEAD_DIMS:
        raise ValueError(f"{OP}: {CONSUMERS_ENV}='3' is built for padded head dim "
                         f"{SM90WS_KTILE_C3_HEAD_DIMS[0]} only (3 consumer warpgroups cannot "
                         f"hold the accumulators of {dp}), got head_dim {head_dim}")
    return 3


def with_k_scale(scheme: Fp8AttentionScheme, k_scale: str) -> Fp8AttentionScheme:
    """``scheme`` with the K-scale granularity ``k_scale`` (``token``: ``scheme`` itself;
    ``tile``: ``k_block=128``; ``auto`` is an error: resolve it first)."""
    k_block = K_SCALE_K_BLOCK[_granularity(k_scale, "with_k_scale")]
    return scheme if k_block == scheme.k_block else replace(scheme, k_block=k_block)


# Whether the native kernel takes V^T in the P.V key order (QuantizedQKV.vt_pv_order).
SM90_VT_PV_ORDER = {"sm90": False, "sm90ws": True}

# Keys per online-softmax tile (the kernels' kBlockN): part of the numerics (P is rounded
# relative to the running max of the tiles). sm90ws uses 128 at both head dims, like the Triton
# kernel's default at head dim 128 (csrc/include/xdit_ops/fp8_attention_sm90_ws.h).
SM90_BLOCK_N = {"sm90": 64, "sm90ws": 128}


# Padded head dims where sm90ws' per-tile kernels take the softmax's row sums from the tensor
# cores (P times 8 rows of ones appended to V^T), i.e. of the e4m3 P (the scheme's p8_row_sum):
# at 64, where that sped the kernel up (run 68, H100: 480.0 against 441.7 TFLOPS at
# (2,4250,24,64) with 3 consumers); at 128 it slowed it (847.2 against 876.4 at 16896).
SM90WS_KTILE_P8_ROW_SUM_HEAD_DIMS = (64,)


def sm90_scheme(impl: str = "sm90", k_scale: str = "token",
                head_dim: int = 128) -> Fp8AttentionScheme:
    """The scheme whose emulation (``fp8_attention_quantized_ref``) the native kernel ``impl``
    computes at ``head_dim``: the op's ``SCHEME`` with the kernel's key-tile width (``sm90``:
    64, the op's own; ``sm90ws``: 128), and with ``k_scale="tile"`` one K scale per 128-key tile
    (``k_block=128``; ``sm90ws``'s tile variant computes it up to the rounding of its folded
    exponent, ``fp8_attention_sm90_ws.h``), whose row sums at padded head dim 64 add the e4m3 P
    (``p8_row_sum``: :data:`SM90WS_KTILE_P8_ROW_SUM_HEAD_DIMS`). ``k_scale`` is a granularity
    (``token`` or ``tile``), not ``auto``."""
    _sm90_op_name(impl)
    scheme = with_k_scale(replace(SCHEME, block_n=SM90_BLOCK_N[impl]), k_scale)
    if (impl == "sm90ws" and scheme.k_block == SM90_BLOCK_N[impl]
            and padded_head_dim(head_dim) in SM90WS_KTILE_P8_ROW_SUM_HEAD_DIMS):
        scheme = replace(scheme, p8_row_sum=True)
    return scheme


def cuda_scheme(head_dim: int, device: torch.device | None = None) -> Fp8AttentionScheme:
    """The scheme whose emulation the CUDA op computes at ``head_dim`` on ``device`` (default:
    the current CUDA device) under the current ``XDIT_OPS_FP8_IMPL``, ``XDIT_OPS_FP8_FORMAT``
    ``XDIT_OPS_FP8_K_SCALE`` and ``XDIT_OPS_FP8_STATS``: the kernels' key-tile width sets the
    softmax block
    (``block_n``), so it can differ from the CPU op's ``SCHEME`` (the Triton kernel's 128-key
    tiles at head dim 128, the sm90ws kernel's), the FP8 format its ``fp8`` and ``p_shift``,
    the K-scale granularity (:func:`resolve_k_scale`) its ``k_block``."""
    impl = resolve_impl(device, head_dim)
    fmt = resolve_format(device)
    k_scale = resolve_k_scale(impl, head_dim)
    if impl == "emulation":
        return with_stats(with_k_scale(with_format(SCHEME, fmt), k_scale))
    if impl in SM90_IMPLS:
        return with_stats(sm90_scheme(impl, k_scale, head_dim))
    from xdit_ops.triton.fp8_attention import attn_config, config_scheme

    return with_stats(with_k_scale(config_scheme(attn_config(padded_head_dim(head_dim)), fmt),
                                   k_scale))


def _format_setting() -> str:
    """``XDIT_OPS_FP8_FORMAT`` (read per call, like ``XDIT_OPS_FP8_IMPL``)."""
    return os.environ.get(FORMAT_ENV, "auto")


def auto_format(hip: bool, arch: str | None) -> Fp8Format:
    """``XDIT_OPS_FP8_FORMAT=auto``'s choice: e4m3fnuz on ROCm (``hip``) with a gfx94x GPU
    (MI300: ``arch`` as torch's ``gcnArchName`` gives it, e.g. ``"gfx942:sramecc+:xnack-"``),
    whose FP8 matrix cores take e4m3fnuz only; e4m3fn otherwise (NVIDIA, gfx950 and later,
    CPU)."""
    return E4M3FNUZ if hip and arch is not None and arch.startswith("gfx94") else E4M3FN


def _rocm_arch(device: torch.device) -> str | None:
    """``gcnArchName`` of a ROCm GPU ``device``; None on CUDA builds and CPU. Read once per
    device index (it is asked on every call, some twice)."""
    if torch.version.hip is None or device.type != "cuda":
        return None
    return _arch_of(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _arch_of(index: int) -> str:
    return torch.cuda.get_device_properties(index).gcnArchName


def resolve_format(device: torch.device | None = None, setting: str | None = None
                   ) -> Fp8Format:
    """The FP8 format (:class:`~xdit_ops.reference.fp8_attention.Fp8Format`) the op uses on
    ``device`` (None: the current CUDA device if there is one, else the CPU) under ``setting``
    (default: the current ``XDIT_OPS_FP8_FORMAT``): ``e4m3fn`` and ``e4m3fnuz`` as named,
    ``auto`` by :func:`auto_format`. An unknown setting is an error naming the variable."""
    if setting is None:
        setting = _format_setting()
    if setting not in FORMAT_SETTINGS:
        raise ValueError(f"{OP}: {FORMAT_ENV}={setting!r} is not one of {FORMAT_SETTINGS}")
    if setting != "auto":
        return FP8_FORMATS[setting]
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch = _rocm_arch(device)
    return auto_format(arch is not None, arch)


def _impl() -> str:
    """``XDIT_OPS_FP8_IMPL`` (read per call: tests and benchmarks switch it in one process)."""
    return os.environ.get(IMPL_ENV, "auto")


@functools.cache
def _sm90ws_runs_on(device_index: int) -> bool:
    """Whether the sm90ws kernel can run on CUDA device ``device_index`` (fixed per process)."""
    return (torch.cuda.get_device_capability(device_index) == (9, 0)
            and _extension.has("_C_sm90") and sm90_kernel_loaded("sm90ws"))


def resolve_impl(device: torch.device | None, head_dim: int, setting: str | None = None,
                 per_key: bool = False) -> str:
    """The CUDA implementation that runs for (``device``, ``head_dim``) under ``setting``
    (default: the current ``XDIT_OPS_FP8_IMPL``; ``device`` None: the current CUDA device, if
    there is one): ``auto`` becomes ``sm90ws`` on a Hopper (sm_90) GPU whose
    ``xdit_ops._C_sm90`` has the kernel, at padded head dim 128, and at 64 where it has the
    per-tile K-scale kernel (3 consumer warpgroups: run 60, H100, (2,4250,24,64), 378.0 TFLOPS
    with quantization against Triton's 326.7) unless the K scales are per key (``per_key``: the
    caller's quantization, as usp_attention's FP8 wire and ring; or ``XDIT_OPS_FP8_K_SCALE=
    token``), where Triton is the faster (run 49: 331.1 against sm90ws' 292.7), and
    ``triton`` otherwise; any other setting is returned as it is (checked by
    :func:`unusable_reason`)."""
    if setting is None:
        setting = _impl()
    if setting != "auto":
        return setting
    if device is None:
        if not torch.cuda.is_available():
            return "triton"
        device = torch.device("cuda")
    dp = padded_head_dim(head_dim)
    if device.type != "cuda" or torch.version.hip is not None or dp not in (64, 128):
        return "triton"
    if dp == 64 and (per_key or os.environ.get(K_SCALE_ENV, "auto") == "token"
                     or not sm90_kernel_loaded("sm90ws", "tile")):
        return "triton"
    index = torch.cuda.current_device() if device.index is None else device.index
    return "sm90ws" if _sm90ws_runs_on(index) else "triton"


def unusable_reason(device: torch.device, dtype: torch.dtype, head_dim: int,
                    impl: str | None = None) -> str | None:
    """Why the FP8 attention cannot run on (device, dtype, head_dim) with the CUDA
    implementation ``impl`` (default: the current ``XDIT_OPS_FP8_IMPL``; ``auto`` is resolved
    by :func:`resolve_impl`); None when it can."""
    if impl is None:
        impl = _impl()
    if impl not in IMPLS:
        return f"XDIT_OPS_FP8_IMPL={impl!r} is not one of {IMPLS}"
    if _format_setting() not in FORMAT_SETTINGS:
        return f"{FORMAT_ENV}={_format_setting()!r} is not one of {FORMAT_SETTINGS}"
    k_scale = os.environ.get(K_SCALE_ENV, "auto")
    if k_scale not in K_SCALE_SETTINGS:
        return f"{K_SCALE_ENV}={k_scale!r} is not one of {K_SCALE_SETTINGS}"
    consumers = os.environ.get(CONSUMERS_ENV, "auto")
    if consumers not in CONSUMERS_SETTINGS:
        return f"{CONSUMERS_ENV}={consumers!r} is not one of {CONSUMERS_SETTINGS}"
    if dtype not in DTYPES:
        return f"fp8 attention takes float16/bfloat16, got {dtype}"
    if head_dim < 1 or head_dim > MAX_HEAD_DIM:
        return f"fp8 attention supports head_dim 1..{MAX_HEAD_DIM}, got {head_dim}"
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"fp8 attention runs on CPU or CUDA, got device {device}"
    impl = resolve_impl(device, head_dim, impl)
    if impl == "emulation":
        return None
    fmt = resolve_format(device)
    if impl in SM90_IMPLS and fmt != E4M3FN:
        return (f"XDIT_OPS_FP8_IMPL={impl}: the native sm_90a kernels take e4m3fn only, got "
                f"{FORMAT_ENV}={_format_setting()!r} ({fmt.name})")
    if torch.version.hip is not None:
        arch = _rocm_arch(device)
        if impl in SM90_IMPLS:
            return f"XDIT_OPS_FP8_IMPL={impl} needs a Hopper (sm_90) GPU, got ROCm {arch}"
        if not arch.startswith(("gfx94", "gfx95")):
            return (f"fp8 attention's kernels need FP8 matrix cores (gfx94x MI300 or gfx950), "
                    f"got {arch}")
    else:
        if fmt != E4M3FN:
            return (f"{FORMAT_ENV}={_format_setting()!r}: Triton's NVIDIA backend has no "
                    f"{fmt.name} ({fmt.triton_dtype}); use e4m3fn or auto, or "
                    "XDIT_OPS_FP8_IMPL=emulation")
        capability = torch.cuda.get_device_capability(device.index or 0)
        if capability < (8, 9):
            return "fp8 attention's kernels need FP8 tensor cores (sm_89 or newer)"
    if impl in SM90_IMPLS:
        if capability != (9, 0):
            return f"XDIT_OPS_FP8_IMPL={impl} needs a Hopper (sm_90) GPU"
        if not _extension.has("_C_sm90"):
            return f"XDIT_OPS_FP8_IMPL={impl} but xdit_ops._C_sm90 is not loaded: " \
                   f"{_extension.reason('_C_sm90')}"
        if not sm90_kernel_loaded(impl):
            return f"XDIT_OPS_FP8_IMPL={impl}: xdit_ops._C_sm90 has no {SM90_IMPLS[impl]} kernel"
        # (auto is tile only where the variant is loaded: resolve_k_scale)
        if k_scale == "tile" and not sm90_kernel_loaded(impl, k_scale):
            return (f"XDIT_OPS_FP8_IMPL={impl} with {K_SCALE_ENV}=tile: xdit_ops._C_sm90 has "
                    f"no {SM90WS_KTILE_OP} kernel (rebuild)")
    try:
        import triton  # noqa: F401  (the quantization pass is Triton for both implementations)
    except ImportError as exc:
        return f"fp8 attention's CUDA path needs Triton: {exc}"
    return None


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    from xdit_ops.ops.attention import check_inputs as check_attention_inputs

    check_attention_inputs(q, k, v, op=OP)
    if q.dtype not in DTYPES:
        raise TypeError(f"{OP}: takes float16/bfloat16 tensors, got {q.dtype}")
    D = q.shape[-1]
    if D > MAX_HEAD_DIM:
        raise ValueError(f"{OP}: head_dim {D} is not supported (at most {MAX_HEAD_DIM})")
    if v.shape[-1] != D:
        raise ValueError(f"{OP}: value head_dim {v.shape[-1]} must equal query head_dim {D}")


def _empty_lse(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty((0,), dtype=torch.float32)


def _finish(q, out, lse, return_lse):
    if not return_lse:
        return out, _empty_lse(q)
    return out, lse


def _fp8_attention_cpu(q, k, v, scale=None, return_lse=False):
    check_inputs(q, k, v)
    out, lse = fp8_attention_ref(q, k, v, scale,
                                 with_stats(with_format(SCHEME, resolve_format(q.device))))
    return _finish(q, out, lse, return_lse)


# The CUDA op's fast path: a call whose key (below) was seen before replays the first call's
# launches (xdit_ops.triton.launch.Replay: the quantization pass's three compiled Triton
# kernels with this call's tensors, its outputs carved again from one buffer) and calls the
# native kernel, skipping the checks, the settings' resolution and the launchers' Python, which
# the key's parts decide. XDIT_OPS_FP8_FAST_PATH=0 turns it off (read per call).
FAST_PATH_ENV = "XDIT_OPS_FP8_FAST_PATH"
# Every setting the CUDA op reads: part of the key, so a changed setting is a new key.
_KEY_SETTINGS = (*FP8_SETTING_ENVS, FAST_PATH_ENV)
# Keys kept (shapes of a serving process are few; past this many, start again).
FAST_PATH_MAX_KEYS = 256
_FAST: dict[tuple, tuple] = {}


def _fast_key(q, k, v, scale, return_lse) -> tuple | None:
    """What decides every argument of the op's launches: shapes, strides, dtypes, the devices,
    the inputs' addresses modulo 16 (Triton specializes on 16-byte alignment), which inputs are
    the same tensor (the recording maps arguments to inputs by identity: a key first seen as
    (x, x, x) must not replay (q, k, v)), the scale, the LSE flag and the settings; None when
    the fast path is off or an input is a tensor subclass."""
    env = os.environ
    settings = tuple(env.get(name) for name in _KEY_SETTINGS)
    fast = settings[-1]
    if fast is not None and fast != "1":
        if fast != "0":
            raise ValueError(f"{OP}: {FAST_PATH_ENV}={fast!r} is not one of ('0', '1')")
        return None
    if type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(v) is not torch.Tensor:
        return None
    return (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype,
            v.dtype, q.device, k.device, v.device, q.data_ptr() % 16, k.data_ptr() % 16,
            v.data_ptr() % 16, k is q, v is q, v is k, scale, return_lse, settings)


def _fast_call(entry, q, k, v):
    replay, op, rest, return_lse, carve, on_device = entry
    with on_device(q.device):
        qq = replay.run((q, k, v), carve)
        out, lse = op(*qq, *rest)
    return _finish(q, out, lse, return_lse)


def _fp8_attention_cuda(q, k, v, scale=None, return_lse=False):
    key = _fast_key(q, k, v, scale, return_lse)
    if key is not None:
        entry = _FAST.get(key)
        if entry is not None:
            return _fast_call(entry, q, k, v)
    check_inputs(q, k, v)
    # a bad XDIT_OPS_FP8_SM90_CONSUMERS is a ValueError naming it (read once: used below)
    consumers_sw = consumers_setting()
    n_sample = stats_sample()
    # once per call: the check and the dispatch below see the same value
    impl = resolve_impl(q.device, q.shape[-1])
    why = unusable_reason(q.device, q.dtype, q.shape[-1], impl)
    if why is not None:
        raise RuntimeError(f"{OP}: cannot run here: {why}")
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    if Sq == 0 or Sk == 0:
        out = q.new_zeros(B, Sq, H, D)
        lse = q.new_full((B, H, Sq), float("-inf"), dtype=torch.float32)
        return _finish(q, out, lse, return_lse)
    fmt = resolve_format(q.device)
    k_scale = resolve_k_scale(impl, D)
    k_block = K_SCALE_K_BLOCK[k_scale]
    if impl == "emulation":
        scheme = with_k_scale(with_format(SCHEME, fmt), k_scale)
        out, lse = fp8_attention_ref(q, k, v, scale, replace(scheme, stats_sample=n_sample))
        return _finish(q, out, lse, return_lse)
    from xdit_ops.triton.fp8_attention import (
        _on_device,
        _quantize_qkv,
        carve,
        fp8_attention_triton,
    )
    from xdit_ops.triton.launch import Replay, recording

    if impl in SM90_IMPLS:
        consumers = resolve_consumers(impl, D, k_scale, consumers_sw)
        # direct: this is the op's CUDA kernel on real tensors; the pass needs no op of its own
        with recording() as log:
            qq = _quantize_qkv(q, k, v, scale, SM90_VT_PV_ORDER[impl], fmt, k_block, direct=True,
                               stats_sample=n_sample)
        op, rest = _sm90_call(qq, q.dtype, return_lse, impl, k_scale, consumers, None)
        tensors = (qq.q, qq.q_scale, qq.k, qq.k_scale, qq.vt, qq.v_scale, qq.lse_corr)
        out, lse = op(*tensors, *rest)
        if key is not None:
            had = cached_hadamard(padded_head_dim(D), q.dtype, q.device)
            replay = Replay.build(log, (q, k, v), (had,), tensors, q.device)
            if replay is not None:
                if len(_FAST) >= FAST_PATH_MAX_KEYS:
                    _FAST.clear()
                _FAST[key] = (replay, op, rest, return_lse, carve, _on_device)
    else:
        out, lse = fp8_attention_triton(q, k, v, scale, return_lse, fp8_format=fmt,
                                        k_block=k_block, stats_sample=n_sample)
    return _finish(q, out, lse, return_lse)


def _sm90_call(qq, out_dtype: torch.dtype, return_lse: bool, impl: str, k_scale: str,
               consumers: int, ping_pong: bool | None):
    """:func:`attention_quantized_sm90`'s checks; returns the native op and its arguments after
    the seven tensors of ``qq`` (q, q_scale, k, k_scale, vt, v_scale, lse_corr)."""
    name = _sm90_op_name(impl)
    ktile = _granularity(k_scale, "attention_quantized_sm90") == "tile" and impl == "sm90ws"
    if ktile:
        name = SM90WS_KTILE_OP
    if consumers not in (2, 3) or (consumers == 3 and not ktile):
        raise ValueError(f"{OP}: consumers={consumers!r}: 2, or 3 with sm90ws' per-tile K-scale "
                         f"kernel (impl='sm90ws', k_scale='tile'; got {impl!r}, {k_scale!r})")
    if consumers == 3 and qq.q.shape[-1] not in SM90WS_KTILE_C3_HEAD_DIMS:
        raise ValueError(f"{OP}: consumers=3 is built for padded head dim "
                         f"{SM90WS_KTILE_C3_HEAD_DIMS[0]} only, got {qq.q.shape[-1]}")
    if ping_pong is None:
        ping_pong = consumers == 2
    if not ping_pong and consumers != 3:
        raise ValueError(f"{OP}: ping_pong=False is built for consumers=3 only, got "
                         f"consumers={consumers}")
    if ping_pong and consumers == 3 and out_dtype != torch.bfloat16:
        raise ValueError(f"{OP}: consumers=3 with ping_pong=True (round robin) is built for "
                         f"bfloat16 output only, got {out_dtype}")
    op = getattr(torch.ops.xdit_ops, name).default
    if qq.vt.dtype != E4M3FN.dtype:
        raise ValueError(f"{OP}: the {impl} kernel takes e4m3fn V^T ({E4M3FN.dtype}), got "
                         f"{qq.vt.dtype} (XDIT_OPS_FP8_FORMAT={_format_setting()!r})")
    if qq.vt_pv_order != SM90_VT_PV_ORDER[impl]:
        want, got = ("the P.V key order", "key order") if SM90_VT_PV_ORDER[impl] else (
            "key order", "the P.V key order")
        raise ValueError(f"{OP}: the {impl} kernel takes V^T in {want}, got one in {got} "
                         f"(QuantizedQKV.vt_pv_order={qq.vt_pv_order})")
    like = qq.q_scale.new_empty(0, dtype=out_dtype)
    rest = (qq.seqlen_k, qq.head_dim, like, return_lse) + ((consumers, ping_pong) if ktile else ())
    return op, rest


def attention_quantized_sm90(qq, out_dtype: torch.dtype, return_lse: bool = True,
                             impl: str = "sm90", k_scale: str = "token", consumers: int = 2,
                             ping_pong: bool | None = None):
    """A native sm_90a kernel on a :class:`~xdit_ops.reference.fp8_attention.QuantizedQKV`:
    (out [B, Sq, H, D] ``out_dtype``, lse [B, H, Sq] fp32 or [B, H, 0]).

    ``impl``: ``"sm90"`` (one warpgroup per 64 query rows, 64-key tiles) or ``"sm90ws"``
    (warp-specialised: TMA producer, two consumer warpgroups per 128 rows, 128-key tiles). Each
    computes the emulation of :func:`sm90_scheme` (impl). ``sm90ws`` takes ``qq.vt`` in the P.V
    key order (``qq.vt_pv_order``: :func:`~xdit_ops.reference.fp8_attention.in_pv_order`),
    ``sm90`` in key order; the other layout is an error, and so is V^T in any FP8 format but
    e4m3fn.

    ``k_scale="tile"``: ``qq.k_scale`` is equal within every 128-key tile (the quantization
    pass with ``k_block=128``; not checked: the kernel reads each tile's first scale); for
    ``sm90ws`` (padded head dim 64 or 128) it runs the per-tile K-scale variant
    (``fp8_attention_sm90ws_ktile_fwd``), for ``sm90`` its per-key kernel (per-key scales,
    these included). It computes the emulation of :func:`sm90_scheme` (impl, k_scale). ``k_scale``
    is the granularity of ``qq``'s K scales (``auto`` is an error: the caller knows it).

    ``consumers``: the per-tile variant's consumer warpgroups, 2 (128 query rows per CTA) or 3
    (192 rows; padded head dim 64 only; ``XDIT_OPS_FP8_SM90_CONSUMERS`` chooses it for the op):
    the same output bits either way. ``ping_pong``: whether the consumers issue their GEMMs in
    turn; None (default) is the built order of the count: 2 in turn (ping-pong), 3 freely (the
    faster, run 60); 3 in turn (round robin, ``ping_pong=True``) is built for bfloat16 output
    only (the A/B measurement). Any other kernel takes ``consumers=2`` only."""
    op, rest = _sm90_call(qq, out_dtype, return_lse, impl, k_scale, consumers, ping_pong)
    return op(qq.q, qq.q_scale, qq.k, qq.k_scale, qq.vt, qq.v_scale, qq.lse_corr, *rest)


lib.impl(OP, _fp8_attention_cpu, "CPU")
lib.impl(OP, _fp8_attention_cuda, "CUDA")


@torch.library.register_fake("xdit_ops::fp8_attention")
def _fp8_attention_fake(q, k, v, scale=None, return_lse=False):
    check_inputs(q, k, v)
    B, Sq, H, D = q.shape
    out = q.new_empty((B, Sq, H, D))
    lse = q.new_empty((B, H, Sq), dtype=torch.float32) if return_lse else _empty_lse(q)
    return out, lse


def _fp8_attention_sm90_fwd_fake(q8, q_scale, k8, k_scale, vt8, v_scale, lse_corr, seqlen_k,
                                 head_dim, out_like, return_lse, consumers=2, ping_pong=True):
    B, H, Sq, _ = q8.shape
    out = q8.new_empty((B, Sq, H, head_dim), dtype=out_like.dtype)
    lse = q8.new_empty((B, H, Sq if return_lse else 0), dtype=torch.float32)
    return out, lse


for _name in (*SM90_IMPLS.values(), SM90WS_KTILE_OP):
    torch.library.register_fake(f"xdit_ops::{_name}")(_fp8_attention_sm90_fwd_fake)


def fp8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with INT8 Q K^T and FP8 P.V (SageAttention2-grade accuracy), BSHD.

    Q and K are Hadamard-rotated along head_dim, K is smoothed (its mean over keys removed,
    exact for softmax; the LSE is corrected), both are INT8 per token; V is FP8 e4m3 per
    channel; P is 2^8-scaled before its FP8 cast; P.V is accumulated in two levels of fp32.
    The FP8 format is e4m3fn, or e4m3fnuz (max 240, P 2^7-scaled) on AMD MI300 or where
    ``XDIT_OPS_FP8_FORMAT`` says so (:func:`resolve_format`).
    Head dims 64 and 128 run natively, others up to 128 are zero-padded (exact).

    Parameters
    ----------
    q : [B, Sq, H, D] float16/bfloat16, D <= 128, head_dim contiguous.
    k, v : [B, Sk, H, D], same dtype and device as ``q``.
    scale : softmax scale; default ``1/sqrt(D)`` (the true D, not the padded one).
    return_lse : also return the natural-log LSE of each query row (for ring-attention merges).

    Returns
    -------
    out : [B, Sq, H, D] in ``q.dtype``, contiguous.
    lse : [B, H, Sq] float32, only when ``return_lse``.
    """
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"{OP}: scale must be a finite number, got {scale!r}")
    scale = None if scale is None else float(scale)
    # The op's fast path without the op's dispatch, for a call the dispatcher would send
    # straight to the CUDA kernel whose key has a replay (else the op, which records one).
    if _FAST and type(q) is torch.Tensor and q.is_cuda and not torch.compiler.is_compiling():
        key = _fast_key(q, k, v, scale, return_lse)
        entry = None if key is None else _FAST.get(key)
        if entry is not None and plain_call(q, k, v):
            out, lse = _fast_call(entry, q, k, v)
            return (out, lse) if return_lse else out
    out, lse = torch.ops.xdit_ops.fp8_attention.default(q, k, v, scale, return_lse)
    return (out, lse) if return_lse else out


__all__ = ["attention_quantized_sm90", "auto_format", "consumers_setting", "cuda_scheme",
           "fp8_attention", "k_scale_setting", "padded_head_dim", "resolve_consumers",
           "resolve_format", "resolve_k_scale", "sm90_kernel_loaded", "sm90_scheme",
           "stats_sample", "stats_setting", "unusable_reason", "with_k_scale", "with_stats"]
