#!/usr/bin/env bash
# Session 15, one GPU (issue 4), run 69: branch fp8-rowsum with the tensor-core row sums as the
# per-tile kernels' default at padded head dim 64 (2 and 3 consumers). Build; ftz_check.py
# (which emulation the kernels match); the FP8 GPU tests; bench_fp8_attention at (2,4250,24,64)
# (2 and 3 consumers, Triton and cuDNN bf16 in the same run).
set -u
export PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
timeout 240 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
timeout 150 python3 benchmarks/results/2026-11-27-run69/logs/ftz_check.py $OUT > $L/ftz_check.log 2>&1; echo "ftz_check rc=$? at $SECONDS s"; grep -v Warn $L/ftz_check.log | cut -c1-400; save
timeout 200 python3 -m pytest -q -rfEs -p no:cacheprovider -m "gpu or sm90" tests/ops/test_fp8_attention.py tests/ops/test_fp8_impl_select.py > $L/tests_fp8.log 2>&1; echo "fp8 tests rc=$? at $SECONDS s"; grep -E "passed|failed|^FAILED" $L/tests_fp8.log | cut -c1-200 | tail -12; save
timeout 150 python3 benchmarks/bench_fp8_attention.py --impls triton sm90ws --shapes 2,4250,24,64 --consumers 2 3 --no-naive --out $OUT > $L/bench_fp8.log 2>&1; echo "bench rc=$? at $SECONDS s"; grep -E "c3|ktile|cudnn|triton_total" $L/bench_fp8.log | cut -c1-200 | head -12; save
