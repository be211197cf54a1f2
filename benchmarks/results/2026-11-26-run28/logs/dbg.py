# ruff: noqa: F401  (kept as run: the script of calls 7-8)
import sys
import time

from tests.ops import test_usp_attention as t
from tests.utils import run_distributed

if __name__ == "__main__":
    t0 = time.time()
    try:
        run_distributed(t._worker_gpu, 2, timeout=90, backend="nccl")
        print("cases PASSED in", time.time() - t0, flush=True)
    except BaseException as e:
        print("cases FAILED:", str(e)[-6000:], flush=True)
