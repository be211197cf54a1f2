"""Triton kernels of ``xdit_ops::fp8_attention`` (``@triton.jit`` only; launchers live in
``xdit_ops/triton/fp8_attention.py``).

They implement :data:`xdit_ops.reference.fp8_attention.SCHEME` operation for operation, in
the same fp32 order, so the CPU emulation is their oracle:

* ``kv_stats_kernel``: partial sums over key chunks of the Hadamard-rotated K (for its mean)
  and partial per-channel amax of V.
* ``quantize_q_kernel`` and ``quantize_kv_kernel``: the quantization pass: rotate Q and K on
  the tensor cores (+-1 matrix, 16-bit inputs: exact products, fp32 sums), subtract the K
  mean, INT8-quantize Q and K per token, write the LSE correction, FP8-quantize V per channel
  and write it transposed (keys contiguous: the K-major B operand of the FP8 P.V).
  With ``STATS_GIVEN`` they take the K mean and V amax as given (reduced across ranks:
  usp_attention's FP8 wire) instead of reducing ``kv_stats_kernel``'s partials.
* ``v_repair_kernel``: where the statistics were a strided sample's (the scheme's
  ``stats_sample``) and a key exceeded V's sampled scale, V of that (batch, head) again with
  its exact amax.
* ``attn_fwd_kernel``: INT8 Q K^T (exact int32), online softmax in fp32 base 2 over key
  tiles of BLOCK_N keys (the scheme's ``block_n``, 64, unless a config says otherwise), P =
  exp2(s - m + P_SHIFT) cast to e4m3, P.V on the FP8 tensor cores from a zero accumulator per tile,
  added to the fp32 output accumulator (two-level accumulation; ``TWO_LEVEL=False``
  accumulates in place instead, the scheme with ``two_level=False``). ``FOLD_SCALES=True``
  applies the K and Q scales inside FMAs (fewer fp32 operations, another rounding order than
  the emulation's). Launch configurations: ``AttnConfig`` in the launcher module.

The FP8 format is the element type of the V^T pointer (``VT8``): ``tl.float8e4nv`` (e4m3fn)
or ``tl.float8e4b8`` (e4m3fnuz, AMD MI300's), a compile-time specialisation that the launchers
choose with the dtype of the V^T buffer (``xdit_ops.reference.fp8_attention.Fp8Format``). From
it the kernels derive, as constexprs, the cast target (``FP8_DTYPE``), the max V is scaled to
(``FP8_MAX``: 448 or 240) and P's scaling (``P_SHIFT``: 8 or 7).
"""

from __future__ import annotations

import triton
import triton.language as tl

# int32 -> fp32 without I2F (which runs at the exponential unit's rate on Hopper): adding the
# bit pattern of 1.5 * 2^23 and subtracting it as a float is exact for |x| < 2^22, and
# |INT8 Q K^T| <= 127 * 127 * 128 < 2^21.
MAGIC_I = tl.constexpr(0x4B400000)
MAGIC_F = tl.constexpr(12582912.0)
LN2 = tl.constexpr(0.6931471805599453)
# Per FP8 format (Fp8Format.max and .p_shift in the reference; a test checks they agree).
E4M3FN_MAX = tl.constexpr(448.0)
E4M3FN_P_SHIFT = tl.constexpr(8.0)
E4M3FNUZ_MAX = tl.constexpr(240.0)
E4M3FNUZ_P_SHIFT = tl.constexpr(7.0)
# Half the smallest e4m3fnuz subnormal (2^-10): a round-to-nearest-even cast makes |x| <= this
# zero.
FNUZ_HALF_MIN_SUBNORMAL = tl.constexpr(2.0**-11)


@triton.jit
def _rotate(x, had, UPCAST: tl.constexpr):
    """x @ had with fp32 sums: +-1 times a 16-bit float is exact, so the tensor cores' bf16/fp16
    product is. UPCAST does it in fp32 (Triton's CPU interpreter multiplies bf16 wrongly)."""
    if UPCAST:
        return tl.dot(x.to(tl.float32), had.to(tl.float32), input_precision="ieee")
    return tl.dot(x, had, out_dtype=tl.float32)


