"""Which diffusers modules a banded VAE may contain, and what each becomes.

Every module of a parallelised VAE must be listed here (exact class match), because row bands are
only exact when every operation either works per pixel, is a convolution or normalisation that
was made band-aware, or is a container whose forward was read and found to use only those. A
module that is not listed makes :func:`parallelize_vae` fail and name it.

Patching is by instance: a listed module gets a ``forward`` (or attention processor) that acts
on bands while a band decode/encode is active and calls the original otherwise.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from xdit_ops.models.vae import _band
from xdit_ops.models.vae._band import (
    OP,
    BandConv,
    UnsupportedModule,
    active,
    band_attention,
    band_group_norm,
    unsupported,
)
from xdit_ops.parallel.halo import BandLayout, all_gather_rows

__all__ = ["UnsupportedModule", "family_of", "walk_and_patch"]


@dataclass
class Walk:
    """What the walk over one VAE needs: paths and parents of every module, and what the checks
    found for the patches (all handlers run before any patch is applied)."""

    root: nn.Module
    modules: dict[str, nn.Module]
    # convolution -> (top, bottom) rows of an explicit pad before it (ZeroPad2d, Downsample2D's
    # F.pad) that become the convolution's global border padding
    extra_pad_h: dict[nn.Module, tuple[int, int]] = field(default_factory=dict)

    def parent(self, path: str) -> tuple[nn.Module, str]:
        head, _, name = path.rpartition(".")
        return self.modules[head], name


# A handler checks one module and returns the patch to apply (or None): every module of a VAE
# is checked before any is patched, so an unsupported VAE is left untouched.
Handler = Callable[["Walk", str, nn.Module], "Callable[[], None] | None"]


def _patch(module: nn.Module, band_forward: Callable) -> None:
    """Make ``module.forward`` run ``band_forward`` while a band context is active."""
    original = module.forward

    def forward(self, *args, **kwargs):
        ctx = active()
        if ctx is None:
            return original(*args, **kwargs)
        return band_forward(self, ctx, *args, **kwargs)

    module.forward = types.MethodType(forward, module)


# ---------------------------------------------------------------------------------------------
# Leaves


def _local(walk: Walk, path: str, module: nn.Module) -> None:
    """Per-pixel (or container-only) module: nothing to do."""
    return None


def _conv(walk: Walk, path: str, module: nn.Module) -> None:
    if isinstance(module.padding, str):
        raise unsupported(path, module, f"padding={module.padding!r} (only explicit padding)")

    def apply() -> None:
        top, bottom = walk.extra_pad_h.get(module, (0, 0))
        pad = module.padding[-2]
        conv = BandConv(module, path, pad_h=(pad + top, pad + bottom))
        if not conv.local:  # 1-row kernels (1x1 projections) run their own forward on a band
            _patch(module, lambda self, ctx, x: conv(x, ctx))

    return apply


def _zero_pad_2d(walk: Walk, path: str, module: nn.Module) -> None:
    """``Sequential(ZeroPad2d, Conv2d)`` (strided downsampling): the pad's H part moves into the
    convolution's global border padding; the pad keeps only its W part."""
    parent, name = walk.parent(path)
    names = list(parent._modules)
    nxt = names.index(name) + 1
    conv = None
    if isinstance(parent, nn.Sequential) and nxt < len(names):
        conv = parent._modules[names[nxt]]
    if not isinstance(conv, nn.Conv2d):
        raise unsupported(path, module, "a ZeroPad2d must feed a Conv2d in the same Sequential")
    left, right, top, bottom = module.padding
    walk.extra_pad_h[conv] = (top, bottom)

    def fwd(self, ctx, x):
        return F.pad(x, (left, right, 0, 0), value=self.value)

    return lambda: _patch(module, fwd)


def _group_norm(walk: Walk, path: str, module: nn.Module) -> None:
    def fwd(self, ctx, x):
        return band_group_norm(x, self.num_groups, self.weight, self.bias, self.eps, ctx)

    return lambda: _patch(module, fwd)


