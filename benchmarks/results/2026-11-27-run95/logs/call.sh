#!/usr/bin/env bash
# Session 18, one GPU (issue 4), run 95: fp8-host with the plain launch outside triton_op not
# through wrap_triton (run 94: ~250 us a launch more there). Build; the launch tests; probe.py
# (the op's host time piece by piece); bench_fp8_host on this commit.
set -u
export PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
R=benchmarks/results/2026-11-27-run95/logs
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
timeout 240 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
timeout 100 python3 -m pytest -q -rfEs -p no:cacheprovider -m "gpu or sm90" tests/ops/test_triton_launch.py > $L/tests_launch.log 2>&1; echo "launch tests rc=$? at $SECONDS s"; grep -E "passed|failed|^FAILED|Error" $L/tests_launch.log | cut -c1-300 | tail -5; save
for s in 1,4608,24,128 1,16896,24,128; do
  timeout 100 python3 $R/probe.py $s > $L/probe_$s.log 2>&1; echo "probe $s rc=$? at $SECONDS s"; grep -v "^ \|^$\|====\|Ordered\|List reduced\|ncalls\|function calls" $L/probe_$s.log | head -40; save
done
grep -A22 "ncalls" $L/probe_1,4608,24,128.log | cut -c1-160
timeout 150 python3 benchmarks/bench_fp8_host.py --out $OUT --shape 1,4608,24,128 --shape 2,4250,24,64 --shape 1,16896,24,128 > $L/host_new.log 2>&1; echo "bench rc=$? at $SECONDS s"; grep "^{" $L/host_new.log | cut -c1-500; save
