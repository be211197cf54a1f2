#!/usr/bin/env bash
# Branch fp8-unroll, one GPU (warm): the A/B with the fast epilogue forced at every length too
# (XDIT_OPS_FP8_UNROLL=2 unrolled, 3 not), at (1,32760,40,128) twice and (1,16896,24,128).
set -u
export PYTHONUNBUFFERED=1
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
X=python/tools/experiments
timeout 200 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=${CMT:-unknown}
timeout 150 python3 $X/unroll_ab.py $OUT/c 1,32760,40,128 1,16896,24,128 1,32760,40,128 > $L/unroll_3.log 2>&1; grep -v Warn $L/unroll_3.log | grep TFLOPS; save
