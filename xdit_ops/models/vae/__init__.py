"""Patch-parallel VAE: a diffusers VAE decodes and encodes with its latent split into row bands.

See :func:`parallelize_vae` and ``docs/vae.md``.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from xdit_ops.models.vae._band import OP, BandContext, UnsupportedModule, activate
from xdit_ops.models.vae._families import family_of, walk_and_patch
from xdit_ops.models.vae._frames import FrameGraphs, frame_graphs_enabled, release_frame_graphs
from xdit_ops.parallel.halo import all_gather_rows, balanced_sizes, gather_rows_to

__all__ = ["UnsupportedModule", "parallelize_vae", "release_frame_graphs"]


def _resolve_group(mesh: DeviceMesh | None, group) -> dist.ProcessGroup | None:
    if group is not None:
        if isinstance(group, str):
            from torch.distributed.distributed_c10d import _resolve_process_group

            return _resolve_process_group(group)
        return group
    from xdit_ops.parallel.state import get_parallel_state

    if mesh is not None:
        state = get_parallel_state(required=False)
        if state is not None and state.mesh is mesh:
            return state.sp_group
        if mesh.ndim == 1:
            return mesh.get_group(0)
        raise ValueError(
            f"{OP}: a mesh with dimensions {mesh.mesh_dim_names} is not the init_parallel mesh; "
            f"pass a 1-D mesh or group= (the band group)"
        )
    return get_parallel_state().sp_group


def _gather_output(out, layout_of, group, output: str):
    """Replace the band tensor in a diffusers output (tensor, tuple or DecoderOutput)."""

    def full(t: torch.Tensor) -> torch.Tensor:
        layout = layout_of(t)
        if output == "rank0":
            return gather_rows_to(t, layout, group, 0)
        return all_gather_rows(t, layout, group)

    if isinstance(out, torch.Tensor):
        return full(out)
    if isinstance(out, tuple):
        return (full(out[0]),) + tuple(out[1:])
    if hasattr(out, "sample"):
        out.sample = full(out.sample)
        return out
    raise TypeError(f"{OP}: cannot find the decoded tensor in a {type(out).__name__}")


def parallelize_vae(
    vae: nn.Module,
    mesh: DeviceMesh | None = None,
    *,
    group: dist.ProcessGroup | str | None = None,
    output: Literal["all", "rank0"] = "all",
    conv_chunk_mb: int = 256,
    halo_assemble_mb: int = 64,
    frame_graphs: bool | None = None,
) -> nn.Module:
    """Make ``vae.decode`` / ``vae.encode`` run on row bands across the ranks of a group.

    The latent ``[B, C, H, W]`` (images) or ``[B, C, T, H, W]`` (videos) is split along H into
    one contiguous band per rank (sizes differ by at most one row). Every convolution exchanges
    only the boundary rows its kernel reads with the ranks that own them, every GroupNorm takes
    its statistics from the whole tensor, and attention sees every band's keys, so the result
    equals the serial decode up to floating-point reassociation while each rank holds about
    1/N of the activations.

    Parameters
    ----------
    vae : a diffusers VAE: ``AutoencoderKL`` (Flux, SD3, PixArt, HunyuanDiT), ``AutoencoderKLWan``
        (Wan 2.1 / 2.2), ``AutoencoderKLQwenImage``, ``AutoencoderKLHunyuanVideo``,
        ``AutoencoderKLCogVideoX``, ``AutoencoderKLLTXVideo``, ``AutoencoderKLLTX2Video`` or
        ``AutoencoderDC`` (SANA). Patched in place (module forwards and attention processors)
        and returned. Outside a band decode the patched modules behave exactly as before.
    mesh : the ``init_parallel`` mesh (its sequence-parallel group is used) or a 1-D mesh.
    group : the band group directly (a ProcessGroup or its name); wins over ``mesh``. Default:
        ``xdit_ops.get_parallel_state().sp_group``. A group of one rank leaves ``vae`` as it is.
    output : ``"all"`` gives the decoded sample on every rank; ``"rank0"`` only on group rank 0
        (the others get an empty ``[..., 0, W]`` tensor). ``encode`` always returns the full
        latent distribution on every rank.
    conv_chunk_mb : rows that need no halo are convolved in slabs of about this many MB of input
        (bounds the temporary memory of one convolution).
    halo_assemble_mb : a band of input up to this many MB is convolved in one call on
        ``[halo; band; halo]`` gathered by one native kernel once the halo has arrived (one copy
        of the band: the fewest kernel launches, for the many small convolutions of a video
        VAE that are launch-bound). Larger bands are convolved in place while the halo travels,
        with zeros standing in for it, and only the boundary rows are recomputed (no copy).
        0: always the latter.
    frame_graphs : for VAEs that decode frame by frame (Wan 2.1/2.2, Qwen-Image), on CUDA:
        capture the per-frame decoder step in a CUDA graph once its shapes settle (from the
        third or fourth frame) and replay it for the remaining frames, halo exchanges and
        attention included: one launch per frame instead of thousands (the banded step is
        host-bound otherwise; Wan 2.1 81x832x480 on 4 H200s: 562 ms instead of 866). The graphs
        and their memory pool are kept between decodes of the same shapes and weights;
        ``xdit_ops.models.vae.release_frame_graphs()`` drops them, and so do
        ``destroy_process_group`` and ``xdit_ops.destroy_parallel`` (a live graph holding NCCL
        kernels kept ``destroy_process_group`` from returning). ``vae._xdit_frame_graphs.enabled
        = False`` decodes eagerly. Default None: on, unless ``XDIT_OPS_VAE_GRAPHS=0``. No
        effect on the CPU or on the other VAEs.

    Returns
    -------
    The same ``vae``.

    Raises
    ------
    UnsupportedModule : naming the first module (path and class) that row bands cannot run
        exactly; nothing is patched then.
    ValueError : at decode time, for a latent with fewer rows than ranks, tiling switched on,
        or an encode input whose height is not a multiple of the spatial compression.
    """
    if output not in ("all", "rank0"):
        raise ValueError(f"{OP}: output must be 'all' or 'rank0', got {output!r}")
    if getattr(vae, "_xdit_band_group", None) is not None:
        raise ValueError(f"{OP}: this {type(vae).__name__} is already parallelised")
    g = _resolve_group(mesh, group)
    if g is None or dist.get_world_size(g) == 1:
        return vae
    fam = family_of(vae)
    walk_and_patch(vae)
    vae._xdit_band_group = g
    chunk = int(conv_chunk_mb) << 20
    assemble = int(halo_assemble_mb) << 20
    world = dist.get_world_size(g)
    rank = dist.get_rank(g)
    name = type(vae).__name__
    graphs = frame_graphs_enabled(frame_graphs) and fam.frame_decoder
    if graphs:
        vae._xdit_frame_graphs = FrameGraphs(vae.decoder, vae.decoder.forward)
        vae.decoder.forward = vae._xdit_frame_graphs

    def check_tiling() -> None:
        if getattr(vae, "use_tiling", False):
            raise ValueError(
                f"{OP}: {name} has tiling on; tiled decoding splits the image itself and is "
                f"approximate. Call vae.disable_tiling() to decode in exact row bands"
            )

    warm = False

    def run_banded(fn, what: str, x: torch.Tensor, scale: int, out_mode: str, args, kwargs):
        """``fn`` on this rank's band of ``x`` (``scale`` rows per latent row), its output
        gathered whole."""
        nonlocal warm
        if not warm:
            # NCCL: the first batch_isend_irecv of a group must involve every rank; a collective
            # first creates the group's communicator whatever the first halo looks like.
            dist.all_reduce(torch.zeros(1, device=x.device), group=g)
            warm = True
        latent_rows = x.shape[-2] // scale
        if latent_rows < world:
            raise ValueError(
                f"{OP}: {name}.{what}: a latent of {latent_rows} rows cannot give each of "
                f"{world} ranks a band; use fewer ranks or a taller input"
            )
        sizes = balanced_sizes(latent_rows, world)
        ctx = BandContext(g, sizes, chunk, assemble)
        band = x.narrow(-2, sum(sizes[:rank]) * scale, sizes[rank] * scale)
        band = band.contiguous(memory_format=torch.channels_last if fam.channels_last
                               and band.dim() == 4 else torch.contiguous_format)
        with activate(ctx):
            out = fn(band, *args, **kwargs)
            where = f"the output of {what}"
            return _gather_output(out, lambda t: ctx.layout(t.shape[-2], where), g, out_mode)

    decode = getattr(vae, fam.decode)

    @functools.wraps(decode)
    def banded_decode(z: torch.Tensor, *args, **kwargs):
        check_tiling()
        return run_banded(decode, fam.decode, z, 1, output, args, kwargs)

    setattr(vae, fam.decode, banded_decode)

    if fam.encode is not None:
        encode = getattr(vae, fam.encode)

        @functools.wraps(encode)
        def banded_encode(x: torch.Tensor, *args, **kwargs):
            check_tiling()
            ratio = fam.spatial_ratio(vae)
            if x.shape[-2] % ratio:
                raise ValueError(
                    f"{OP}: {name}.{fam.encode}: input height {x.shape[-2]} is not a multiple "
                    f"of the spatial compression {ratio}"
                )
            return run_banded(encode, fam.encode, x, ratio, "all", args, kwargs)

        setattr(vae, fam.encode, banded_encode)
    return vae
