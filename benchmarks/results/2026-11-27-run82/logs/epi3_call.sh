#!/usr/bin/env bash
# Branch fp8-epi-next (not run yet), one H100: why the fast epilogue loses at (1,32760,40,128).
# Build; the three epilogues A/B (logs: epi3_*.log); ncu source counters of the old and the fast
# kernel at 32760 (the loop's stall locations side by side). Copy OUT into a run folder after.
set -u
export PYTHONUNBUFFERED=1
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
X=python/tools/experiments
timeout 240 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=${CMT:-unknown}
if [ "${PHASE:-ab}" = ncu ]; then
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
for E in old fast; do
  XDIT_OPS_FP8_EPI=$E timeout 120 $NCU --clock-control none --section SourceCounters --section WarpStateStats --section SpeedOfLight -k regex:fp8_attention_ws_kernel --launch-skip 2 --launch-count 1 -o $L/ws_$E python3 benchmarks/results/2026-11-27-run47/logs/prof_fp8.py 1,32760,40,128 > $L/ncu_$E.log 2>&1; echo "ncu $E rc=$?"
  $NCU -i $L/ws_$E.ncu-rep --page source --csv --print-source sass > $L/ncu_${E}_sass.csv 2>/dev/null; gzip -f $L/ncu_${E}_sass.csv
  $NCU -i $L/ws_$E.ncu-rep --page details > $L/ncu_${E}_details.txt 2>&1; rm -f $L/ws_$E.ncu-rep
  grep -E "Duration|Warp Cycles Per Issued|Compute \(SM\) Throughput" $L/ncu_${E}_details.txt
done; save
exit 0
fi
for i in 1 2; do timeout 90 python3 $X/epi3_ab.py $OUT/a$i 1,32760,40,128 > $L/epi3_32k_$i.log 2>&1; grep -v Warn $L/epi3_32k_$i.log; done; save
timeout 60 python3 $X/epi3_ab.py $OUT/b 1,16896,24,128 1,4608,24,128 > $L/epi3_small.log 2>&1; grep -v Warn $L/epi3_small.log; save
timeout 90 python3 $X/quant_prof.py $OUT/q 1,4608,24,128 1,16896,24,128 1,32760,40,128 2,4250,24,64 > $L/quant_prof.log 2>&1; tail -5 $L/quant_prof.log | cut -c1-400; save
