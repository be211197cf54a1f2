"""parallelize_vae: banded decode/encode equals serial, for every supported diffusers VAE.

Every VAE is a tiny real diffusers class with random weights. Inputs have a different mean and
scale in every band (a ramp along H), so a GroupNorm that used band-local statistics would fail;
one test shows that it does. Latent heights are odd so the bands are uneven.
"""

from __future__ import annotations

import copy
import itertools
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.utils import rel_err, run_distributed

diffusers = pytest.importorskip("diffusers")

# fp32 decode/encode vs serial: max |parallel - serial| / max |serial|.
FP32_MAX_REL = 1e-5


def _layout_of(t: torch.Tensor) -> str:
    """``row`` (contiguous), ``channels_last`` (4-D, not also contiguous) or ``other``."""
    if t.is_contiguous():
        return "row"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "other"


def _halo_conv(m: torch.nn.Module) -> bool:
    """A convolution that reads rows across a band edge (kernel height > 1): a Conv2d/Conv3d,
    or a wrapper holding one as ``.conv`` (HunyuanVideoCausalConv3d). parallelize_vae patches
    the wrapper's forward, which calls the inner convolution's weights without its module
    call, so only the wrapper's hooks see the band's output."""
    c = m.conv if isinstance(getattr(m, "conv", None), torch.nn.Conv3d) else m
    return isinstance(c, (torch.nn.Conv2d, torch.nn.Conv3d)) and c.kernel_size[-2] > 1


def _max_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def _ramp(x: torch.Tensor, low: float = -3.0, high: float = 3.0) -> torch.Tensor:
    """Give each row a different offset and scale: bands then have different statistics."""
    h = x.shape[-2]
    shape = [1] * (x.dim() - 2) + [h, 1]
    offset = torch.linspace(low, high, h).view(shape)
    scale = torch.linspace(0.5, 3.0, h).view(shape)
    return x * scale + offset


# ---------------------------------------------------------------------------------------------
# Tiny configurations: (constructor, latent shape, image shape for encode or None)


def _kl():
    return diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
    )


def _wan():
    return diffusers.AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )


def _wan22():
    return diffusers.AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, patch_size=2,
        scale_factor_spatial=16, in_channels=12, out_channels=12,
    )


def _qwen():
    return diffusers.AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )


def _hunyuan():
    return diffusers.AutoencoderKLHunyuanVideo(
        latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        norm_num_groups=4,
    )


def _cog():
    return diffusers.AutoencoderKLCogVideoX(
        latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        norm_num_groups=4,
    )


def _ltx():
    vae = diffusers.AutoencoderKLLTXVideo(
        latent_channels=8, block_out_channels=(8, 16, 16, 16),
        decoder_block_out_channels=(8, 16, 16, 16), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
    )
    vae.use_framewise_decoding = False
    return vae


def _ltx2():
    vae = diffusers.AutoencoderKLLTX2Video(
        latent_channels=8, block_out_channels=(8, 16, 32, 64),
        decoder_block_out_channels=(8, 16, 32), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1),
    )
    vae.use_framewise_decoding = False
    return vae


def _dc(head_dim: int = 4):
    return diffusers.AutoencoderDC(
        latent_channels=4, attention_head_dim=head_dim,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16, 16), decoder_block_out_channels=(8, 16, 16),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
    )


def _dc_quadratic():  # head dim 16 > 4 x 3 latent pixels: the quadratic-attention branch
    return _dc(head_dim=16)


# name -> (constructor, latent shape, image shape to encode or None)
CONFIGS = {
    "kl": (_kl, (2, 4, 7, 5), (2, 3, 28, 12)),
    "wan": (_wan, (2, 4, 2, 7, 5), (1, 3, 5, 40, 16)),
    "wan22": (_wan22, (1, 4, 2, 7, 5), (1, 3, 5, 64, 32)),
    "qwen": (_qwen, (1, 4, 2, 7, 5), (1, 3, 5, 32, 16)),
    "hunyuan": (_hunyuan, (1, 4, 2, 7, 5), (1, 3, 5, 40, 16)),
    "cog": (_cog, (1, 4, 2, 7, 5), (1, 3, 5, 32, 16)),
    "ltx": (_ltx, (1, 8, 2, 5, 3), (1, 3, 9, 128, 32)),
    "ltx2": (_ltx2, (1, 8, 2, 5, 3), (1, 3, 9, 128, 32)),
    "dc": (_dc, (2, 4, 7, 5), (2, 3, 16, 8)),
    "dc_quadratic": (_dc_quadratic, (1, 4, 4, 3), None),
}


