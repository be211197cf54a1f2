#!/usr/bin/env bash
# Session 17, one GPU (issue 4), run 91: main; where the FP8 op's time with quantization goes
# beyond its kernels (gaps.py: kernel durations and idle gaps of back-to-back op calls).
set -u
export PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
timeout 240 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
timeout 150 python3 benchmarks/results/2026-11-27-run91/logs/gaps.py $OUT 1,16896,24,128 1,4608,24,128 1,32760,40,128 > $L/gaps.log 2>&1; echo "rc=$?"; grep -v Warn $L/gaps.log | head -90; save
