"""usp_attention against the single-device fp64 oracle, on gloo with 2, 3 and 4 ranks.

Each spawned world runs every Ulysses x Ring factorisation of its size over a list of cases
(awkward lengths, uneven heads, joint tokens front/back with and without per-sample lengths,
fp32/bf16, LSE), so the process start-up is paid once per world size.
"""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import xdit_ops
from tests.utils import (
    ATTN_ERROR_FACTOR,
    ATTN_ERROR_FLOOR,
    assert_cuda_graph_replays,
    max_abs_err,
    oracle_attention,
    randn,
    run_distributed,
    run_threads,
)

_usp = importlib.import_module("xdit_ops.ops.usp_attention")

# (name, B, S, H, D, J, position, with_joint_lengths, dtype, return_lse)
CASES = [
    ("plain", 3, 37, 6, 8, 0, "front", False, torch.float32, False),
    ("joint-front-lse", 1, 29, 5, 16, 7, "front", False, torch.float32, True),
    ("joint-back-lengths", 2, 33, 6, 8, 5, "back", True, torch.float32, True),
    ("joint-front-lengths", 3, 26, 4, 8, 6, "front", True, torch.float32, False),
    ("bf16", 1, 40, 4, 16, 3, "back", False, torch.bfloat16, True),
]
# Issue-sized shapes (one per world): S=4097 / 4096+77 text tokens, 30 and 24 heads, D 64/72.
BIG_CASES = [
    ("S4097-h30-d64", 1, 4097, 6, 64, 0, "front", False, torch.float32, False),
    ("S4096+77-h24-d72", 1, 1024, 24, 72, 77, "back", True, torch.float32, True),
]


