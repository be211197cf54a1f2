#!/usr/bin/env bash
# Session 14, one GPU, branch fp8-exp (experiments, not landed): build, the variants' bit check,
# bench_fp8_attention at head dims 64 and 128 with the 2-consumer free-issue kernel (c2free) and
# the 3-consumer kernel with P.V beside the softmax (c3ov), beside the landed kernels.
set -u
export PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
timeout 200 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
timeout 100 python3 benchmarks/results/2026-11-27-run63/logs/check_variants.py > $L/check.log 2>&1; rc=$?; echo "check rc=$rc at $SECONDS s"; tail -12 $L/check.log | cut -c1-200; save
if [ $rc -eq 0 ]; then
  timeout 300 python3 benchmarks/bench_fp8_attention.py --impls sm90ws --no-naive --shapes 2,4250,24,64 1,16896,24,128 1,32760,40,128 --consumers 2 3 2free 3ov --out $OUT > $L/bench_fp8.log 2>&1; echo "bench rc=$? at $SECONDS s"; grep -E "ktile|cudnn" $L/bench_fp8.log | cut -c1-110 | head -30; save
fi
