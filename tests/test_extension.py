"""The package without its native modules, and ``import xdit_ops`` without a GPU.

Both run in fresh interpreters (subprocesses): the extension is loaded once per process, and
CUDA initialisation cannot be undone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

NO_EXTENSION = textwrap.dedent(
    """
    import torch
    import xdit_ops
    from xdit_ops import _extension
    from xdit_ops.reference import attention_ref, merge_attention_states_ref

    assert not _extension.has("_C") and not _extension.has("_C_sm90")
    assert "XDIT_OPS_DISABLE_EXTENSION=1" in _extension.reason("_C"), _extension.reason("_C")

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 77, 3, 72) for _ in range(3))
    out, lse = xdit_ops.attention(q, k, v, return_lse=True)
    ref, ref_lse = attention_ref(q, k, v)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)

    acc = torch.zeros(2, 77, 3, 72)
    acc_lse = torch.full((2, 3, 77), float("-inf"))
    for lo, hi in ((0, 30), (30, 77)):
        blk, blk_lse = xdit_ops.attention(q, k[:, lo:hi], v[:, lo:hi], return_lse=True)
        xdit_ops.merge_attention_states_(acc, acc_lse, blk, blk_lse)
    torch.testing.assert_close(acc, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acc_lse, ref_lse, rtol=1e-5, atol=1e-5)
    print("cpu-path-ok")
    """
)

NO_GPU = textwrap.dedent(
    """
    import glob, os
    import xdit_ops  # first, before torch: the package must load its own dependencies
    import torch
    from xdit_ops import _extension
    built = glob.glob(os.path.join(os.path.dirname(xdit_ops.__file__), "_C.*.so"))
    assert bool(built) == _extension.has("_C"), (built, _extension.reason("_C"))
    assert not torch.cuda.is_initialized(), "import xdit_ops initialised CUDA"
    out = xdit_ops.attention(*(torch.randn(1, 5, 2, 8) for _ in range(3)))
    assert out.shape == (1, 5, 2, 8)
    assert not torch.cuda.is_initialized(), "CPU attention initialised CUDA"
    print("no-gpu-ok", torch.cuda.is_available())
    """
)


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                          text=True, timeout=120)


def test_cpu_path_without_extension():
    res = _run(NO_EXTENSION, XDIT_OPS_DISABLE_EXTENSION="1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "cpu-path-ok" in res.stdout


@pytest.mark.parametrize("hide_gpus", [True, False], ids=["no_gpu_visible", "as_is"])
def test_import_never_needs_a_gpu(hide_gpus):
    env = {"CUDA_VISIBLE_DEVICES": ""} if hide_gpus else {}
    res = _run(NO_GPU, **env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no-gpu-ok" in res.stdout
    if hide_gpus:
        assert "no-gpu-ok False" in res.stdout
