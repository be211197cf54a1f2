#!/usr/bin/env bash
# Session 18, one GPU (issue 4), run 96: fp8-host with the op's fast path (a call of a key seen
# before replays the first call's recorded launches: XDIT_OPS_FP8_FAST_PATH). Build; the launch
# and FP8 GPU tests; bench_fp8_host on this commit, then on main's Python over the same build
# (run 94's base/ copies), then this commit again.
set -u
export PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
B94=benchmarks/results/2026-11-27-run94/logs/base
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
timeout 240 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
timeout 200 python3 -m pytest -q -rfEs -p no:cacheprovider -m "gpu or sm90" tests/ops/test_triton_launch.py tests/ops/test_fp8_attention.py tests/ops/test_fp8_impl_select.py > $L/tests_fp8.log 2>&1; echo "fp8 tests rc=$? at $SECONDS s"; grep -E "passed|failed|^FAILED|Error" $L/tests_fp8.log | cut -c1-300 | tail -8; save
SH="--shape 1,4608,24,128 --shape 2,4250,24,64 --shape 1,16896,24,128"
timeout 110 python3 benchmarks/bench_fp8_host.py --out $OUT/new $SH > $L/host_new_1.log 2>&1; echo "new 1 rc=$? at $SECONDS s"; save
rm -rf /tmp/base; mkdir -p /tmp/base; cp -r xdit_ops benchmarks /tmp/base/
cp $B94/triton_fp8_attention.py /tmp/base/xdit_ops/triton/fp8_attention.py
cp $B94/ops_fp8_attention.py /tmp/base/xdit_ops/ops/fp8_attention.py
rm -f /tmp/base/xdit_ops/triton/launch.py
(cd /tmp/base && PYTHONPATH=/tmp/base:/tmp/site timeout 110 python3 benchmarks/bench_fp8_host.py --out $OUT/base $SH) > $L/host_base.log 2>&1; echo "base rc=$? at $SECONDS s"; save
timeout 110 python3 benchmarks/bench_fp8_host.py --out $OUT/new $SH > $L/host_new_2.log 2>&1; echo "new 2 rc=$? at $SECONDS s"; save
grep -h "^{" $L/host_new_1.log $L/host_base.log $L/host_new_2.log | cut -c1-600
