"""Hardware markers: ``gpu``, ``sm90``, ``multigpu(n)`` skip cleanly where hardware is missing.

* ``@pytest.mark.gpu``: needs one CUDA GPU.
* ``@pytest.mark.sm90``: needs a Hopper (compute capability 9.0) GPU. Hardware only: a test of
  the native Hopper module asserts ``xdit_ops._extension.has("_C_sm90")`` itself, so a broken
  build fails instead of skipping (``python/tools/gpu_check.sh`` also fails its build step when
  ``csrc/cuda/sm90`` has sources and the module does not load on a Hopper machine).
* ``@pytest.mark.multigpu(n)``: needs ``torch.cuda.device_count() >= n`` (``n`` defaults to 2).

The markers are declared in ``pyproject.toml``; this file only decides when to skip.
"""

from __future__ import annotations

import functools
import os
import sys

import pytest
import torch

# Test modules import the shared helpers as ``utils`` or as ``tests.utils``, from any cwd.
_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
# Appended, not prepended: an installed xdit_ops must win over the source tree.
if os.path.dirname(_TESTS) not in sys.path:
    sys.path.append(os.path.dirname(_TESTS))

# NVLink multicast must stay off on the shared GPU machines (GPU.md); the NCCL workers the tests
# spawn inherit these.
for _var, _val in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ.setdefault(_var, _val)


@functools.cache
def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@functools.cache
def _has_hopper() -> bool:
    return any(torch.cuda.get_device_capability(i) == (9, 0) for i in range(_gpu_count()))


def _multigpu_need(marker: pytest.Mark) -> int:
    n = marker.args[0] if marker.args else marker.kwargs.get("n", 2)
    if not isinstance(n, int) or n < 1:
        raise pytest.UsageError(f"multigpu(n): n must be a positive int, got {n!r}")
    return n


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("gpu") is not None and _gpu_count() == 0:
            item.add_marker(pytest.mark.skip(reason="gpu: no CUDA GPU visible"))
        if item.get_closest_marker("sm90") is not None and not _has_hopper():
            item.add_marker(pytest.mark.skip(reason="sm90: no Hopper (sm_90) GPU visible"))
        marker = item.get_closest_marker("multigpu")
        if marker is not None:
            need = _multigpu_need(marker)
            if _gpu_count() < need:
                item.add_marker(pytest.mark.skip(
                    reason=f"multigpu({need}): {_gpu_count()} CUDA GPU(s) visible"
                ))
