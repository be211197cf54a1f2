#!/usr/bin/env bash
# Session 17, one GPU (issue 4), run 92: main; the quantization pass's K/V kernel under other
# launch parameters (kv_sweep.py) at (1,16896,24,128) and (1,32760,40,128).
set -u
export PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
timeout 240 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
timeout 200 python3 benchmarks/results/2026-11-27-run92/logs/kv_sweep.py $OUT 1,16896,24,128 1,32760,40,128 > $L/kv_sweep.log 2>&1; echo "rc=$?"; grep -v Warn $L/kv_sweep.log | sort -t'(' -k3 | head -80; save
