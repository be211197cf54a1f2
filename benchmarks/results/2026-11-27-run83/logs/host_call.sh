#!/usr/bin/env bash
# Branch fp8-epi-next, one GPU: where the FP8 op's host time goes (quant_host.py at 4608 and
# 16896), after the build.
set -u
export PYTHONUNBUFFERED=1
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
X=python/tools/experiments
timeout 240 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=${CMT:-unknown}
timeout 150 python3 $X/quant_host.py 1,4608,24,128 > $L/quant_host_4608.log 2>&1; echo "rc=$?"; grep " us$" $L/quant_host_4608.log; save
timeout 60 python3 $X/quant_host.py 1,16896,24,128 > $L/quant_host_16896.log 2>&1; grep " us$" $L/quant_host_16896.log; save