def _nearest_upsample(walk: Walk, path: str, module: nn.Module) -> None:
    """nn.Upsample subclasses: nearest with integer scale along H is band-local."""
    sf = module.scale_factor
    sf = sf if isinstance(sf, tuple) else (sf, sf)
    if module.size is not None or module.mode not in ("nearest", "nearest-exact") or (
        float(sf[-2]) != int(sf[-2])
    ):
        raise unsupported(path, module, "only nearest upsampling by an integer factor")
    return None


# ---------------------------------------------------------------------------------------------
# diffusers AutoencoderKL family (vae.py, resnet.py, up/downsampling.py, attention_processor.py)


def _resnet_2d(walk: Walk, path: str, module: nn.Module) -> None:
    if module.upsample is not None or module.downsample is not None:
        raise unsupported(path, module, "up/down-sampling resnets")
    if module.time_embedding_norm not in ("default", "scale_shift", "group"):
        raise unsupported(path, module, f"time_embedding_norm={module.time_embedding_norm!r}")
    return None


def _upsample_2d(walk: Walk, path: str, module: nn.Module) -> None:
    """Nearest x2 (or to ``output_size``), then the convolution if any. diffusers' forward
    makes a channels-last input row-order when the output would pass torch's NHWC kernel limit
    (Flux 8192^2 on 2 GPUs: the last upsampler's band); the rest of the decode then ran NCHW,
    with cuDNN's transpose workspace, and did not fit. Such a band is upsampled in row chunks
    into a channels-last output instead; every other input goes through diffusers' forward."""
    if module.use_conv_transpose or not module.interpolate:
        raise unsupported(path, module, "transposed-convolution or non-interpolating upsampling")
    original = module.forward

    def fwd(self, ctx, hidden_states, output_size=None, *args, **kwargs):
        if args or kwargs.get("scale") is not None or not _band.upsample_flips_layout(
                hidden_states, output_size):
            return original(hidden_states, output_size, *args, **kwargs)
        assert hidden_states.shape[1] == self.channels
        x = hidden_states
        if self.norm is not None:  # LayerNorm / RMSNorm over channels: per pixel
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = _band.nearest_upsample_rows(x, output_size)
        if self.use_conv:
            x = (self.conv if self.name == "conv" else self.Conv2d_0)(x)
        return x

    return lambda: _patch(module, fwd)


