#!/usr/bin/env bash
# Session 20, one GPU (issue 4), run 110: main with the sampled statistics, the split K/V
# launches, the repair in the K launch and 4-tile statistics programs. Build; the FP8, launch, impl-select and 1-GPU FP8-wire GPU tests; run 106's
# stats_ab.py (exact arm fixed), sample / exact x2 (the exact arm: XDIT_OPS_FP8_STATS=exact,
# the same split launches); bench_fp8_attention (sm90ws).
set -u
export PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
A=benchmarks/results/2026-11-27-run106/logs
SH="1,16896,24,128 1,32760,40,128 1,4608,24,128 2,4250,24,64"
rm -rf /tmp/site /tmp/gc
timeout 300 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; tail -1 $L/build.log; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
timeout 200 python3 -m pytest -q -rfEs -p no:cacheprovider -m "gpu or sm90" tests/ops/test_fp8_attention.py tests/ops/test_triton_launch.py tests/ops/test_fp8_impl_select.py tests/ops/test_usp_fp8_wire.py > $L/tests_fp8.log 2>&1; echo "fp8 tests rc=$? at $SECONDS s"; grep -E "passed|failed|^FAILED|Error" $L/tests_fp8.log | cut -c1-300 | tail -8; save
for arm in sample exact sample exact; do
  ARM=$arm timeout 100 python3 $A/stats_ab.py $OUT $SH > $L/ab_$arm.log 2>&1; echo "ab $arm rc=$? at $SECONDS s"; grep "^$arm" $L/ab_$arm.log | python3 -c "
import sys, json
for line in sys.stdin:
    arm, rest = line.split(' ', 1); shape, js = rest.split(') ', 1); d = json.loads(js)
    print(arm, shape + ')', 'span %.1f us %.1f TFLOPS' % (d['span_us'], d['tflops_with_pass']), 'pass', [round(x[1], 1) for x in d['kernel_us'][:-1]], 'kernel %.1f' % d['kernel_us'][-1][1], 'cos %.6f l1 %.5f' % (d['accuracy_512_rows']['cos_mean'], d['accuracy_512_rows']['rel_l1']), 'repaired', d['heads_repaired'])
"; cp $L/ab_$arm.log $L/ab_${arm}_$SECONDS.log; save
done
timeout 200 python3 benchmarks/bench_fp8_attention.py --impls sm90ws --no-naive --out $OUT > $L/bench_fp8.log 2>&1; echo "bench rc=$? at $SECONDS s"; grep -E "cudnn|ktile_total|c3_total|target" $L/bench_fp8.log | cut -c1-170 | head -30; save
