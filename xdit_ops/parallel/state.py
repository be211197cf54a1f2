"""Parallel state: one torch ``DeviceMesh`` with named dimensions.

Mesh dimensions, outermost first: ``data``, ``cfg``, ``pipefusion``, ``ring``, ``ulysses``.
Ulysses is innermost so that its ranks are neighbours (one NVLink island); the ring spans the
next level. The sequence-parallel group is ``ring x ulysses`` with sequence-parallel rank
``ring_rank * ulysses_degree + ulysses_rank``: the order in which shards are concatenated.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DIMS = ("data", "cfg", "pipefusion", "ring", "ulysses")


@dataclass(frozen=True)
class ParallelState:
    mesh: DeviceMesh
    degrees: dict[str, int]
    # The flattened ring x ulysses group (None when its degree is 1): sequence sharding, the VAE's
    # row bands and anything else that splits one sample across the sequence-parallel ranks.
    sp_group_: dist.ProcessGroup | None = None

    @property
    def sp_group(self) -> dist.ProcessGroup | None:
        return self.sp_group_

    def group(self, dim: str) -> dist.ProcessGroup:
        """The process group of one mesh dimension (``ulysses``, ``ring``, ...)."""
        if dim not in DIMS:
            raise ValueError(f"init_parallel: unknown mesh dimension {dim!r}; known: {DIMS}")
        return self.mesh.get_group(dim)

    def rank(self, dim: str) -> int:
        return self.mesh.get_local_rank(dim)

    @property
    def sp_degree(self) -> int:
        return self.degrees["ulysses"] * self.degrees["ring"]

    @property
    def sp_rank(self) -> int:
        return self.rank("ring") * self.degrees["ulysses"] + self.rank("ulysses")


_STATE: ParallelState | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _ensure_process_group(device_type: str, timeout: datetime.timedelta) -> None:
    if dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if device_type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group(backend=backend, timeout=timeout)
    else:  # a single process: a world of one, on a private loopback port
        if device_type == "cuda":
            torch.cuda.set_device(0)
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://127.0.0.1:{_free_port()}",
            rank=0,
            world_size=1,
            timeout=timeout,
        )


def init_parallel(
    ulysses_degree: int = 1,
    ring_degree: int = 1,
    cfg_degree: int = 1,
    pipefusion_degree: int = 1,
    data_degree: int = 1,
    *,
    mesh: DeviceMesh | None = None,
    device_type: str | None = None,
    timeout_s: float = 600.0,
) -> ParallelState:
    """Initialise torch.distributed if needed and build the xdit_ops device mesh.

    Parameters
    ----------
    ulysses_degree, ring_degree, cfg_degree, pipefusion_degree, data_degree : int
        Degrees whose product must equal the world size.
    mesh : DeviceMesh, optional
        A mesh the caller built. Its dimension names must come from
        ``data, cfg, pipefusion, ring, ulysses``; missing ones have degree 1. The degree
        arguments are then ignored unless they disagree with the mesh.
    device_type : "cuda" or "cpu"; default cuda when a GPU is visible. NCCL on CUDA, gloo on CPU.
    timeout_s : collective timeout, so a broken peer raises instead of hanging forever.

    Returns
    -------
    ParallelState, also kept as the current state (:func:`get_parallel_state`).
    """
    global _STATE
    given = {
        "data": data_degree,
        "cfg": cfg_degree,
        "pipefusion": pipefusion_degree,
        "ring": ring_degree,
        "ulysses": ulysses_degree,
    }
    for name, deg in given.items():
        if not isinstance(deg, int) or isinstance(deg, bool) or deg < 1:
            raise ValueError(f"init_parallel: {name}_degree must be a positive int, got {deg!r}")
    if mesh is not None:
        names = mesh.mesh_dim_names
        if not names:
            raise ValueError("init_parallel: the mesh needs mesh_dim_names")
        unknown = [n for n in names if n not in DIMS]
        if unknown:
            raise ValueError(f"init_parallel: mesh dimensions {unknown} are not among {DIMS}")
        degrees = {d: 1 for d in DIMS}
        for i, n in enumerate(names):
            degrees[n] = mesh.size(i)
        for name, deg in given.items():
            if deg != 1 and deg != degrees[name]:
                raise ValueError(
                    f"init_parallel: {name}_degree={deg} disagrees with the mesh's {degrees[name]}"
                )
        if tuple(n for n in DIMS if n in names) != tuple(names):
            raise ValueError(f"init_parallel: mesh dimensions {names} must follow the order {DIMS}")
        if len(names) != len(DIMS):
            mesh = _full_mesh(mesh, degrees)
        _STATE = ParallelState(mesh=mesh, degrees=degrees, sp_group_=_sp_group(mesh, degrees))
        return _STATE

    device_type = device_type or _default_device_type()
    _ensure_process_group(device_type, datetime.timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    product = 1
    for d in given.values():
        product *= d
    if product != world:
        parts = " x ".join(f"{n}={d}" for n, d in given.items() if d != 1) or "all degrees 1"
        raise ValueError(
            f"init_parallel: the degrees multiply to {product} ({parts}) but the world size is "
            f"{world}; make their product equal {world}"
        )
    shape = tuple(given[d] for d in DIMS)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=DIMS)
    _STATE = ParallelState(mesh=mesh, degrees=given, sp_group_=_sp_group(mesh, given))
    return _STATE


def _sp_group(mesh: DeviceMesh, degrees: dict[str, int]) -> dist.ProcessGroup | None:
    """Create the ring x ulysses groups (every rank takes part in creating all of them)."""
    sp = degrees["ring"] * degrees["ulysses"]
    if sp == 1:
        return None
    ranks = mesh.mesh.reshape(-1, sp).tolist()  # ring and ulysses are the two innermost dims
    mine = dist.get_rank()
    group = None
    for r in ranks:
        g = dist.new_group(ranks=r)
        if mine in r:
            group = g
    return group


def _full_mesh(mesh: DeviceMesh, degrees: dict[str, int]) -> DeviceMesh:
    """Re-express a user mesh over all five named dimensions (size-1 ones added)."""
    shape = tuple(degrees[d] for d in DIMS)
    ranks = mesh.mesh.reshape(shape)
    return DeviceMesh(mesh.device_type, ranks, mesh_dim_names=DIMS)


def get_parallel_state(required: bool = True) -> ParallelState | None:
    """The state from the last :func:`init_parallel`."""
    if _STATE is None and required:
        raise RuntimeError("xdit_ops: no parallel state; call xdit_ops.init_parallel(...) first")
    return _STATE


def destroy_parallel() -> None:
    """Forget the mesh and tear down the default process group if we own it."""
    global _STATE
    _STATE = None
    from xdit_ops.models.vae._frames import release_frame_graphs

    release_frame_graphs()  # graphs holding NCCL kernels would keep the communicators busy
    from xdit_ops.ops.usp_attention import release_symmetric_buffers

    release_symmetric_buffers()
    if dist.is_initialized():
        dist.destroy_process_group()
