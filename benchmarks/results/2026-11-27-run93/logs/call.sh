#!/usr/bin/env bash
# Session 17, one GPU (issue 4), run 93: main with the K/V quantization kernel at 8 warps for
# per-tile K scales at padded head dim 128 (run 92's best). Build; the FP8 GPU tests; the op's
# kernels and GPU time per queued call (run 91's gaps.py).
set -u
export PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
timeout 240 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
timeout 150 python3 -m pytest -q -rfEs -p no:cacheprovider -m "gpu or sm90" tests/ops/test_fp8_attention.py tests/ops/test_fp8_impl_select.py > $L/tests_fp8.log 2>&1; echo "fp8 tests rc=$? at $SECONDS s"; grep -E "passed|failed|^FAILED" $L/tests_fp8.log | cut -c1-200 | tail -6; save
timeout 120 python3 benchmarks/results/2026-11-27-run91/logs/gaps.py $OUT 1,16896,24,128 1,32760,40,128 1,4608,24,128 > $L/gaps.log 2>&1; echo "rc=$?"; grep -E "_kernel\"|span|^\(" -A1 $L/gaps.log | grep -vE "^--|\[$" | head -40; save
