"""Triton launchers of FP8 attention: the quantization pass and the attention kernel.

Two ``torch.library.triton_op`` ops (visible to torch.compile down to the kernels):

* ``xdit_ops::fp8_quantize_triton(q, k, v, had, scale, vt_pv_order=False, fp8_format="e4m3fn",
  k_block=1, stats_sample=-1)`` -> the tensors of
  :class:`xdit_ops.reference.fp8_attention.QuantizedQKV`, same layouts (``vt_pv_order``: V^T's
  keys in the sm90ws kernel's P.V key order; ``fp8_format``: V^T's FP8 format, e4m3fn or
  e4m3fnuz; ``stats_sample``: the scheme's statistics sample, -1 for the op's).

The pass: ``kv_stats_kernel`` (the K sums and V amaxes: over every key, or past
``STATS_SAMPLE`` keys over a strided sample of ~1024), ``quantize_q_kernel``,
``quantize_kv_kernel`` and, with the sample, ``v_repair_kernel`` (V again with its exact amax
where a key exceeded the sample's scale; a few loads a program otherwise).
* ``xdit_ops::fp8_attention_fwd_triton(q8, q_scale, k8, k_scale, vt8, v_scale, lse_corr,
  seqlen_k, head_dim, out_dtype_like, return_lse)`` -> (out [B, Sq, H, D], lse [B, H, Sq]).

:func:`fp8_attention_triton` chains them (the CUDA kernel of ``xdit_ops::fp8_attention``).
Under ``TRITON_INTERPRET=1`` the same launch code runs the kernels in Triton's CPU
interpreter (:func:`quantize_qkv_triton`, :func:`attention_quantized_triton` with CPU tensors).

The FP8 format (:class:`~xdit_ops.reference.fp8_attention.Fp8Format`) reaches the kernels as
V^T's dtype, which Triton specialises them on (the kernels derive the cast dtype, the max and
P's shift from it as constexprs): :func:`quantize_qkv_triton` takes it or resolves
``XDIT_OPS_FP8_FORMAT`` for the tensors' device (``auto``: e4m3fnuz on a ROCm gfx94x GPU, MI300;
e4m3fn otherwise: :func:`xdit_ops.ops.fp8_attention.resolve_format`); the attention kernel
reads it from V^T's dtype.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import replace
from typing import NamedTuple

import torch
import triton
from torch.library import triton_op

from xdit_ops.reference.fp8_attention import (
    E4M3FN,
    FP8,
    FP8_FORMATS,
    LOG2E,
    SCHEME,
    Fp8AttentionScheme,
    Fp8Format,
    QuantizedQKV,
    cached_hadamard,
    fp8_format_of,
    pad_to,
    padded_head_dim,
    stats_rows,
    with_format,
)
from xdit_ops.triton.kernels import fp8_attention as kernels
from xdit_ops.triton.launch import launch, note_alloc

QUANT_BLOCK_S = 64


class QuantLaunch(NamedTuple):
    """Launch parameters of the quantization kernels at one padded head dim.

    num_warps : of every quantization kernel.
    programs_per_sm : the tile-loop kernels' grids are sized for this many resident programs
        per SM (in whole waves, each program walking several tiles: :func:`programs_per_head`).
    stats_stages, q_stages, kv_stages : software-pipelining depth of the tile loops of
        kv_stats_kernel, quantize_q_kernel and quantize_kv_kernel (its K loop).
    v_stages : that of quantize_kv_kernel's V loop (V_STAGES: its loads are issued
        v_stages - 1 tiles ahead, by cp.async into shared memory that the K loop's buffers
        reuse, or, with V^T in key order, into registers: 4 stages took 134 registers a thread
        at head dim 64, over the four-program budget).
    kv_tile_warps : warps of quantize_kv_kernel with one K scale per 128-key tile (k_block
        128); 0: num_warps scaled with the tile (as many elements a thread as with 64 keys).
    q_warps, stats_warps : warps of quantize_q_kernel and kv_stats_kernel; 0: num_warps.
    kv_split : quantize_kv_kernel as two launches with one K scale per 128-key tile (the
        configuration runs 107-108 measured; per-key scales keep one launch), V's tiles
        (``v_warps`` warps, ``v_per_sm`` programs per SM) then K's (``k_warps``, ``k_per_sm``,
        ``k_stages`` K-loop stages); 0: the fused launch's.
    """

    num_warps: int
    programs_per_sm: int
    stats_stages: int
    q_stages: int
    kv_stages: int
    v_stages: int = 3
    kv_tile_warps: int = 0
    q_warps: int = 0
    stats_warps: int = 0
    kv_split: bool = False
    v_warps: int = 0
    v_per_sm: int = 0
    k_warps: int = 0
    k_per_sm: int = 0
    k_stages: int = 0

    @property
    def q_num_warps(self) -> int:
        return self.q_warps or self.num_warps

    @property
    def stats_num_warps(self) -> int:
        return self.stats_warps or self.num_warps


# From ptxas -v (sm_90a, run-time specialization: 16-byte aligned pointers and strides).
# Head dim 128: kv_stats_kernel 246 registers a thread on 4 warps at 3 stages (80 KB of shared
# memory; 122 on 8 warps at 2), quantize_q_kernel 174 on 4 warps at 3 stages (88 KB; 108 on
# 8), quantize_kv_kernel 97 (V^T in the P.V key order) or 101 (key order) on 8 warps at 3 K
# and 3 V stages (88 KB): two programs per SM. Head dim 64, 4 warps: 121, 110 and 93 or 104
# registers (24, 36 and 36 KB): four programs per SM.
QUANT_LAUNCH: dict[int, QuantLaunch] = {
    64: QuantLaunch(num_warps=4, programs_per_sm=4, stats_stages=2, q_stages=3, kv_stages=3),
    # kv_tile_warps=8 (run 92, H100, the K/V kernel at k_block 128, the same bits): 143.7
    # against 16 warps' 154.4 us at (1,16896,24,128), 439.1 against 456.1 at (1,32760,40,128).
    # q_warps=4 (run 97, the Q kernel at 3 stages: 63.7 against 8 warps' 70.4 us at
    # (1,16896,24,128), 191.4 against 210.2 at (1,32760,40,128); the LSE correction's sum is
    # another order); stats_warps=4 at 3 stages (run 97, the same bits: 73.4 against 76.3 us,
    # 221.8 against 231.1).
    # kv_split (runs 107-108, H100, sampled statistics, the same bits): V's tiles on 8 warps x
    # 1 program per SM, then K's on 8 x 1 with 4 K-loop stages: 71 + 77.5 us against the
    # fused kernel's 154 at (1,16896,24,128), 207.5 + 227 against 469 at (1,32760,40,128),
    # 28.1 + 28.3 against 56.2 at (1,4608,24,128) (K's at 8 x 2 with 3 stages: 76, 225, 33).
    128: QuantLaunch(num_warps=8, programs_per_sm=2, stats_stages=3, q_stages=3, kv_stages=3,
                     kv_tile_warps=8, q_warps=4, stats_warps=4, kv_split=True, v_warps=8,
                     v_per_sm=1, k_warps=8, k_per_sm=1, k_stages=4),
}
STATS_BLOCK_S = 64
# At most this many key chunks per (batch, head) in kv_stats_kernel: the quantization kernels
# reduce the chunks' partials as one [next_pow2(chunks), DP] tensor.
STATS_MAX_CHUNKS = 32
# kv_stats_kernel's grid is sized for this many SMs (H100 and H200: 132), not the device's:
# the chunking fixes the K sum's order, so this keeps the quantized K (its last bits) the same
# on every GPU.
STATS_GRID_SMS = 132
# v_repair_kernel's programs per (batch, head): its check costs a launch of this many x B x H
# programs every call; its requantization (rare) runs on them.
REPAIR_PROGRAMS = 1
# Past this many keys the pass's statistics are a strided sample's (the scheme's
# stats_sample; a module constant so that a test can shrink it with the emulation's).
STATS_SAMPLE = SCHEME.stats_sample
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CONFIG_ENV = "XDIT_OPS_FP8_TRITON_CONFIG"


class AttnConfig(NamedTuple):
    """Launch configuration of ``attn_fwd_kernel``.

    block_m : query rows per program (64 per warpgroup is what one wgmma covers).
    block_n : keys per tile. Part of the numerics: P is rounded relative to the running max of
        the tiles, so the kernel matches the emulation run with ``block_n`` (see
        :func:`config_scheme`); the op's scheme uses 64.
    num_warps, num_stages : Triton launch options (num_stages software-pipelines the key loop).
    two_level : flush each tile's P.V into the fp32 accumulator (the scheme); False accumulates
        in place in the tensor core (the scheme with ``two_level=False``).
    fold_scales : fewer fp32 operations per score (the K scale in one FMA with the int32 ->
        fp32 conversion, the Q scale in the exponent's FMA); rounds differently from the
        emulation (a small drift, measured by benchmarks/tune_fp8_attention.py).
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    two_level: bool = True
    fold_scales: bool = False

    def __str__(self) -> str:
        return (f"{self.block_m},{self.block_n},{self.num_warps},{self.num_stages},"
                f"{int(self.two_level)},{int(self.fold_scales)}")

    def as_list(self) -> list[int]:
        return [self.block_m, self.block_n, self.num_warps, self.num_stages,
                int(self.two_level), int(self.fold_scales)]


# The attention kernel's configuration per padded head dim (64, 128), used unless
# XDIT_OPS_FP8_TRITON_CONFIG overrides it. Update from benchmarks/tune_fp8_attention.py.
# Measured so far (H100, run 4): an autotuner over 128x64 tiles (8 warps, 2-4 stages) and
# 64x64 (4 warps) gave 456-459 TFLOPS at head dim 128; which config it chose was not recorded.
# From the sweep on an H100 (benchmarks/results/2026-11-26-run7, tune_fp8_attention): kernel
# alone at (1, 16896, 24, 128) 582 TFLOPS with 128x128 tiles against 504 with 128x64 (cuDNN bf16
# 643 in the same run); at (2, 4250, 24, 64) 353 with 64x64 / 4 warps against 324 (cuDNN 394).
# Both passed the sweep's accuracy checks (emulation drift, the op tests' bars, the gate).
DEFAULT_CONFIGS: dict[int, AttnConfig] = {
    64: AttnConfig(64, 64, 4, 3),
    128: AttnConfig(128, 128, 8, 3),
}
# On ROCm (AMD MI300, gfx942; wave64, 512 registers a lane counting the accumulation
# registers): chosen by compiling for gfx942 (no MI300 has run them). The CUDA 128x128 tiles
# over 8 warps spill there at head dim 128 (2 stages: 256 VGPRs, 150 spilled); 128x64 over 4 warps
# compiles without spills (306 VGPRs + 50 AGPRs, 32 KB LDS), as the head-dim-64 CUDA config
# does (233 VGPRs). Both 64-key tiles: the op's scheme (block_n 64).
ROCM_CONFIGS: dict[int, AttnConfig] = {
    64: AttnConfig(64, 64, 4, 3),
    128: AttnConfig(128, 64, 4, 2),
}
# Triton's CPU interpreter: smaller tiles run faster there (CI).
INTERPRET_CONFIG = AttnConfig(64, 64, 4, 1)


@functools.lru_cache(maxsize=16)
def parse_config(text: str) -> AttnConfig:
    """``"BLOCK_M,BLOCK_N,num_warps,num_stages[,two_level[,fold_scales]]"`` (e.g.
    ``"128,64,8,3"``; the flags 0 or 1, default 1 and 0) -> :class:`AttnConfig`, validated.
    Cached per text (:func:`attn_config` reads the environment on every call; a bad text is not
    cached and raises each time)."""
    try:
        vals = [int(x) for x in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) not in (4, 5, 6):
        raise ValueError(f"fp8_attention: {CONFIG_ENV}={text!r} must be BLOCK_M,BLOCK_N,"
                         "num_warps,num_stages[,two_level[,fold_scales]] (integers)")
    flags = vals[4:] + [1, 0][len(vals) - 4:]
    cfg = AttnConfig(*vals[:4], two_level=bool(flags[0]), fold_scales=bool(flags[1]))

    def pow2(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0

    # 16 rows is the smallest tl.dot tile; FP8/INT8 tensor-core products step over 32 keys.
    bad = [name for name, ok in [
        ("BLOCK_M", pow2(cfg.block_m) and 16 <= cfg.block_m <= 256),
        ("BLOCK_N", pow2(cfg.block_n) and 32 <= cfg.block_n <= 256),
        ("num_warps", pow2(cfg.num_warps) and cfg.num_warps <= 16),
        ("num_stages", 1 <= cfg.num_stages <= 8),
        ("two_level", flags[0] in (0, 1)),
        ("fold_scales", flags[1] in (0, 1)),
    ] if not ok]
    if bad:
        raise ValueError(f"fp8_attention: {CONFIG_ENV}={text!r}: bad {', '.join(bad)} "
                         "(BLOCK_M 16-256 and BLOCK_N 32-256 powers of two, num_warps a power "
                         "of two <= 16, num_stages 1-8, flags 0 or 1)")
    return cfg


def attn_config(dp: int) -> AttnConfig:
    """The attention kernel's configuration at padded head dim ``dp``: the environment's
    :data:`CONFIG_ENV` (read per call, parsed once per text), else the interpreter's, or
    :data:`ROCM_CONFIGS` on a ROCm build of torch, or :data:`DEFAULT_CONFIGS`."""
    text = os.environ.get(CONFIG_ENV)
    if text:
        return parse_config(text)
    if INTERPRET:
        return INTERPRET_CONFIG
    return (ROCM_CONFIGS if torch.version.hip is not None else DEFAULT_CONFIGS)[dp]


def config_scheme(cfg: AttnConfig, fmt: Fp8Format = E4M3FN) -> Fp8AttentionScheme:
    """The scheme whose emulation (``fp8_attention_quantized_ref``) a config computes on V^T of
    FP8 format ``fmt`` (up to the rounding of ``fold_scales``)."""
    return replace(with_format(SCHEME, fmt), block_n=cfg.block_n, two_level=cfg.two_level)



# Every launch: xdit_ops.triton.launch.launch (wrap_triton only when traced; recorded for the
# op's fast path under a recording).
_launch = launch


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# Per-program fixed cost of a tile-loop quantization kernel, in tiles (the Hadamard matrix and
# the statistics from L2, the pipeline's fill): what another wave of programs costs beyond its
# tiles, in programs_per_head's model.
PROGRAM_COST_TILES = 0.5


@functools.lru_cache(maxsize=256)
def programs_per_head(num_heads: int, num_tiles: int, slots: int) -> int:
    """Programs per (batch, head) of a tile-loop quantization kernel whose grid is ``(P,
    num_heads)``, with ``slots`` programs resident at once (programs per SM x SMs), each program
    walking ``ceil(num_tiles / P)`` or fewer tiles: the P in 1..num_tiles that minimises the
    time in waves of programs, ``ceil(num_heads * P / slots) * (ceil(num_tiles / P) +
    PROGRAM_COST_TILES)`` (the smallest such P). One wave of ``slots // num_heads`` programs a
    head leaves ``slots % num_heads`` slots idle for the whole run: at 24 heads and one program
    per SM on 132 SMs, 12 of 132 (P = 5, 27 tiles of 132 a program); two full waves of P = 11
    take 12 tiles a program."""
    best, best_cost = 1, math.inf
    for p in range(1, min(num_tiles, 8 * (slots // num_heads + 1)) + 1):
        waves = -(-num_heads * p // slots)
        cost = waves * (-(-num_tiles // p) + PROGRAM_COST_TILES)
        if cost < best_cost:
            best, best_cost = p, cost
    return best


def _programs_per_head(num_heads: int, num_tiles: int, per_sm: int,
                       device: torch.device) -> int:
    """:func:`programs_per_head` for ``per_sm`` programs per SM of ``device``; in Triton's CPU
    interpreter, two programs (several tiles each), never more than tiles."""
    if device.type != "cuda":
        return max(1, min(num_tiles, 2))
    return programs_per_head(num_heads, max(num_tiles, 1), per_sm * _num_sms(device))


def _stats_chunks(B: int, S: int, H: int, DP: int, sampled: bool = False) -> tuple[int, int]:
    """(tokens per chunk, chunks) of kv_stats_kernel over S keys of [B, *, H, *] at padded head
    dim DP, in whole 64-key tiles, at most STATS_MAX_CHUNKS chunks per (batch, head) (a fixed
    chunking: the same K sums on every GPU): for every key, one wave of the programs per SM on a
    STATS_GRID_SMS-SM GPU (in the interpreter two chunks); for a strided sample of S keys
    (``sampled``), STATS_SAMPLE_TILES tiles a program."""
    tiles = triton.cdiv(max(S, 1), STATS_BLOCK_S)
    if sampled:
        chunks = triton.cdiv(tiles, STATS_SAMPLE_TILES)
    elif INTERPRET:
        chunks = 2
    else:
        chunks = QUANT_LAUNCH[DP].programs_per_sm * STATS_GRID_SMS // (B * H)
    chunks = max(1, min(STATS_MAX_CHUNKS, tiles, chunks))
    tokens_per_chunk = triton.cdiv(tiles, chunks) * STATS_BLOCK_S
    return tokens_per_chunk, triton.cdiv(max(S, 1), tokens_per_chunk)


# Tiles of 64 sampled keys per kv_stats_kernel program with the sampled statistics: a ~1024-key
# sample is 16 tiles a head, 4 programs (at 24 heads 96 programs, one wave; 16 programs a head,
# run 109, took 13.2 us at (1,16896,24,128), two waves of latency-bound programs that each read
# the 32 KB Hadamard matrix).
STATS_SAMPLE_TILES = 4


def _launch_kv_stats(k, v, had, ksum, vmax, tokens_per_chunk: int, stride: int = 1,
                     count: int | None = None) -> None:
    """kv_stats_kernel into ``ksum``, ``vmax`` [B * H, num_chunks, DP] fp32, over the keys
    ``0, stride, 2 stride, ...`` (``count`` of them; default every key)."""
    B, S, H, D = k.shape
    DP = had.shape[0]
    launch = QUANT_LAUNCH[DP]
    _launch(kernels.kv_stats_kernel, (B * H, ksum.shape[1]),
            k, v, had, ksum, vmax,
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            H, S if count is None else count, tokens_per_chunk, stride,
            D=D, DP=DP, BLOCK_S=STATS_BLOCK_S, UPCAST=INTERPRET,
            num_warps=launch.stats_num_warps, num_stages=launch.stats_stages)


def _kv_stats_partials(k: torch.Tensor, v: torch.Tensor, had: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv_stats_kernel`` over the tokens of ``k``, ``v`` [B, S, H, D]: per-chunk partial sums
    of the rotated K and amaxes of |V|, each [B * H, num_chunks, DP] fp32 (the quantization
    kernels reduce the chunks)."""
    B, S, H, D = k.shape
    DP = had.shape[0]
    tokens_per_chunk, num_chunks = _stats_chunks(B, S, H, DP)
    ksum = torch.empty(B * H, num_chunks, DP, device=k.device, dtype=torch.float32)
    vmax = torch.empty(B * H, num_chunks, DP, device=k.device, dtype=torch.float32)
    _launch_kv_stats(k, v, had, ksum, vmax, tokens_per_chunk)
    return ksum, vmax


# Offsets of the tensors carved from one buffer are multiples of this (TMA and Triton's
# 16-byte pointer specialization need 16; 256 keeps every tensor on its own cache lines).
CARVE_ALIGN = 256


def carve(specs, device: torch.device) -> list[torch.Tensor]:
    """Uninitialised tensors of ``specs`` (a sequence of (shape, dtype)) as views into one byte
    buffer at CARVE_ALIGN-aligned offsets: one allocation (~5-9 µs of host time each on the GPU
    machines, runs 83 and 95) for all."""
    offsets, total = [], 0
    for shape, dt in specs:
        offsets.append(total)
        total += -(-math.prod(shape) * dt.itemsize // CARVE_ALIGN) * CARVE_ALIGN
    buf = torch.empty(total, device=device, dtype=torch.uint8)
    return [buf[o:o + math.prod(shape) * dt.itemsize].view(dt).view(shape)
            for o, (shape, dt) in zip(offsets, specs, strict=True)]


def _empty_tensors(specs, device: torch.device, one_buffer: bool) -> list[torch.Tensor]:
    """Uninitialised tensors of ``specs``: one allocation each, or, with ``one_buffer``,
    :func:`carve`'s views of one buffer (told to a launch recording: a replay carves them
    again). Views of one buffer may not be returned by a custom op (outputs must not alias),
    so only the op's direct path carves."""
    if not one_buffer:
        return [torch.empty(shape, device=device, dtype=dt) for shape, dt in specs]
    out = carve(specs, device)
    note_alloc(tuple(specs), out)
    return out


# Keys per K scale the quantization pass supports: 1 (per key, the op's scheme) and one scale
# per 128-key tile (XDIT_OPS_FP8_K_SCALE=tile: the sm90ws kernel's key tile).
K_BLOCKS = (1, 128)


def _check_k_block(k_block: int) -> None:
    if k_block not in K_BLOCKS:
        raise ValueError(f"fp8_attention: the quantization pass takes k_block in {K_BLOCKS}, "
                         f"got {k_block!r}")


def _quantize(q, k, v, had, scale, vt_pv_order=False, fp8_format="e4m3fn", k_block=1,
              one_buffer=False, stats_sample=None):
    _check_k_block(k_block)
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    DP = had.shape[0]
    Sk_pad = pad_to(max(Sk, 1), SCHEME.block_n)  # the QuantizedQKV layout
    dev = q.device
    launch = QUANT_LAUNCH[DP]
    fmt = FP8_FORMATS[fp8_format]
    # The statistics' keys: every key, or past STATS_SAMPLE keys a strided sample (the K mean
    # and V's scale from it, V with headroom and v_repair_kernel where a key exceeds it)
    stride, count = stats_rows(Sk, STATS_SAMPLE if stats_sample is None else stats_sample)
    sampled = stride > 1
    tokens_per_chunk, num_chunks = _stats_chunks(B, count, H, DP, sampled)
    # One K scale per k_block keys: tiles of k_block keys (the last may reach past Sk_pad, a
    # multiple of 64; the kernel masks its stores), over proportionally more warps and
    # proportionally fewer programs per SM (the same elements a thread and threads per SM as
    # with 64-key tiles). From ptxas -v (sm_90a) at k_block 128: 86 registers a thread at head
    # dim 64 (8 warps, 64 KB: 2 programs per SM), 91 at 128 (16 warps, 144 KB: 1 program per
    # SM); at 128 the launch takes 8 warps since run 92 (QuantLaunch.kv_tile_warps).
    kv_block = max(QUANT_BLOCK_S, k_block)
    kv_warps = (launch.kv_tile_warps if kv_block == 128 and launch.kv_tile_warps
                else launch.num_warps * kv_block // QUANT_BLOCK_S)
    kv_per_sm = max(1, launch.programs_per_sm * QUANT_BLOCK_S // kv_block)
    kv_tiles = triton.cdiv(Sk_pad, kv_block)
    kv_grid = (_programs_per_head(B * H, kv_tiles, kv_per_sm, dev), B * H)
    split = launch.kv_split and kv_block == 128  # (measured with 128-key tiles only)
    if split:  # V's launch (its grid: the repair's too), then K's
        v_grid = (_programs_per_head(B * H, kv_tiles, launch.v_per_sm or kv_per_sm, dev),
                  B * H)
        k_grid = (_programs_per_head(B * H, kv_tiles, launch.k_per_sm or kv_per_sm, dev),
                  B * H)
        parts = [(v_grid, 1, launch.v_warps or kv_warps, launch.kv_stages),
                 (k_grid, 2, launch.k_warps or kv_warps, launch.k_stages or launch.kv_stages)]
    else:
        parts = [(kv_grid, 0, kv_warps, launch.kv_stages)]
    v_grid = parts[0][0]
    f32 = torch.float32
    specs = [((B * H, num_chunks, DP), f32), ((B * H, num_chunks, DP), f32),
             ((B, H, Sq, DP), torch.int8), ((B, H, Sq), f32), ((B, H, Sq), f32),
             ((B, H, Sk_pad, DP), torch.int8), ((B, H, Sk_pad), f32),
             ((B, H, DP, Sk_pad), fmt.dtype), ((B, H, DP), f32)]
    if sampled:  # the K/V programs' exact V amaxes, for v_repair_kernel
        specs.append(((B * H, v_grid[0], DP), f32))
    ksum, vmax, q8, q_scale, lse_corr, k8, k_scale, vt8, v_scale, *vpart = _empty_tensors(
        tuple(specs), dev, one_buffer)
    vpart = vpart[0] if sampled else vmax  # (unread by the K/V kernel without the sample)
    _launch_kv_stats(k, v, had, ksum, vmax, tokens_per_chunk, stride, count)
    consts = dict(D=D, DP=DP, BLOCK_S=QUANT_BLOCK_S,
                  NUM_CHUNKS_P2=triton.next_power_of_2(num_chunks), UPCAST=INTERPRET,
                  num_warps=launch.num_warps)
    if Sq > 0:
        q_tiles = triton.cdiv(Sq, QUANT_BLOCK_S)
        grid = (_programs_per_head(B * H, q_tiles, launch.programs_per_sm, dev), B * H)
        _launch(kernels.quantize_q_kernel, grid,
                q, had, ksum, q8, q_scale, lse_corr,
                q.stride(0), q.stride(1), q.stride(2),
                H, Sq, count, num_chunks, scale * LOG2E / DP, scale / DP,
                num_stages=launch.q_stages, **(consts | dict(num_warps=launch.q_num_warps)))
    headroom = dict(V_HEADROOM=SCHEME.v_headroom) if sampled else {}
    kv_consts = consts | dict(BLOCK_S=kv_block, K_BLOCK=k_block)
    for grid, part, warps, stages in parts:
        _launch(kernels.quantize_kv_kernel, grid,
                k, v, had, ksum, vmax, k8, k_scale, vt8, v_scale, vpart,
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                H, Sk, Sk_pad, num_chunks, count, v_grid[0],
                VT_PV_ORDER=vt_pv_order, num_stages=stages, V_STAGES=launch.v_stages,
                **(kv_consts | dict(num_warps=warps)), **headroom,
                **(dict(PART=part) if part else {}),
                **(dict(NUM_PARTS_P2=triton.next_power_of_2(v_grid[0]))
                   if part == 2 and sampled else {}))
    if sampled and not split:  # (split: the K launch did the repair's work)
        # one program per (batch, head): where nothing is to repair (the usual case) a program
        # reads the partials and ends; where something is, it requantizes its head's V alone
        _launch(kernels.v_repair_kernel, (REPAIR_PROGRAMS, B * H),
                v, vmax, vpart, vt8, v_scale,
                v.stride(0), v.stride(1), v.stride(2),
                H, Sk, Sk_pad, num_chunks, v_grid[0],
                NUM_PARTS_P2=triton.next_power_of_2(v_grid[0]), VT_PV_ORDER=vt_pv_order,
                V_STAGES=launch.v_stages, **(kv_consts | dict(num_warps=kv_warps)), **headroom)
    return q8, q_scale, k8, k_scale, vt8, v_scale, lse_corr


def _attention(q8, q_scale, k8, k_scale, vt8, v_scale, lse_corr, seqlen_k, head_dim,
               out_dtype_like, return_lse, config):
    B, H, Sq, DP = q8.shape
    Sk_pad = k8.shape[2]
    cfg = AttnConfig(*config[:4], two_level=bool(config[4]), fold_scales=bool(config[5]))
    fp8_format_of(vt8.dtype)  # e4m3fn or e4m3fnuz, an error otherwise: the kernel's format
    out = torch.empty(B, Sq, H, head_dim, device=q8.device, dtype=out_dtype_like.dtype)
    lse = torch.empty(B, H, Sq if return_lse else 0, device=q8.device, dtype=torch.float32)
    # Without the LSE the kernel never touches its pointer; pass a live buffer all the same
    # (Triton's launcher validates every pointer, and an empty tensor's may be null).
    _launch(kernels.attn_fwd_kernel, (triton.cdiv(Sq, cfg.block_m), B * H),
            q8, q_scale, k8, k_scale, vt8, v_scale, lse_corr, out, lse if return_lse else q_scale,
            out.stride(0), out.stride(1), out.stride(2),
            H, Sq, seqlen_k, Sk_pad,
            D=head_dim, DP=DP, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            RETURN_LSE=return_lse, TWO_LEVEL=cfg.two_level, FOLD_SCALES=cfg.fold_scales,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


@triton_op("xdit_ops::fp8_quantize_triton", mutates_args=())
def fp8_quantize_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, had: torch.Tensor, scale: float,
    vt_pv_order: bool = False, fp8_format: str = "e4m3fn", k_block: int = 1,
    stats_sample: int = -1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """The quantization pass (see :class:`QuantizedQKV` for the outputs' layouts;
    ``vt_pv_order``: V^T in the P.V key order; ``fp8_format``: the name of V^T's format;
    ``k_block``: keys per K scale, 1 or 128; ``stats_sample``: the scheme's, -1 for
    ``STATS_SAMPLE``)."""
    return _quantize(q, k, v, had, scale, vt_pv_order, fp8_format, k_block,
                     stats_sample=None if stats_sample < 0 else stats_sample)


@triton_op("xdit_ops::fp8_attention_fwd_triton", mutates_args=())
def fp8_attention_fwd_triton(
    q8: torch.Tensor, q_scale: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor,
    vt8: torch.Tensor, v_scale: torch.Tensor, lse_corr: torch.Tensor, seqlen_k: int,
    head_dim: int, out_dtype_like: torch.Tensor, return_lse: bool, config: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention kernel on quantized inputs; out [B, Sq, H, head_dim] in
    ``out_dtype_like.dtype``, lse [B, H, Sq] fp32 (empty [B, H, 0] unless ``return_lse``).
    ``config``: :meth:`AttnConfig.as_list`."""
    return _attention(q8, q_scale, k8, k_scale, vt8, v_scale, lse_corr, seqlen_k, head_dim,
                      out_dtype_like, return_lse, config)


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device, not the tensors' (seen on 4 H100s: with the
    current device cuda:0, tensors on cuda:1..3 failed with "Pointer argument ... cannot be
    accessed"). Every launch goes through the two public wrappers below, which enter this.
    Already there (the usual case), nothing to switch: a null context (cheaper in host time)."""
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def quantize_qkv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: float | None = None, vt_pv_order: bool = False,
                        fp8_format: Fp8Format | str | None = None, k_block: int = 1,
                        stats_sample: int | None = None) -> QuantizedQKV:
    """The quantization pass in Triton, returning :class:`QuantizedQKV` (BSHD inputs).

    ``vt_pv_order``: write V^T with its keys in the P.V key order (the sm90ws kernel's input,
    :func:`xdit_ops.reference.fp8_attention.vt_to_pv_order`); the Triton attention kernel and
    the sm90 kernel take the plain layout. ``fp8_format``: V^T's FP8 format (a
    :class:`~xdit_ops.reference.fp8_attention.Fp8Format` or its name); None resolves
    ``XDIT_OPS_FP8_FORMAT`` for ``q``'s device (:func:`xdit_ops.ops.fp8_attention.resolve_format`).
    ``k_block``: keys sharing one K scale, 1 (per key, the op's scheme) or 128 (one scale per
    128-key tile from key 0: the scheme with ``k_block=128``, ``XDIT_OPS_FP8_K_SCALE=tile``;
    still written per key, equal within a tile and zero past Sk).
    ``stats_sample``: the statistics' sample (the scheme's ``stats_sample``; 0: every key);
    None: ``STATS_SAMPLE``, the op's scheme's.
    """
    return _quantize_qkv(q, k, v, scale, vt_pv_order, fp8_format, k_block, direct=False,
                         stats_sample=stats_sample)


def _quantize_qkv(q, k, v, scale, vt_pv_order, fp8_format, k_block, direct: bool,
                  stats_sample: int | None = None) -> QuantizedQKV:
    """:func:`quantize_qkv_triton`; ``direct``: run the pass as plain Python (its outputs carved
    from one buffer), not through the ``triton_op`` (``xdit_ops::fp8_quantize_triton``, whose
    dispatch costs host time and whose outputs may not alias): for callers that are already an
    op's implementation on real tensors (``xdit_ops::fp8_attention``'s CUDA kernel), where
    nothing traces the pass."""
    _check_k_block(k_block)
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if fp8_format is None:
        from xdit_ops.ops.fp8_attention import resolve_format

        fp8_format = resolve_format(q.device)
    name = fp8_format.name if isinstance(fp8_format, Fp8Format) else fp8_format
    if name not in FP8_FORMATS:
        raise ValueError(f"fp8_attention: unknown FP8 format {name!r}; one of "
                         f"{tuple(FP8_FORMATS)}")
    had = cached_hadamard(padded_head_dim(D), q.dtype, q.device)
    with _on_device(q.device):
        if direct or INTERPRET:
            t = _quantize(q, k, v, had, scale, vt_pv_order, name, k_block, one_buffer=direct,
                          stats_sample=stats_sample)
        else:
            t = fp8_quantize_triton(q, k, v, had, scale, vt_pv_order, name, k_block,
                                    -1 if stats_sample is None else stats_sample)
    return QuantizedQKV(*t, seqlen_k=k.shape[1], head_dim=D, vt_pv_order=vt_pv_order)


def attention_quantized_triton(qq: QuantizedQKV, out_dtype: torch.dtype,
                               return_lse: bool = True, config: AttnConfig | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention kernel in Triton on :class:`QuantizedQKV`: (out BSHD, lse [B, H, Sq]).

    ``config`` defaults to :func:`attn_config` of the padded head dim; the result is the
    emulation of :func:`config_scheme` (config, ``qq.fp8_format``) (the op's scheme for the
    default table). ``qq.vt`` must be in key order (``qq.vt_pv_order`` False); its dtype is the
    FP8 format the kernel reads V in and casts P to.
    """
    if qq.vt_pv_order:
        raise ValueError("fp8_attention: the Triton attention kernel takes V^T in key order; "
                         "got one in the sm90ws kernel's P.V key order (vt_pv_order=True)")
    cfg = attn_config(qq.q.shape[-1]) if config is None else config
    like = qq.q_scale.new_empty(0, dtype=out_dtype)
    fn = _attention if INTERPRET else fp8_attention_fwd_triton
    with _on_device(qq.q.device):
        return fn(qq.q, qq.q_scale, qq.k, qq.k_scale, qq.vt, qq.v_scale, qq.lse_corr,
                  qq.seqlen_k, qq.head_dim, like, return_lse, cfg.as_list())


def fp8_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         scale: float | None, return_lse: bool,
                         fp8_format: Fp8Format | str | None = None, k_block: int = 1,
                         stats_sample: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantization pass + attention kernel: out [B, Sq, H, D] in q.dtype, lse [B, H, Sq]
    (``fp8_format``, ``k_block`` and ``stats_sample`` as :func:`quantize_qkv_triton` takes
    them)."""
    qq = quantize_qkv_triton(q, k, v, scale, fp8_format=fp8_format, k_block=k_block,
                             stats_sample=stats_sample)
    return attention_quantized_triton(qq, q.dtype, return_lse)


# ---------------------------------------------------------------------------------------------
# usp_attention's FP8 wire (xdit_ops/ops/usp_fp8_wire.py): the statistics of a rank's tokens,
# and the quantization of tokens given the statistics of the whole sequence


def kv_stats_triton(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the Hadamard-rotated K over the tokens of ``k`` and amax of |V| per channel, by
    ``kv_stats_kernel`` (the quantization pass's own statistics kernel), its chunks reduced.

    Parameters
    ----------
    k, v : [B, S, H, D] float16/bfloat16 (any strides with head_dim contiguous), S > 0.

    Returns
    -------
    ksum, vmax : [B, H, DP] fp32 (vmax zero past D).
    """
    B, S, H, D = k.shape
    DP = padded_head_dim(D)
    with _on_device(k.device):
        ksum, vmax = _kv_stats_partials(k, v, cached_hadamard(DP, k.dtype, k.device))
    return ksum.sum(dim=1).view(B, H, DP), vmax.amax(dim=1).view(B, H, DP)


def quantize_tokens_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           k_mean: torch.Tensor, v_amax: torch.Tensor, scale: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The quantization of some tokens given the K mean and V amax of the whole sequence
    (``xdit_ops.ops.usp_fp8_wire.quantize_tokens_ref`` on the GPU): ``quantize_q_kernel`` and
    ``quantize_kv_kernel`` with ``STATS_GIVEN`` (they read the K mean and the V amax as given
    instead of reducing kv_stats partials).

    Parameters
    ----------
    q, k, v : [B, S, H, D] float16/bfloat16, head_dim contiguous, S > 0.
    k_mean, v_amax : [B, H, DP] fp32 (v_amax without zeros).
    scale : softmax scale.

    V is e4m3fn, whatever ``XDIT_OPS_FP8_FORMAT`` says (the FP8 wire is not format-aware).

    Returns
    -------
    q8 [B, H, S, DP] int8, k8 [B, H, S, DP] int8, vt8 [B, H, DV, S] uint8 (e4m3fn bits, DV = D
    rounded up to 4), scales [3, B, H, S] fp32 (q_scale, lse_corr, k_scale); k8 and vt8 are
    views into buffers padded to whole 64-token tiles.
    """
    B, S, H, D = q.shape
    DP = padded_head_dim(D)
    DV = pad_to(D, 4)
    dev = q.device
    had = cached_hadamard(DP, q.dtype, dev)
    launch = QUANT_LAUNCH[DP]
    k_mean = k_mean.contiguous()
    v_amax = v_amax.contiguous()
    # K/V outputs in whole tiles (zero codes and scales past S, sliced off below): the K/V
    # kernel's stores are unmasked (masked stores along S, whose stride is not a multiple of 16
    # bytes, took 214 registers a thread instead of ~100 at head dim 128).
    S_pad = pad_to(S, QUANT_BLOCK_S)
    q8 = torch.empty(B, H, S, DP, device=dev, dtype=torch.int8)
    k8 = torch.empty(B, H, S_pad, DP, device=dev, dtype=torch.int8)
    vt8 = torch.empty(B, H, DP, S_pad, device=dev, dtype=FP8)
    scales = torch.empty(3, B, H, S, device=dev, dtype=torch.float32)
    k_scale = torch.empty(B, H, S_pad, device=dev, dtype=torch.float32)
    # The K/V kernel's V scales (v_amax / 448), unused: the receiver derives its heads' scales
    # from v_amax after the exchange.
    v_scale = torch.empty(B, H, DP, device=dev, dtype=torch.float32)
    tiles = triton.cdiv(S, QUANT_BLOCK_S)
    grid = (_programs_per_head(B * H, tiles, launch.programs_per_sm, dev), B * H)
    # Every token is quantized (S valid keys); the statistics' chunk count is unused.
    consts = dict(D=D, DP=DP, BLOCK_S=QUANT_BLOCK_S, NUM_CHUNKS_P2=1, UPCAST=INTERPRET,
                  STATS_GIVEN=True, num_warps=launch.num_warps)
    with _on_device(dev):
        _launch(kernels.quantize_q_kernel, grid,
                q, had, k_mean, q8, scales[0], scales[1],
                q.stride(0), q.stride(1), q.stride(2),
                H, S, S, 1, scale * LOG2E / DP, scale / DP,
                num_stages=launch.q_stages, **(consts | dict(num_warps=launch.q_num_warps)))
        _launch(kernels.quantize_kv_kernel, grid,
                k, v, had, k_mean, v_amax, k8, k_scale, vt8, v_scale, v_scale,
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                H, S, S_pad, 1, S, 1,
                num_stages=launch.kv_stages, V_STAGES=launch.v_stages, **consts)
    scales[2] = k_scale[:, :, :S]
    return q8, k8[:, :, :S], vt8.view(torch.uint8)[:, :, :DV, :S], scales