def factorisations(world: int) -> list[tuple[int, int]]:
    return [(u, world // u) for u in range(1, world + 1) if world % u == 0]


def _full_inputs(case, seed):
    _, B, S, H, D, J, _, with_len, dtype, _ = case
    q = randn(B, S, H, D, seed=seed, dtype=dtype)
    k = randn(B, S, H, D, seed=seed + 1, dtype=dtype)
    v = randn(B, S, H, D, seed=seed + 2, dtype=dtype)
    # Joint tokens carry an offset so that a text/image mix-up shows in the error.
    qj = randn(B, J, H, D, seed=seed + 3, dtype=dtype)
    kj = randn(B, J, H, D, seed=seed + 4, dtype=dtype, scale=1.5)
    vj = (randn(B, J, H, D, seed=seed + 5) + 2.0).to(dtype)
    lengths = None
    if with_len:
        lengths = torch.tensor([(J * (b + 1)) // B for b in range(B)], dtype=torch.int64)
        lengths[0] = max(1, J // 3)
    return q, k, v, qj, kj, vj, lengths


def _oracle(q, k, v, qj, kj, vj, lengths):
    """Full attention over [joint; seq] keys, fp64; returns (seq rows, joint rows, lse)."""
    B, S = q.shape[:2]
    J = qj.shape[1]
    qa, ka, va = (torch.cat([a, b], 1) for a, b in ((qj, q), (kj, k), (vj, v)))
    mask = torch.ones(B, J + S, dtype=torch.bool, device=q.device)
    if lengths is not None:
        mask[:, :J] = torch.arange(J, device=q.device)[None, :] < lengths[:, None]
    out, lse = oracle_attention(qa, ka, va, key_mask=mask)
    return out[:, J:], out[:, :J], lse[:, :, J:], lse[:, :, :J]


def _yardstick_error(q, k, v, qj, kj, vj, lengths, ref_s, ref_j):
    """Max error of PyTorch's own SDPA in the inputs' dtype on the full sequence (the policy's
    yardstick: the parallel op may be at most ATTN_ERROR_FACTOR x as far from the oracle)."""
    B, S = q.shape[:2]
    J = qj.shape[1]
    qa, ka, va = (torch.cat([a, b], 1).transpose(1, 2) for a, b in ((qj, q), (kj, k), (vj, v)))
    mask = torch.ones(B, 1, 1, J + S, dtype=torch.bool, device=q.device)
    if lengths is not None:
        keep = torch.arange(J, device=q.device)[None, :] < lengths.to(q.device)[:, None]
        mask[:, 0, 0, :J] = keep
    out = F.scaled_dot_product_attention(qa, ka, va, attn_mask=mask).transpose(1, 2)
    return max(max_abs_err(out[:, J:], ref_s), max_abs_err(out[:, :J], ref_j) if J else 0.0)


def _tol(dtype, yard_err):
    if dtype == torch.float32:
        return 2e-5
    return ATTN_ERROR_FACTOR * yard_err + ATTN_ERROR_FLOOR[dtype]


def _run_case(case, u, r, seed, device="cpu"):
    name, B, S, H, D, J, pos, _, dtype, return_lse = case
    inputs = _full_inputs(case, seed)
    inputs = [None if t is None else t.to(device) for t in inputs]
    q, k, v, qj, kj, vj, lengths = inputs
    out_s, out_j, lse_s, lse_j = _oracle(q, k, v, qj, kj, vj, lengths)
    yard = _yardstick_error(*inputs, out_s, out_j) if dtype != torch.float32 else 0.0
    parts = []
    for t in (q, k, v):
        shard, seq_len = xdit_ops.shard_sequence(t, dim=1)
        parts.append(shard)
    L = parts[0].shape[1]

    def with_joint(shard, joint):
        return torch.cat([joint, shard], 1) if pos == "front" else torch.cat([shard, joint], 1)

    ql, kl, vl = (with_joint(s, j) for s, j in zip(parts, (qj, kj, vj), strict=True))
    res = xdit_ops.usp_attention(ql, kl, vl, joint_tokens=J, joint_position=pos,
                                 joint_lengths=lengths, seq_len=seq_len, return_lse=return_lse)
    out = res[0] if return_lse else res
    assert out.shape == ql.shape and out.dtype == dtype, (name, out.shape, out.dtype)
    seq_rows = slice(J, J + L) if pos == "front" else slice(0, L)
    joint_rows = slice(0, J) if pos == "front" else slice(L, L + J)
    st = xdit_ops.get_parallel_state()
    start = st.sp_rank * L
    valid = max(0, min(L, S - start))
    tol = _tol(dtype, yard)
    what = f"{name} U{u}R{r} rank{dist.get_rank()}"
    err = max_abs_err(out[:, seq_rows][:, :valid], out_s[:, start:start + valid])
    assert err <= tol, f"{what}: sequence rows error {err:.2e} > {tol:.1e}"
    if J:
        err = max_abs_err(out[:, joint_rows], out_j)
        assert err <= tol, f"{what}: joint rows error {err:.2e} > {tol:.1e}"
    assert not torch.isnan(out[:, seq_rows][:, :valid]).any(), what
    # The full output gathered from the shards equals the oracle too.
    full = xdit_ops.gather_sequence(out[:, seq_rows].contiguous(), seq_len, dim=1)
    assert full.shape[1] == S
    assert max_abs_err(full, out_s) <= tol, f"{what}: gathered output"
    if return_lse:
        lse = res[1]
        assert lse.shape == (B, H, J + L) and lse.dtype == torch.float32, (what, lse.shape)
        lt = 1e-4 if dtype == torch.float32 else 5e-2
        e = max_abs_err(lse[:, :, seq_rows][:, :, :valid], lse_s[:, :, start:start + valid])
        assert e <= lt, f"{what}: lse error {e:.2e}"
        if J:
            e = max_abs_err(lse[:, :, joint_rows], lse_j)
            assert e <= lt, f"{what}: joint lse error {e:.2e}"


def _worker_all(rank, world, big):
    for u, r in factorisations(world):
        xdit_ops.init_parallel(ulysses_degree=u, ring_degree=r, device_type="cpu")
        for i, case in enumerate(CASES):
            _run_case(case, u, r, seed=1000 * i + 17)
        if big and (u, r) == factorisations(world)[-1 if world != 4 else 1]:
            for i, case in enumerate(BIG_CASES):
                _run_case(case, u, r, seed=99 + i)
    xdit_ops.destroy_parallel()


CHUNK_CASES = [
    ("chunks-front-lse", 1, 29, 8, 16, 7, "front", False, torch.float32, True),
    ("chunks-back-lengths", 2, 33, 8, 8, 5, "back", True, torch.float32, True),
    ("chunks-plain", 3, 37, 16, 8, 0, "front", False, torch.float32, False),
]


def _worker_chunks(rank, world):
    """The pipelined Ulysses path (XDIT_OPS_USP_CHUNKS): head chunks exchanged asynchronously."""
    xdit_ops.init_parallel(ulysses_degree=world, device_type="cpu")
    os.environ["XDIT_OPS_USP_CHUNKS"] = "2"
    for i, case in enumerate(CHUNK_CASES):
        _run_case(case, world, 1, seed=500 + i)


@pytest.mark.parametrize("world", [2, 4])
def test_usp_pipelined_chunks(world):
    run_distributed(_worker_chunks, world)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_usp_matches_single_device(world):
    run_distributed(_worker_all, world, world != 3, timeout=600)


def _run_shard_lengths(u, r, seed, device="cpu", dtype=torch.float32, L=9, J=4, D=8, H=5):
    """Uneven shards, each padded at its own end (VAE row bands): every grid, a zero-length
    shard, padding between the shards of one Ulysses block, and joint tokens in front."""
    world = u * r
    lens = [(L - (i * 3) % L) if i != 1 else 0 for i in range(world)]
    lens[-1] = max(lens[-1], 1)
    B = 2
    q, k, v = (randn(B, sum(lens), H, D, seed=seed + i, dtype=dtype).to(device)
               for i in range(3))
    qj, kj, vj = (randn(B, J, H, D, seed=seed + 10 + i, dtype=dtype).to(device)
                  for i in range(3))
    out_s, out_j, lse_s, _ = _oracle(q, k, v, qj, kj, vj, None)
    me = xdit_ops.get_parallel_state().sp_rank
    start = sum(lens[:me])

    def local(t, joint):
        shard = t[:, start:start + lens[me]]
        pad = t.new_zeros(B, L - lens[me], H, D)
        return torch.cat([joint, shard, pad], 1)

    ql, kl, vl = local(q, qj), local(k, kj), local(v, vj)
    out, lse = xdit_ops.usp_attention(ql, kl, vl, joint_tokens=J, shard_lengths=lens,
                                      return_lse=True)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    what = f"shard_lengths {lens} U{u}R{r} rank{me}"
    assert max_abs_err(out[:, J:J + lens[me]], out_s[:, start:start + lens[me]]) <= tol, what
    assert max_abs_err(out[:, :J], out_j) <= tol, what
    e = max_abs_err(lse[:, :, J:J + lens[me]], lse_s[:, :, start:start + lens[me]])
    assert e <= (1e-4 if dtype == torch.float32 else 5e-2), what


def _worker_shard_lengths(rank, world):
    for u, r in factorisations(world):
        xdit_ops.init_parallel(ulysses_degree=u, ring_degree=r, device_type="cpu")
        _run_shard_lengths(u, r, seed=7 * u + r)
        with pytest.raises(ValueError, match="shard_lengths"):
            q = randn(1, 6, 4, 8, seed=3)
            xdit_ops.usp_attention(q, q, q, shard_lengths=[7] * world)
        with pytest.raises(ValueError, match="not both"):
            xdit_ops.usp_attention(q, q, q, shard_lengths=[6] * world, seq_len=6 * world)
    xdit_ops.destroy_parallel()


@pytest.mark.parametrize("world", [3, 4])
def test_usp_shard_lengths(world):
    run_distributed(_worker_shard_lengths, world, timeout=300)


def _worker_fp8(rank, world):
    """backend="fp8": each rank's local attention is the FP8 kernel (its CPU emulation here) and
    the partials merge by their LSEs; the gathered result passes the FP8 accuracy gate against
    the fp32 oracle, on DiT-like inputs (K offset and outlier channels, heavy-tailed Q)."""
    from xdit_ops.reference.fp8_attention import attention_error_metrics, dit_like_qkv

    q, k, v = dit_like_qkv(1, 512, 4, 64, seed=3)
    ref, _ = oracle_attention(q.double(), k.double(), v.double())
    for u, r in factorisations(world):
        xdit_ops.init_parallel(ulysses_degree=u, ring_degree=r, device_type="cpu")
        shards = [xdit_ops.shard_sequence(t)[0] for t in (q, k, v)]
        out = xdit_ops.usp_attention(*shards, backend="fp8")
        full = xdit_ops.gather_sequence(out, 512).float()
        m = attention_error_metrics(full, ref.float())
        assert m["cos_mean"] >= 0.999 and m["cos_min"] >= 0.995, (u, r, m)
        assert m["rel_l1"] <= 0.03, (u, r, m)
    xdit_ops.destroy_parallel()


def test_usp_fp8_backend():
    run_distributed(_worker_fp8, 2, timeout=300)


def _worker_group_args(rank, world):
    """Engines pass their own groups (ProcessGroup or name) instead of a mesh."""
    st = xdit_ops.init_parallel(ulysses_degree=2, ring_degree=2, device_type="cpu")
    ug, rg = st.group("ulysses"), st.group("ring")
    q = randn(1, 24, 6, 8, seed=5)
    k = randn(1, 24, 6, 8, seed=6)
    v = randn(1, 24, 6, 8, seed=7)
    ref, _ = oracle_attention(q, k, v)
    shards = [xdit_ops.shard_sequence(t)[0] for t in (q, k, v)]
    for groups in ((ug, rg), (ug.group_name, rg.group_name)):
        out = xdit_ops.usp_attention(*shards, ulysses_group=groups[0], ring_group=groups[1])
        full = xdit_ops.gather_sequence(out, 24)
        assert max_abs_err(full, ref) < 2e-5
    with pytest.raises(ValueError, match="either mesh or"):
        xdit_ops.usp_attention(*shards, ulysses_group=ug, mesh=st.mesh)


def test_usp_group_arguments():
    run_distributed(_worker_group_args, 4)


def _worker_bad_shape(rank, world, u, r):
    xdit_ops.init_parallel(ulysses_degree=u, ring_degree=r, device_type="cpu")
    last = rank == world - 1
    L = 8 if not last else 9  # the last rank is given a wrong shape
    q = randn(1, L, 4, 8, seed=rank)
    with pytest.raises(ValueError, match="disagree"):
        xdit_ops.usp_attention(q, q, q)
    # The group is still usable afterwards.
    q = randn(1, 8, 4, 8, seed=rank)
    xdit_ops.usp_attention(q, q, q)
    # Agreement is remembered per shape, not for the group: a later mismatch on shapes new to
    # every rank still makes every rank raise (plans of agreed shapes exist by now).
    q = randn(1, 6 if not last else 5, 4, 8, seed=rank)
    with pytest.raises(ValueError, match="disagree"):
        xdit_ops.usp_attention(q, q, q)
    q6 = randn(1, 6, 4, 8, seed=rank)
    xdit_ops.usp_attention(q6, q6, q6)
    # XDIT_OPS_USP_CHECK=always checks every call: one rank going back to an agreed shape while
    # the others pass another agreed shape (both planned already) raises on every rank.
    q8 = randn(1, 8, 4, 8, seed=rank)
    usp = importlib.import_module("xdit_ops.ops.usp_attention")
    eager = usp._capturing
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDIT_OPS_USP_CHECK", "always")
        xdit_ops.usp_attention(q6, q6, q6)
        xdit_ops.usp_attention(q8, q8, q8)
        with pytest.raises(ValueError, match="disagree"):
            xdit_ops.usp_attention(*((q8,) * 3 if not last else (q6,) * 3))
        # A plan first built under CUDA-graph capture (where no host collective runs) still
        # checks every eager call after it: the capture is stood in for (no CUDA here) by
        # _capturing answering True for the planning call.
        q4 = randn(1, 4, 4, 8, seed=rank)
        mp.setattr(usp, "_capturing", lambda: True)
        xdit_ops.usp_attention(q4, q4, q4)
        mp.setattr(usp, "_capturing", eager)
        xdit_ops.usp_attention(q4, q4, q4)
        with pytest.raises(ValueError, match="disagree"):
            xdit_ops.usp_attention(*((q4,) * 3 if not last else (q8,) * 3))
    xdit_ops.usp_attention(q8, q8, q8)
    # Ranks set to move data differently (on CUDA: one pushing into symmetric memory, the
    # others in an all-to-all) disagree by name instead of hanging.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDIT_OPS_USP_ULYSSES", "push" if last else "nccl")
        with pytest.raises(ValueError, match="disagree .*XDIT_OPS_USP_CHUNKS/_RING/_ULYSSES"):
            xdit_ops.usp_attention(q8, q8, q8)
    # Likewise the push's output layout: rank blocks (v3) on one rank, rows on the others.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDIT_OPS_PUSH_KERNEL", "v3" if last else "v2")
        with pytest.raises(ValueError, match="disagree .*XDIT_OPS_PUSH_KERNEL"):
            xdit_ops.usp_attention(q8, q8, q8)
    # and the overlap's head chunks: different lists (or a list against equal chunks) would cut
    # the shares differently
    for mine, theirs in (("1,2,1", "1,1,2"), ("1,2,1", "equal"), ("2", "2,2")):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("XDIT_OPS_USP_CHUNKS", mine if last else theirs)
            with pytest.raises(ValueError, match="disagree .*XDIT_OPS_USP_CHUNKS"):
                xdit_ops.usp_attention(q8, q8, q8)
    with pytest.MonkeyPatch.context() as mp:
        # a list every rank agrees on: read by the overlap only (CUDA), the all-to-all runs
        mp.setenv("XDIT_OPS_USP_CHUNKS", "1,2,1")
        xdit_ops.usp_attention(q8, q8, q8)
        # a malformed value: every rank refuses it by name (after the check: none is left
        # waiting in a collective)
        mp.setenv("XDIT_OPS_USP_CHUNKS", "1,,2")
        with pytest.raises(ValueError, match="XDIT_OPS_USP_CHUNKS must be an int, 'equal' or "
                                             "a comma list .* got '1,,2'"):
            xdit_ops.usp_attention(q8, q8, q8)
    xdit_ops.usp_attention(q8, q8, q8)


@pytest.mark.parametrize("u,r", [(2, 1), (1, 2), (2, 2)])
def test_usp_wrong_shape_fails_instead_of_hanging(u, r):
    run_distributed(_worker_bad_shape, u * r, u, r, timeout=120)


# Every case has a local length of 10 on 2 ranks; each differs from the one before it in one
# argument (joint tokens, their position, joint_lengths, return_lse, seq_len, dtype): a field of
# the plan key, or (return_lse) an argument one plan serves both ways, so a stale plan would give
# a wrong result against the oracle.
PLAN_KEY_CASES = [
    ("key-a", 2, 20, 4, 8, 0, "front", False, torch.float32, False),
    ("key-joint", 2, 14, 4, 8, 3, "front", False, torch.float32, False),
    ("key-back", 2, 14, 4, 8, 3, "back", False, torch.float32, False),
    ("key-lengths", 2, 14, 4, 8, 3, "back", True, torch.float32, False),
    ("key-lse", 2, 14, 4, 8, 3, "back", True, torch.float32, True),
    ("key-seq-len", 2, 19, 4, 8, 0, "front", False, torch.float32, False),
    ("key-dtype", 2, 20, 4, 8, 0, "front", False, torch.bfloat16, False),
    ("key-a-again", 2, 20, 4, 8, 0, "front", False, torch.float32, False),
]


def _worker_plan_cache(rank, world):
    """The plan cache: a repeated call equals the first, every key field is picked up, the
    agreement all-gather runs once per shape, and a new mesh gets new plans."""
    usp = importlib.import_module("xdit_ops.ops.usp_attention")
    for u, r in factorisations(world):
        xdit_ops.init_parallel(ulysses_degree=u, ring_degree=r, device_type="cpu")
        for i, case in enumerate(PLAN_KEY_CASES):
            _run_case(case, u, r, seed=300 + i)
        q, k, v = (randn(2, 10, 4, 8, seed=40 + i + rank) for i in range(3))
        usp._PLANS.clear()
        first = xdit_ops.usp_attention(q, k, v, joint_tokens=3, return_lse=True)
        planned = dict(usp._PLANS)
        assert len(planned) == 1, len(planned)
        again = xdit_ops.usp_attention(q, k, v, joint_tokens=3, return_lse=True)
        assert usp._PLANS == planned  # the same plan object served the second call
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
        # Views of a fused projection (other strides, head_dim still contiguous) share the plan.
        qkv = torch.stack([q, k, v], dim=2)  # [B, T, 3, H, D]
        strided = xdit_ops.usp_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                         joint_tokens=3, return_lse=True)
        assert usp._PLANS == planned
        assert max_abs_err(strided[0], first[0]) <= 1e-6
        assert max_abs_err(strided[1], first[1]) <= 1e-6
        # The agreement all-gather runs on the first call with new shapes only (the one above
        # was agreed on its first call), whatever else of the key changes.
        gathers = []
        check = usp._check_agreement
        def counted(meta, ug, rg, gathers=gathers, check=check):
            gathers.append(meta)
            return check(meta, ug, rg)

        usp._check_agreement = counted
        try:
            xdit_ops.usp_attention(q, k, v, joint_tokens=3, return_lse=False)
            assert gathers == []
            q2 = randn(2, 12, 4, 8, seed=rank)
            xdit_ops.usp_attention(q2, q2, q2, joint_tokens=4)
            xdit_ops.usp_attention(q2, q2, q2, joint_tokens=4)
            assert len(gathers) == 1, gathers
        finally:
            usp._check_agreement = check
    # A new mesh plans anew: the same shapes on the other grid still match the oracle.
    for u, r in factorisations(world)[::-1]:
        xdit_ops.init_parallel(ulysses_degree=u, ring_degree=r, device_type="cpu")
        _run_case(PLAN_KEY_CASES[1], u, r, seed=77)
    # An environment switch changed between calls is picked up (XDIT_OPS_USP_CHUNKS).
    xdit_ops.init_parallel(ulysses_degree=world, device_type="cpu")
    _run_case(CHUNK_CASES[0], world, 1, seed=5)
    assert not any(p.path == "pipelined" for p in usp._PLANS.values())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDIT_OPS_USP_CHUNKS", "2")
        _run_case(CHUNK_CASES[0], world, 1, seed=6)
        assert any(p.path == "pipelined" for p in usp._PLANS.values())
    xdit_ops.destroy_parallel()


def test_usp_plan_cache():
    run_distributed(_worker_plan_cache, 2, timeout=300)


def _worker_compile(rank, world):
    # Compile in this thread: inductor's worker pool once aborted a spawned rank at exit
    # ("terminate called without an active exception", exit code -6) after the test passed.
    torch._inductor.config.compile_threads = 1
    xdit_ops.init_parallel(ulysses_degree=world, device_type="cpu")
    q = randn(2, 10, 4, 8, seed=1)
    k = randn(2, 10, 4, 8, seed=2)
    v = randn(2, 10, 4, 8, seed=3)

    def block(q, k, v):
        return xdit_ops.usp_attention(q * 0.5, k, v, joint_tokens=3) + 1.0

    eager = block(q, k, v)
    compiled = torch.compile(block, fullgraph=True)(q, k, v)
    assert max_abs_err(compiled, eager) <= 1e-6


def test_usp_compile_fullgraph():
    run_distributed(_worker_compile, 2, timeout=400)


def test_usp_single_device_is_attention():
    """Without a mesh it is plain attention (joint tokens and padding still honoured)."""
    q = randn(2, 19, 3, 16, seed=11)
    k = randn(2, 19, 3, 16, seed=12)
    v = randn(2, 19, 3, 16, seed=13)
    out = xdit_ops.usp_attention(q, k, v, joint_tokens=4, joint_position="back")
    ref, _ = oracle_attention(q, k, v)
    assert max_abs_err(out, ref) <= ATTN_ERROR_FLOOR[torch.float32] * 10
    # The second call runs the cached plan: the same result.
    assert torch.equal(xdit_ops.usp_attention(q, k, v, joint_tokens=4, joint_position="back"),
                       out)
    lengths = torch.tensor([1, 4])
    out = xdit_ops.usp_attention(q, k, v, joint_tokens=4, joint_position="back",
                                 joint_lengths=lengths)
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[0, 16:] = False
    ref, _ = oracle_attention(q, k, v, key_mask=mask)
    assert max_abs_err(out, ref) <= 2e-5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"joint_position": "middle"}, "joint_position"),
        ({"joint_tokens": -1}, "joint_tokens"),
        ({"joint_tokens": 40}, "joint_tokens=40"),
        ({"backend": "nope"}, "unknown backend"),
        ({"joint_lengths": torch.tensor([1, 2])}, "joint_tokens is 0"),
        ({"scale": float("nan")}, "scale"),
    ],
)
def test_usp_bad_arguments(kwargs, match):
    q = randn(2, 19, 3, 16, seed=1)
    xdit_ops.usp_attention(q, q, q)  # the shapes are planned: bad arguments still raise
    for _ in range(2):  # and a failed call leaves no plan behind
        with pytest.raises((ValueError, TypeError), match=match):
            xdit_ops.usp_attention(q, q, q, **kwargs)


