#!/usr/bin/env bash
# Session 18, one GPU (issue 4), run 100: xdit_ops.fp8_attention replays a key's call itself
# when the dispatcher would send it straight to the CUDA kernel (usp_attention's plain-call
# test, now in ops/_lib.py); the key with the three devices. Build; the launch GPU tests.
set -u
export PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
timeout 170 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
timeout 60 python3 -m pytest -q -rfEs -p no:cacheprovider -m "gpu or sm90" tests/ops/test_triton_launch.py > $L/tests_launch.log 2>&1; echo "launch tests rc=$? at $SECONDS s"; grep -E "passed|failed|^FAILED|Error" $L/tests_launch.log | cut -c1-300 | tail -6; save