def _downsample_2d(walk: Walk, path: str, module: nn.Module) -> None:
    if not module.use_conv:
        raise unsupported(path, module, "pooling downsampling")
    if module.padding != 0:
        return None
    # diffusers pads (0, 1, 0, 1) before the stride-2 convolution: the extra bottom row is
    # padding of the whole image, so it moves into the convolution's global border padding.
    walk.extra_pad_h[module.conv] = (0, 1)

    def fwd(self, ctx, hidden_states, *args, **kwargs):
        if self.norm is not None:
            hidden_states = self.norm(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        hidden_states = F.pad(hidden_states, (0, 1, 0, 0), mode="constant", value=0)
        return self.conv(hidden_states)

    return lambda: _patch(module, fwd)


def attention_tokens(attn, x, ctx, counts, mask_fn=None):
    """A diffusers ``Attention`` (self-attention, AttnProcessor2_0 semantics) on this rank's
    tokens ``x [B, S_local, C]`` with keys from every rank: ``[B, S_local, C]``, the residual
    added and divided by ``rescale_output_factor`` as the processor does."""
    residual = x
    b = x.shape[0]
    if attn.group_norm is not None:
        x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    heads = attn.heads
    hd = k.shape[-1] // heads
    q, k, v = (t.view(b, -1, heads, hd) for t in (q, k, v))
    if attn.norm_q is not None:
        q = attn.norm_q(q.transpose(1, 2)).transpose(1, 2)
    if attn.norm_k is not None:
        k = attn.norm_k(k.transpose(1, 2)).transpose(1, 2)
    o = band_attention(q, k, v, ctx, counts, mask_fn).reshape(b, -1, heads * hd).to(q.dtype)
    o = attn.to_out[1](attn.to_out[0](o))
    if attn.residual_connection:
        o = o + residual
    return o / attn.rescale_output_factor


class BandAttnProcessor:
    """Self-attention of a diffusers ``Attention`` over the whole image, from row bands."""

    def __init__(self, original, path: str):
        self.original = original
        self.path = path

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        ctx = active()
        if ctx is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 temb, *args, **kwargs)
        if encoder_hidden_states is not None or attention_mask is not None:
            raise unsupported(self.path, attn, "cross-attention or an attention mask")
        if hidden_states.dim() != 4:
            raise unsupported(self.path, attn, f"hidden states of shape "
                                               f"{tuple(hidden_states.shape)}, not [B, C, H, W]")
        b, c, h, w = hidden_states.shape
        counts = tuple(s * w for s in ctx.layout(h, self.path).sizes)
        # Tokens [B, S, C]: a view of a channels-last band, a copy of a row-order one.
        o = attention_tokens(attn, hidden_states.flatten(2).transpose(1, 2), ctx, counts)
        # [B, S, C] memory viewed as [B, C, H, W] is channels-last. A channels-last decode
        # (AutoencoderKL's, see run_banded) keeps that view; a row-order one gets its rows back
        # in row order with one copy, so that its later convolutions stay in row order.
        o = o.transpose(-1, -2).reshape(b, c, h, w)
        if hidden_states.is_contiguous(memory_format=torch.channels_last):
            return o
        return o.contiguous()


def _attention(walk: Walk, path: str, module: nn.Module) -> None:
    from diffusers.models import attention_processor as ap

    ok = (ap.AttnProcessor2_0, ap.AttnProcessor)
    fused = getattr(ap, "FusedAttnProcessor2_0", None)
    if fused is not None:
        ok = ok + (fused,)
    if not isinstance(module.processor, ok):
        raise unsupported(path, module, f"attention processor {type(module.processor).__name__}")
    if module.spatial_norm is not None or module.is_cross_attention:
        raise unsupported(path, module, "spatial-norm or cross attention")

    def apply() -> None:
        module.processor = BandAttnProcessor(module.processor, path)

    return apply


# ---------------------------------------------------------------------------------------------
# Wan 2.1/2.2 and Qwen-Image video VAEs (causal 3-D convolutions with a per-frame cache)


def _causal_conv_wan(walk: Walk, path: str, module: nn.Module) -> None:
    """``WanCausalConv3d`` pads (W, H, time) itself with ``_padding`` then runs Conv3d with no
    padding. In bands: time padding and cached frames are concatenated as in the original (the
    cache holds this rank's rows only), H is padded by the halo and the global border."""
    pw, _, ph, _, pt, _ = module._padding
    # W's zero padding is the convolution's own (no padded copy of the input); time is padded
    # in front only, and only until the cache holds the frames it needs (the first frames).
    conv = BandConv(module, path, pad_h=(ph, ph), pad_other=(0, pw), mode="zeros")
    if conv.local:
        return None

    def fwd(self, ctx, x, cache_x=None):
        front = pt
        if cache_x is not None and pt > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            front -= cache_x.shape[2]
        if front > 0:
            x = F.pad(x, (0, 0, 0, 0, front, 0))
        return conv(x, ctx)

    return lambda: _patch(module, fwd)


