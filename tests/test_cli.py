"""``xdit-ops doctor`` and ``xdit-ops run`` as a user runs them (subprocesses, CPU only)."""

from __future__ import annotations

import os
import subprocess
import sys


def _cli(*argv: str) -> subprocess.CompletedProcess:
    # CPU only: the GPU machine runs the same commands from gpu_check.sh with its GPUs.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "xdit_ops.cli", *argv], env=env,
                          capture_output=True, text=True, timeout=240)


def test_doctor():
    res = _cli("doctor")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for needle in ("torch ", "cuDNN", "NCCL", "native modules:", "xdit_ops._C ",
                   "xdit_ops._C_sm90", "GPUs: 0", "attention backends on cpu", "auto ->"):
        assert needle in out, f"{needle!r} missing from doctor output:\n{out}"
    # Every refused backend comes with its reason.
    assert "cudnn needs a CUDA tensor, got device cpu" in out


def test_run_attention_cpu_and_exit_codes():
    res = _cli("run", "--device", "cpu", "--shape", "1,77,3,72", "--iters", "2", "--warmup", "1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "math      bf16 1x77x3x72" in res.stdout and "checks passed" in res.stdout
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("attention  cpu")]
    # The math backend in each dtype at least (other CPU backends may join it).
    assert sum(" math " in ln for ln in lines) == 3, res.stdout
    assert all(ln.rstrip().endswith("ok") for ln in lines), res.stdout
    # A tolerance no rounded result can meet must fail the command (bf16/fp16 outputs carry
    # rounding error against the fp32 reference), and the failure must be named.
    res = _cli("run", "--device", "cpu", "--shape", "1,77,3,72", "--iters", "1",
               "--max-rel-err", "1e-9")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAIL" in res.stdout and "FAILED: cpu math" in res.stdout
    res = _cli("run", "--job", "nope")
    assert res.returncode == 2 and "unknown job" in res.stderr


def test_run_usp_job_cpu():
    """The usp job spawns 2 gloo ranks and checks Ulysses and ring against one device."""
    res = _cli("run", "--job", "usp", "--device", "cpu", "--iters", "1")
    assert res.returncode == 0, res.stdout + res.stderr
    for cfg in ("U2xR1", "U1xR2"):
        line = [ln for ln in res.stdout.splitlines() if cfg in ln]
        assert line and line[0].rstrip().endswith("ok"), res.stdout
