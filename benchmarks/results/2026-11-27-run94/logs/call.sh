#!/usr/bin/env bash
# Session 18, one GPU (issue 4), run 94: branch fp8-host (the cached Triton launch, the op's
# direct quantization pass with its outputs in one buffer, a null device context when already
# there). Build; the new launch tests and the FP8 GPU tests; bench_fp8_host on this commit and
# on main's Python (base/: main's two fp8_attention modules over the same build), interleaved.
set -u
export PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
R=benchmarks/results/2026-11-27-run94/logs
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
timeout 240 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
timeout 200 python3 -m pytest -q -rfEs -p no:cacheprovider -m "gpu or sm90" tests/ops/test_triton_launch.py tests/ops/test_fp8_attention.py tests/ops/test_fp8_impl_select.py > $L/tests_fp8.log 2>&1; echo "fp8 tests rc=$? at $SECONDS s"; grep -E "passed|failed|^FAILED|Error" $L/tests_fp8.log | cut -c1-300 | tail -8; save
# base: main's Python over the same build (its own benchmarks copy, so the repo root is not first)
rm -rf /tmp/base; mkdir -p /tmp/base; cp -r xdit_ops benchmarks /tmp/base/
cp $R/base/triton_fp8_attention.py /tmp/base/xdit_ops/triton/fp8_attention.py
cp $R/base/ops_fp8_attention.py /tmp/base/xdit_ops/ops/fp8_attention.py
rm -f /tmp/base/xdit_ops/triton/launch.py
for i in 1 2; do
  (cd /tmp/base && PYTHONPATH=/tmp/base:/tmp/site timeout 100 python3 -c "import xdit_ops.triton.fp8_attention as m; print('base module', m.__file__)" && PYTHONPATH=/tmp/base:/tmp/site timeout 100 python3 benchmarks/bench_fp8_host.py --out $OUT/base --shape 1,4608,24,128 --shape 2,4250,24,64 --shape 1,16896,24,128) > $L/host_base_$i.log 2>&1; echo "base $i rc=$? at $SECONDS s"; save
  timeout 100 python3 benchmarks/bench_fp8_host.py --out $OUT/new --shape 1,4608,24,128 --shape 2,4250,24,64 --shape 1,16896,24,128 > $L/host_new_$i.log 2>&1; echo "new $i rc=$? at $SECONDS s"; save
done
grep -h "^{" $L/host_base_*.log $L/host_new_*.log | cut -c1-400
grep -h "base module" $L/host_base_1.log