def _build(name: str):
    torch.manual_seed(0)  # the same weights on every rank
    return CONFIGS[name][0]().eval()


def _inputs(name: str):
    _, zshape, xshape = CONFIGS[name]
    g = torch.Generator().manual_seed(1)
    z = _ramp(torch.randn(zshape, generator=g))
    x = None if xshape is None else _ramp(torch.randn(xshape, generator=g), -1.0, 1.0)
    return z, x


def _encoded(vae, x: torch.Tensor) -> torch.Tensor:
    out = vae.encode(x)
    return out.latent if hasattr(out, "latent") else out.latent_dist.mean


def _serial_on_rank0(rank: int, fn):
    """``fn()`` computed once on rank 0 and sent to every rank (the CI machine has 2 cores)."""
    box = [fn() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _check_family(name: str, rank: int, world: int, assemble_mb: int = 64) -> None:
    from xdit_ops import parallelize_vae

    vae = _build(name)
    z, x = _inputs(name)
    with torch.no_grad():
        ref = _serial_on_rank0(rank, lambda: vae.decode(z).sample)
        ref_enc = None if x is None else _serial_on_rank0(rank, lambda: _encoded(vae, x))
        parallelize_vae(vae, group=dist.group.WORLD, halo_assemble_mb=assemble_mb)
        out = vae.decode(z).sample
        err = _max_rel(out, ref)
        assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
        assert err <= FP32_MAX_REL, f"{name} on {world} ranks: decode max rel error {err:.2e}"
        if x is not None:
            enc = _encoded(vae, x)
            e_err = _max_rel(enc, ref_enc)
            assert e_err <= FP32_MAX_REL, f"{name} on {world} ranks: encode error {e_err:.2e}"
        if name == "hunyuan":  # its frame-causal mask, built per query chunk
            from xdit_ops.models.vae import _band

            budget, _band.SCORE_BYTES = _band.SCORE_BYTES, 512
            try:
                chunked = _max_rel(vae.decode(z).sample, ref)
            finally:
                _band.SCORE_BYTES = budget
            assert chunked <= FP32_MAX_REL, f"hunyuan, chunked attention: {chunked:.2e}"
    if rank == 0:
        print(f"{name} world={world}: decode max rel err {err:.2e}")


def _worker_families(rank: int, world: int, names: tuple[str, ...]) -> None:
    dist.init_process_group("gloo")
    # 2 ranks: the tiny bands are convolved on [halo; band; halo] slabs (the default for small
    # bands); 3 and 4 ranks: in place with the boundary rows recomputed (the large-band path).
    for name in names:
        _check_family(name, rank, world, assemble_mb=64 if world == 2 else 0)


@pytest.mark.parametrize(
    "world,names",
    [
        (2, tuple(CONFIGS)),
        (3, tuple(CONFIGS)),
        (4, tuple(CONFIGS)),
    ],
    ids=["2-all", "3-all", "4-all"],
)
def test_vae_matches_serial(world: int, names: tuple[str, ...]) -> None:
    run_distributed(_worker_families, world, names, timeout=300)


# ---------------------------------------------------------------------------------------------
# Per-frame graphs of the frame-by-frame decoders, on gloo: the recorder re-runs the step at each
# replay (CPU has no CUDA graphs), so everything but the capture itself is checked here: when a
# step is recorded, the static frame and cache buffers, the cache hand-over between replays, the
# reuse of a kept graph by a second decode and a new graph for new weights.


def _rerun_recorder(step, pool):
    box: list[torch.Tensor] = []

    def replay() -> None:
        box[:] = [step()]

    return replay, lambda: box[0], pool


def _worker_frame_graphs(rank: int, world: int) -> None:
    from xdit_ops import parallelize_vae
    from xdit_ops.models.vae import release_frame_graphs

    dist.init_process_group("gloo")
    for name in ("wan", "qwen"):
        vae = _build(name)
        z = _ramp(torch.randn((1, 4, 6, 7, 5), generator=torch.Generator().manual_seed(2)))
        with torch.no_grad():
            ref = _serial_on_rank0(rank, lambda vae=vae, z=z: vae.decode(z).sample)
            parallelize_vae(vae, group=dist.group.WORLD, frame_graphs=True)
            graphs = vae._xdit_frame_graphs
            graphs.recorder, graphs.device_types = _rerun_recorder, ("cpu",)
            out = vae.decode(z).sample
            assert graphs.captures == 1 and graphs.replays >= 3, (name, graphs.captures,
                                                                   graphs.replays)
            replays = graphs.replays
            again = vae.decode(z).sample  # the kept graph, from its first steady frame
            assert graphs.captures == 1 and graphs.replays > replays
            graphs.enabled = False
            eager = vae.decode(z).sample
            graphs.enabled = True
            for p in vae.decoder.parameters():  # new weights (same values): a new graph
                p.data = p.data.clone()
            fresh = vae.decode(z).sample
            assert graphs.captures == 2
            # teardown: destroy_process_group now drops every graph first (a live graph with
            # NCCL kernels kept it from returning on GPUs)
            assert getattr(dist.destroy_process_group, "__wrapped__", None) is not None
            release_frame_graphs()
            assert not graphs.graphs and not graphs.steady
            after = vae.decode(z).sample
            assert graphs.captures == 3
        for what, t in (("first", out), ("second", again), ("eager", eager), ("new", fresh),
                        ("released", after)):
            err = _max_rel(t, ref)
            assert err <= FP32_MAX_REL, f"{name} frame graphs, {what} decode: {err:.2e}"


def test_frame_graphs_match_serial() -> None:
    run_distributed(_worker_frame_graphs, 2, timeout=300)


# ---------------------------------------------------------------------------------------------
# The GroupNorm test can fail: band-local statistics are visibly wrong on the ramp input.


def _naive_group_norm(x, num_groups, weight, bias, eps, ctx):
    return F.group_norm(x, num_groups, weight, bias, eps)


def _worker_group_norm(rank: int, world: int) -> None:
    from xdit_ops.models.vae import _band, _families
    from xdit_ops.parallel.halo import balanced_sizes

    dist.init_process_group("gloo")
    g = torch.Generator().manual_seed(3)
    x = _ramp(torch.randn(2, 8, 3, 11, 6, generator=g))  # [B, C, T, H, W], 11 rows: uneven bands
    gn = torch.nn.GroupNorm(4, 8)
    with torch.no_grad():
        gn.weight.copy_(torch.randn(8, generator=g))
        gn.bias.copy_(torch.randn(8, generator=g))
        ref = gn(x)
        sizes = balanced_sizes(11, world)
        lo = sum(sizes[:rank])
        band = x[..., lo:lo + sizes[rank], :]
        ctx = _band.BandContext(dist.group.WORLD, sizes, 1 << 20)
        got = _band.band_group_norm(band, 4, gn.weight, gn.bias, gn.eps, ctx)
        want = ref[..., lo:lo + sizes[rank], :]
        assert _max_rel(got, want) <= FP32_MAX_REL, _max_rel(got, want)
        # half precision: statistics in fp32 from the bf16 band, output within bf16 rounding
        got16 = _band.band_group_norm(band.bfloat16(), 4, gn.weight, gn.bias, gn.eps, ctx)
        assert got16.dtype == torch.bfloat16
        assert _max_rel(got16, want) <= 1e-2
        naive = _naive_group_norm(band, 4, gn.weight, gn.bias, gn.eps, ctx)
        assert _max_rel(naive, want) > 0.1, "band-local statistics should be wrong here"

    # The same at the model level: a VAE decode with band-local GroupNorm misses by far.
    vae = _build("kl")
    z, _ = _inputs("kl")
    with torch.no_grad():
        ref = _serial_on_rank0(rank, lambda: vae.decode(z).sample)
        from xdit_ops import parallelize_vae

        parallelize_vae(vae, group=dist.group.WORLD)
        good = _max_rel(vae.decode(z).sample, ref)
        real = _families.band_group_norm
        _families.band_group_norm = _naive_group_norm
        try:
            bad = _max_rel(vae.decode(z).sample, ref)
        finally:
            _families.band_group_norm = real
    assert good <= FP32_MAX_REL, good
    assert bad > 1e-2, f"a decode with band-local GroupNorm should fail the check, err {bad:.2e}"


def test_group_norm_uses_whole_tensor_statistics() -> None:
    run_distributed(_worker_group_norm, 3, timeout=180)


# ---------------------------------------------------------------------------------------------
# Halo-exchange convolution over every padding mode, stride, dilation and band layout


def _worker_halo(rank: int, world: int) -> None:
    from xdit_ops.parallel import halo
    from xdit_ops.parallel.halo import (
        BandLayout,
        ConvRows,
        all_gather_rows,
        gather_rows_to,
        halo_conv,
    )

    dist.init_process_group("gloo")
    group = dist.group.WORLD
    layouts = [(3, 1, 3), (1, 1, 5), (2, 4, 1)]  # uneven, thinner than a halo, multi-hop
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64, generator=g)
    fills = {"zeros": 0.0, "constant": 0.5}
    for sizes, (k, d), s, (pt, pb), mode in itertools.product(
        layouts, ((1, 1), (3, 1), (3, 2), (5, 1)), (1, 2), ((0, 0), (1, 1), (2, 0), (0, 2)),
        ("zeros", "constant", "replicate", "reflect", "circular"),
    ):
        layout = BandLayout(sizes)
        geom = ConvRows(k, s, d, pt, pb, mode)
        if geom.out_rows(7) < 1:
            continue
        w = torch.randn(4, 3, k, 3, dtype=torch.float64, generator=g)
        fill = fills.get(mode, 0.0)
        if mode in fills:
            padded = F.pad(x, (0, 0, pt, pb), value=fill)
        else:
            padded = F.pad(x, (0, 0, pt, pb), mode=mode)
        ref = F.conv2d(padded, w, None, (s, 1), (0, 1), (d, 1))
        band = x[:, :, layout.starts[rank]:layout.starts[rank + 1]].contiguous()
        if mode == "reflect":  # a channels-last band (an attention block's output) is read too
            band = band.to(memory_format=torch.channels_last)

        def conv_fn(t, pad_h, w=w, s=s, d=d):
            return F.conv2d(t, w, None, (s, 1), (pad_h, 1), (d, 1))

        copies = halo.BAND_COPIES[0]
        y, out_layout = halo_conv(band, layout, geom, conv_fn, group, fill=fill, chunk_bytes=64)
        # a channels-last band is read in place (its [B, h, W * C] rows) and stays channels-last
        assert halo.BAND_COPIES[0] == copies, (sizes, geom)
        if mode == "reflect" and y.shape[-2] > 1:
            assert y.is_contiguous(memory_format=torch.channels_last), (sizes, geom, y.stride())
        full = all_gather_rows(y, out_layout, group)
        assert full.shape == ref.shape, (sizes, geom, full.shape, ref.shape)
        err = (full - ref).abs().max().item()
        assert err < 1e-12, (sizes, geom, err)
    only0 = gather_rows_to(y, out_layout, group, 0)
    assert only0.shape[-2] == (full.shape[-2] if rank == 0 else 0)