@triton.jit
def kv_stats_kernel(
    K, V, HAD, KSUM, VMAX,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    H, Sk, tokens_per_chunk, row_stride,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_S: tl.constexpr, UPCAST: tl.constexpr,
):
    """Grid (B * H, NUM_CHUNKS). KSUM/VMAX: [B * H, NUM_CHUNKS, DP] fp32: per chunk of
    tokens_per_chunk keys (a multiple of BLOCK_S), the sum of the rotated K over its keys and
    the amax of |V| per channel. The keys are rows ``0, row_stride, 2 row_stride, ...`` of K
    and V, Sk of them (row_stride 1: every key; more: the scheme's strided sample,
    ``stats_rows``).

    Each thread accumulates its own elements of the [BLOCK_S, DP] tiles across the chunk (K in
    fp32 in the rotation's tensor-core layout, V's amax in V's dtype: |v| and max are exact),
    and the chunk's rows are reduced once at the end: a reduction over the tile's rows per tile
    (shuffles and block-wide barriers, ~230 of a thread's ~470 instructions per tile at head
    dim 128) is what bounded this kernel. The K sum's order is fixed by the chunking
    (deterministic); it is not the emulation's order, which no GPU order is.
    """
    bh = tl.program_id(0).to(tl.int64)  # offsets below can pass 2^31 at long sequences
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, DP)
    offs_s = tl.arange(0, BLOCK_S)
    d_ok = offs_d < D
    had = tl.load(HAD + offs_d[:, None] * DP + offs_d[None, :])
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    kacc = tl.zeros([BLOCK_S, DP], dtype=tl.float32)
    vacc = tl.zeros([BLOCK_S, DP], dtype=V.dtype.element_ty)
    start = chunk * tokens_per_chunk
    stop = tl.minimum(start + tokens_per_chunk, Sk)
    for s0 in range(start, stop, BLOCK_S):
        rows = s0 + offs_s
        row_ok = (rows < stop)[:, None]
        ok = row_ok & d_ok[None, :]
        k = tl.load(k_base + (rows * row_stride)[:, None] * stride_ks + offs_d[None, :], mask=ok,
                    other=0.0)
        # The select (a no-op: masked rows rotate to zeros) keeps Triton from folding the add
        # into the wgmma's accumulator: the sum stays an fp32 add, rounded to nearest, not the
        # tensor core's accumulation.
        kacc += tl.where(row_ok, _rotate(k, had, UPCAST), 0.0)
        v = tl.load(v_base + (rows * row_stride)[:, None] * stride_vs + offs_d[None, :], mask=ok,
                    other=0.0)
        vacc = tl.maximum(vacc, tl.abs(v)).to(V.dtype.element_ty)
    out = (bh * num_chunks + chunk) * DP + offs_d
    tl.store(KSUM + out, tl.sum(kacc, axis=0))
    tl.store(VMAX + out, tl.max(vacc, axis=0).to(tl.float32))


@triton.jit
def _div(a, b):
    """IEEE fp32 division (Triton's ``/`` is div.full.f32, ~2 ulp): the scales must be the
    emulation's, bit for bit, or codes near a rounding boundary move."""
    return tl.math.div_rn(a, b)


@triton.jit
def _round_int8(x):
    """round-half-away(x) clamped to [-127, 127], as trunc(x +- 0.5) (the emulation's op)."""
    y = tl.where(x >= 0, x + 0.5, x - 0.5)
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)
    return y.to(tl.int8)  # fp32 -> int truncates toward zero


@triton.jit
def _int8_rows(x):
    """Symmetric INT8 codes of each row of ``x`` (round half away of ``x * 127 / amax``) and the
    row amax (1 for an all-zero row): the per-token quantization of Q and of K."""
    amax = tl.max(tl.abs(x), axis=1)
    amax = tl.where(amax > 0, amax, 1.0)
    return _round_int8(x * _div(127.0, amax)[:, None]), amax


@triton.jit
def _to_fp8(x, FP8_DTYPE: tl.constexpr, FP8_MAX: tl.constexpr):
    """fp32 ``x`` clamped to [-FP8_MAX, FP8_MAX] and cast to FP8_DTYPE, round to nearest even.

    e4m3fnuz has no negative zero: its code 0x80 is the NaN. A value that rounds to zero
    (|x| <= 2^-11, half the smallest subnormal) is made +0 first, so the code is 0x00 whatever
    the conversion does with the sign of a zero (Triton's CPU interpreter keeps it: 0x80). For
    a conversion that drops it (round to nearest even, as torch's) this changes no code.
    """
    x = tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX)
    if FP8_DTYPE == tl.float8e4b8:
        x = tl.where(tl.abs(x) <= FNUZ_HALF_MIN_SUBNORMAL, 0.0, x)
    return x.to(FP8_DTYPE, fp_downcast_rounding="rtne")


@triton.jit
def _this_head(H):
    """(bh, b, h) of a program of grid (P, B * H); bh int64: offsets from it can pass 2^31 at
    long sequences."""
    bh = tl.program_id(1).to(tl.int64)
    return bh, bh // H, bh % H


