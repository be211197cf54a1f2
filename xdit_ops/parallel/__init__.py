"""Meshes and process groups (torch DeviceMesh underneath)."""

from xdit_ops.parallel.state import (
    DIMS,
    ParallelState,
    destroy_parallel,
    get_parallel_state,
    init_parallel,
)

__all__ = ["DIMS", "ParallelState", "destroy_parallel", "get_parallel_state", "init_parallel"]