def test_halo_conv_matches_full_convolution() -> None:
    run_distributed(_worker_halo, 3, timeout=240)


def _worker_row_order(rank: int, world: int) -> None:
    """No halo convolution copies its band: every band reaches halo_conv in a layout gather_rows
    reads in place (row order, or channels-last through its [B, h, W * C] rows). The KL
    decoders run channels-last (cuDNN's half-precision layout: an NCHW convolution transposes
    through a workspace of twice its input, the peak of a Flux 4096^2 decode in run 18); the
    attention block's [B, S, C] output viewed as NCHW is channels-last too. Before the
    channels-last rows, every halo gather of such a band copied it whole (run 13: 2.2 s of a
    3.5 s Flux 4096^2 decode). Checked with the real processor and with its output forced
    channels-last and forced row order; the decode matches serial in each. In-place path:
    halo_assemble_mb=0."""
    from xdit_ops import parallelize_vae
    from xdit_ops.models.vae import _families
    from xdit_ops.parallel import halo

    dist.init_process_group("gloo")
    z, _ = _inputs("kl")
    original = _families.BandAttnProcessor.__call__
    forced = {
        "real": None,
        "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
        "row_order": lambda t: t.contiguous(),
    }
    try:
        for name, force in forced.items():
            _families.BandAttnProcessor.__call__ = original if force is None else (
                lambda self, *a, _f=force, **k: _f(original(self, *a, **k)))
            ref_vae = _build("kl")
            with torch.no_grad():
                ref = ref_vae.decode(z).sample
            vae = _build("kl")
            parallelize_vae(vae, group=dist.group.WORLD, halo_assemble_mb=0)
            convs = [0]
            for m in vae.decoder.modules():
                if isinstance(m, torch.nn.Conv2d) and m.kernel_size[-2] > 1:
                    m.register_forward_hook(lambda mod, a, out, n=convs: n.__setitem__(0, n[0] + 1))
            copies = halo.BAND_COPIES[0]
            with torch.no_grad():
                out = vae.decode(z).sample
            assert convs[0] > 10, (name, convs)
            assert halo.BAND_COPIES[0] == copies, (name, halo.BAND_COPIES[0] - copies)
            err = ((out - ref).abs().max() / ref.abs().max()).item()
            assert err <= 1e-5, (name, err)
    finally:
        _families.BandAttnProcessor.__call__ = original