@triton.jit
def _round_k_scale(s):
    """The K scale to 22 significant bits, toward zero (the reference's ``round_k_scale``): the
    two lowest mantissa bits cleared, so that 1.5 * 2^23 * s is exact in fp32 (an attention
    kernel may then fuse the magic-number int32 -> fp32 conversion with the K scale)."""
    return (s.to(tl.int32, bitcast=True) & -4).to(tl.float32, bitcast=True)


@triton.jit
def _load_had(HAD, DP: tl.constexpr):
    """The [DP, DP] Hadamard matrix."""
    offs_d = tl.arange(0, DP)
    return tl.load(HAD + offs_d[:, None] * DP + offs_d[None, :])


@triton.jit
def _load_k_mean(KSUM, bh, Sk, num_chunks, DP: tl.constexpr, NUM_CHUNKS_P2: tl.constexpr,
                 STATS_GIVEN: tl.constexpr):
    """The K mean of one (batch, head): the kv_stats partial sums (KSUM [B * H, num_chunks,
    DP]) reduced and divided by Sk, or, with STATS_GIVEN, read as it is (KSUM [B * H, DP]; Sk
    and num_chunks unused)."""
    offs_d = tl.arange(0, DP)
    if STATS_GIVEN:
        k_mean = tl.load(KSUM + bh * DP + offs_d)
    else:
        offs_c = tl.arange(0, NUM_CHUNKS_P2)
        c_ok = (offs_c < num_chunks)[:, None]
        part = (bh * num_chunks + offs_c[:, None]) * DP + offs_d[None, :]
        k_mean = _div(tl.sum(tl.load(KSUM + part, mask=c_ok, other=0.0), axis=0),
                      Sk.to(tl.float32))
    return k_mean


@triton.jit
def _load_v_amax(VMAX, bh, num_chunks, DP: tl.constexpr, NUM_CHUNKS_P2: tl.constexpr,
                 STATS_GIVEN: tl.constexpr, V_HEADROOM: tl.constexpr = 1.0):
    """The V amax per channel of one (batch, head): the kv_stats partials (VMAX [B * H,
    num_chunks, DP]) reduced, times V_HEADROOM (a power of two: exact; not 1 where the
    partials are a strided sample's), zeros made 1, or, with STATS_GIVEN, read as it is (VMAX
    [B * H, DP], without zeros)."""
    offs_d = tl.arange(0, DP)
    if STATS_GIVEN:
        v_amax = tl.load(VMAX + bh * DP + offs_d)
    else:
        offs_c = tl.arange(0, NUM_CHUNKS_P2)
        c_ok = (offs_c < num_chunks)[:, None]
        part = (bh * num_chunks + offs_c[:, None]) * DP + offs_d[None, :]
        v_amax = tl.max(tl.load(VMAX + part, mask=c_ok, other=0.0), axis=0)
        if V_HEADROOM != 1.0:
            v_amax = v_amax * V_HEADROOM
        v_amax = tl.where(v_amax > 0, v_amax, 1.0)
    return v_amax


# The two quantization kernels below walk several BLOCK_S-row tiles per program (a grid
# stride loop): the program's fixed cost (the Hadamard matrix, 32 KB at head dim 128, and the
# stats partials, num_chunks x DP x 8 bytes, both from L2; more than half of what a one-tile
# program read) is paid once, and Triton software-pipelines the next tiles' Q or K loads
# (cp.async) under the current tile's work. Q and K/V are separate launches: in one program,
# what the second loop needs stays live across the first (155 registers a thread at 8 warps:
# one program per SM), and in one kernel with a branch per program the two loops' shared
# memory adds up. Bases per (batch, head) are int64, offsets inside a head int32 (rows x
# stride < 2^31) and rebuilt from each tile's rows: loop-invariant [BLOCK_S, DP] offset tensors
# would stay live across the loop (32 registers a thread each). Each tile's operations are the
# emulation's, in the same order, whatever the number of programs.


