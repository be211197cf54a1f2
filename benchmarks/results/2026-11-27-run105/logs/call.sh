#!/usr/bin/env bash
# Session 19, two GPUs (issue 3), run 105 (the same warm machine as run 104): cProfile of the
# FP8 wire's eager calls (wire_prof.py).
set -u
export PYTHONUNBUFFERED=1
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
[ -d /tmp/site ] || { timeout 200 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$?"; }
export PYTHONPATH=/tmp/site:.
timeout 120 torchrun --standalone --nproc-per-node=2 benchmarks/results/2026-11-27-run105/logs/wire_prof.py $OUT > $L/wire_prof.log 2>&1; echo "prof rc=$? at $SECONDS s"; head -c 7000 $L/wire_prof.log
tar czf $OUT/logs.tgz -C /tmp logs