def test_usp_opcheck():
    q = randn(2, 9, 3, 8, seed=1)
    k = randn(2, 9, 3, 8, seed=2)
    v = randn(2, 9, 3, 8, seed=3)
    torch.library.opcheck(
        torch.ops.xdit_ops.usp_attention.default,
        (q, k, v, None, 2, True, -1, None, "auto", "", "", True),
    )


# ---------------------------------------------------------------------------------------------
# GPUs: NCCL, one process per GPU, the shapes.

GPU_CASES = [
    ("S4097-h30-d64-bf16", 1, 4097, 30, 64, 0, "front", False, torch.bfloat16, True),
    ("S4096+77-h24-d128-front", 1, 4096, 24, 128, 77, "front", False, torch.bfloat16, False),
    ("S4096+512-h24-d72-back-lengths", 3, 1031, 24, 72, 512, "back", True, torch.bfloat16, True),
    ("S4097-h30-d64-fp32", 1, 4097, 30, 64, 77, "back", True, torch.float32, True),
    ("b3-h30-d128-lengths", 3, 2049, 30, 128, 77, "front", True, torch.bfloat16, True),
]


def _worker_gpu(rank, world):
    for u, r in factorisations(world):
        xdit_ops.init_parallel(ulysses_degree=u, ring_degree=r)
        # First the transport of one host with peer access: without a ring the push
        # (symmetric-memory stores, the default), with one the copy-engine ring (symmetric-memory
        # pulls: XDIT_OPS_USP_RING=auto): every case, the shapes in a row (a buffer per shape),
        # then the padded-shard case (squeezed keys); then NCCL's by name. The push first is the
        # order that hung in runs 27-28, and the copy-engine ring deadlocked here in runs 5-7,
        # before _symm_buffer synchronised ahead of its rendezvous.
        switch = "XDIT_OPS_USP_ULYSSES" if r == 1 else "XDIT_OPS_USP_RING"
        first = None  # the default: the push without a ring, the copy-engine ring with one
        # with a ring also the copy-engine ring synchronised by stream-memory flags
        for transport in (first, "nccl") + (("ceflags",) if r > 1 else ()):
            with pytest.MonkeyPatch.context() as mp:
                if transport:
                    mp.setenv(switch, transport)
                for i, case in enumerate(GPU_CASES):
                    _run_case(case, u, r, seed=31 * i + 5 + (transport is not None),
                              device="cuda")
                _run_shard_lengths(u, r, seed=3 * u + r, device="cuda", dtype=torch.bfloat16,
                                   L=300, J=77, D=128)
            if transport == first:
                plans = [p for p in _usp._PLANS.values() if p.U == u and p.R == r]
                used = {p.path for p in plans} if r == 1 else {p.ring for p in plans}
                assert used == ({"push"} if r == 1 else {"ce"}), (u, r, used)
                if u > 1 and r > 1:  # the hybrid: the push feeds the copy-engine ring
                    assert {p.path for p in plans} == {"push"}, (u, r)
                if r == 1:  # the default push sends its output back by rank blocks
                    assert all(p.push_blocks for p in plans), u
        if r == 1:
            # The push with its output stored into the output rows (XDIT_OPS_PUSH_KERNEL=v2).
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("XDIT_OPS_PUSH_KERNEL", "v2")
                for i, case in enumerate(GPU_CASES):
                    _run_case(case, u, r, seed=31 * i + 7, device="cuda")
                _run_shard_lengths(u, r, seed=3 * u + r + 1, device="cuda",
                                   dtype=torch.bfloat16, L=300, J=77, D=128)
            plans = [p for p in _usp._PLANS.values() if p.U == u and p.path == "push"]
            assert any(not p.push_blocks for p in plans), u
        if os.environ.get("XDIT_OPS_TEST_CE") == "1" and r == 1:
            # The copy-engine Ulysses exchange (opt-in; the push replaced it), only when asked.
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("XDIT_OPS_USP_ULYSSES", "ce")
                for i, case in enumerate(GPU_CASES):
                    _run_case(case, u, r, seed=41 * i + 3, device="cuda")
    xdit_ops.destroy_parallel()


