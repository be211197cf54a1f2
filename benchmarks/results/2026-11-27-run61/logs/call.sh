#!/usr/bin/env bash
# Session 14, one GPU (issue 4), run 61: build, the 3-consumer sm90ws kernel's bit-identity test first
# (a failure could poison the context), the other FP8 GPU tests, bench_fp8_attention at head
# dim 64 (2 vs 3 consumers, round robin and free issue; Triton and cuDNN bf16 in the same run)
# and at (1,16896,24,128) and (1,32760,40,128); then head dim 64 again timed as CUDA-graph
# replays (--cuda-graph: the GPU time alone, no host launch gaps inside a call).
set -u
export PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
timeout 200 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
timeout 120 python3 -m pytest -x -q -rfEs -p no:cacheprovider tests/ops/test_fp8_attention.py::test_sm90ws_three_consumers_are_bit_identical > $L/tests_c3.log 2>&1; rc=$?; echo "bit-identity rc=$rc at $SECONDS s"; tail -4 $L/tests_c3.log | cut -c1-300; save
if [ $rc -eq 0 ]; then
  timeout 150 python3 -m pytest -q -rfEs -p no:cacheprovider -m "gpu or sm90" tests/ops/test_fp8_attention.py tests/ops/test_fp8_impl_select.py > $L/tests_fp8.log 2>&1; echo "fp8 tests rc=$? at $SECONDS s"; tail -4 $L/tests_fp8.log | cut -c1-300; save
  timeout 300 python3 benchmarks/bench_fp8_attention.py --impls triton sm90ws --shapes 2,4250,24,64 1,16896,24,128 1,32760,40,128 --consumers 2 3 3rr --no-naive --out $OUT > $L/bench_fp8.log 2>&1; echo "bench rc=$? at $SECONDS s"; grep -E "c3|ktile|cudnn|triton_total" $L/bench_fp8.log | cut -c1-200 | head -30; save
  mkdir -p $OUT/graph; timeout 120 python3 benchmarks/bench_fp8_attention.py --impls triton sm90ws --shapes 2,4250,24,64 --consumers 2 3 --no-naive --cuda-graph --out $OUT/graph > $L/bench_fp8_graph.log 2>&1; echo "graph bench rc=$? at $SECONDS s"; grep -E "c3|ktile|cudnn|triton_total|triton_quant_ktile" $L/bench_fp8_graph.log | cut -c1-120 | head -12; save
fi
