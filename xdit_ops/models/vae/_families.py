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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xdit_ops.models.vae._band import (
    OP,
    active,
    band_attention,
    band_conv,
    band_group_norm,
    conv_needs_halo,
)


class UnsupportedModule(NotImplementedError):
    """A module that row bands cannot run exactly (named by path and class)."""


def unsupported(path: str, module: nn.Module, why: str = "") -> UnsupportedModule:
    tail = f": {why}" if why else ""
    cls = type(module).__name__
    return UnsupportedModule(f"{OP}: module {path} ({cls}) is not supported{tail}")


@dataclass
class Walk:
    """What the walk over one VAE needs: paths and parents of every module."""

    root: nn.Module
    modules: dict[str, nn.Module]

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
        raise unsupported(path, module, f"padding={module.padding!r}")
    original = module.forward

    def fwd(self, ctx, x):
        e = getattr(self, "_xdit_extra_pad_h", (0, 0))
        if not conv_needs_halo(self, e):  # 1-row kernels (1x1 projections) are band-local
            return original(x)
        pad = self.padding[-2]
        return band_conv(self, x, ctx, path, pad_h=(pad + e[0], pad + e[1]))

    return lambda: _patch(module, fwd)


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

    def fwd(self, ctx, x):
        return F.pad(x, (left, right, 0, 0), value=self.value)

    def apply() -> None:
        conv._xdit_extra_pad_h = (top, bottom)
        _patch(module, fwd)

    return apply


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
    if module.use_conv_transpose or not module.interpolate:
        raise unsupported(path, module, "transposed-convolution or non-interpolating upsampling")
    return None


