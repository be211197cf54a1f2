"""``xdit_ops.init_parallel`` on gloo with 2, 3 and 4 CPU ranks.

Each world size is one spawn (process start-up dominates on 2 cores); inside it every
degree layout of that world is checked: mesh dims and ranks, the per-dimension groups, the
sequence-parallel group's members and order (sp_rank = ring_rank * ulysses + ulysses_rank),
the product check and a mesh the user built.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from utils import run_distributed

import xdit_ops
from xdit_ops.parallel import DIMS


def _layouts(world: int):
    """Every assignment of degrees (data, cfg, pipefusion, ring, ulysses) whose product is world,
    limited to at most two non-trivial degrees to keep the run short."""
    out = []
    for degs in itertools.product(range(1, world + 1), repeat=len(DIMS)):
        prod = 1
        for d in degs:
            prod *= d
        if prod == world and sum(d > 1 for d in degs) <= 2:
            out.append(dict(zip(DIMS, degs, strict=True)))
    return out


def _expected_coords(rank: int, degrees: dict[str, int]) -> dict[str, int]:
    """Row-major coordinates of a global rank over (data, cfg, pipefusion, ring, ulysses)."""
    coords = {}
    for dim in reversed(DIMS):
        coords[dim] = rank % degrees[dim]
        rank //= degrees[dim]
    return coords


def _check_state(state, degrees: dict[str, int], device: str = "cpu") -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = state.mesh
    assert mesh.mesh_dim_names == DIMS, mesh.mesh_dim_names
    assert tuple(mesh.mesh.shape) == tuple(degrees[d] for d in DIMS)
    assert mesh.mesh.flatten().tolist() == list(range(world))
    assert state.degrees == degrees
    coords = _expected_coords(rank, degrees)
    for dim in DIMS:
        assert state.rank(dim) == coords[dim], (dim, state.rank(dim), coords)
        ranks = dist.get_process_group_ranks(state.group(dim))
        # The members of my group along `dim`: every rank that differs from me only in `dim`.
        expect = [r for r in range(world)
                  if all(_expected_coords(r, degrees)[d] == coords[d] for d in DIMS if d != dim)]
        assert sorted(ranks) == expect, (dim, ranks, expect)
    sp = degrees["ring"] * degrees["ulysses"]
    assert state.sp_degree == sp
    assert state.sp_rank == coords["ring"] * degrees["ulysses"] + coords["ulysses"]
    if sp == 1:
        assert state.sp_group is None
        return
    base = rank - rank % sp
    assert sorted(dist.get_process_group_ranks(state.sp_group)) == list(range(base, base + sp))
    # Order: gathering along sp_group puts shard i at the rank whose sp_rank is i.
    mine = torch.tensor([state.sp_rank, rank], dtype=torch.int64, device=device)
    got = [torch.empty_like(mine) for _ in range(sp)]
    dist.all_gather(got, mine, group=state.sp_group)
    assert [int(t[0]) for t in got] == list(range(sp)), got
    assert [int(t[1]) for t in got] == list(range(base, base + sp)), got


def _worker(rank: int, world: int) -> None:
    # The product check runs after the process group exists and names the degrees.
    with pytest.raises(ValueError, match=rf"multiply to {2 * world} \(ulysses={2 * world}\).*"
                                         rf"world size is {world}"):
        xdit_ops.init_parallel(ulysses_degree=2 * world, device_type="cpu")
    uly = world + (world % 2 == 0)
    with pytest.raises(ValueError, match=rf"multiply to {2 * uly} \(ring=2 x ulysses={uly}\)"):
        xdit_ops.init_parallel(ring_degree=2, ulysses_degree=uly, device_type="cpu")
    for degrees in _layouts(world):
        state = xdit_ops.init_parallel(
            **{f"{d}_degree": n for d, n in degrees.items()}, device_type="cpu"
        )
        assert xdit_ops.get_parallel_state() is state
        _check_state(state, degrees)

    # A mesh the user built, with only some of the dimensions.
    if world % 2 == 0:
        user = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ring", "ulysses"))
        expect = dict.fromkeys(DIMS, 1) | {"ring": 2, "ulysses": world // 2}
    else:
        user = init_device_mesh("cpu", (world,), mesh_dim_names=("cfg",))
        expect = dict.fromkeys(DIMS, 1) | {"cfg": world}
    state = xdit_ops.init_parallel(mesh=user)
    _check_state(state, expect)
    with pytest.raises(ValueError, match=r"init_parallel: (ring|cfg)_degree=5 disagrees"):
        xdit_ops.init_parallel(**{f"{user.mesh_dim_names[0]}_degree": 5}, mesh=user)
    if world % 2 == 0:
        swapped = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("ulysses", "ring"))
        with pytest.raises(ValueError, match=r"must follow the order"):
            xdit_ops.init_parallel(mesh=swapped)
    bogus = init_device_mesh("cpu", (world,), mesh_dim_names=("tensor",))
    with pytest.raises(ValueError, match=r"mesh dimensions \['tensor'\] are not among"):
        xdit_ops.init_parallel(mesh=bogus)
    xdit_ops.destroy_parallel()
    assert xdit_ops.get_parallel_state(required=False) is None


@pytest.mark.parametrize("world", [2, 3, 4])
def test_init_parallel_gloo(world):
    run_distributed(_worker, world, timeout=180)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"ulysses_degree": 0}, r"init_parallel: ulysses_degree must be a positive int, got 0"),
        ({"ring_degree": True}, r"init_parallel: ring_degree must be a positive int, got True"),
        ({"cfg_degree": 1.5}, r"init_parallel: cfg_degree must be a positive int, got 1.5"),
    ],
)
def test_bad_degrees_before_any_process_group(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        xdit_ops.init_parallel(**kwargs, device_type="cpu")
    assert not dist.is_initialized()


def _nccl_worker(rank: int, world: int) -> None:
    assert torch.cuda.current_device() == rank
    for degrees in ({"ulysses": world}, {"ring": world}, {"ring": 2, "ulysses": world // 2}):
        full = dict.fromkeys(DIMS, 1) | degrees
        state = xdit_ops.init_parallel(**{f"{d}_degree": n for d, n in degrees.items()})
        assert state.mesh.device_type == "cuda" and dist.get_backend() == "nccl"
        _check_state(state, full, device="cuda")
    xdit_ops.destroy_parallel()


@pytest.mark.multigpu(2)
@pytest.mark.parametrize("world", [2, 4])
def test_init_parallel_nccl(world):
    # One process per GPU (run_distributed skips when fewer than `world` GPUs are visible).
    run_distributed(_nccl_worker, world, timeout=300, backend="nccl")


def test_world_of_one(monkeypatch):
    # In this process, without torchrun's variables: a private world of one on loopback.
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert not dist.is_initialized()
    try:
        state = xdit_ops.init_parallel(device_type="cpu")
        assert dist.get_backend() == "gloo" and dist.get_world_size() == 1
        _check_state(state, dict.fromkeys(DIMS, 1))
    finally:
        xdit_ops.destroy_parallel()
    assert not dist.is_initialized()
