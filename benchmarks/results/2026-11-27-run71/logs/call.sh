#!/usr/bin/env bash
# Session 15, a call on 4 GPUs (the first 4-GPU kind lent since session 12): main after the
# fp8-rowsum merge. Build; then in parallel: the 2-GPU usp tests (fast path, graph, host paths,
# overlap and copy-engine-flag paths: session 14's review mends) on GPUs 0-1, the FP8 GPU tests
# on GPU 2, the row-copy unit test on GPU 3; bench_usp on all 4 at the three issue shapes
# (ulysses, ring, hybrid; host-time rows); then the 4-GPU test ids never run before (the fast
# path and graph replays incl. the hybrid, the host paths, the overlap) in the time left.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt; NG=$(nvidia-smi -L | wc -l)
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
left() { echo $(( ${BUDGET:-520} - SECONDS )); }
timeout 240 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site XDIT_OPS_GIT_COMMIT=$CMT
T=tests/ops/test_usp_attention.py
G=tests/ops/test_usp_graph.py::test_usp_gpu_graph_replay_equals_eager
H=tests/ops/test_usp_host_path.py::test_usp_gpu_host_paths_agree
( CUDA_VISIBLE_DEVICES=2 timeout 150 python3 -m pytest -q -rfEs -p no:cacheprovider -m "gpu or sm90" tests/ops/test_fp8_attention.py tests/ops/test_fp8_impl_select.py > $L/tests_fp8.log 2>&1; echo "fp8 tests rc=$?" >> $L/bg.txt ) &
B1=$!
( export CUDA_VISIBLE_DEVICES=3; nvcc -std=c++17 -arch=sm_90a -Icsrc/include -Icsrc/tests csrc/tests/test_row_copy.cu csrc/kernels/row_copy.cu -o /tmp/test_row_copy && /tmp/test_row_copy > $L/test_row_copy.log 2>&1; echo "row copy test rc=$?" >> $L/bg.txt ) &
B2=$!
CUDA_VISIBLE_DEVICES=0,1 timeout 200 python3 -m pytest -q -rfEs -p no:cacheprovider -m "gpu or sm90 or multigpu" tests/ops/test_graph_call.py tests/ops/test_usp_graph.py tests/ops/test_usp_host_path.py "$T::test_usp_gpu_cuda_graph" "$T::test_usp_gpu_overlap_matches_single_device[2-lists-lists]" "$T::test_usp_gpu_cuda_graph_overlap[2-default]" "$T::test_usp_gpu_cuda_graph_ring_flags[2]" > $L/tests_usp2.log 2>&1; echo "usp 2-GPU tests rc=$? at $SECONDS s"; grep -E "passed|failed|^FAILED" $L/tests_usp2.log | cut -c1-250 | tail -8
wait $B1 $B2; cat $L/bg.txt; grep -E "passed|failed|^FAILED" $L/tests_fp8.log | cut -c1-200 | tail -4; tail -1 $L/test_row_copy.log; save
timeout 200 torchrun --standalone --nproc-per-node=$NG benchmarks/bench_usp.py --shapes 0,1,2 --no-yunchang --configs ulysses,ring,hybrid --out $OUT > $L/bench_usp.log 2>&1; echo "bench_usp rc=$? at $SECONDS s"; grep -E "xdit_ops|single-GPU|host time|eff" $L/bench_usp.log | head -30 | cut -c1-220; save
echo "left $(left) s"
timeout $(( $(left) - 5 )) python3 -m pytest -v -rfEs -p no:cacheprovider "$G[4-hybrid]" "$G[4-push]" "$G[4-overlap]" "$G[4-ce]" "$G[4-ceflags]" "$G[4-nccl]" "$G[4-uce]" "$H[4-overlap]" "$H[4-ceflags]" "$H[4-ce]" "$H[4-overlap-equal]" "$T::test_usp_gpu_cuda_graph_overlap[4-default]" > $L/tests_usp4.log 2>&1; echo "usp 4-GPU tests rc=$? at $SECONDS s"; grep -E "passed|failed|FAILED|PASSED" $L/tests_usp4.log | cut -c1-250 | tail -12; save
