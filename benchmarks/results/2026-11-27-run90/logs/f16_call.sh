#!/usr/bin/env bash
# Branch fp8-unroll-f16, one GPU: build; the unrolled / not unrolled A/B of the fast-epilogue
# kernel for float16 and bfloat16 outputs at (1,16896,24,128) and (1,4608,24,128), twice.
set -u
export PYTHONUNBUFFERED=1
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
X=python/tools/experiments
timeout 240 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=${CMT:-unknown}
timeout 200 python3 $X/f16_ab.py $OUT/a 1,16896,24,128 1,4608,24,128 1,16896,24,128 > $L/f16.log 2>&1; echo "ab rc=$?"; grep -v Warn $L/f16.log | grep TFLOPS; save
