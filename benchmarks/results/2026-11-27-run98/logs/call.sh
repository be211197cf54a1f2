#!/usr/bin/env bash
# Session 18, one GPU (issue 4), run 98: fp8-host with the Q and statistics kernels on 4 warps
# (run 97's sweep). Build; the FP8, launch and 1-GPU FP8-wire tests; the GPU time per queued op
# call (run 91's gaps.py); bench_fp8_host; bench_fp8_attention (sm90ws) at the four shapes.
set -u
export PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
timeout 240 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
timeout 200 python3 -m pytest -q -rfEs -p no:cacheprovider -m "gpu or sm90" tests/ops/test_triton_launch.py tests/ops/test_fp8_attention.py tests/ops/test_fp8_impl_select.py tests/ops/test_usp_fp8_wire.py > $L/tests_fp8.log 2>&1; echo "fp8 tests rc=$? at $SECONDS s"; grep -E "passed|failed|^FAILED|Error" $L/tests_fp8.log | cut -c1-300 | tail -8; save
timeout 120 python3 benchmarks/results/2026-11-27-run91/logs/gaps.py $OUT 1,16896,24,128 1,32760,40,128 1,4608,24,128 > $L/gaps.log 2>&1; echo "gaps rc=$? at $SECONDS s"; grep -E "_kernel\"|span|^\(" -A1 $L/gaps.log | grep -vE "^--|\[$" | head -40; save
timeout 100 python3 benchmarks/bench_fp8_host.py --out $OUT --shape 1,4608,24,128 --shape 2,4250,24,64 --shape 1,16896,24,128 > $L/host.log 2>&1; echo "host rc=$? at $SECONDS s"; grep "^{" $L/host.log | cut -c1-600; save
timeout 150 python3 benchmarks/bench_fp8_attention.py --impls sm90ws --no-naive --out $OUT > $L/bench_fp8.log 2>&1; echo "bench rc=$? at $SECONDS s"; grep -E "cudnn|ktile|c3|total" $L/bench_fp8.log | cut -c1-170 | head -24; save