def test_frame_graphs_switch(monkeypatch) -> None:
    from xdit_ops.models.vae import frame_graphs_enabled

    monkeypatch.delenv("XDIT_OPS_VAE_GRAPHS", raising=False)
    assert frame_graphs_enabled(None)  # on by default since run 12 (teardown verified)
    assert not frame_graphs_enabled(False) and frame_graphs_enabled(True)
    monkeypatch.setenv("XDIT_OPS_VAE_GRAPHS", "0")
    assert not frame_graphs_enabled(None) and frame_graphs_enabled(True)
    monkeypatch.setenv("XDIT_OPS_VAE_GRAPHS", "yes")
    with pytest.raises(ValueError, match="XDIT_OPS_VAE_GRAPHS must be 0 or 1, got 'yes'"):
        frame_graphs_enabled(None)


def test_halo_convolutions_keep_row_order() -> None:
    run_distributed(_worker_row_order, 2, timeout=120)


# ---------------------------------------------------------------------------------------------
# Upsample2D past torch's NHWC nearest-kernel limit: diffusers makes such an input row-order
# (Flux 8192^2 on 2 GPUs: the last upsampler's band, after which the decode ran NCHW and did not
# fit); a channels-last band is upsampled in row chunks and stays channels-last.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nearest_upsample_rows_matches_interpolate(dtype) -> None:
    from xdit_ops.models.vae._band import nearest_upsample_rows

    g = torch.Generator().manual_seed(7)
    for shape in ((2, 3, 7, 5), (1, 4, 9, 3), (3, 2, 1, 4)):  # odd heights, one row
        h, w = shape[-2:]
        base = torch.randn(shape, generator=g).to(dtype)
        for x in (base.contiguous(memory_format=torch.channels_last), base):
            # x2; to (2H, 2W) given as a size; to other sizes, larger, smaller, odd
            for size in (None, (2 * h, 2 * w), (17, 11), (5, 4), (3 * h, w), (2 * h + 1, 7)):
                if size is None:
                    ref = F.interpolate(x, scale_factor=2.0, mode="nearest")
                else:
                    ref = F.interpolate(x, size=size, mode="nearest")
                # one row per chunk, a few rows with a shorter last chunk, one chunk
                for limit in (1, 37, 150, 2**31):
                    y = nearest_upsample_rows(x, size, limit)
                    assert torch.equal(y, ref), (shape, x.stride(), size, limit)
                    assert _layout_of(y) == "channels_last", (shape, size)


