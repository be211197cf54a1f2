"""The numerics of ``xdit_ops::fp8_attention``, emulated exactly on the CPU.

This module is the CPU implementation of the op and the oracle of its GPU kernels. It is split
the way the kernels are split, so a GPU test can feed one stage's GPU output to the next stage
here:

1. :func:`quantize_qkv_ref`: the quantization pass -> :class:`QuantizedQKV`.
2. :func:`fp8_attention_quantized_ref`: the attention kernel on quantized inputs.

The scheme (``SCHEME``, SageAttention2-grade; see docs/fp8_attention.md for why each piece):

* head_dim is zero-padded to ``Dp`` = 64 or 128 (exact); the softmax scale uses the true D.
* Q and K are rotated by the Sylvester-Hadamard matrix ``Hd`` (entries +-1, ``Hd Hd^T = Dp I``)
  along head_dim; ``(q Hd) . (k Hd) = Dp (q . k)``, so the rotation is exact and the 1/Dp goes
  into the scale. Products of a bf16/fp16 value with +-1 are exact, so the rotation costs no
  precision before the fp32 sum.
* K smoothing: the mean of (rotated) K over the keys of each (batch, head) is subtracted.
  Softmax is invariant to it (to any vector subtracted from every key); the LSE gets
  ``scale * q . mean(k)`` added back. Past ``stats_sample`` (1024) keys the mean is that of a
  strided sample of the keys (:func:`stats_rows`: every ``ceil(Sk / 1024)``-th key), so the
  pass need not read K twice: the result stays exact, only the centring is estimated.
* Q and K: INT8, one scale per token (row of Q, key of K), symmetric,
  ``x_q = round_half_away(x * (127 / amax))``. Q K^T is exact in int32; the two scales are
  applied to the int32 tile as a row vector and a column vector (in the kernels the int32 ->
  fp32 conversion is a magic-number add, exact because |Q K^T| < 2^22). The K scale
  ``amax / 127`` is cut to 22 significant bits (:func:`round_k_scale`) so that a kernel may
  fuse that conversion with the K scale into one exact FMA; the codes use the unrounded
  ``127 / amax``.
* V: FP8 e4m3, one scale per channel (``amax_c / FP8_MAX``, 448 for e4m3fn; the
  format is a parameter, :class:`Fp8Format`: e4m3fnuz, AMD MI300's, has max 240); stored transposed,
  ``[B, H, Dp, Sk_pad]``, keys contiguous, the K-major layout the FP8 P.V product needs. The
  warp-specialised sm_90a kernel takes it with the keys of every 32-key block permuted (the
  "P.V key order", :func:`vt_to_pv_order`): a layout, not a change of numerics. Past
  ``stats_sample`` keys ``amax_c`` is ``v_headroom`` (4) times the sample's amax, unless some
  key of the (batch, head) exceeds that in some channel: then every channel of that (batch,
  head) takes its exact amax over all keys (the pass's repair step). No value is ever clipped;
  the headroom leaves e4m3's relative precision unchanged above ``amax / 7168`` (the smallest
  normal, 2^-6, at 448 / (4 amax) a unit; without headroom ``amax / 28672``).
* Online softmax over key tiles of ``block_n`` = 64 keys in fp32, base 2. P is computed as
  ``exp2(s - m_running + p_shift)`` (p_shift 8 for e4m3fn: in (0, 256]; 7 for e4m3fnuz: in
  (0, 128], the same codes halved) and cast to e4m3; its fp32 value goes into the row sum (the
  2^p_shift cancels in ``acc / l``).
* P.V: each tile's product starts from zero (the FP8 tensor core's accumulator keeps only ~22
  bits) and is added to an fp32 accumulator after rescaling by ``exp2(m_old - m_new)``
  (two-level accumulation).
* Epilogue: ``out = acc / l * v_scale`` in fp32, cast to the input dtype; LSE in natural log.

The per-tensor FP8 baseline (what FlashAttention-3 ships: one scale per tensor, e4m3 Q/K/V,
no smoothing, no rotation, single-level accumulation) is :func:`fp8_attention_naive_ref`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

INT8_MAX = 127.0
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@dataclass(frozen=True)
class Fp8Format:
    """The 8-bit float format of V and P (and of Q/K with ``qk_format="fp8"``).

    name : ``"e4m3fn"`` (OCP: NVIDIA sm_89+, AMD gfx950) or ``"e4m3fnuz"`` (AMD MI300, gfx94x).
    dtype : the torch dtype of the codes.
    max : largest finite value (448, 240). Everything scaled into the format (V's per-channel
        scale ``amax / max``, the clamps before a cast) uses it: torch's e4m3fnuz cast turns
        values from 248 up into NaN (0x80), so nothing above ``max`` may reach a cast.
    triton_dtype : the ``triton.language`` dtype's name (``float8e4nv``, ``float8e4b8``).
    p_shift : the scheme's P scaling for this format, ``P = exp2(s - m + p_shift)`` in
        (0, 2^p_shift], 2^p_shift <= max: 8 for e4m3fn (256), 7 for e4m3fnuz (128). e4m3fnuz
        is e4m3fn with the exponent bias one higher (bias 8: one binade less at the top, one
        more at the bottom), so e4m3fnuz(x / 2) = e4m3fn(x) / 2 wherever e4m3fn(x) <= 240:
        with the shift one lower, P's codes are the e4m3fn ones halved, the same rounding.
    """

    name: str
    dtype: torch.dtype
    max: float
    triton_dtype: str
    p_shift: float

    def cast(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 -> this format, round to nearest even (the hardware casts' rounding in range;
        torch's casts of values past ``max`` differ by format: clamp first)."""
        return x.to(self.dtype)


