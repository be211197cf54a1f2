"""benchmarks/common.py on the CPU: call accounting, input rotation, rooflines, the JSON file.

(The GPU paths, CUDA events, L2 flush and graphs, run in the benchmarks on the GPU machine.)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import common  # noqa: E402


def test_bench_interleaved_calls_and_rotation():
    calls: dict[str, list] = {"a": [], "b": []}
    fns = {
        "a": lambda x: (calls["a"].append(x), time.sleep(0.002)),
        "b": lambda x: calls["b"].append(x),
    }
    t = common.bench_interleaved(fns, inputs=[(0,), (1,), (2,)], warmup=2, iters=9, rounds=3,
                                 device="cpu")
    # 2 warm-up + 3 rounds x 3 timed calls each, cycling through the three input sets.
    assert [len(c) for c in calls.values()] == [11, 11]
    assert set(calls["a"]) == {0, 1, 2} and calls["b"][2:5] == [0, 1, 2]
    assert t["a"].n == 9 and t["a"].median_ms >= 2.0 > t["b"].median_ms
    assert t["a"].min_ms <= t["a"].p20_ms <= t["a"].median_ms <= t["a"].p80_ms
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device"):
        common.bench(lambda: None, warmup=0, iters=1, cuda_graph=True, device="cpu")


def test_rooflines():
    assert common.attention_flops(1, 24, 4608, 4608, 128) == 4 * 24 * 4608 * 4608 * 128
    assert common.attention_tflops(2, 3, 5, 7, 11, 1.0) == pytest.approx(4 * 2 * 3 * 5 * 7 * 11
                                                                         / 1e-3 / 1e12)
    assert common.gbps(3e9, 1000.0) == pytest.approx(3.0)
    assert common.parallel_efficiency(8.0, 4, 2.5) == pytest.approx(0.8)


def test_write_json(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    t = common.Timing.of([1.0, 2.0, 3.0])
    path = common.write_json("bench_x", [{"ms": 1.5, "timing": t}], tmp_path, extra={"k": 1})
    data = json.loads(path.read_text())
    meta = data["meta"]
    for key in ("gpu", "torch", "cuda", "cudnn", "nccl", "git_commit", "command", "timestamp"):
        assert key in meta, key
    assert meta["benchmark"] == "bench_x" and meta["k"] == 1
    assert "pytest" in meta["command"] or "py" in meta["command"]
    assert data["rows"] == [{"ms": 1.5, "timing": {"median_ms": 2.0, "min_ms": 1.0,
                                                   "p20_ms": t.p20_ms, "p80_ms": t.p80_ms,
                                                   "mean_ms": 2.0, "n": 3}}]
    # Under torchrun, only rank 0 writes.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    other = common.write_json("bench_y", [], tmp_path)
    assert not other.exists() and "-x2-" in other.name