def _wan_attention(walk: Walk, path: str, module: nn.Module) -> None:
    """Single-head attention over each frame's H*W tokens, keys from every band."""

    def fwd(self, ctx, x):
        identity = x
        b, c, t, h, w = x.shape
        layout = ctx.layout(h, path)
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        x = self.norm(x)
        qkv = self.to_qkv(x).reshape(b * t, c * 3, h * w).permute(0, 2, 1)
        q, k, v = (s.unsqueeze(2) for s in qkv.chunk(3, dim=-1))  # BSHD, one head
        counts = tuple(s * w for s in layout.sizes)
        x = band_attention(q, k, v, ctx, counts).squeeze(2)
        x = x.permute(0, 2, 1).reshape(b * t, c, h, w)
        x = self.proj(x)
        x = x.view(b, t, c, h, w).permute(0, 2, 1, 3, 4)
        return x + identity

    return lambda: _patch(module, fwd)


# ---------------------------------------------------------------------------------------------
# HunyuanVideo (causal Conv3d with replicate padding, GroupNorm, frame-causal mid-block attention)


def _causal_conv_hunyuan(walk: Walk, path: str, module: nn.Module) -> None:
    """F.pad(replicate) on (W, H, time) then Conv3d: H replicate-padding only at the global
    border, read from the halo elsewhere."""
    pw, _, ph, _, pt, _ = module.time_causal_padding
    cp = module.conv.padding
    if any(cp) and module.pad_mode not in ("constant",):
        raise unsupported(path, module, "convolution padding after replicate padding")
    conv = BandConv(module.conv, f"{path}.conv", pad_h=(ph + cp[1], ph + cp[1]),
                    pad_other=(cp[0], cp[2]),
                    mode="zeros" if module.pad_mode == "constant" else module.pad_mode)
    if conv.local:
        return None

    def fwd(self, ctx, x):
        return conv(F.pad(x, (pw, pw, 0, 0, pt, 0), mode=self.pad_mode), ctx)

    return lambda: _patch(module, fwd)


def _hunyuan_upsample(walk: Walk, path: str, module: nn.Module) -> None:
    if float(module.upsample_factor[1]) != int(module.upsample_factor[1]):
        raise unsupported(path, module, "non-integer height upsampling")
    return None


def _hunyuan_mid_block(walk: Walk, path: str, module: nn.Module) -> None:
    """Resnets as usual; attention over all (frame, row, column) tokens with HunyuanVideo's
    frame-causal mask (a key is visible when its frame is not after the query's)."""

    def fwd(self, ctx, hidden_states):
        hidden_states = self.resnets[0](hidden_states)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            if attn is not None:
                b, c, t, h, w = hidden_states.shape
                layout = ctx.layout(h, path)
                x = hidden_states.permute(0, 2, 3, 4, 1).flatten(1, 3)
                frames = torch.arange(t, device=x.device)
                q_frame = frames.repeat_interleave(h * w)
                k_frame = torch.cat([frames.repeat_interleave(n * w) for n in layout.sizes])
                counts = tuple(t * n * w for n in layout.sizes)

                # keys arrive rank by rank, each rank's tokens in (frame, row, column) order
                def mask_fn(i0, i1, q_frame=q_frame, k_frame=k_frame):
                    return k_frame[None, :] <= q_frame[i0:i1, None]

                o = attention_tokens(attn, x, ctx, counts, mask_fn)
                hidden_states = o.unflatten(1, (t, h, w)).permute(0, 4, 1, 2, 3)
            hidden_states = resnet(hidden_states)
        return hidden_states

    return lambda: _patch(module, fwd)


# ---------------------------------------------------------------------------------------------
# CogVideoX


def _causal_conv_cog(walk: Walk, path: str, module: nn.Module) -> None:
    if module.pad_mode != "replicate":  # time padding by cached frames; H padding in the conv
        return None
    pw, _, ph, _, pt, _ = module.time_causal_padding
    conv = BandConv(module.conv, f"{path}.conv", pad_h=(ph, ph), pad_other=(0, 0),
                    mode="replicate")
    if conv.local:
        return None

    def fwd(self, ctx, inputs, conv_cache=None):
        return conv(F.pad(inputs, (pw, pw, 0, 0, pt, 0), mode="replicate"), ctx), None

    return lambda: _patch(module, fwd)