def _worker_upsample_rows(rank: int, world: int) -> None:
    from xdit_ops import parallelize_vae
    from xdit_ops.models.vae import _band
    from xdit_ops.parallel import halo

    dist.init_process_group("gloo")
    z, _ = _inputs("kl")
    vae = _build("kl")
    with torch.no_grad():
        ref = _serial_on_rank0(rank, lambda: vae.decode(z).sample)
    parallelize_vae(vae, group=dist.group.WORLD)
    ups = [m for m in vae.decoder.modules() if type(m).__name__ == "Upsample2D"]
    assert len(ups) == 2
    seen: list[tuple[str, str]] = []
    for m in ups:  # the upsampled band (the convolution's input) and the upsampler's output
        m.conv.register_forward_pre_hook(lambda mod, a: seen.append(("up", _layout_of(a[0]))))
        m.register_forward_hook(lambda mod, a, out: seen.append(("out", _layout_of(out))))
    real, limit = _band.nearest_upsample_rows, _band.UPSAMPLE_NHWC_LIMIT
    calls = [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    # Chunked upsamplers per decode, by limit: none at the real limit (diffusers' forward); both
    # at 1 (one input row per chunk); at 4000, on rank 0 only the second (its band 2 x 16 x 8 x
    # 10 times 2 is 5120 elements: chunks of 3, 3 and 2 rows), rank 1's 2 x 16 x 6 x 10 staying
    # under it.
    expect = {limit: 0, 1: 2, 4000: 1 if rank == 0 else 0}
    _band.nearest_upsample_rows = counted
    try:
        for forced, n_chunked in expect.items():
            _band.UPSAMPLE_NHWC_LIMIT = forced
            calls[0] = 0
            seen.clear()
            copies = halo.BAND_COPIES[0]
            with torch.no_grad():
                out = vae.decode(z).sample
            assert calls[0] == n_chunked, (forced, calls[0])
            assert len(seen) == 4 and all(lay == "channels_last" for _, lay in seen), seen
            assert halo.BAND_COPIES[0] == copies, (forced, halo.BAND_COPIES[0] - copies)
            err = _max_rel(out, ref)
            assert err <= FP32_MAX_REL, (forced, err)
    finally:
        _band.nearest_upsample_rows, _band.UPSAMPLE_NHWC_LIMIT = real, limit


def test_upsample_past_nhwc_limit_keeps_channels_last() -> None:
    run_distributed(_worker_upsample_rows, 2, timeout=120)


# ---------------------------------------------------------------------------------------------
# API: output on rank 0 only, clear errors, no-op on one rank


def _worker_api(rank: int, world: int) -> None:
    from xdit_ops import parallelize_vae
    from xdit_ops.models.vae import UnsupportedModule

    dist.init_process_group("gloo")
    z, _ = _inputs("kl")
    vae = _build("kl")
    with torch.no_grad():
        ref = _serial_on_rank0(rank, lambda: vae.decode(z).sample)
        parallelize_vae(vae, group=dist.group.WORLD, output="rank0")
        out = vae.decode(z).sample
    if rank == 0:
        assert rel_err(out, ref) <= FP32_MAX_REL
    else:
        assert out.shape[-2] == 0
    # A second decode of the same patched VAE gives the same result (cached plans, symmetric
    # state). (Query chunking of the masked attention is covered by the HunyuanVideo case of
    # test_vae_matches_serial: this KL VAE's attention runs through usp_attention's ring.)
    with torch.no_grad():
        again = vae.decode(z).sample
    if rank == 0:
        assert rel_err(again, ref) <= FP32_MAX_REL
    with pytest.raises(ValueError, match="already parallelised"):
        parallelize_vae(vae, group=dist.group.WORLD)
    vae.enable_tiling()
    with pytest.raises(ValueError, match="tiling"), torch.no_grad():
        vae.decode(z)
    vae.disable_tiling()
    with pytest.raises(ValueError, match="cannot give each"), torch.no_grad():
        vae.decode(z[..., :1, :])

    # An unsupported module is named, and nothing is patched.
    bad = _build("kl")
    bad.decoder.up_blocks[0].upsamplers[0].interpolate = False
    with pytest.raises(UnsupportedModule, match=r"decoder\.up_blocks\.0\.upsamplers\.0 "
                                                r"\(Upsample2D\)"):
        parallelize_vae(bad, group=dist.group.WORLD)
    assert "forward" not in bad.decoder.conv_in.__dict__
    bad.decoder.conv_act = torch.nn.Hardswish()
    bad.decoder.up_blocks[0].upsamplers[0].interpolate = True
    with pytest.raises(UnsupportedModule, match=r"decoder\.conv_act \(Hardswish\)"):
        parallelize_vae(bad, group=dist.group.WORLD)

    # The default group is init_parallel's sequence-parallel group; mesh= resolves to it too.
    import xdit_ops

    state = xdit_ops.init_parallel(ulysses_degree=world, device_type="cpu")
    for kwargs in ({}, {"mesh": state.mesh}):
        default = _build("kl")
        parallelize_vae(default, **kwargs)
        assert default._xdit_band_group is state.sp_group
        with torch.no_grad():
            got = default.decode(z).sample
        if rank == 0:
            assert rel_err(got, ref) <= FP32_MAX_REL

    # A group of one rank leaves the VAE alone.
    singles = [dist.new_group([r]) for r in range(world)]
    solo = _build("kl")
    assert parallelize_vae(solo, group=singles[rank]) is solo
    assert "forward" not in solo.decoder.conv_in.__dict__
    assert "_decode" not in solo.__dict__


def test_api_rank0_output_and_errors() -> None:
    run_distributed(_worker_api, 2, timeout=180)


# ---------------------------------------------------------------------------------------------
# GPU: NCCL, fp32 (TF32 off) and bf16 against serial on the same GPU


def _worker_gpu(rank: int, world: int) -> None:
    from xdit_ops import parallelize_vae
    from xdit_ops.parallel import halo

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    dist.init_process_group("nccl")
    dev = torch.device("cuda", rank)
    # (name, latent frames): the frame-by-frame decoders get enough frames for their per-frame
    # CUDA graphs to be captured (shapes settle after the first frames) and replayed
    cases = (("kl", 0), ("wan", 7), ("wan22", 6), ("qwen", 6), ("hunyuan", 0))
    only = os.environ.get("XDIT_OPS_TEST_VAE_CASES")  # e.g. "wan": a short GPU run
    for name, frames in cases:
        if only and name not in only.split(","):
            continue
        z, _ = _inputs(name)
        if frames:
            z = _ramp(torch.randn(z.shape[:2] + (frames,) + z.shape[3:],
                                  generator=torch.Generator().manual_seed(2)))
        z = z.to(dev)
        vae = _build(name).to(dev)
        print(f"rank {rank}: {name} {tuple(z.shape)}", flush=True)  # names the case of a hang
        with torch.no_grad():
            ref32 = vae.decode(z).sample
            # A bf16 copy: casting the model itself to bf16 and back would round its weights
            # (that made the fp32 comparison below fail by 5.9e-3 on the first GPU run).
            ref16 = copy.deepcopy(vae).to(torch.bfloat16).decode(z.bfloat16()).sample.float()
            parallelize_vae(vae, group=dist.group.WORLD, frame_graphs=True)
            # No halo convolution copies its band, and the layout holds from convolution to
            # convolution: channels-last for AutoencoderKL (run 18: an NCHW decode's peak was
            # cuDNN's transpose workspace), row order for the video VAEs. Before, a channels-
            # last band made every halo gather copy it whole (run 13). Recorded in the first
            # decode.
            layouts: list[tuple[str, str]] = []

            def record(mod, args, out, layouts=layouts):
                layouts.append((type(mod).__name__, _layout_of(out)))

            hooks = [m.register_forward_hook(record) for m in vae.decoder.modules()
                     if _halo_conv(m)]
            copies = halo.BAND_COPIES[0]
            out32 = vae.decode(z).sample
            rows32 = None
            if name == "kl":  # Upsample2D in row chunks, as past the NHWC limit (Flux 8192^2)
                from xdit_ops.models.vae import _band

                limit, _band.UPSAMPLE_NHWC_LIMIT = _band.UPSAMPLE_NHWC_LIMIT, 1
                try:
                    rows32 = vae.decode(z).sample
                finally:
                    _band.UPSAMPLE_NHWC_LIMIT = limit
            for h in hooks:
                h.remove()
            again32 = vae.decode(z).sample  # a second decode replays the kept graphs
            out16 = vae.to(torch.bfloat16).decode(z.bfloat16()).sample.float()
        want = "channels_last" if name == "kl" else "row"
        assert layouts and all(lay == want for _, lay in layouts), (
            name, [x for x in layouts if x[1] != want])
        assert halo.BAND_COPIES[0] == copies, (name, halo.BAND_COPIES[0] - copies)
        assert _max_rel(out32, ref32) <= FP32_MAX_REL, (name, _max_rel(out32, ref32))
        assert _max_rel(again32, ref32) <= FP32_MAX_REL, (name, _max_rel(again32, ref32))
        if rows32 is not None:
            assert _max_rel(rows32, ref32) <= FP32_MAX_REL, (name, _max_rel(rows32, ref32))
        noise = _max_rel(ref16, ref32)
        assert _max_rel(out16, ref32) <= 2 * noise + 1e-3, (name, _max_rel(out16, ref32), noise)
        graphs = getattr(vae, "_xdit_frame_graphs", None)
        if frames:
            # fp32 and bf16 weights: one capture each; every later frame is a replay
            assert graphs is not None and graphs.captures == 2, (name, graphs and graphs.captures)
            assert graphs.replays >= 3 * (frames - 4), (name, graphs.replays)
        else:
            assert graphs is None


@pytest.mark.gpu
@pytest.mark.multigpu(2)
def test_vae_nccl_matches_serial() -> None:
    run_distributed(_worker_gpu, 2, backend="nccl",
                    timeout=float(os.environ.get("XDIT_OPS_TEST_TIMEOUT", "600")))
