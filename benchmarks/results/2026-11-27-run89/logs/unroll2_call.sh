#!/usr/bin/env bash
# Branch fp8-unroll2, one GPU: build; the A/B of unroll2_ab.py at the four shapes (32760 twice).
set -u
export PYTHONUNBUFFERED=1
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
X=python/tools/experiments
timeout 240 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=${CMT:-unknown}
timeout 200 python3 $X/unroll2_ab.py $OUT/a 1,32760,40,128 2,4250,24,64 1,16896,24,128 1,32760,40,128 1,4608,24,128 > $L/unroll2.log 2>&1; echo "ab rc=$?"; grep -v Warn $L/unroll2.log | grep TFLOPS; save