def _cog_downsample(walk: Walk, path: str, module: nn.Module) -> None:
    """CogVideoXDownsample3D pads (0, 1, 0, 1) before a stride-2 Conv2d: the bottom row is
    global border padding."""
    if module.conv.padding[-2] != 0:
        raise unsupported(path, module, "padded convolution after explicit padding")
    conv = BandConv(module.conv, f"{path}.conv", pad_h=(0, 1))

    def fwd(self, ctx, x):
        if self.compress_time:  # average pairs of frames (after the first when odd): per pixel
            b, c, t, h, w = x.shape
            y = x.permute(0, 3, 4, 1, 2).reshape(b * h * w, c, t)
            if t % 2 == 1:
                first, rest = y[..., 0], y[..., 1:]
                if rest.shape[-1] > 0:
                    rest = F.avg_pool1d(rest, kernel_size=2, stride=2)
                y = torch.cat([first[..., None], rest], dim=-1)
            else:
                y = F.avg_pool1d(y, kernel_size=2, stride=2)
            x = y.reshape(b, h, w, c, y.shape[-1]).permute(0, 3, 4, 1, 2)
        x = F.pad(x, (0, 1, 0, 0))
        b, c, t, h, w = x.shape
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        x = conv(x, ctx)
        return x.reshape(b, t, x.shape[1], x.shape[2], x.shape[3]).permute(0, 2, 1, 3, 4)

    return lambda: _patch(module, fwd)


# ---------------------------------------------------------------------------------------------
# LTX-Video and LTX-2 (causal Conv3d whose H padding is the Conv3d's own: zeros or reflect)


def _ltx_resnet(walk: Walk, path: str, module: nn.Module) -> None:
    if module.per_channel_scale1 is not None or module.per_channel_scale2 is not None:
        raise unsupported(path, module, "noise injection draws different noise per band")
    return None


# ---------------------------------------------------------------------------------------------
# SANA's AutoencoderDC (ReLU linear attention over all pixels, pixel (un)shuffle, RMS/batch norm)


def _sana_linear_attention(walk: Walk, path: str, module: nn.Module) -> None:
    """SanaMultiscaleAttnProcessor2_0 on bands. Linear attention sums ``[v; 1] k^T`` over every
    pixel: each rank sums its own pixels and one all-reduce adds the bands (fp32). The tiny-image
    quadratic branch normalises over all keys, so it gathers K and V. The branch is chosen from
    the whole image's pixel count, the same on every rank."""
    from diffusers.models.attention_processor import SanaMultiscaleAttnProcessor2_0

    if type(module.processor) is not SanaMultiscaleAttnProcessor2_0:
        raise unsupported(path, module, f"processor {type(module.processor).__name__}")

    def fwd(self, ctx, hidden_states):
        b, _, h, w = hidden_states.shape
        layout = ctx.layout(h, path)
        linear = layout.total * w > self.attention_head_dim
        residual, dtype = hidden_states, hidden_states.dtype
        x = hidden_states.movedim(1, -1)
        x = torch.cat([self.to_q(x), self.to_k(x), self.to_v(x)], dim=3).movedim(-1, 1)
        x = torch.cat([x] + [blk(x) for blk in self.to_qkv_multiscale], dim=1)
        if linear:
            x = x.float()
        x = x.reshape(b, -1, 3 * self.attention_head_dim, h * w)
        q, k, v = x.chunk(3, dim=2)
        q, k = self.nonlinearity(q), self.nonlinearity(k)
        if linear:
            v = F.pad(v, (0, 0, 0, 1), mode="constant", value=1)
            scores = torch.matmul(v, k.transpose(-1, -2)).contiguous()
            dist.all_reduce(scores, group=ctx.group)
            o = torch.matmul(scores, q).float()
            o = (o[:, :, :-1] / (o[:, :, -1:] + self.eps)).to(dtype)
        else:
            # every band's pixels as the rows of [2, B, heads, N, head_dim]
            counts = BandLayout(tuple(n * w for n in layout.sizes))
            kv = all_gather_rows(torch.stack([k, v]).transpose(-1, -2), counts, ctx.group)
            scores = torch.matmul(kv[0], q).float()
            scores = scores / (torch.sum(scores, dim=2, keepdim=True) + self.eps)
            o = torch.matmul(kv[1].transpose(-1, -2), scores.to(kv.dtype))
        o = torch.reshape(o, (b, -1, h, w))
        o = self.to_out(o.movedim(1, -1)).movedim(-1, 1)
        if self.norm_type == "rms_norm":
            o = self.norm_out(o.movedim(1, -1)).movedim(-1, 1)
        else:
            o = self.norm_out(o)
        if self.residual_connection:
            o = o + residual
        return o

    return lambda: _patch(module, fwd)


