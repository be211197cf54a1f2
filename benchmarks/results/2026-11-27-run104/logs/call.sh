#!/usr/bin/env bash
# Session 19, two GPUs (issue 3), run 104: usp_attention's FP8 wire after session 18's direct
# Triton launches (never run on several GPUs since). Build; the 2-GPU FP8-wire and FP8-ring GPU
# tests; bench_usp --backend fp8 at (1,4608,24,128) (host time and efficiency of the bf16
# Ulysses default against the FP8 wire and the FP8 ring).
set -u
export PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt; nvidia-smi topo -m > $L/topo.txt 2>&1
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
timeout 300 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; tail -1 $L/build.log; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
timeout 200 python3 -m pytest -q -rfEs -p no:cacheprovider tests/ops/test_usp_fp8_wire.py tests/ops/test_usp_fp8_ring.py -k "gpu and 2" > $L/tests_wire.log 2>&1; echo "wire tests rc=$? at $SECONDS s"; grep -E "passed|failed|^FAILED|Error" $L/tests_wire.log | cut -c1-300 | tail -6; save
timeout 150 torchrun --standalone --nproc-per-node=2 benchmarks/bench_usp.py --shapes 0 --configs ulysses,ulysses-fp8wire,ring-fp8wire --backend fp8 --no-yunchang --out $OUT > $L/bench_usp.log 2>&1; echo "bench rc=$? at $SECONDS s"; grep -vE "^\s*$" $L/bench_usp.log | cut -c1-220 | tail -12; save