@triton.jit
def quantize_q_kernel(
    Q, HAD, KSUM, Q8, QSCALE, LSECORR,
    stride_qb, stride_qs, stride_qh,
    H, Sq, Sk, num_chunks, score_scale, corr_scale,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_S: tl.constexpr, NUM_CHUNKS_P2: tl.constexpr,
    UPCAST: tl.constexpr, STATS_GIVEN: tl.constexpr = False,
):
    """Grid (P, B * H): program p quantizes the tiles p, p + P, ... of Q of one (batch, head):
    rotate, INT8 per row, LSE correction scale * q . mean(k).

    Q8 [B, H, Sq, DP] int8, QSCALE/LSECORR [B, H, Sq] fp32. KSUM: the kv_stats partial sums
    [B * H, num_chunks, DP] of Sk keys, or, with STATS_GIVEN, the K mean [B * H, DP] (Sk and
    num_chunks unused: usp_attention's FP8 wire, whose statistics are reduced across ranks).
    """
    pid = tl.program_id(0)
    bh, b, h = _this_head(H)
    offs_d = tl.arange(0, DP)
    offs_s = tl.arange(0, BLOCK_S)
    d_ok = offs_d < D
    had = _load_had(HAD, DP)
    k_mean = _load_k_mean(KSUM, bh, Sk, num_chunks, DP, NUM_CHUNKS_P2, STATS_GIVEN)
    q_base = Q + b * stride_qb + h * stride_qh
    q8_base = Q8 + bh * Sq * DP
    row_base = bh * Sq
    for t in tl.range(pid, tl.cdiv(Sq, BLOCK_S), tl.num_programs(0)):
        rows = t * BLOCK_S + offs_s
        q_ok = rows < Sq
        q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :],
                    mask=q_ok[:, None] & d_ok[None, :], other=0.0)
        qr = _rotate(q, had, UPCAST)
        codes, amax = _int8_rows(qr)
        tl.store(q8_base + rows[:, None] * DP + offs_d[None, :], codes, mask=q_ok[:, None])
        tl.store(QSCALE + row_base + rows, _div(amax, 127.0) * score_scale, mask=q_ok)
        corr = tl.sum(qr * k_mean[None, :], axis=1) * corr_scale
        tl.store(LSECORR + row_base + rows, corr, mask=q_ok)


