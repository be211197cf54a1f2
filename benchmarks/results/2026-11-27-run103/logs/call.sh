#!/usr/bin/env bash
# Session 19, one GPU (issue 4), run 103: the persistent sm90ws per-tile kernel above 132 key
# tiles only (padded head dim 128; XDIT_OPS_FP8_PERSISTENT=0 for the kernel before). Build; the
# persistent-kernel GPU tests; run 102's A/B script (kernel-only and whole op; at and below 132
# key tiles the switch is a control: the same kernel); the FP8, launch and impl-select GPU
# tests; bench_fp8_attention (sm90ws).
set -u
export PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
R=benchmarks/results/2026-11-27-run102/logs
timeout 300 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; tail -1 $L/build.log; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
timeout 100 python3 -m pytest -q -x -rfEs -p no:cacheprovider -m "gpu or sm90" tests/ops/test_fp8_attention.py -k "persistent" > $L/tests_persist.log 2>&1; echo "persistent tests rc=$? at $SECONDS s"; grep -E "passed|failed|^FAILED|Error" $L/tests_persist.log | cut -c1-300 | tail -6; save
timeout 150 python3 $R/persist_ab.py $OUT > $L/persist_ab.log 2>&1; echo "ab rc=$? at $SECONDS s"; cut -c1-600 $L/persist_ab.log | tail -8; save
timeout 200 python3 -m pytest -q -rfEs -p no:cacheprovider -m "gpu or sm90" tests/ops/test_fp8_attention.py tests/ops/test_triton_launch.py tests/ops/test_fp8_impl_select.py > $L/tests_fp8.log 2>&1; echo "fp8 tests rc=$? at $SECONDS s"; grep -E "passed|failed|^FAILED|Error" $L/tests_fp8.log | cut -c1-300 | tail -8; save
timeout 150 python3 benchmarks/bench_fp8_attention.py --impls sm90ws --no-naive --out $OUT > $L/bench_fp8.log 2>&1; echo "bench rc=$? at $SECONDS s"; grep -E "cudnn|ktile|c3|total" $L/bench_fp8.log | cut -c1-170 | head -24; save
