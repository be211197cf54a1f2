#!/usr/bin/env bash
# Session 15, a call on 2 GPUs: main after the fp8-rowsum merge (+ session 14's review mends,
# c8ec080, not run on GPUs before). Build; the row-copy unit test; the fast-path / graph tests,
# the host-path tests, the overlap and copy-engine-flag paths (which now read XDIT_OPS_USP_HOST
# and XDIT_OPS_MEMOPS_BATCH from the plan); the FP8 GPU tests; bench_usp_host; bench_usp at 4608.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
timeout 240 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
nvcc -std=c++17 -arch=sm_90a -Icsrc/include -Icsrc/tests csrc/tests/test_row_copy.cu csrc/kernels/row_copy.cu -o /tmp/test_row_copy && /tmp/test_row_copy > $L/test_row_copy.log 2>&1; echo "row copy test rc=$?"; tail -1 $L/test_row_copy.log
export PYTHONPATH=/tmp/site XDIT_OPS_GIT_COMMIT=$CMT
T=tests/ops/test_usp_attention.py
timeout 240 python3 -m pytest -q -rfEs -p no:cacheprovider -m "gpu or sm90 or multigpu" tests/ops/test_graph_call.py tests/ops/test_usp_graph.py tests/ops/test_usp_host_path.py "$T::test_usp_gpu_cuda_graph" "$T::test_usp_gpu_overlap_matches_single_device[2-lists-lists]" "$T::test_usp_gpu_overlap_matches_single_device[2-default-tensors]" "$T::test_usp_gpu_cuda_graph_overlap[2-default]" "$T::test_usp_gpu_cuda_graph_ring_flags[2]" > $L/tests_usp.log 2>&1; echo "usp tests rc=$? at $SECONDS s"; grep -E "passed|failed|^FAILED" $L/tests_usp.log | cut -c1-250 | tail -8; save
timeout 120 python3 -m pytest -q -rfEs -p no:cacheprovider -m "gpu or sm90" tests/ops/test_fp8_attention.py tests/ops/test_fp8_impl_select.py > $L/tests_fp8.log 2>&1; echo "fp8 tests rc=$? at $SECONDS s"; grep -E "passed|failed|^FAILED" $L/tests_fp8.log | cut -c1-200 | tail -6; save
timeout 100 torchrun --standalone --nproc-per-node=2 benchmarks/bench_usp_host.py --out $OUT > $L/bench_usp_host.log 2>&1; echo "host bench rc=$? at $SECONDS s"; tail -4 $L/bench_usp_host.log | cut -c1-300; save
timeout 150 torchrun --standalone --nproc-per-node=2 benchmarks/bench_usp.py --shapes 0 --no-yunchang --configs ulysses,ring --out $OUT > $L/bench_usp.log 2>&1; echo "bench rc=$? at $SECONDS s"; grep -A4 "host time" $L/bench_usp.log | cut -c1-220; grep "xdit_ops " $L/bench_usp.log | head -6 | cut -c1-200; save
