#!/usr/bin/env bash
# Branch fp8-unroll, one GPU: build; the FP8 GPU tests with XDIT_OPS_FP8_UNROLL=1 (the kUnroll2
# kernels in place of the base ones at padded head dim 128, bf16); the A/B (unroll_ab.py).
set -u
export PYTHONUNBUFFERED=1
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
X=python/tools/experiments
timeout 240 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=${CMT:-unknown}
timeout 120 python3 $X/unroll_ab.py $OUT/a 1,32760,40,128 1,16896,24,128 > $L/unroll_1.log 2>&1; grep -v Warn $L/unroll_1.log | grep TFLOPS; save
XDIT_OPS_FP8_UNROLL=1 timeout 150 python3 -m pytest -q -rfEs -p no:cacheprovider -m "gpu or sm90" tests/ops/test_fp8_attention.py > $L/tests_unroll.log 2>&1; echo "tests rc=$? at $SECONDS s"; grep -E "passed|failed|^FAILED" $L/tests_unroll.log | cut -c1-200 | tail -4; save
timeout 150 python3 $X/unroll_ab.py $OUT/b 1,4608,24,128 1,16896,24,128 1,32760,40,128 > $L/unroll_2.log 2>&1; grep -v Warn $L/unroll_2.log | grep TFLOPS; save