def _dc_up(walk: Walk, path: str, module: nn.Module) -> None:
    if module.interpolate and module.interpolation_mode not in ("nearest", "nearest-exact"):
        raise unsupported(path, module, f"{module.interpolation_mode} interpolation")
    return None


def _batch_norm(walk: Walk, path: str, module: nn.Module) -> None:
    """Inference batch norm uses running statistics: per pixel."""
    if not module.track_running_stats:
        raise unsupported(path, module, "batch statistics")
    original = module.forward

    def fwd(self, ctx, x):
        if self.training:
            raise unsupported(path, self, "batch norm in training mode (batch statistics)")
        return original(x)

    return lambda: _patch(module, fwd)


# ---------------------------------------------------------------------------------------------
# Registry


_LOCAL_TORCH = (
    nn.SiLU, nn.GELU, nn.ReLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity, nn.Linear,
    nn.ModuleList, nn.Sequential, nn.LayerNorm,
)

_AE = "diffusers.models.autoencoders"
_WAN = f"{_AE}.autoencoder_kl_wan"
_QWEN = f"{_AE}.autoencoder_kl_qwenimage"
_HY = f"{_AE}.autoencoder_kl_hunyuan_video"
_COG = f"{_AE}.autoencoder_kl_cogvideox"
_LTX = f"{_AE}.autoencoder_kl_ltx"
_LTX2 = f"{_AE}.autoencoder_kl_ltx2"
_DC = f"{_AE}.autoencoder_dc"
_AP = "diffusers.models.attention_processor"