@pytest.mark.multigpu(2)
@pytest.mark.parametrize("world", [2, 4])
def test_usp_gpu_matches_single_device(world):
    run_distributed(_worker_gpu, world, timeout=300, backend="nccl")


def _worker_gpu_graph(rank, world, ulysses_ce=False, transport=None, push_kernel=None,
                      ring=None, chunks=None, heads=8):
    """CUDA-graph capture and replay of the op gives the eager result (``ring``: a ring-only
    grid with that ring transport; ``chunks``: XDIT_OPS_USP_CHUNKS)."""
    if ulysses_ce:
        transport = "ce"
    u = 1 if ring else world if transport else 2 if world % 2 == 0 else 1
    if transport:
        os.environ["XDIT_OPS_USP_ULYSSES"] = transport
    if ring:
        os.environ["XDIT_OPS_USP_RING"] = ring
    if push_kernel:
        os.environ["XDIT_OPS_PUSH_KERNEL"] = push_kernel
    if chunks:
        os.environ["XDIT_OPS_USP_CHUNKS"] = chunks
    xdit_ops.init_parallel(ulysses_degree=u, ring_degree=world // u)
    q, k, v = (randn(1, 1024, heads, 64, seed=s, dtype=torch.bfloat16, device="cuda")
               for s in (1, 2, 3))
    # New inputs in place as well: the replay must compute them (a transport whose buffers
    # still held the last eager result would pass a replay of the same inputs unmoved).
    fresh = tuple(randn(*t.shape, seed=seed, dtype=t.dtype, device="cuda")
                  for t, seed in zip((q, k, v), (4, 5, 6), strict=True))
    assert_cuda_graph_replays(lambda: xdit_ops.usp_attention(q, k, v, joint_tokens=16),
                              (q, k, v), fresh)
    if transport:
        assert {p.path for p in _usp._PLANS.values()} == {transport}
    if transport == "overlap":
        want = _usp._overlap_chunks(heads // u, chunks)
        assert {p.chunk_heads for p in _usp._PLANS.values()} == {want}, want
    if ring:
        assert {p.ring for p in _usp._PLANS.values()} == {ring}
    if push_kernel:
        assert all(p.push_blocks == (push_kernel == "v3") for p in _usp._PLANS.values())


@pytest.mark.multigpu(4)
@pytest.mark.parametrize("ulysses_ce", [False, True])
def test_usp_gpu_cuda_graph(ulysses_ce):
    run_distributed(_worker_gpu_graph, 4, ulysses_ce, timeout=150, backend="nccl")


# XDIT_OPS_USP_CHUNKS values of the overlap GPU tests: "default" (unset: the uneven default,
# one head first and last), the equal default of sessions 10-11 and 3 equal chunks; "lists":
# head-count lists, each run on the cases whose share it adds up to (on 2 GPUs shares of 15,
# 12 and 6 heads; on 4 of 6 and 3: 30 heads do not split evenly, the push), and a list that
# does not add up, refused by name on every rank.
OVERLAP_CHUNK_SETS = {
    "default": (None, "equal", "3"),
    "lists": ("1,4,1", "1,2,2,1", "3,1,2", "1,1,1", "2,12,1", "1,5,5,1"),
}


def _worker_gpu_overlap(rank, world, chunk_set="default", host="tensors"):
    """The overlap path (XDIT_OPS_USP_ULYSSES=overlap: chunk 0 pushed, the other chunks and the
    outputs on the copy engines, flags by stream memory operations) against the oracle: every
    case under each chunking of ``chunk_set`` (heads that do not split evenly, or N equal
    chunks that do not divide the share, take the push; a list only the cases it fits), the
    shapes back to back (one flag set for every buffer), then the padded-shard case; on the
    host path ``host`` (XDIT_OPS_USP_HOST)."""
    os.environ["XDIT_OPS_USP_HOST"] = host
    xdit_ops.init_parallel(ulysses_degree=world, ring_degree=1)
    ran = set()
    for n, chunks in enumerate(OVERLAP_CHUNK_SETS[chunk_set]):
        listed = chunks is not None and "," in chunks

        def fits(H, chunks=chunks, listed=listed):  # a list: only the shares it adds up to
            return not listed or _fits_share(chunks, H, world)

        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("XDIT_OPS_USP_ULYSSES", "overlap")
            if chunks:
                mp.setenv("XDIT_OPS_USP_CHUNKS", chunks)
            for i, case in enumerate(GPU_CASES):
                if fits(case[3]):
                    _run_case(case, world, 1, seed=17 * i + 2 + n, device="cuda")
            for H in (5, 12):  # uneven heads (the push), even ones (squeezed keys per chunk)
                if fits(H):
                    _run_shard_lengths(world, 1, seed=5 * world + H + n, device="cuda",
                                       dtype=torch.bfloat16, L=300, J=77, D=128, H=H)
        plans = [p for p in _usp._PLANS.values() if p.U == world]
        for p in plans:
            even = all(h == p.heads[0] for h in p.heads)
            c = _usp._overlap_chunks(p.heads[0], chunks) if even else (p.heads[0],)
            want = ("overlap", c) if len(c) > 1 else ("push", ())
            assert (p.path, p.chunk_heads) == want, (world, chunks, p.heads, p.path,
                                                     p.chunk_heads)
            if p.path == "overlap":
                ran.add(chunks)
        _usp._PLANS.clear()
    # every chunking of the set ran the overlap somewhere (on 4 GPUs "2,12,1" and "1,5,5,1"
    # fit no share, on 2 GPUs "1,1,1" none)
    shapes = [case[3] for case in GPU_CASES] + [5, 12]
    fitting = {c for c in OVERLAP_CHUNK_SETS[chunk_set]
               if any(_fits_share(c, H, world) for H in shapes)}
    assert ran == fitting, (ran, fitting)
    if chunk_set == "lists":
        # a list that does not add up to the share: refused by name on every rank, none hangs
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("XDIT_OPS_USP_ULYSSES", "overlap")
            mp.setenv("XDIT_OPS_USP_CHUNKS", "1,4,4,1")
            with pytest.raises(ValueError, match="XDIT_OPS_USP_CHUNKS='1,4,4,1' must list"):
                _run_case(GPU_CASES[1], world, 1, seed=3, device="cuda")
        _run_case(GPU_CASES[1], world, 1, seed=4, device="cuda")  # the group still works
    xdit_ops.destroy_parallel()


def _fits_share(chunks, H, world) -> bool:
    """Whether the overlap runs ``XDIT_OPS_USP_CHUNKS=chunks`` at ``H`` heads on ``world``
    ranks (even heads, and a list adding up to the share or N equal chunks dividing it)."""
    if H % world:
        return False
    return len(_usp._overlap_chunks(H // world, chunks)) > 1 if chunks is None or \
        "," not in chunks else sum(_usp.parse_chunks(chunks)) == H // world


@pytest.mark.multigpu(2)
@pytest.mark.parametrize("chunk_set,host", [("default", "tensors"), ("lists", "tensors"),
                                            ("lists", "lists")])
@pytest.mark.parametrize("world", [2, 4])
def test_usp_gpu_overlap_matches_single_device(world, chunk_set, host):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    run_distributed(_worker_gpu_overlap, world, chunk_set, host, timeout=450, backend="nccl")


@pytest.mark.multigpu(2)
@pytest.mark.parametrize("chunks", [None, "equal", "1,4,1"], ids=["default", "equal", "1.4.1"])
@pytest.mark.parametrize("world", [2, 4])
def test_usp_gpu_cuda_graph_overlap(world, chunks):
    """The overlap path (stream memory operations on side streams) captured and replayed, with
    6 heads a rank: the default chunks (1, 2, 2, 1), the equal default (3, 3) and (1, 4, 1)."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    run_distributed(_worker_gpu_graph, world, False, "overlap", None, None, chunks, 6 * world,
                    timeout=150, backend="nccl")


@pytest.mark.multigpu(2)
@pytest.mark.parametrize("world", [2, 4])
def test_usp_gpu_cuda_graph_ring_flags(world):
    """The copy-engine ring synchronised by stream-memory flags, captured and replayed."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    run_distributed(_worker_gpu_graph, world, False, None, None, "ceflags", timeout=150,
                    backend="nccl")


@pytest.mark.multigpu(2)
@pytest.mark.parametrize("push_kernel", ["v2", "v3"], ids=["rows", "blocks"])
def test_usp_gpu_cuda_graph_push(push_kernel):
    """The push transport (symmetric-memory stores and device barriers) captured and replayed
    on 2 GPUs; ``rows``: the output stored into the output rows (XDIT_OPS_PUSH_KERNEL=v2),
    ``blocks``: sent back by rank blocks (v3, the default)."""
    run_distributed(_worker_gpu_graph, 2, False, "push", push_kernel, timeout=150,
                    backend="nccl")


def test_ulysses_transport_switch():
    from xdit_ops.ops.usp_attention import ulysses_transport

    cuda = torch.device("cuda", 0)  # a device object only: nothing runs on it
    assert [ulysses_transport(cuda, s) for s in (None, "auto", "nccl", "ce", "push",
                                                  "overlap")] == \
        ["auto", "auto", "nccl", "ce", "push", "overlap"]
    # off CUDA every transport is NCCL's (gloo on CPU)
    assert ulysses_transport(torch.device("cpu"), "push") == "nccl"
    with pytest.raises(ValueError, match="usp_attention: XDIT_OPS_USP_ULYSSES must be one of "
                                         r"\('auto', 'nccl', 'ce', 'push', 'overlap'\), "
                                         "got 'nvlink'"):
        ulysses_transport(cuda, "nvlink")


def test_auto_transports_by_size_and_ranks():
    """The auto transports (``_build_plan``): the flag ring and the overlapped Ulysses from
    AUTO_FLAGS_MIN_TOKENS gathered tokens (the overlap from AUTO_OVERLAP_MIN_RANKS ranks and
    where it applies), the barrier ring and the push below, NCCL without peer mapping; the
    push's output by rank blocks unless v1/v2 is asked for."""
    from xdit_ops.ops.ulysses_pack import push_blocks
    from xdit_ops.ops.usp_attention import auto_ring, auto_ulysses

    N, M = _usp.AUTO_FLAGS_MIN_TOKENS, _usp.AUTO_OVERLAP_MIN_RANKS
    assert 4608 + 512 < N <= 16896 + 512  # between the shapes measured (runs 44-45)
    assert [auto_ring(True, n) for n in (4608 + 512, N - 1, N, 32760)] == \
        ["ce", "ce", "ceflags", "ceflags"]
    assert auto_ring(False, 32760) == "nccl"
    assert [auto_ulysses(True, True, M, n) for n in (N - 1, N, 32760)] == \
        ["push", "overlap", "overlap"]
    assert auto_ulysses(True, True, M - 1, 32760) == "push"  # 2 ranks: a tie, the push
    assert auto_ulysses(True, False, 8, 32760) == "push"  # uneven heads, v1, ...
    assert auto_ulysses(False, False, 8, 32760) == "nccl"
    assert [push_blocks(v) for v in (None, "", "v3", "v2", "v1")] == \
        [True, True, True, False, False]


def _old_overlap_chunks(h, switch):
    """The overlap's chunk count before uneven chunks (session 11), for an int switch."""
    c = int(switch or "0")
    if c <= 0:
        c = 2 if h % 2 == 0 else 3 if h % 3 == 0 else 1
    return c if 1 < c <= _usp.MAX_OVERLAP_CHUNKS and h % c == 0 else 1


def test_parse_chunks():
    parse = _usp.parse_chunks
    assert [parse(v) for v in (None, "", " ", "0", "2", " 3 ", "-1", "equal")] == \
        [0, 0, 0, 0, 2, 3, -1, "equal"]
    assert parse("1,4,4,1") == (1, 4, 4, 1)
    assert parse(" 1, 2 ,1") == (1, 2, 1)
    for bad in ("1,0,1", "1,,1", "4,", "1;4", "two", "1.5", "1,-1,2", "Equal"):
        with pytest.raises(ValueError, match=r"usp_attention: XDIT_OPS_USP_CHUNKS must be an "
                                             r"int, 'equal' or a comma list .*got '"):
            parse(bad)
    # a list or "equal" is the overlap's: the pipelined and copy-engine paths take their default
    assert [_usp._pipelined_chunks(16, 2, 1, v) for v in ("1,3,3,1", "equal", "2", None)] == \
        [1, 1, 2, 1]
    assert [_usp._ce_chunks(6, v) for v in ("1,4,1", "equal", "2", None)] == [3, 3, 2, 3]


def test_overlap_chunks_int_switch_unchanged():
    """An int XDIT_OPS_USP_CHUNKS cuts the share as before (N equal chunks, the push where N
    does not divide it), and ``equal`` is the old default (2, or 3)."""
    for h in range(1, 41):
        for sw in ("1", "2", "3", "4", "5", "6", "8", "9", "10"):
            c = _old_overlap_chunks(h, sw)
            assert _usp._overlap_chunks(h, sw) == (h // c,) * c if c > 1 else (h,), (h, sw)
        c = _old_overlap_chunks(h, None)
        assert _usp._overlap_chunks(h, "equal") == ((h // c,) * c if c > 1 else (h,)), h
    assert _usp._overlap_chunks(10, "2") == (5, 5)
    assert _usp._overlap_chunks(6, "3") == (2, 2, 2)
    assert _usp._overlap_chunks(9, "2") == (9,)  # does not divide: no overlap (the push)


def test_overlap_default_chunks():
    """The default (unset, empty or <= 0): one head first and last, the rest between."""
    M = _usp.MAX_OVERLAP_CHUNKS
    table = {1: (1,), 2: (1, 1), 3: (1, 1, 1), 4: (1, 2, 1), 5: (1, 3, 1), 6: (1, 2, 2, 1),
             8: (1, 3, 3, 1), 10: (1, 4, 4, 1), 12: (1, 3, 3, 4, 1)}
    for h, want in table.items():
        assert _usp.overlap_default_chunks(h) == want, h
        for sw in (None, "", "0", "-1"):
            assert _usp._overlap_chunks(h, sw) == want, (h, sw)
    for h in range(2, 200):
        ch = _usp.overlap_default_chunks(h)
        assert sum(ch) == h and 2 <= len(ch) <= M and min(ch) >= 1, (h, ch)
        assert ch[0] == ch[-1] == 1, (h, ch)
        mid = ch[1:-1]
        assert list(mid) == sorted(mid) and max(mid, default=0) - min(mid, default=0) <= 1, ch
        if len(ch) < M:  # room for more chunks: the middle ones stay small
            assert max(mid, default=0) <= max(3, _usp.OVERLAP_MIDDLE_MAX), (h, ch)


def test_overlap_chunk_lists():
    assert _usp._overlap_chunks(10, "1,4,4,1") == (1, 4, 4, 1)
    assert _usp._overlap_chunks(6, "1,4,1") == (1, 4, 1)
    assert _usp._overlap_chunks(6, "5,1") == (5, 1)
    assert _usp._overlap_chunks(8, ",".join(["1"] * 8)) == (1,) * 8
    with pytest.raises(ValueError, match=r"XDIT_OPS_USP_CHUNKS='1,4,4,1' must list at most 8 "
                                         r"head chunks adding up to this rank's share of 6 "
                                         r"heads .* its 4 chunks add up to 10"):
        _usp._overlap_chunks(6, "1,4,4,1")
    with pytest.raises(ValueError, match="at most 8 head chunks .* its 9 chunks add up to 9"):
        _usp._overlap_chunks(9, ",".join(["1"] * 9))
    # whether the plan may choose the overlap: a list always (checked once chosen), an int
    # where it divides, the default from 2 heads
    can = _usp._overlap_can_chunk
    assert can(6, "1,4,4,1") and can(6, "2") and can(6, None) and can(5, None)
    assert can(9, "equal")  # (3, 3, 3)
    assert not can(5, "2") and not can(1, None) and not can(7, "equal")


def test_overlap_chunk_codes():
    """XDIT_OPS_USP_CHUNKS in the cross-rank check: ints as before, lists by their counts."""
    code = _usp._chunks_code
    assert [code(v) for v in (None, "0", "2", "equal", "x", "1,,1")] == [-1, 0, 2, -2, 99, 99]
    assert code("1,4,4,1") == code(" 1, 4,4,1") != code("1,4,1")
    assert code("1,4,4,1") not in (-2, -1, 99) and code("1,4,4,1") > 1_000_000
    assert code(str(1 << 40)) == 99  # an int the check's int64 could not carry alike
    assert _usp._switch_codes("1,2,1", None, None, None, None)[0] == code("1,2,1")


def test_overlap_push_heads():
    """The chunked push takes chunk 0 of every share; the last chunk's push-out counts keep
    this rank's chunk and the total H."""
    heads = [6, 6, 6, 6]
    for r in range(4):
        for ch in ((1, 2, 2, 1), (1, 4, 1), (3, 3), (5, 1)):
            (cnt, starts), out = _usp.overlap_push_heads(heads, r, ch)
            assert cnt == [ch[0]] * 4 and starts == [0, 6, 12, 18]
            assert out[r] == ch[-1] and sum(out) == 24
            assert [x for i, x in enumerate(out) if i not in (r, (r + 1) % 4)] == [6, 6]


def test_overlap_flag_words_fit():
    """Every flag word of up to MAX_OVERLAP_CHUNKS chunks is distinct and inside the buffer."""
    M = _usp.MAX_OVERLAP_CHUNKS
    for U in (2, 4, 8):
        n = _usp._flag(2, 0, U, U)
        words = [_usp._flag(0, c, j, U) for c in range(M) for j in range(U)]
        words += [_usp._flag(k, 0, j, U) for k in (1, 2) for j in range(U)]
        assert len(set(words)) == len(words) and 0 <= min(words) and max(words) < n


def _plan_overlap(monkeypatch, H, U, S, chunks, transport="overlap", r=0):
    """``_build_plan`` of rank ``r`` of a peer-mapped Ulysses group of ``U`` stub ranks (no
    process group: the cross-rank check is off) with ``XDIT_OPS_USP_CHUNKS=chunks``."""
    monkeypatch.setattr(_usp, "_group_size", lambda g: 1 if g is None else g.size)
    monkeypatch.setattr(_usp, "_group_rank", lambda g: 0 if g is None else g.rank)
    monkeypatch.setattr(_usp, "ulysses_transport", lambda device, switch: switch or "auto")
    monkeypatch.setattr(_usp, "_peer_mapped", lambda *a, **k: True)
    q = randn(1, S // U, H, 8, seed=1)
    switches = ("0", chunks, None, transport, None, None, None, None)
    return _usp._build_plan(q, q, q, None, 0, True, -1, "auto", _StubGroup(r, U), None, None,
                            switches)


def _plan_hybrid(monkeypatch, ulysses=None, ring=None, mapped=True, S=256, U=2, R=2):
    """``_build_plan`` of rank 0 of a U x R grid of stub groups (no process group: the
    cross-rank check is off) with ``XDIT_OPS_USP_ULYSSES=ulysses``, ``XDIT_OPS_USP_RING=ring``
    and every group peer-mapped or not."""
    monkeypatch.setattr(_usp, "_group_size", lambda g: 1 if g is None else g.size)
    monkeypatch.setattr(_usp, "_group_rank", lambda g: 0 if g is None else g.rank)
    monkeypatch.setattr(_usp, "ulysses_transport", lambda device, switch: switch or "auto")
    monkeypatch.setattr(_usp, "ring_transport", lambda device, switch: switch or "auto")
    monkeypatch.setattr(_usp, "_peer_mapped", lambda *a, **k: mapped)
    monkeypatch.setattr(_usp.dist, "get_process_group_ranks", lambda g: list(range(g.size)))
    q = randn(1, S // (U * R), 8, 8, seed=1)
    switches = ("0", None, ring, ulysses, None, None, None, None)
    return _usp._build_plan(q, q, q, None, 0, True, -1, "auto", _StubGroup(0, U),
                            _StubGroup(0, R), None, switches)


def test_hybrid_plan_takes_the_push_with_a_copy_engine_ring(monkeypatch):
    """On a peer-mapped hybrid grid the Ulysses exchange is the push when the ring runs on the
    copy engines (auto, ce, ceflags; the overlap asked for takes the push there too): then a
    call can replay a graph of its own (no NCCL kernel in it, without the LSE). With the NCCL
    ring, or without peer mapping, NCCL's all-to-all as before (session 15, runs 71-72)."""
    monkeypatch.setattr(_usp, "_RUN", object())  # the native replay, as where _C is loaded
    for ulysses, ring in ((None, None), (None, "ce"), (None, "ceflags"), ("push", "ce"),
                          ("overlap", "ce"), ("overlap", "ceflags")):
        p = _plan_hybrid(monkeypatch, ulysses, ring)
        assert (p.path, p.ring in _usp.CE_RINGS) == ("push", True), (ulysses, ring, p.path)
        # (p.graphed is off on CPU tensors; eligibility is what the CUDA plan turns it on by)
        assert (_usp._graph_eligible(p, False), _usp._graph_eligible(p, True)) == (True, False)
    # 16384 gathered tokens: auto's ring is the flag ring, the Ulysses part still the push
    p = _plan_hybrid(monkeypatch, S=_usp.AUTO_FLAGS_MIN_TOKENS)
    assert (p.path, p.ring) == ("push", "ceflags")
    for ulysses, ring, mapped in ((None, "nccl", True), ("push", "nccl", True),
                                  ("nccl", "ce", True), (None, None, False)):
        p = _plan_hybrid(monkeypatch, ulysses, ring, mapped)
        assert p.path == "nccl", (ulysses, ring, mapped, p.path)
        assert not _usp._graph_eligible(p, False)


def test_overlap_plan_chunks(monkeypatch):
    """The plan's chunks: the overlap's head counts (``chunk_heads``, ``chunks`` their count);
    a list that does not fit the share raises where the overlap is chosen, not where auto takes
    the push."""
    for H, U, sw, want in ((24, 4, None, (1, 2, 2, 1)), (40, 4, None, (1, 4, 4, 1)),
                           (24, 4, "1,4,1", (1, 4, 1)), (24, 4, "2", (3, 3)),
                           (24, 4, "equal", (3, 3)), (40, 4, "equal", (5, 5)),
                           (24, 2, "1,10,1", (1, 10, 1)), (20, 4, None, (1, 3, 1))):
        p = _plan_overlap(monkeypatch, H, U, 64, sw)
        assert (p.path, p.chunk_heads, p.chunks) == ("overlap", want, len(want)), (H, U, sw)
    # N equal chunks that do not divide the share: the push, as before
    p = _plan_overlap(monkeypatch, 40, 4, 64, "3")
    assert (p.path, p.chunk_heads, p.chunks) == ("push", (), 1)
    # one head a rank: no chunks, the push
    assert _plan_overlap(monkeypatch, 4, 4, 64, None).path == "push"
    with pytest.raises(ValueError, match="XDIT_OPS_USP_CHUNKS='1,4,4,1' must list .* share of "
                                         "6 heads"):
        _plan_overlap(monkeypatch, 24, 4, 64, "1,4,4,1")
    # auto: the overlap from AUTO_FLAGS_MIN_TOKENS (a list is checked then), the push below
    # (the list is not read, nor refused)
    N = _usp.AUTO_FLAGS_MIN_TOKENS
    assert _plan_overlap(monkeypatch, 24, 4, 64, "1,4,4,1", None).path == "push"
    p = _plan_overlap(monkeypatch, 24, 4, N, "1,4,1", None)
    assert (p.path, p.chunk_heads) == ("overlap", (1, 4, 1))
    with pytest.raises(ValueError, match="share of 6 heads"):
        _plan_overlap(monkeypatch, 24, 4, N, "1,4,4,1", None)
    assert _plan_overlap(monkeypatch, 40, 4, N, None, None).chunk_heads == (1, 4, 4, 1)


def test_ring_transport_switch():
    from xdit_ops.ops.usp_attention import ring_transport

    cuda = torch.device("cuda", 0)  # a device object only: nothing runs on it
    assert [ring_transport(cuda, s) for s in (None, "auto", "nccl", "ce", "ceflags")] == \
        ["auto", "auto", "nccl", "ce", "ceflags"]
    assert ring_transport(torch.device("cpu"), "ce") == "nccl"
    with pytest.raises(ValueError, match="usp_attention: XDIT_OPS_USP_RING must be one of "
                                         r"\('auto', 'nccl', 'ce', 'ceflags'\), got 'p2p'"):
        ring_transport(cuda, "p2p")


# ---------------------------------------------------------------------------------------------
# The push transport's Python on CPU: symmetric memory is CUDA-only, so U ranks run in threads
# of this process, plain tensors stand in for the peer-mapped buffers and a threading barrier
# for the device barrier. The kernels' layouts are tested in test_ulysses_pack.py; this checks
# the wiring around them (buffer views, joint rows, the separate joint partial, squeezed keys,
# buffer reuse across calls).


class _StubGroup:
    def __init__(self, rank, size):
        self.rank, self.size = rank, size


class _StubHandle:
    def __init__(self, bufs, barrier):
        self.bufs, self.barrier_ = bufs, barrier

    def get_buffer(self, rank, sizes, dtype, storage_offset=0):
        n = math.prod(sizes)
        return self.bufs[rank][storage_offset:storage_offset + n].view(sizes)

    def barrier(self, channel=0):
        self.barrier_.wait(timeout=60)


def _push_cases():
    # (heads, B, L, J, joint_front, with lengths, shard_lengths or None)
    return [
        ([3, 2], 2, 6, 3, True, False, None),
        ([3, 2], 2, 6, 3, False, True, None),  # joint keys masked: a partial of their own
        ([2, 2, 1], 1, 5, 0, True, False, [5, 2, 4]),  # padding inside the block: squeezed
    ]


@pytest.mark.parametrize("push_kernel", ["v2", "v3"], ids=["rows", "blocks"])
@pytest.mark.parametrize("case", range(3))
def test_push_path_wiring_in_threads(case, push_kernel, monkeypatch):
    """``push_kernel``: XDIT_OPS_PUSH_KERNEL as the plan sees it (v2: the output push into
    the output rows and a copy out; v3, like unset: the output push by rank blocks and an
    unpack)."""
    import threading

    heads, B, L, J, front, with_len, shard_lengths = _push_cases()[case]
    U, H, D = len(heads), sum(heads), 8
    lens = shard_lengths or [L] * U
    seq = [randn(B, sum(lens), H, D, seed=10 * case + i) for i in range(3)]
    joint = [randn(B, J, H, D, seed=10 * case + 5 + i) for i in range(3)]
    lengths = torch.tensor([max(1, J // 2), J])[:B] if with_len else None
    # two calls: the second (queries halved) reuses the buffers, and must not change the
    # first call's result (it is the caller's, not a view of the buffer)
    refs = [_oracle(seq[0] * f, *seq[1:], joint[0] * f, *joint[1:], lengths)[:2]
            for f in (1.0, 0.5)]
    starts = [sum(lens[:r]) for r in range(U)]

    def shard(t, r):  # rank r's rows, padded at its own end to L
        mine = t[:, starts[r]:starts[r] + lens[r]]
        return torch.cat([mine, mine.new_zeros(B, L - lens[r], H, D)], 1)

    bufs: dict = {}
    lock = threading.Lock()
    barrier = threading.Barrier(U)

    def symm_buffer(group, tag, shape, dtype, device):
        with lock:
            if (tag, shape) not in bufs:  # NaN: an unwritten element would show
                bufs[(tag, shape)] = [torch.full(shape, float("nan"), dtype=dtype)
                                      for _ in range(U)]
        ranks = bufs[(tag, shape)]
        return ranks[group.rank], _StubHandle(ranks, barrier)

    usp = importlib.import_module("xdit_ops.ops.usp_attention")
    monkeypatch.setattr(usp, "_group_size", lambda g: 1 if g is None else g.size)
    monkeypatch.setattr(usp, "_group_rank", lambda g: 0 if g is None else g.rank)
    monkeypatch.setattr(usp, "ulysses_transport", lambda device, switch: "push")
    monkeypatch.setattr(usp, "_symm_buffer", symm_buffer)
    for cache in ("_PLANS", "_PUSH"):  # this test's plans and views stay out of the others'
        monkeypatch.setattr(usp, cache, {})
    # _switches()' eight values; no cross-rank check: no process group here
    switches = ("0", None, None, "push", None, None, push_kernel, None)
    results, errors = {}, []

    def rank_main(r):
        try:
            g = _StubGroup(r, U)
            inputs = []
            for t, tj in zip(seq, joint, strict=True):
                parts = [tj, shard(t, r)] if front else [shard(t, r), tj]
                inputs.append(torch.cat(parts, 1))
            q, k, v = inputs
            seq_len = -1 if shard_lengths else U * L
            outs = []
            for f in (1.0, 0.5):
                plan = usp._build_plan(q * f, k, v, lengths, J, front, seq_len, "auto", g,
                                       None, shard_lengths, switches)
                assert plan.path == "push", plan.path
                assert plan.push_blocks == (push_kernel == "v3")
                outs.append(usp._run(plan, q * f, k, v, lengths, None, "auto", False)[0])
            results[r] = outs
        except BaseException as exc:  # reported below with the rank
            barrier.abort()
            errors.append((r, exc))

    run_threads(rank_main, U)
    assert not errors, errors
    for r in range(U):
        rows_s = slice(J, J + lens[r]) if front else slice(0, lens[r])
        rows_j = slice(0, J) if front else slice(L, L + J)
        for out, (out_s, out_j) in zip(results[r], refs, strict=True):
            want = out_s[:, starts[r]:starts[r] + lens[r]]
            assert max_abs_err(out[:, rows_s], want) < 2e-5, r
            if J:
                assert max_abs_err(out[:, rows_j], out_j) < 2e-5, r