def _downsample_2d(walk: Walk, path: str, module: nn.Module) -> None:
    if not module.use_conv:
        raise unsupported(path, module, "pooling downsampling")
    if module.padding != 0:
        return None
    # diffusers pads (0, 1, 0, 1) before the stride-2 convolution: the extra bottom row is
    # padding of the whole image, so it moves into the convolution's global border padding.

    def fwd(self, ctx, hidden_states, *args, **kwargs):
        if self.norm is not None:
            hidden_states = self.norm(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        hidden_states = F.pad(hidden_states, (0, 1, 0, 0), mode="constant", value=0)
        return self.conv(hidden_states)

    def apply() -> None:
        module.conv._xdit_extra_pad_h = (0, 1)
        _patch(module, fwd)

    return apply


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
            raise NotImplementedError(f"{OP}: {self.path}: cross-attention or masks in a VAE")
        if hidden_states.dim() != 4:
            raise NotImplementedError(f"{OP}: {self.path}: expected [B, C, H, W] hidden states")
        residual = hidden_states
        b, c, h, w = hidden_states.shape
        layout = ctx.layout(h, self.path)
        x = hidden_states.view(b, c, h * w).transpose(1, 2)
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
        counts = tuple(s * w for s in layout.sizes)
        o = band_attention(q, k, v, ctx, counts).reshape(b, -1, heads * hd).to(q.dtype)
        o = attn.to_out[1](attn.to_out[0](o))
        o = o.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            o = o + residual
        return o / attn.rescale_output_factor


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
    if module.kernel_size[-2] == 1 and ph == 0 and module.stride[-2] == 1:
        return None

    def fwd(self, ctx, x, cache_x=None):
        padding = list(self._padding)
        if cache_x is not None and self._padding[4] > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            padding[4] -= cache_x.shape[2]
        padding[2] = padding[3] = 0
        x = F.pad(x, padding)
        return band_conv(self, x, ctx, path, pad_h=(ph, ph), pad_other=(0, 0), mode="zeros")

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
# Registry


_LOCAL_TORCH = (
    nn.SiLU, nn.GELU, nn.ReLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity, nn.Linear,
    nn.ModuleList, nn.Sequential, nn.LayerNorm,
)

# (module, class name) -> handler. Containers marked _local were read: their forwards only
# chain listed modules, per-pixel ops, nearest upsampling, and reshapes that keep rows local.
_DIFFUSERS: dict[tuple[str, str], Handler] = {
    ("diffusers.models.activations", "FP32SiLU"): _local,
    ("diffusers.models.normalization", "RMSNorm"): _local,
    ("diffusers.models.autoencoders.vae", "Encoder"): _local,
    ("diffusers.models.autoencoders.vae", "Decoder"): _local,
    ("diffusers.models.unets.unet_2d_blocks", "UNetMidBlock2D"): _local,
    ("diffusers.models.unets.unet_2d_blocks", "UpDecoderBlock2D"): _local,
    ("diffusers.models.unets.unet_2d_blocks", "DownEncoderBlock2D"): _local,
    ("diffusers.models.resnet", "ResnetBlock2D"): _resnet_2d,
    ("diffusers.models.upsampling", "Upsample2D"): _upsample_2d,
    ("diffusers.models.downsampling", "Downsample2D"): _downsample_2d,
    ("diffusers.models.attention_processor", "Attention"): _attention,
}
for _fam, _mod in (("Wan", "autoencoder_kl_wan"), ("QwenImage", "autoencoder_kl_qwenimage")):
    _m = f"diffusers.models.autoencoders.{_mod}"
    _DIFFUSERS.update({
        (_m, f"{_fam}CausalConv3d"): _causal_conv_wan,
        (_m, f"{_fam}RMS_norm"): _local,
        (_m, f"{_fam}Upsample"): _nearest_upsample,
        (_m, f"{_fam}Resample"): _local,
        (_m, f"{_fam}ResidualBlock"): _local,
        (_m, f"{_fam}AttentionBlock"): _wan_attention,
        (_m, f"{_fam}MidBlock"): _local,
        (_m, f"{_fam}Encoder3d"): _local,
        (_m, f"{_fam}Decoder3d"): _local,
        (_m, f"{_fam}UpBlock"): _local,
    })
_WAN = "diffusers.models.autoencoders.autoencoder_kl_wan"
_DIFFUSERS.update({
    (_WAN, "WanResidualUpBlock"): _local,
    (_WAN, "WanResidualDownBlock"): _local,
    (_WAN, "AvgDown3D"): _local,
    (_WAN, "DupUp3D"): _local,
})


def registry() -> dict[type, Handler]:
    """Handlers by exact class (classes missing from the installed diffusers are skipped)."""
    table: dict[type, Handler] = {cls: _local for cls in _LOCAL_TORCH}
    table.update({nn.Conv2d: _conv, nn.Conv3d: _conv, nn.GroupNorm: _group_norm,
                  nn.ZeroPad2d: _zero_pad_2d})
    for (mod, name), handler in _DIFFUSERS.items():
        try:
            cls = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
        table[cls] = handler
    return table


@dataclass(frozen=True)
class Family:
    """How one VAE class is entered: its spatial compression and its entry methods."""

    spatial_ratio: Callable[[nn.Module], int]
    decode: str = "_decode"
    encode: str | None = "_encode"


def _kl_ratio(vae: nn.Module) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _wan_ratio(vae: nn.Module) -> int:
    return int(vae.config.scale_factor_spatial or 8)


def _qwen_ratio(vae: nn.Module) -> int:
    return 2 ** len(vae.temperal_downsample)


_FAMILIES: dict[tuple[str, str], Family] = {
    ("diffusers.models.autoencoders.autoencoder_kl", "AutoencoderKL"): Family(_kl_ratio),
    ("diffusers.models.autoencoders.autoencoder_kl_wan", "AutoencoderKLWan"): Family(_wan_ratio),
    ("diffusers.models.autoencoders.autoencoder_kl_qwenimage", "AutoencoderKLQwenImage"):
        Family(_qwen_ratio),
}


def family_of(vae: nn.Module) -> Family:
    for (mod, name), fam in _FAMILIES.items():
        try:
            cls = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
        if type(vae) is cls:
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