E4M3FN = Fp8Format("e4m3fn", torch.float8_e4m3fn, 448.0, "float8e4nv", 8.0)
E4M3FNUZ = Fp8Format("e4m3fnuz", torch.float8_e4m3fnuz, 240.0, "float8e4b8", 7.0)
FP8_FORMATS: dict[str, Fp8Format] = {f.name: f for f in (E4M3FN, E4M3FNUZ)}
# The default format's dtype and max (the names every e4m3fn-only caller uses).
FP8 = E4M3FN.dtype
FP8_MAX = E4M3FN.max


def fp8_format_of(dtype: torch.dtype) -> Fp8Format:
    """The :class:`Fp8Format` whose codes have ``dtype``; an error naming the dtype otherwise."""
    for f in FP8_FORMATS.values():
        if f.dtype == dtype:
            return f
    raise ValueError(f"fp8_attention: {dtype} is not an FP8 format of the scheme "
                     f"({', '.join(f'{f.dtype}' for f in FP8_FORMATS.values())})")


@dataclass(frozen=True)
class Fp8AttentionScheme:
    """Knobs of the quantization scheme; ``SCHEME`` is the one the op uses.

    qk_format : "int8" or "fp8" (e4m3) for Q and K.
    q_block, k_block : tokens sharing one scale (1 = per token, 0 = one per tensor).
    v_per_channel : one V scale per channel (else one per tensor).
    hadamard : rotate Q and K by the Hadamard matrix along head_dim.
    smooth_k : subtract the mean of K over keys.
    block_n : keys per online-softmax tile (the kernel's BLOCK_N; P's rounding depends on it).
    p_shift : P = exp2(s - m + p_shift) before the e4m3 cast.
    two_level : each tile's P.V starts from zero and is added in fp32 (else accumulate in place).
    pv_accum_bits : model the FP8 tensor core's accumulator: after every 32-key step the
        accumulator is truncated to this many mantissa bits (None = exact fp32 sums).
    fp8 : the FP8 format (:class:`Fp8Format`); ``p_shift`` must keep P within its max
        (:func:`with_format` sets both).
    p8_row_sum : the softmax's row sum adds the FP8-rounded P (what multiplies V; a kernel that
        takes it from the tensor cores, P times ones) instead of the fp32 P.
    stats_sample : with more keys than this, the K mean and V's per-channel scales come from a
        strided sample of about this many keys (:func:`stats_rows`), V's with ``v_headroom``
        and the exact amax where a key exceeds it; 0: from every key.
    v_headroom : the factor on the sampled V amax (exact in fp32: a power of two).
    """

    qk_format: str = "int8"
    q_block: int = 1
    k_block: int = 1
    v_per_channel: bool = True
    hadamard: bool = True
    smooth_k: bool = True
    block_n: int = 64
    p_shift: float = 8.0
    two_level: bool = True
    pv_accum_bits: int | None = None
    fp8: Fp8Format = E4M3FN
    p8_row_sum: bool = False
    stats_sample: int = 1024
    v_headroom: float = 4.0

    def __post_init__(self) -> None:
        if 2.0 ** self.p_shift > self.fp8.max:
            raise ValueError(f"fp8_attention: p_shift {self.p_shift} puts P up to "
                             f"2^{self.p_shift} = {2.0 ** self.p_shift:g}, past {self.fp8.name}'s "
                             f"max {self.fp8.max:g} (use with_format)")