# diffusers classes that need nothing in bands: per-pixel modules and containers whose forwards
# were read and found to chain only listed modules, per-pixel ops, nearest upsampling and
# reshapes that keep rows in the band.
_LOCAL_DIFFUSERS: dict[str, tuple[str, ...]] = {
    "diffusers.models.activations": ("FP32SiLU",),
    "diffusers.models.normalization": ("RMSNorm",),
    "diffusers.models.embeddings": (
        "PixArtAlphaCombinedTimestepSizeEmbeddings", "TimestepEmbedding", "Timesteps",
    ),
    f"{_AE}.vae": ("Encoder", "Decoder"),
    "diffusers.models.unets.unet_2d_blocks": (
        "UNetMidBlock2D", "UpDecoderBlock2D", "DownEncoderBlock2D",
    ),
    "diffusers.models.upsampling": ("CogVideoXUpsample3D",),  # nearest x2, then a Conv2d
    _WAN: (
        "WanRMS_norm", "WanResample", "WanResidualBlock", "WanMidBlock", "WanEncoder3d",
        "WanDecoder3d", "WanUpBlock", "WanResidualUpBlock", "WanResidualDownBlock", "AvgDown3D",
        "DupUp3D",
    ),
    _QWEN: (
        "QwenImageRMS_norm", "QwenImageResample", "QwenImageResidualBlock", "QwenImageMidBlock",
        "QwenImageEncoder3d", "QwenImageDecoder3d", "QwenImageUpBlock",
    ),
    _HY: (
        "HunyuanVideoDownsampleCausal3D", "HunyuanVideoResnetBlockCausal3D",
        "HunyuanVideoDownBlock3D", "HunyuanVideoUpBlock3D", "HunyuanVideoEncoder3D",
        "HunyuanVideoDecoder3D",
    ),
    _COG: (
        "CogVideoXSpatialNorm3D",  # nearest resize of the latent band to the band
        "CogVideoXResnetBlock3D", "CogVideoXDownBlock3D", "CogVideoXMidBlock3D",
        "CogVideoXUpBlock3D", "CogVideoXEncoder3D", "CogVideoXDecoder3D",
    ),
    # LTX CausalConv3d: time padding by frame repeats, H padding in its Conv3d; Downsampler3d /
    # Upsampler3d: space-to-depth / depth-to-space reshapes that keep rows in the band.
    _LTX: (
        "LTXVideoCausalConv3d", "LTXVideoDownsampler3d", "LTXVideoUpsampler3d",
        "LTXVideoDownBlock3D", "LTXVideo095DownBlock3D", "LTXVideoMidBlock3d",
        "LTXVideoUpBlock3d", "LTXVideoEncoder3d", "LTXVideoDecoder3d",
    ),
    _LTX2: (
        "LTX2VideoCausalConv3d", "LTX2VideoDownsampler3d", "LTX2VideoUpsampler3d",
        "LTX2VideoDownBlock3D", "LTX2VideoMidBlock3d", "LTX2VideoUpBlock3d",
        "LTX2VideoEncoder3d", "LTX2VideoDecoder3d", "PerChannelRMSNorm",
    ),
    _DC: (
        "ResBlock", "EfficientViTBlock", "Encoder", "Decoder",
        "DCDownBlock2d",  # (strided) conv then pixel_unshuffle: rows stay in the band
    ),
    "diffusers.models.transformers.sana_transformer": ("GLUMBConv",),
    _AP: ("SanaMultiscaleAttentionProjection",),
}

# (module, class name) -> handler: the diffusers classes that are checked or patched.
_DIFFUSERS: dict[tuple[str, str], Handler] = {
    ("diffusers.models.resnet", "ResnetBlock2D"): _resnet_2d,
    ("diffusers.models.upsampling", "Upsample2D"): _upsample_2d,
    ("diffusers.models.downsampling", "Downsample2D"): _downsample_2d,
    (_AP, "Attention"): _attention,
    (_WAN, "WanCausalConv3d"): _causal_conv_wan,
    (_WAN, "WanUpsample"): _nearest_upsample,
    (_WAN, "WanAttentionBlock"): _wan_attention,
    (_QWEN, "QwenImageCausalConv3d"): _causal_conv_wan,
    (_QWEN, "QwenImageUpsample"): _nearest_upsample,
    (_QWEN, "QwenImageAttentionBlock"): _wan_attention,
    (_HY, "HunyuanVideoCausalConv3d"): _causal_conv_hunyuan,
    (_HY, "HunyuanVideoUpsampleCausal3D"): _hunyuan_upsample,
    (_HY, "HunyuanVideoMidBlock3D"): _hunyuan_mid_block,
    (_COG, "CogVideoXSafeConv3d"): _conv,
    (_COG, "CogVideoXCausalConv3d"): _causal_conv_cog,
    ("diffusers.models.downsampling", "CogVideoXDownsample3D"): _cog_downsample,
    (_LTX, "LTXVideoResnetBlock3d"): _ltx_resnet,
    (_LTX2, "LTX2VideoResnetBlock3d"): _ltx_resnet,
    (_DC, "DCUpBlock2d"): _dc_up,
    (_AP, "SanaMultiscaleLinearAttention"): _sana_linear_attention,
}
_DIFFUSERS.update(
    {(module, name): _local for module, names in _LOCAL_DIFFUSERS.items() for name in names}
)


