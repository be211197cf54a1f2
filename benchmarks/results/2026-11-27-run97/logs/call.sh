#!/usr/bin/env bash
# Session 18, one GPU (issue 4), run 97: fp8-host's launch tests with run 96's two test fixes
# (the public op returns the output alone without return_lse); the quantization pass's Q and
# statistics kernels under other launch parameters (qs_sweep.py, as run 92 did for K/V).
set -u
export PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
R=benchmarks/results/2026-11-27-run97/logs
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
timeout 240 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
timeout 100 python3 -m pytest -q -rfEs -p no:cacheprovider -m "gpu or sm90" tests/ops/test_triton_launch.py > $L/tests_launch.log 2>&1; echo "launch tests rc=$? at $SECONDS s"; grep -E "passed|failed|^FAILED|Error" $L/tests_launch.log | cut -c1-300 | tail -6; save
timeout 330 python3 $R/qs_sweep.py $OUT 1,16896,24,128 1,32760,40,128 > $L/qs_sweep.log 2>&1; echo "sweep rc=$? at $SECONDS s"; grep -v Warn $L/qs_sweep.log | grep -E "default|same bits True" | awk '{print}' | head -80; save
