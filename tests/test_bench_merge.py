"""benchmarks/bench_merge.py on the CPU: its byte accounting and its input rotation.

(The timing itself runs on the GPU machine.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_merge  # noqa: E402


def test_merge_bytes_counts_every_read_and_write():
    B, S, H, D = 1, 8190, 40, 128
    rows = B * S * H
    part = rows * D * 2  # one bf16 [B, S, H, D] tensor, ~84 MB
    lse = rows * 4
    # Ring of 4: four partials and their LSEs read, the bf16 result and its LSE written.
    assert bench_merge.merge_bytes("partials", (B, S, H, D), 4) == 4 * (part + lse) + part + lse
    # In place: fp32 accumulator and LSE read and written, bf16 block and its LSE read.
    assert bench_merge.merge_bytes("states", (B, S, H, D), 1) == 2 * (2 * part + lse) + part + lse
    with pytest.raises(ValueError, match="unknown op 'x'"):
        bench_merge.merge_bytes("x", (B, S, H, D), 1)


def test_input_sets_exceed_twice_the_l2():
    l2 = 50 << 20
    assert bench_merge.input_sets(420 << 20, l2) == 1
    assert bench_merge.input_sets(36 << 20, l2) == 3  # 3 x 36 MiB >= 100 MiB
    assert bench_merge.input_sets(1 << 10, l2) == 8  # capped


def test_both_kernels_are_timed_and_the_setting_is_per_call(monkeypatch):
    """Each timed call sets XDIT_OPS_MERGE_IMPL itself (the launcher reads it per call), so
    interleaved candidates do not inherit each other's choice. On the CPU the op runs its
    reference; only the variable and the result's shape are checked here."""
    # setenv records the variable's state, so the test's end restores it (calls set it below).
    monkeypatch.setenv("XDIT_OPS_MERGE_IMPL", "unset-by-test")
    outs, lses = bench_merge.make_inputs("partials", (2, 5, 3, 8), 3, torch.device("cpu"), 0)
    for impl in bench_merge.IMPLS:
        out, lse = bench_merge.call_of("partials", impl)(outs, lses)
        assert bench_merge.os.environ["XDIT_OPS_MERGE_IMPL"] == impl
        assert out.shape == (2, 5, 3, 8) and out.dtype == torch.bfloat16
        assert lse.shape == (2, 3, 5)