def _class(module: str, name: str) -> type | None:
    """``module.name`` from the installed diffusers, or None where that version lacks it."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def registry() -> dict[type, Handler]:
    """Handlers by exact class (classes missing from the installed diffusers are skipped)."""
    table: dict[type, Handler] = {cls: _local for cls in _LOCAL_TORCH}
    table.update({nn.Conv2d: _conv, nn.Conv3d: _conv, nn.GroupNorm: _group_norm,
                  nn.ZeroPad2d: _zero_pad_2d, nn.BatchNorm2d: _batch_norm})
    for (module, name), handler in _DIFFUSERS.items():
        cls = _class(module, name)
        if cls is not None:
            table[cls] = handler
    return table


@dataclass(frozen=True)
class Family:
    """How one VAE class is entered: its spatial compression and its entry methods."""

    spatial_ratio: Callable[[nn.Module], int]
    decode: str = "_decode"
    encode: str | None = "_encode"
    # decodes frame by frame through ``decoder(x, feat_cache=, feat_idx=)``: per-frame graphs
    frame_decoder: bool = False
    # 4-D bands run channels-last (cuDNN's layout for half-precision convolutions: no transpose
    # workspace; the halo exchange and the group norm read such bands in place)
    channels_last: bool = False


def _kl_ratio(vae: nn.Module) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _wan_ratio(vae: nn.Module) -> int:
    return int(vae.config.scale_factor_spatial or 8)


def _qwen_ratio(vae: nn.Module) -> int:
    return 2 ** len(vae.temperal_downsample)


def _ratio_attr(vae: nn.Module) -> int:
    return int(vae.spatial_compression_ratio)


def _ltx2_ratio(vae: nn.Module) -> int:
    # the spatial_compression_ratio attribute counts "temporal"-only downsamplers as spatial too
    cfg = vae.config
    spatial = sum(
        1 for kind, on in zip(cfg.downsample_type, _as_tuple(cfg.spatio_temporal_scaling,
                                                            len(cfg.downsample_type)), strict=True)
        if on and kind in ("conv", "spatial", "spatiotemporal")
    )
    return cfg.patch_size * 2**spatial


def _as_tuple(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,) * n


_FAMILIES: dict[tuple[str, str], Family] = {
    (_DC, "AutoencoderDC"): Family(_ratio_attr),
    (_HY, "AutoencoderKLHunyuanVideo"): Family(_ratio_attr),
    (_COG, "AutoencoderKLCogVideoX"): Family(_kl_ratio),
    (_LTX, "AutoencoderKLLTXVideo"): Family(_ratio_attr),
    (_LTX2, "AutoencoderKLLTX2Video"): Family(_ltx2_ratio),
    (f"{_AE}.autoencoder_kl", "AutoencoderKL"): Family(_kl_ratio, channels_last=True),
    (_WAN, "AutoencoderKLWan"): Family(_wan_ratio, frame_decoder=True),
    (_QWEN, "AutoencoderKLQwenImage"): Family(_qwen_ratio, frame_decoder=True),
}


def family_of(vae: nn.Module) -> Family:
    for (module, name), fam in _FAMILIES.items():
        if type(vae) is _class(module, name):
            return fam
    known = ", ".join(name for _, name in _FAMILIES)
    raise UnsupportedModule(f"{OP}: VAE class {type(vae).__name__} is not supported (supported: "
                            f"{known})")


def walk_and_patch(vae: nn.Module) -> None:
    """Check every module of ``vae`` against the registry first, then patch them."""
    table = registry()
    modules = dict(vae.named_modules())
    walk = Walk(vae, modules)
    patches = []
    for path, module in modules.items():
        if module is vae:
            continue
        handler = table.get(type(module))
        if handler is None:
            raise unsupported(path, module)
        patch = handler(walk, path, module)
        if patch is not None:
            patches.append(patch)
    for patch in patches:
        patch()
