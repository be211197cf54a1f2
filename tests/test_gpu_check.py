"""python/tools/gpu_check.sh's mechanics on a machine without a GPU: the output folder, the
summary table, the exit code of a failed step, options."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "python" / "tools" / "gpu_check.sh"


def _gpu_check(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_gpu_check_doctor_bench_and_failed_step(tmp_path):
    res = _gpu_check(tmp_path / "a", "--only", "doctor,bench", "--bench", "attention,no_such")
    # A failed step (an unknown benchmark) makes the exit code non-zero, after the others ran.
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1] == "RESULT: FAILED", res.stdout
    summary = res.stdout[res.stdout.index("gpu_check summary"):]
    assert "FAIL(no such)" in summary and "bench_no_such" in summary
    assert any(ln.startswith("doctor") and " ok " in ln for ln in summary.splitlines()), summary
    # GPU benchmarks skip without a GPU, with the reason.
    assert any(ln.startswith("bench_attention") and "skip" in ln and "no GPU" in ln
               for ln in summary.splitlines()), summary
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["artifacts.tar.gz", "gpu_check.log"], files
    log = (tmp_path / "a" / "gpu_check.log").read_text()
    assert "native modules:" in log and "attention backends on cpu" in log
    with tarfile.open(tmp_path / "a" / "artifacts.tar.gz") as tar:
        assert "logs/doctor.log" in tar.getnames()


def test_gpu_check_rejects_bad_options(tmp_path):
    res = _gpu_check(tmp_path / "c", "--only", "nonsense")
    assert res.returncode == 2 and "unknown step nonsense" in res.stderr
    res = _gpu_check(tmp_path / "c", "--frobnicate")
    assert res.returncode == 2 and "unknown option --frobnicate" in res.stderr
