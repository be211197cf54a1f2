#!/usr/bin/env bash
# Session 20, one GPU (issue 4), run 108: rebuild (v_repair_kernel on one program per head);
# kv_sweep3.py: the K/V work as two launches, V's and K's launch configurations.
set -u
export PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
R=benchmarks/results/2026-11-27-run108/logs
rm -rf /tmp/site /tmp/gc
timeout 300 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; tail -1 $L/build.log; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
timeout 400 python3 $R/kv_sweep3.py $OUT 1,16896,24,128 1,32760,40,128 1,4608,24,128 > $L/kv_sweep3.log 2>&1; echo "sweep rc=$? at $SECONDS s"; grep "^(" $L/kv_sweep3.log | sed -e "s/'quantize_kv_kernel'/kv/g; s/'quantize_q_kernel'/q/; s/'kv_stats_kernel'/st/; s/'v_repair_kernel'/rep/" | cut -c1-200; save