@triton.jit
def _v_tiles(v_base, vt_base, stride_vs, pid, nprog, num_tiles, Sk, Sk_pad, v_mul,
             D: tl.constexpr, DP: tl.constexpr, BLOCK_S: tl.constexpr,
             VT_PV_ORDER: tl.constexpr, K_BLOCK: tl.constexpr, V_STAGES: tl.constexpr,
             FP8_DTYPE: tl.constexpr, FP8_MAX: tl.constexpr, TRACK: tl.constexpr):
    """V's key tiles pid, pid + nprog, ... of one (batch, head) to FP8 (``v * v_mul`` per
    channel), stored transposed at ``vt_base`` ([DP, Sk_pad], keys contiguous; the tile's
    keys in the P.V key order with VT_PV_ORDER). Returns, with TRACK, the running max of |V|
    per element over the tiles ([BLOCK_S, DP] in V's dtype: exact; in fp32 it was no faster,
    run 107), else zeros."""
    offs_d = tl.arange(0, DP)
    offs_s = tl.arange(0, BLOCK_S)
    d_ok = offs_d < D
    vacc = tl.zeros([BLOCK_S, DP], dtype=v_base.dtype.element_ty)
    for t in tl.range(pid, num_tiles, nprog, num_stages=V_STAGES):
        rows = t * BLOCK_S + offs_s
        ld_ok = (rows < Sk)[:, None] & d_ok[None, :]
        v = tl.load(v_base + rows[:, None] * stride_vs + offs_d[None, :], mask=ld_ok, other=0.0)
        vf = v.to(tl.float32)
        if TRACK:
            vacc = tl.maximum(vacc, tl.abs(v)).to(v_base.dtype.element_ty)
        vq = _to_fp8(vf * v_mul[None, :], FP8_DTYPE, FP8_MAX)
        if VT_PV_ORDER:
            # Row (key) bits (b4 b3 b2 b1 b0) = (jj1 jj0 l1 l0 b) -> (jj1 l1 l0 jj0 b): the tile's
            # rows permuted in registers, so the store stays contiguous along keys.
            vq = tl.reshape(vq, [BLOCK_S // 32, 2, 2, 4, 2, DP])
            vq = tl.reshape(tl.permute(vq, [0, 1, 3, 2, 4, 5]), [BLOCK_S, DP])
        if K_BLOCK == 1:
            tl.store(vt_base + offs_d[None, :] * Sk_pad + rows[:, None], vq)
        else:
            tl.store(vt_base + offs_d[None, :] * Sk_pad + rows[:, None], vq,
                     mask=(rows < Sk_pad)[:, None])
    return vacc


@triton.jit
def quantize_kv_kernel(
    K, V, HAD, KSUM, VMAX, K8, KSCALE, VT8, VSCALE, VPART,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    H, Sk, Sk_pad, num_chunks, mean_n, num_parts,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_S: tl.constexpr, NUM_CHUNKS_P2: tl.constexpr,
    UPCAST: tl.constexpr, VT_PV_ORDER: tl.constexpr = False, STATS_GIVEN: tl.constexpr = False,
    K_BLOCK: tl.constexpr = 1, V_STAGES: tl.constexpr = 3, V_HEADROOM: tl.constexpr = 1.0,
    PART: tl.constexpr = 0, NUM_PARTS_P2: tl.constexpr = 0,
):
    """Grid (P, B * H): program p quantizes the key tiles p, p + P, ... of one (batch, head).
    V: FP8 (VT8's format, scaled to its max) per channel, stored transposed (keys contiguous); K:
    rotate, subtract the mean, INT8
    per key (codes from 127 / amax, the scale amax / 127 cut to 22 significant bits), zero
    codes and scales in the padding.

    K8 [B, H, Sk_pad, DP] int8, KSCALE [B, H, Sk_pad] fp32, VT8 [B, H, DP, Sk_pad] e4m3fn or
    e4m3fnuz,
    VSCALE [B, H, DP] fp32. VT_PV_ORDER: V^T's keys in the P.V key order of the sm90ws kernel
    (``xdit_ops.reference.fp8_attention.PV_KEY_ORDER``: inside every 32-key block, key k at
    column 4 l + 16 (jj >> 1) + 2 (jj & 1) + b for k = 8 jj + 2 l + b); BLOCK_S a multiple of 32.
    KSUM/VMAX: the kv_stats partials [B * H, num_chunks, DP], or, with STATS_GIVEN, the K mean
    and the V amax [B * H, DP] (amax without zeros; num_chunks unused): usp_attention's FP8
    wire, which quantizes a rank's Sk tokens given the statistics of the whole sequence.
    K_BLOCK: keys per K scale, 1 (per key) or BLOCK_S (one scale per tile of BLOCK_S keys: the
    amax over the tile's keys and channels; the scheme's ``k_block``, XDIT_OPS_FP8_K_SCALE=tile
    with BLOCK_S = 128). Then Sk_pad need not be a multiple of BLOCK_S (the stores are masked
    to the keys below Sk_pad).
    V_STAGES: software-pipelining depth of the V loop (V is quantized in a loop of its own,
    before K's; the launch's num_stages sets K's).
    mean_n: the keys the K sums of KSUM are over (Sk, or the strided sample's count).
    V_HEADROOM: not 1 where the VMAX partials are a strided sample's (the scheme's
    ``stats_sample``): V is scaled to V_HEADROOM times their amax, and each program writes the
    exact amax of |V| over its keys to VPART [B * H, P, DP] (P: the grid's programs per head)
    for :func:`v_repair_kernel`, which requantizes a (batch, head) where a key exceeded it.
    PART: 0 both V and K, 1 V only, 2 K only (the pass's K/V work as two launches). With
    PART 2 and V_HEADROOM the K launch first does :func:`v_repair_kernel`'s work for its
    (batch, head) (``num_parts``: the V launch's programs per head, VPART's rows;
    NUM_PARTS_P2 its next power of two): one launch less.
    """
    tl.static_assert(K_BLOCK == 1 or K_BLOCK == BLOCK_S)
    FP8_DTYPE: tl.constexpr = VT8.dtype.element_ty
    FP8_MAX: tl.constexpr = E4M3FNUZ_MAX if FP8_DTYPE == tl.float8e4b8 else E4M3FN_MAX
    pid = tl.program_id(0)
    num_tiles = tl.cdiv(Sk_pad, BLOCK_S)
    bh, b, h = _this_head(H)
    offs_d = tl.arange(0, DP)
    offs_s = tl.arange(0, BLOCK_S)
    d_ok = offs_d < D
    # V first, in a loop of its own: Triton software-pipelines only the loads that feed a dot in
    # a loop that has one (K's, into the rotation), so a V load in K's loop is a plain load
    # whose DRAM latency every tile waits out (with one program per SM, the K_BLOCK = 128 launch,
    # nothing else runs then). Alone, with num_stages, its loads are cp.async V_STAGES - 1 tiles
    # ahead. The K mean and the Hadamard matrix are read after it (not live across it).
    if PART != 2:
        v_amax = _load_v_amax(VMAX, bh, num_chunks, DP, NUM_CHUNKS_P2, STATS_GIVEN, V_HEADROOM)
        if pid == 0:
            tl.store(VSCALE + bh * DP + offs_d, _div(v_amax, FP8_MAX))
        v_base = V + b * stride_vb + h * stride_vh
        vacc = _v_tiles(v_base, VT8 + bh * DP * Sk_pad, stride_vs, pid, tl.num_programs(0),
                        num_tiles, Sk, Sk_pad, _div(FP8_MAX, v_amax), D, DP, BLOCK_S,
                        VT_PV_ORDER, K_BLOCK, V_STAGES, FP8_DTYPE, FP8_MAX,
                        V_HEADROOM != 1.0)
        if V_HEADROOM != 1.0:
            tl.store(VPART + (bh * tl.num_programs(0) + pid) * DP + offs_d,
                     tl.max(vacc, axis=0).to(tl.float32))
    if PART == 1:
        return
    if PART == 2 and V_HEADROOM != 1.0:
        _v_repair(V + b * stride_vb + h * stride_vh, VMAX, VPART, VT8, VSCALE, stride_vs, bh,
                  pid, tl.num_programs(0), Sk, Sk_pad, num_chunks, num_parts, D, DP, BLOCK_S,
                  NUM_CHUNKS_P2, NUM_PARTS_P2, VT_PV_ORDER, K_BLOCK, 1, V_HEADROOM, FP8_DTYPE,
                  FP8_MAX)
    had = _load_had(HAD, DP)
    k_mean = _load_k_mean(KSUM, bh, mean_n, num_chunks, DP, NUM_CHUNKS_P2, STATS_GIVEN)
    k_base = K + b * stride_kb + h * stride_kh
    k8_base = K8 + bh * Sk_pad * DP
    key_base = bh * Sk_pad
    for t in tl.range(pid, num_tiles, tl.num_programs(0)):
        rows = t * BLOCK_S + offs_s
        k_ok = rows < Sk
        ld_ok = k_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + rows[:, None] * stride_ks + offs_d[None, :], mask=ld_ok, other=0.0)
        kr = _rotate(k, had, UPCAST) - k_mean[None, :]
        kr = tl.where(k_ok[:, None], kr, 0.0)
        if K_BLOCK == 1:
            codes, amax = _int8_rows(kr)
            tl.store(k8_base + rows[:, None] * DP + offs_d[None, :], codes)
            tl.store(KSCALE + key_base + rows,
                     tl.where(k_ok, _round_k_scale(_div(amax, 127.0)), 0.0))
        else:
            # One scale for the tile's keys (the padding rows are zeros: they do not count).
            tile_amax = tl.max(tl.max(tl.abs(kr), axis=1), axis=0)
            tile_amax = tl.where(tile_amax > 0, tile_amax, 1.0)
            codes = _round_int8(kr * _div(127.0, tile_amax))
            st_ok = rows < Sk_pad
            tl.store(k8_base + rows[:, None] * DP + offs_d[None, :], codes, mask=st_ok[:, None])
            tl.store(KSCALE + key_base + rows,
                     tl.where(k_ok, _round_k_scale(_div(tile_amax, 127.0)), 0.0), mask=st_ok)


@triton.jit
def v_repair_kernel(
    V, VMAX, VPART, VT8, VSCALE,
    stride_vb, stride_vs, stride_vh,
    H, Sk, Sk_pad, num_chunks, num_parts,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_S: tl.constexpr, NUM_CHUNKS_P2: tl.constexpr,
    NUM_PARTS_P2: tl.constexpr, UPCAST: tl.constexpr = False, VT_PV_ORDER: tl.constexpr = False,
    K_BLOCK: tl.constexpr = 1, V_STAGES: tl.constexpr = 3, V_HEADROOM: tl.constexpr = 4.0,
):
    """Grid (P, B * H), after quantize_kv_kernel with V_HEADROOM (V scaled to V_HEADROOM
    times a strided sample's amax, VMAX's partials): where some key of a (batch, head)
    exceeded that scale in some channel (VPART: the K/V programs' exact amaxes, [B * H,
    num_parts, DP]), V of that (batch, head) is quantized again with its exact amax per
    channel over all keys and its scales rewritten; elsewhere nothing (each program reads
    ~(num_chunks + num_parts) x DP floats and ends). So no V value is ever clipped, and the
    result is :func:`~xdit_ops.reference.fp8_attention.quantize_qkv_ref`'s. (UPCAST: unused,
    the launcher's constants of the K/V kernel.)"""
    FP8_DTYPE: tl.constexpr = VT8.dtype.element_ty
    FP8_MAX: tl.constexpr = E4M3FNUZ_MAX if FP8_DTYPE == tl.float8e4b8 else E4M3FN_MAX
    pid = tl.program_id(0)
    bh, b, h = _this_head(H)
    _v_repair(V + b * stride_vb + h * stride_vh, VMAX, VPART, VT8, VSCALE, stride_vs, bh, pid,
              tl.num_programs(0), Sk, Sk_pad, num_chunks, num_parts, D, DP, BLOCK_S,
              NUM_CHUNKS_P2, NUM_PARTS_P2, VT_PV_ORDER, K_BLOCK, V_STAGES, V_HEADROOM, FP8_DTYPE,
              FP8_MAX)


@triton.jit
def _v_repair(v_base, VMAX, VPART, VT8, VSCALE, stride_vs, bh, pid, nprog, Sk, Sk_pad,
              num_chunks, num_parts, D: tl.constexpr, DP: tl.constexpr, BLOCK_S: tl.constexpr,
              NUM_CHUNKS_P2: tl.constexpr, NUM_PARTS_P2: tl.constexpr,
              VT_PV_ORDER: tl.constexpr, K_BLOCK: tl.constexpr, V_STAGES: tl.constexpr,
              V_HEADROOM: tl.constexpr, FP8_DTYPE: tl.constexpr, FP8_MAX: tl.constexpr):
    """v_repair_kernel's work for one (batch, head) on program ``pid`` of ``nprog``: the
    sampled scale (VMAX's partials x V_HEADROOM) against the exact amax (VPART's num_parts
    partials); where a channel's exact amax exceeds it, V's tiles pid, pid + nprog, ... again
    with the exact amax, and (program 0) its scales."""
    offs_d = tl.arange(0, DP)
    used = _load_v_amax(VMAX, bh, num_chunks, DP, NUM_CHUNKS_P2, False, V_HEADROOM)
    offs_p = tl.arange(0, NUM_PARTS_P2)
    parts = tl.load(VPART + (bh * num_parts + offs_p[:, None]) * DP + offs_d[None, :],
                    mask=(offs_p < num_parts)[:, None], other=0.0)
    exact = tl.max(parts, axis=0)
    if tl.max((exact > used).to(tl.int32), axis=0) > 0:
        v_amax = tl.where(exact > 0, exact, 1.0)
        if pid == 0:
            tl.store(VSCALE + bh * DP + offs_d, _div(v_amax, FP8_MAX))
        _v_tiles(v_base, VT8 + bh * DP * Sk_pad, stride_vs, pid, nprog,
                 tl.cdiv(Sk_pad, BLOCK_S), Sk, Sk_pad, _div(FP8_MAX, v_amax), D, DP, BLOCK_S,
                 VT_PV_ORDER, K_BLOCK, V_STAGES, FP8_DTYPE, FP8_MAX, False)


@triton.jit
def _attn_tile(
    acc, l_i, m_i, q8, qs, k_base, ks_base, vt_base, start_n, Sk, Sk_pad,
    DP: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, TWO_LEVEL: tl.constexpr,
    FOLD_SCALES: tl.constexpr, FP8_DTYPE: tl.constexpr, P_SHIFT: tl.constexpr,
):
    # Addresses are rebuilt from scalar bases in every tile: loop-carried [DP, BLOCK_N] pointer
    # tensors would hold two registers per element for the whole loop and spill.
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DP)
    if MASK:
        # The last tile: Sk_pad is a multiple of the scheme's 64-key tile, not of BLOCK_N, so
        # a 128-key tile may reach past the buffers; masked keys load zero codes and scales.
        n_ok = offs_n < Sk
        k8 = tl.load(k_base + offs_n[None, :] * DP + offs_d[:, None], mask=n_ok[None, :],
                     other=0)
        ks = tl.load(ks_base + offs_n, mask=n_ok, other=0.0)
    else:
        k8 = tl.load(k_base + offs_n[None, :] * DP + offs_d[:, None])  # [DP, BLOCK_N]: K^T
        ks = tl.load(ks_base + offs_n)
    s_i = tl.dot(q8, k8, out_dtype=tl.int32)
    bits = (s_i + MAGIC_I).to(tl.float32, bitcast=True)  # 1.5 * 2^23 + s_i, exact
    if FOLD_SCALES:
        # Fewer fp32 operations per score (the softmax, not the tensor cores, bounds this
        # kernel): t = s_i * ks as one FMA with the per-key constant -1.5 * 2^23 * ks (rounded:
        # ~0.5 ks absolute, next to |s_i| up to 2^21), the row max taken on t and qs applied
        # inside the exponent's FMA. Not the emulation's rounding order: drift is measured.
        t = tl.fma(bits, ks[None, :], -(ks * MAGIC_F)[None, :])
        if MASK:
            t_max = tl.max(tl.where(n_ok[None, :], t, float("-inf")), axis=1)
            t_min = tl.min(tl.where(n_ok[None, :], t, float("inf")), axis=1)
        else:
            t_max = tl.max(t, axis=1)
            t_min = tl.min(t, axis=1)
        # qs < 0 only for a negative softmax scale; then the row max of t * qs is qs * min(t).
        m_new = tl.maximum(m_i, tl.where(qs >= 0, qs * t_max, qs * t_min))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(tl.fma(t, qs[:, None], -(m_new - P_SHIFT)[:, None]))
        if MASK:
            p = tl.where(n_ok[None, :], p, 0.0)
    else:
        s = (bits - MAGIC_F) * ks[None, :]
        s = s * qs[:, None]
        if MASK:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - (m_new - P_SHIFT)[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if MASK:
        v8 = tl.load(vt_base + offs_d[None, :] * Sk_pad + offs_n[:, None], mask=n_ok[:, None],
                     other=0.0)
    else:
        v8 = tl.load(vt_base + offs_d[None, :] * Sk_pad + offs_n[:, None])  # [BLOCK_N, DP]
    # P in (0, 2^P_SHIFT], within the format's max (and positive: no clamp, no sign to fix).
    p8 = p.to(FP8_DTYPE, fp_downcast_rounding="rtne")
    if TWO_LEVEL:
        # The tile's products start from zero in the tensor core's accumulator (fewer bits
        # than fp32 for FP8 inputs) and reach the fp32 accumulator after <= BLOCK_N of them.
        acc = acc * alpha[:, None] + tl.dot(p8, v8, out_dtype=tl.float32)
    else:
        # In place: no second [BLOCK_M, DP] fp32 tile live (64 registers a thread at head dim
        # 128 over 8 warps), at the price of accumulating every key in the tensor core.
        acc = tl.dot(p8, v8, acc * alpha[:, None], out_dtype=tl.float32)
    return acc, l_i, m_new


@triton.jit
def attn_fwd_kernel(
    Q8, QSCALE, K8, KSCALE, VT8, VSCALE, LSECORR, OUT, LSE,
    stride_ob, stride_os, stride_oh,
    H, Sq, Sk, Sk_pad,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    RETURN_LSE: tl.constexpr, TWO_LEVEL: tl.constexpr = True,
    FOLD_SCALES: tl.constexpr = False,
):
    """Grid (cdiv(Sq, BLOCK_M), B * H). OUT: [B, Sq, H, D] (any strides), LSE: [B, H, Sq].

    BLOCK_N is part of the numerics (see module docstring); any power of two >= 32 works with
    Sk_pad a multiple of 64. VT8's FP8 format (e4m3fn or e4m3fnuz) is P's too, with P scaled
    by 2^P_SHIFT (8 or 7). The key loop is software-pipelined over the launch's num_stages.
    """
    FP8_DTYPE: tl.constexpr = VT8.dtype.element_ty
    P_SHIFT: tl.constexpr = E4M3FNUZ_P_SHIFT if FP8_DTYPE == tl.float8e4b8 else E4M3FN_P_SHIFT
    pid_m = tl.program_id(0)
    bh, b, h = _this_head(H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DP)
    m_ok = offs_m < Sq
    row = bh * Sq + offs_m
    q8 = tl.load(Q8 + row[:, None] * DP + offs_d[None, :], mask=m_ok[:, None], other=0)
    qs = tl.load(QSCALE + row, mask=m_ok, other=0.0)
    k_base = K8 + bh * Sk_pad * DP
    ks_base = KSCALE + bh * Sk_pad
    vt_base = VT8 + bh * DP * Sk_pad

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DP], dtype=tl.float32)
    n_full = (Sk // BLOCK_N) * BLOCK_N
    for start_n in tl.range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q8, qs, k_base, ks_base, vt_base, start_n, Sk,
                                   Sk_pad, DP, BLOCK_N, False, TWO_LEVEL, FOLD_SCALES,
                                   FP8_DTYPE, P_SHIFT)
    if n_full < Sk:
        acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q8, qs, k_base, ks_base, vt_base, n_full, Sk,
                                   Sk_pad, DP, BLOCK_N, True, TWO_LEVEL, FOLD_SCALES,
                                   FP8_DTYPE, P_SHIFT)

    vs = tl.load(VSCALE + bh * DP + offs_d)
    out = acc / l_i[:, None] * vs[None, :]
    o_ptrs = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=m_ok[:, None] & (offs_d < D)[None, :])
    if RETURN_LSE:
        corr = tl.load(LSECORR + row, mask=m_ok, other=0.0)
        lse = (m_i + tl.log2(l_i) - P_SHIFT) * LN2 + corr
        tl.store(LSE + row, lse, mask=m_ok)
