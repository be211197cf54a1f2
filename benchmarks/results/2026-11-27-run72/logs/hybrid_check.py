"""Session 15, run 72: the 2 x 2 hybrid with the push as its Ulysses exchange (branch
hybrid-push) against the single-device result: test_usp_attention's GPU cases and the padded
shard case, with the copy-engine ring (default) and the flag-synchronised one; the plans'
paths. Run from the repository root: python3 .../hybrid_check.py"""
import os

import torch

import xdit_ops
from tests.ops.test_usp_attention import GPU_CASES, _run_case, _run_shard_lengths
from tests.utils import run_distributed
from xdit_ops.ops import usp_attention as _usp


def _worker(rank, world):
    xdit_ops.init_parallel(ulysses_degree=2, ring_degree=2)
    for ring in (None, "ceflags"):
        if ring:
            os.environ["XDIT_OPS_USP_RING"] = ring
        for i, case in enumerate(GPU_CASES):
            _run_case(case, 2, 2, seed=31 * i + 9, device="cuda")
        _run_shard_lengths(2, 2, seed=11, device="cuda", dtype=torch.bfloat16, L=300, J=77,
                           D=128)
    plans = [p for p in _usp._PLANS.values() if p.U == 2 and p.R == 2]
    assert {p.path for p in plans} == {"push"}, {p.path for p in plans}
    assert {p.ring for p in plans} == {"ce", "ceflags"}, {p.ring for p in plans}
    if rank == 0:
        print(f"hybrid 2x2: {len(plans)} plans, paths {sorted({p.path for p in plans})}, "
              f"rings {sorted({p.ring for p in plans})}: every case matched", flush=True)
    xdit_ops.destroy_parallel()


if __name__ == "__main__":
    run_distributed(_worker, 4, timeout=200, backend="nccl")
