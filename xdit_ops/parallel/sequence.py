"""Sharding a sequence across the sequence-parallel ranks, and gathering it back.

The full sequence of S tokens is padded to a multiple of the group size P and cut into P equal
shards; shard ``i`` goes to the rank whose sequence-parallel rank is ``i``
(``ring_rank * ulysses_degree + ulysses_rank`` with the mesh from ``init_parallel``). Equal
shards keep every all-to-all and ring step uniform; the padded keys are excluded exactly by
``usp_attention(..., seq_len=S)`` and the padded rows are dropped by :func:`gather_sequence`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

_MESH_SP_GROUPS: dict[int, tuple[DeviceMesh, dist.ProcessGroup | None]] = {}


def resolve_sp_group(
    mesh: DeviceMesh | None = None, group: dist.ProcessGroup | str | None = None
) -> dist.ProcessGroup | None:
    """The sequence-parallel group: ``group`` if given, else the mesh's / current state's."""
    if group is not None:
        if isinstance(group, str):
            from torch.distributed.distributed_c10d import _resolve_process_group

            return _resolve_process_group(group)
        return group
    from xdit_ops.parallel.state import _sp_group, get_parallel_state

    if mesh is not None:
        names = mesh.mesh_dim_names or ()
        degrees = {n: mesh.size(i) for i, n in enumerate(names)}
        degrees = {"ring": degrees.get("ring", 1), "ulysses": degrees.get("ulysses", 1)}
        state = get_parallel_state(required=False)
        if state is not None and state.mesh is mesh:
            return state.sp_group
        if "ring" in names and "ulysses" in names:
            key = id(mesh)
            if key not in _MESH_SP_GROUPS:  # group creation is collective: once per mesh
                _MESH_SP_GROUPS[key] = (mesh, _sp_group(mesh, degrees))
            return _MESH_SP_GROUPS[key][1]
        dim = "ulysses" if "ulysses" in names else "ring"
        return mesh.get_group(dim) if dim in names else None
    state = get_parallel_state(required=False)
    return None if state is None else state.sp_group


def padded_length(seq_len: int, world: int) -> int:
    """``seq_len`` rounded up to a multiple of ``world``."""
    return -(-seq_len // world) * world


def shard_sequence(
    x: torch.Tensor,
    dim: int = 1,
    mesh: DeviceMesh | None = None,
    *,
    group: dist.ProcessGroup | str | None = None,
) -> tuple[torch.Tensor, int]:
    """This rank's shard of ``x`` along ``dim``, padded so that all shards are equal.

    Parameters
    ----------
    x : the full tensor (same on every rank), e.g. [B, S, H, D] or [B, S, C].
    dim : the sequence dimension.
    mesh, group : the sequence-parallel group (default: the current ``init_parallel`` state).

    Returns
    -------
    (shard, seq_len) : shard is a contiguous [.., ceil(S/P), ..] tensor (zero-padded rows on the
    last ranks); seq_len is S, to pass to ``usp_attention`` and ``gather_sequence``.
    """
    g = resolve_sp_group(mesh, group)
    world = 1 if g is None else dist.get_world_size(g)
    rank = 0 if g is None else dist.get_rank(g)
    dim = dim % x.dim()
    seq_len = x.shape[dim]
    if seq_len == 0:
        raise ValueError(f"shard_sequence: dimension {dim} of x has length 0")
    total = padded_length(seq_len, world)
    if total != seq_len:
        pad_shape = list(x.shape)
        pad_shape[dim] = total - seq_len
        x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    local = total // world
    return x.narrow(dim, rank * local, local).contiguous(), seq_len


def gather_sequence(
    local_shard: torch.Tensor,
    seq_len: int,
    dim: int = 1,
    mesh: DeviceMesh | None = None,
    *,
    group: dist.ProcessGroup | str | None = None,
) -> torch.Tensor:
    """Concatenate every rank's shard along ``dim`` and drop the padding past ``seq_len``.

    ``local_shard`` must have the same shape on every rank (what :func:`shard_sequence` gives).
    Returns the full tensor, identical on every rank.
    """
    g = resolve_sp_group(mesh, group)
    world = 1 if g is None else dist.get_world_size(g)
    dim = dim % local_shard.dim()
    local = local_shard.shape[dim]
    if not 0 < seq_len <= local * world:
        raise ValueError(
            f"gather_sequence: seq_len={seq_len} does not fit {world} shards of {local} tokens"
        )
    if world == 1:
        return local_shard.narrow(dim, 0, seq_len)
    moved = local_shard.movedim(dim, 0).contiguous()
    out = moved.new_empty((world * local,) + tuple(moved.shape[1:]))
    dist.all_gather_into_tensor(out, moved, group=g)
    return out.narrow(0, 0, seq_len).movedim(0, dim)