SCHEME = Fp8AttentionScheme()
# FlashAttention-3's released FP8 path: per-tensor e4m3 scales and nothing else.
NAIVE_SCHEME = Fp8AttentionScheme(
    qk_format="fp8", q_block=0, k_block=0, v_per_channel=False, hadamard=False,
    smooth_k=False, two_level=False, stats_sample=0,
)
# The scheme with its statistics from every key (what SCHEME was until session 20; the FP8
# wire and ring of usp_attention, whose statistics are reduced across ranks, compute these).
EXACT_STATS_SCHEME = replace(SCHEME, stats_sample=0)


def stats_rows(seqlen_k: int, sample: int) -> tuple[int, int]:
    """(stride, count) of the keys the statistics read: keys ``0, stride, 2 stride, ...``
    below ``seqlen_k``, ``count = ceil(seqlen_k / stride)`` of them, with ``stride =
    ceil(seqlen_k / sample)``; every key (stride 1) where ``seqlen_k <= sample`` or ``sample
    <= 0``."""
    if sample <= 0 or seqlen_k <= sample:
        return 1, seqlen_k
    stride = -(-seqlen_k // sample)
    return stride, -(-seqlen_k // stride)


def with_format(scheme: Fp8AttentionScheme, fmt: Fp8Format | str) -> Fp8AttentionScheme:
    """``scheme`` in the FP8 format ``fmt`` (an :class:`Fp8Format` or its name), with the
    format's P shift. ``with_format(SCHEME, E4M3FN) == SCHEME``."""
    if isinstance(fmt, str):
        if fmt not in FP8_FORMATS:
            raise ValueError(f"fp8_attention: unknown FP8 format {fmt!r}; one of "
                             f"{tuple(FP8_FORMATS)}")
        fmt = FP8_FORMATS[fmt]
    return replace(scheme, fp8=fmt, p_shift=fmt.p_shift)


@dataclass
class QuantizedQKV:
    """The quantization pass's output (the attention kernel's input), BHSD.

    q : [B, H, Sq, Dp] int8 (or e4m3).
    q_scale : [B, H, Sq] fp32, per row, dequant scale x softmax scale x log2(e) (x 1/Dp with
        the rotation): ``s_log2 = ((q @ k^T) * k_scale[None, :]) * q_scale[:, None]``.
    k : [B, H, Sk_pad, Dp] int8 (or e4m3), zero beyond Sk; Sk_pad = Sk rounded up to block_n.
    k_scale : [B, H, Sk_pad] fp32, per key (equal within a k_block), zero beyond Sk.
    vt : [B, H, Dp, Sk_pad] e4m3 (its dtype is the FP8 format: :attr:`fp8_format`), V^T,
        zero beyond Sk and beyond D.
    v_scale : [B, H, Dp] fp32, per channel.
    lse_corr : [B, H, Sq] fp32, ``scale * q . mean(k)`` (natural log units), added to the LSE.
    seqlen_k : the true Sk.
    head_dim : the true D.
    vt_pv_order : ``vt``'s keys are in the P.V key order (:func:`vt_to_pv_order`; the sm90ws
        kernel's input), not in key order.
    """

    q: torch.Tensor
    q_scale: torch.Tensor
    k: torch.Tensor
    k_scale: torch.Tensor
    vt: torch.Tensor
    v_scale: torch.Tensor
    lse_corr: torch.Tensor
    seqlen_k: int
    head_dim: int
    vt_pv_order: bool = False

    @property
    def fp8_format(self) -> Fp8Format:
        """The FP8 format of V (and of the P the attention kernel casts), from ``vt``'s dtype."""
        return fp8_format_of(self.vt.dtype)


# The P.V key order of V^T (the warp-specialised sm_90a kernel's layout, which takes P.V's A
# operand from the registers that hold the softmax's S accumulator). Inside every block of
# PV_KEY_BLOCK keys, key k = 8 jj + 2 l + b (jj, l < 4, b < 2) sits at column
# PV_KEY_ORDER[k] = 4 l + 16 (jj >> 1) + 2 (jj & 1) + b: the wgmma accumulator gives a thread
# the keys 8 jj + 2 l + b of its rows, the 8-bit A operand the columns 4 l + 16 h + a, and this
# maps each thread's own keys onto its own A slots (csrc/include/xdit_ops/fp8_attention_sm90_ws.cuh,
# pv_a_register). P.V sums over keys, so the same permutation of P's and V's keys is exact up
# to the tensor core's summation order.
PV_KEY_BLOCK = 32
PV_KEY_ORDER = tuple(4 * ((k >> 1) & 3) + 16 * (k >> 4) + 2 * ((k >> 3) & 1) + (k & 1)
                     for k in range(PV_KEY_BLOCK))


def _pv_gather_index(n: int, inverse: bool, device: torch.device) -> torch.Tensor:
    """Column index ``idx`` [n] such that ``out = x[..., idx]`` permutes the keys of every
    32-key block into the P.V key order (``inverse``: back into key order)."""
    if n % PV_KEY_BLOCK:
        raise ValueError(f"fp8_attention: the P.V key order needs a multiple of {PV_KEY_BLOCK} "
                         f"keys, got {n}")
    order = torch.tensor(PV_KEY_ORDER, dtype=torch.long)
    # out[pi(k)] = x[k] -> out = x[pi^-1]; back: x[k] = out[pi(k)] -> x = out[pi]
    within = order if inverse else torch.argsort(order)
    idx = (torch.arange(0, n, PV_KEY_BLOCK)[:, None] + within[None, :]).flatten()
    return idx.to(device)


def vt_to_pv_order(vt: torch.Tensor) -> torch.Tensor:
    """V^T [..., Dp, Sk_pad] (keys in order, Sk_pad a multiple of 32) -> the same with the keys
    of every 32-key block in the P.V key order: column ``32 i + PV_KEY_ORDER[k]`` holds key
    ``32 i + k``. Any dtype (e4m3 is gathered as bytes)."""
    idx = _pv_gather_index(vt.shape[-1], False, vt.device)
    return vt.view(torch.uint8)[..., idx].view(vt.dtype)


def vt_from_pv_order(vt: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`vt_to_pv_order`."""
    idx = _pv_gather_index(vt.shape[-1], True, vt.device)
    return vt.view(torch.uint8)[..., idx].view(vt.dtype)


def in_pv_order(qq: QuantizedQKV) -> QuantizedQKV:
    """``qq`` with ``vt`` in the P.V key order (the sm90ws kernel's input); ``qq`` itself if
    it already is."""
    if qq.vt_pv_order:
        return qq
    return replace(qq, vt=vt_to_pv_order(qq.vt).contiguous(), vt_pv_order=True)


def in_key_order(qq: QuantizedQKV) -> QuantizedQKV:
    """``qq`` with ``vt`` in key order (the plain layout); ``qq`` itself if it already is."""
    if not qq.vt_pv_order:
        return qq
    return replace(qq, vt=vt_from_pv_order(qq.vt).contiguous(), vt_pv_order=False)


def padded_head_dim(head_dim: int) -> int:
    """64 or 128: the head dim the kernels run at (smaller ones are zero-padded)."""
    if head_dim <= 0 or head_dim > 128:
        raise ValueError(f"fp8_attention: head_dim must be in [1, 128], got {head_dim}")
    return 64 if head_dim <= 64 else 128


def pad_to(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sylvester-Hadamard matrix of order n (a power of 2), entries +-1, unnormalised."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard_matrix: order must be a power of 2, got {n}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=32)
def cached_hadamard(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """:func:`hadamard_matrix` of order ``n`` as a contiguous ``dtype`` tensor on ``device``,
    made once per (n, dtype, device) and shared: the emulation, the Triton launchers and the
    FP8 wire rotate by it on every call. Read-only."""
    return hadamard_matrix(n).to(device=device, dtype=dtype).contiguous()


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero, as ``trunc(x +- 0.5)`` in x's dtype.

    Written the way the kernels do it (add 0.5 in fp32, truncate on the int cast) so the
    emulation makes the same fp32 roundings.
    """
    return torch.where(x >= 0, x + 0.5, x - 0.5).trunc()


def _group_amax(x: torch.Tensor, block: int) -> torch.Tensor:
    """amax of |x| [B, H, S, D] over head_dim and groups of ``block`` tokens -> [B, H, S]."""
    B, H, S, _ = x.shape
    a = x.abs().amax(dim=-1)  # [B, H, S]
    if block == 1:
        return a
    if block == 0:
        return a.amax(dim=-1, keepdim=True).amax(dim=1, keepdim=True).amax(
            dim=0, keepdim=True).expand(B, H, S).contiguous()
    Sp = pad_to(S, block)
    a = torch.nn.functional.pad(a, (0, Sp - S))
    a = a.view(B, H, Sp // block, block).amax(dim=-1, keepdim=True).expand(-1, -1, -1, block)
    return a.reshape(B, H, Sp)[:, :, :S].contiguous()


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> e4m3fn, round to nearest even (what the GPU's cvt.rn.satfinite does in range)."""
    return x.to(FP8)


# The K scales keep 22 significant bits (the two lowest of fp32's 23 stored mantissa bits are
# cleared, rounding toward zero): then 1.5 * 2^23 * k_scale is exact in fp32, and the kernels may
# fuse the int32 -> fp32 magic-number conversion with the K scale into one FMA,
# fma(bits(x + 0x4B400000), ks, -1.5 * 2^23 * ks) = fp32(x * ks) exactly (docs/fp8_attention.md).
K_SCALE_DROP_BITS = 2


def round_k_scale(s: torch.Tensor) -> torch.Tensor:
    """fp32 scales with their ``K_SCALE_DROP_BITS`` lowest mantissa bits cleared (toward zero).

    Parameters
    ----------
    s : fp32 tensor (any shape), finite and >= 0 (zeros stay zero).

    Returns
    -------
    fp32 tensor, same shape: ``s`` to 22 significant bits, at most 2^-21 relative below it.
    """
    return (s.contiguous().view(torch.int32) & -(1 << K_SCALE_DROP_BITS)).view(torch.float32)


def _quantize_rows(x: torch.Tensor, block: int, fmt: str, fp8: Fp8Format = E4M3FN
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization of fp32 [B, H, S, D] with a scale per group of ``block`` tokens.

    Returns (codes [B, H, S, D] int8 or ``fp8``, dequant scale [B, H, S] fp32).
    """
    amax = _group_amax(x, block)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    qmax = INT8_MAX if fmt == "int8" else fp8.max
    inv = qmax / amax  # fp32, as the kernel computes it
    y = x * inv[..., None]
    if fmt == "int8":
        codes = round_half_away(y).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    elif fmt == "fp8":
        codes = fp8.cast(y.clamp_(-qmax, qmax))
    else:
        raise ValueError(f"fp8_attention: unknown qk_format {fmt!r}")
    return codes, amax / qmax


def quantize_qkv_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    scheme: Fp8AttentionScheme = SCHEME,
    fp8_cast: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> QuantizedQKV:
    """The quantization pass of :data:`SCHEME` (or another scheme), on any device.

    Parameters
    ----------
    q : [B, Sq, H, D] float16/bfloat16/float32.
    k, v : [B, Sk, H, D], same dtype.
    scale : softmax scale, default ``1/sqrt(D)`` of the true D.
    scheme : the scheme, its FP8 format included (``scheme.fp8``: V's codes and max).
    fp8_cast : the fp32 -> FP8 conversion of V, default ``scheme.fp8.cast`` (another one to
        mirror a backend whose rounding differs, e.g. Triton's CPU interpreter); it gets values
        already clamped to the format's max.

    Returns
    -------
    QuantizedQKV (BHSD, see its docstring).
    """
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    Dp = padded_head_dim(D)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    Sk_pad = pad_to(max(Sk, 1), scheme.block_n)
    qf = q.float().transpose(1, 2)  # [B, H, Sq, D]
    kf = k.float().transpose(1, 2)
    vf = v.float().transpose(1, 2)
    if Dp != D:
        qf = torch.nn.functional.pad(qf, (0, Dp - D))
        kf = torch.nn.functional.pad(kf, (0, Dp - D))
        vf = torch.nn.functional.pad(vf, (0, Dp - D))
    score_scale = scale * LOG2E
    if scheme.hadamard:
        hd = cached_hadamard(Dp, torch.float32, qf.device)
        # +-1 times a 16-bit float is exact; the kernels sum in fp32 on the tensor cores.
        qf = qf @ hd
        kf = kf @ hd
        score_scale /= Dp
    stride, _ = stats_rows(Sk, scheme.stats_sample)
    if scheme.smooth_k and Sk > 0:
        k_mean = kf[:, :, ::stride].mean(dim=2, keepdim=True)  # [B, H, 1, Dp]
        kf = kf - k_mean
        # scale * q . mean(k) in natural-log units (the rotation's Dp divides out).
        lse_corr = (qf * k_mean).sum(-1) * (scale / (Dp if scheme.hadamard else 1))
    else:
        lse_corr = qf.new_zeros(B, H, Sq)
    fp8 = scheme.fp8
    if fp8_cast is None:
        fp8_cast = fp8.cast
    q_codes, q_deq = _quantize_rows(qf, scheme.q_block, scheme.qk_format, fp8)
    k_codes, k_deq = _quantize_rows(kf, scheme.k_block, scheme.qk_format, fp8)
    # Codes from the unrounded 127 / amax, the scale to 22 bits (round_k_scale): <= 2^-21
    # relative, far below the codes' own half-step error.
    k_deq = round_k_scale(k_deq)
    k_codes = torch.nn.functional.pad(k_codes.view(torch.uint8), (0, 0, 0, Sk_pad - Sk)).view(
        k_codes.dtype)
    k_deq = torch.nn.functional.pad(k_deq, (0, Sk_pad - Sk))
    if scheme.v_per_channel:
        v_amax = vf.abs().amax(dim=2) if Sk > 0 else vf.new_zeros(B, H, Dp)  # [B, H, Dp]
        if stride > 1:  # the sample's amax with headroom, unless a key exceeds it
            used = vf[:, :, ::stride].abs().amax(dim=2) * scheme.v_headroom
            used = torch.where(used > 0, used, torch.ones_like(used))
            over = (v_amax > used).any(dim=-1, keepdim=True)
            v_amax = torch.where(over, v_amax, used)
    else:
        v_amax = vf.abs().amax().expand(B, H, Dp).contiguous() if Sk > 0 else vf.new_zeros(
            B, H, Dp)
    v_amax = torch.where(v_amax > 0, v_amax, torch.ones_like(v_amax))
    v_codes = fp8_cast((vf * (fp8.max / v_amax)[:, :, None, :]).clamp_(-fp8.max, fp8.max))
    vt = torch.zeros(B, H, Dp, Sk_pad, dtype=torch.uint8, device=q.device)
    vt[:, :, :, :Sk] = v_codes.view(torch.uint8).transpose(-1, -2)
    return QuantizedQKV(
        q=q_codes.contiguous(),
        q_scale=(q_deq * score_scale).contiguous(),
        k=k_codes.contiguous(),
        k_scale=(k_deq * 1.0).contiguous(),
        vt=vt.view(fp8.dtype),
        v_scale=(v_amax / fp8.max).contiguous(),
        lse_corr=lse_corr.contiguous(),
        seqlen_k=Sk,
        head_dim=D,
    )


def _truncate_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep ``bits`` mantissa bits (after the leading one) of fp32 x, rounding toward zero."""
    m, e = torch.frexp(x)  # x = m * 2^e, 0.5 <= |m| < 1
    step = float(2 ** (bits + 1))
    return torch.ldexp(torch.trunc(m * step) / step, e)


def _pv_product(p8: torch.Tensor, vt: torch.Tensor, acc: torch.Tensor | None,
                bits: int | None) -> torch.Tensor:
    """p8 [.., M, N] e4m3 @ vt^T [.., D, N] accumulated into ``acc`` (or zero) in fp32.

    With ``bits``, the accumulator is truncated after every 32-key step, a model of the FP8
    tensor core's limited-precision accumulator.
    """
    pf, vf = p8.float(), vt.float()
    if bits is None:
        prod = pf @ vf.transpose(-1, -2)
        return prod if acc is None else acc + prod
    out = torch.zeros_like(pf[..., :1].expand(*pf.shape[:-1], vf.shape[-2])) if acc is None \
        else acc
    for j in range(0, pf.shape[-1], 32):
        out = _truncate_mantissa(out + pf[..., j:j + 32] @ vf[..., j:j + 32].transpose(-1, -2),
                                 bits)
    return out


def fp8_attention_quantized_ref(
    qq: QuantizedQKV,
    out_dtype: torch.dtype,
    scheme: Fp8AttentionScheme | None = None,
    fp8_cast: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention kernel on quantized inputs, emulated tile by tile (``fp8_cast``: P's
    fp32 -> FP8 conversion, default the format's). ``qq.vt`` may be in either key order
    (``qq.vt_pv_order``). ``scheme`` defaults to ``SCHEME`` in ``qq``'s FP8 format
    (:attr:`QuantizedQKV.fp8_format`); a scheme of another format is an error.

    Returns
    -------
    out : [B, Sq, H, D] ``out_dtype``.
    lse : [B, H, Sq] fp32, natural log (``-inf`` where Sk == 0).
    """
    if scheme is None:
        scheme = with_format(SCHEME, qq.fp8_format)
    elif qq.vt.dtype != scheme.fp8.dtype:
        raise ValueError(f"fp8_attention: V^T is {qq.vt.dtype} but the scheme's FP8 format is "
                         f"{scheme.fp8.name} ({scheme.fp8.dtype})")
    if fp8_cast is None:
        fp8_cast = scheme.fp8.cast
    qq = in_key_order(qq)
    B, H, Sq, Dp = qq.q.shape
    Sk, D = qq.seqlen_k, qq.head_dim
    qf = qq.q.float()
    kf = qq.k.float()
    m = torch.full((B, H, Sq), float("-inf"), device=qf.device)
    l_sum = torch.zeros(B, H, Sq, device=qf.device)
    acc = torch.zeros(B, H, Sq, Dp, device=qf.device)
    bn = scheme.block_n
    for n0 in range(0, Sk, bn):
        n1 = min(n0 + bn, Sk)
        # int8 x int8 products summed over Dp <= 128 stay below 2^24: exact in fp32.
        s = (qf @ kf[:, :, n0:n1].transpose(-1, -2)) * qq.k_scale[:, :, None, n0:n1]
        s = s * qq.q_scale[..., None]
        m_new = torch.maximum(m, s.amax(dim=-1))
        alpha = torch.exp2(m - m_new)
        p = torch.exp2(s - (m_new[..., None] - scheme.p_shift))
        p8 = fp8_cast(p)
        l_sum = l_sum * alpha + (p8.float() if scheme.p8_row_sum else p).sum(dim=-1)
        vt = qq.vt[:, :, :, n0:n1]
        if scheme.two_level:
            acc = acc * alpha[..., None] + _pv_product(p8, vt, None, scheme.pv_accum_bits)
        else:
            acc = _pv_product(p8, vt, acc * alpha[..., None], scheme.pv_accum_bits)
        m = m_new
    if Sk == 0:
        out = torch.zeros(B, H, Sq, Dp, device=qf.device)
        lse = torch.full((B, H, Sq), float("-inf"), device=qf.device)
    else:
        out = acc / l_sum[..., None] * qq.v_scale[:, :, None, :]
        lse = (m + torch.log2(l_sum) - scheme.p_shift) * LN2 + qq.lse_corr
    out = out[..., :D].transpose(1, 2).to(out_dtype).contiguous()
    return out, lse.float().contiguous()


def fp8_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    scheme: Fp8AttentionScheme = SCHEME,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 attention of ``scheme`` (default: the op's), BSHD in and out.

    Parameters
    ----------
    q : [B, Sq, H, D] float16/bfloat16/float32, D <= 128.
    k, v : [B, Sk, H, D].
    scale : softmax scale, default ``1/sqrt(D)``.

    Returns
    -------
    out : [B, Sq, H, D] in q's dtype; lse : [B, H, Sq] fp32 natural log.
    """
    return fp8_attention_quantized_ref(quantize_qkv_ref(q, k, v, scale, scheme), q.dtype, scheme)


def fp8_attention_naive_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor FP8 attention (FlashAttention-3's released FP8 numerics), the baseline."""
    return fp8_attention_ref(q, k, v, scale, NAIVE_SCHEME)


def scheme_variant(**changes) -> Fp8AttentionScheme:
    """``SCHEME`` with some fields changed (for ablations)."""
    return replace(SCHEME, **changes)


def dit_like_qkv(
    batch: int,
    seqlen: int,
    heads: int,
    head_dim: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    score_std: float = 2.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic Q, K, V [B, S, H, D] with the statistics that break naive FP8 attention.

    What video/image DiTs show (SageAttention papers) and plain Gaussians lack:

    * Q heavy-tailed: Student-t with 4 degrees of freedom, channel scales log-normal.
    * K with a large offset common to all tokens (2 sigma per channel) and ``max(2, D/32)``
      outlier channels whose offset is 10-50x the other channels' spread (std 3).
    * V with channel scales and a small common offset.
    * Q is scaled so that the softmax-relevant (K-mean-free) scores ``q . (k - mean k) / sqrt(D)``
      of the first 256 queries have standard deviation ``score_std`` (2.5: a median query spreads
      its attention over ~10 % of 2k keys, 1 % of queries over fewer than 6 keys).

    Deterministic for a given seed and device.
    """
    g = torch.Generator(device=device)
    g.manual_seed(seed)

    def n(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32)

    B, S, H, D = batch, seqlen, heads, head_dim
    chi2 = n(B, S, H, D)
    chi2 = chi2 * chi2
    for _ in range(3):
        x = n(B, S, H, D)
        chi2 += x * x
    q = n(B, S, H, D) / torch.sqrt(chi2 / 4) * torch.exp(0.5 * n(1, 1, H, D))
    del chi2
    k = n(B, S, H, D) * torch.exp(0.3 * n(1, 1, H, D)) + 2 * n(1, 1, H, D)
    num_out = max(2, D // 32)
    idx = torch.randperm(D, generator=g, device=device)[:num_out]
    mag = 10 + 40 * torch.rand(num_out, generator=g, device=device)
    k[..., idx] = 3 * n(B, S, H, num_out) + mag * torch.sign(n(1, 1, H, num_out))
    v = n(B, S, H, D) * torch.exp(0.3 * n(1, 1, H, D)) + 0.5 * n(1, 1, H, D)
    kt = k.transpose(1, 2)
    s = q[:, :256].transpose(1, 2) @ (kt - kt.mean(2, keepdim=True)).transpose(-1, -2)
    q = q * (score_std / (s / math.sqrt(D)).std())
    return q.to(dtype), k.to(dtype), v.to(dtype)


def attention_error_metrics(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Accuracy metrics of an attention output [B, S, H, D] against a reference.

    cos_mean / cos_min: cosine similarity per (batch, head) over (S, D), mean and worst;
    rel_l1: sum|out - ref| / sum|ref|; rmse.
    """
    o = out.double().transpose(1, 2).flatten(2)
    r = ref.double().transpose(1, 2).flatten(2)
    cos = torch.nn.functional.cosine_similarity(o.flatten(0, 1), r.flatten(0, 1), dim=-1)
    return {
        "cos_mean": cos.mean().item(),
        "cos_min": cos.min().item(),
        "rel_l1": ((o - r).abs().sum() / r.abs().sum().clamp_min(1e-300)).item(),
        "rmse": (o - r).pow(2).mean().sqrt().item(),
    }
