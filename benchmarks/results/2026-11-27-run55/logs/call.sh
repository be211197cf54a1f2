#!/usr/bin/env bash
# Session 13, a call on 2 GPUs: build, the row-copy unit test, the fast-path / graph tests, the
# host-time breakdown (bench_usp_host), bench_usp at 4608 (host rows with the fast-path A/B).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
timeout 200 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
nvcc -std=c++17 -arch=sm_90a -Icsrc/include -Icsrc/tests csrc/tests/test_row_copy.cu csrc/kernels/row_copy.cu -o /tmp/test_row_copy && /tmp/test_row_copy > $L/test_row_copy.log 2>&1; echo "row copy test rc=$?"; cat $L/test_row_copy.log
export PYTHONPATH=/tmp/site XDIT_OPS_GIT_COMMIT=$CMT
timeout ${TEST_LIMIT:-240} python3 -m pytest -x -q -rfEs -p no:cacheprovider -m "gpu or sm90 or multigpu" tests/ops/test_graph_call.py tests/ops/test_usp_graph.py ${EXTRA_TESTS:-} > $L/tests.log 2>&1; echo "tests rc=$? at $SECONDS s"; tail -6 $L/tests.log | cut -c1-300; save
timeout 100 torchrun --standalone --nproc-per-node=2 benchmarks/bench_usp_host.py --out $OUT > $L/bench_usp_host.log 2>&1; echo "host bench rc=$? at $SECONDS s"; tail -4 $L/bench_usp_host.log | cut -c1-300; save
[ -n "${NO_USP_BENCH:-}" ] || { timeout 150 torchrun --standalone --nproc-per-node=2 benchmarks/bench_usp.py --shapes ${SHAPES:-0} --no-yunchang --configs ${CONFIGS:-ulysses,ring} --out $OUT > $L/bench_usp.log 2>&1; echo "bench rc=$? at $SECONDS s"; grep -A4 "host time" $L/bench_usp.log | cut -c1-220; grep "xdit_ops " $L/bench_usp.log | head -6 | cut -c1-200; save; }
