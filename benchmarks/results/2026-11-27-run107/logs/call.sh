#!/usr/bin/env bash
# Session 20, one GPU (issue 4), run 107: rebuild with the K/V kernel's PART / V_TRACK
# constexprs (main's launches unchanged); kv_sweep2.py (the K/V work fused or as two launches);
# run 106's stats_ab.py with the exact arm fixed (XDIT_OPS_FP8_STATS=exact), sample / exact x2.
set -u
export PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
R=benchmarks/results/2026-11-27-run107/logs
A=benchmarks/results/2026-11-27-run106/logs
SH="1,16896,24,128 1,32760,40,128 1,4608,24,128 2,4250,24,64"
rm -rf /tmp/site /tmp/gc
timeout 300 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; tail -1 $L/build.log; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
timeout 200 python3 $R/kv_sweep2.py $OUT 1,16896,24,128 1,32760,40,128 2,4250,24,64 > $L/kv_sweep2.log 2>&1; echo "sweep rc=$? at $SECONDS s"; grep "^(" $L/kv_sweep2.log | cut -c1-260; save
for arm in sample exact sample exact; do
  ARM=$arm timeout 100 python3 $A/stats_ab.py $OUT $SH > $L/ab_$arm.log 2>&1; echo "ab $arm rc=$? at $SECONDS s"; grep "^$arm" $L/ab_$arm.log | python3 -c "
import sys, json
for line in sys.stdin:
    arm, rest = line.split(' ', 1); shape, js = rest.split(') ', 1); d = json.loads(js)
    print(arm, shape + ')', 'span %.1f us %.1f TFLOPS' % (d['span_us'], d['tflops_with_pass']), 'pass', [round(x[1], 1) for x in d['kernel_us'][:-1]], 'kernel %.1f' % d['kernel_us'][-1][1], 'cos %.6f l1 %.5f' % (d['accuracy_512_rows']['cos_mean'], d['accuracy_512_rows']['rel_l1']), 'repaired', d['heads_repaired'])
"; cp $L/ab_$arm.log $L/ab_${arm}_$SECONDS.log; save
done
