#!/usr/bin/env bash
# Run 106, second call (the same warm machine): stats_ab.py (fixed: the sample's amax is
# [B, H, D] already), sample / exact / sample / exact; then bench_fp8_attention (sm90ws).
set -u
export PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
R=benchmarks/results/2026-11-27-run106/logs
SH="1,16896,24,128 1,32760,40,128 1,4608,24,128 2,4250,24,64"
[ -d /tmp/site ] || { timeout 300 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build2.log 2>&1; echo "build rc=$? at $SECONDS s"; }
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
for arm in sample exact sample exact; do
  ARM=$arm timeout 100 python3 $R/stats_ab.py $OUT $SH > $L/ab_$arm.log 2>&1; echo "ab $arm rc=$? at $SECONDS s"; grep "^$arm" $L/ab_$arm.log | python3 -c "
import sys, json
for line in sys.stdin:
    arm, rest = line.split(' ', 1); shape, js = rest.split(') ', 1); d = json.loads(js)
    print(arm, shape + ')', 'span %.1f us %.1f TFLOPS' % (d['span_us'], d['tflops_with_pass']), 'pass', [round(x[1], 1) for x in d['kernel_us'][:-1]], 'kernel %.1f' % d['kernel_us'][-1][1], 'cos %.6f l1 %.5f' % (d['accuracy_512_rows']['cos_mean'], d['accuracy_512_rows']['rel_l1']), 'repaired', d['heads_repaired'])
"; cp $L/ab_$arm.log $L/ab_${arm}_$SECONDS.log; save
done
timeout 200 python3 benchmarks/bench_fp8_attention.py --impls sm90ws --no-naive --out $OUT > $L/bench_fp8.log 2>&1; echo "bench rc=$? at $SECONDS s"; grep -E "cudnn|ktile|c3|total|quant" $L/bench_fp8.log | cut -c1-170 | head -30; save
