#!/usr/bin/env bash
# Session 16, call 2 on 4 GPUs: the overlap's chunk 0 attention queued before the copies of the
# other chunks (ATTEND_FIRST). Build; the overlap GPU tests on 4 and 2 GPUs (vs the single
# device, graphs, host paths); logs/prof_b2b.py (back-to-back and single calls at
# (1,32760,40,128), ATTEND_FIRST on/off and the push, with a profile of back-to-back calls) with
# the SM clocks and power read (nvidia-smi query, read-only) meanwhile; bench_usp at 32760.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt; NG=$(nvidia-smi -L | wc -l)
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
left() { echo $(( ${BUDGET:-560} - SECONDS )); }
D=benchmarks/results/2026-11-27-run74/logs
timeout 240 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
T=tests/ops/test_usp_attention.py; H=tests/ops/test_usp_host_path.py::test_usp_gpu_host_paths_agree
timeout 200 python3 -m pytest -v -rfEs -p no:cacheprovider "$T::test_usp_gpu_overlap_matches_single_device[4-default-tensors]" "$T::test_usp_gpu_cuda_graph_overlap[4-default]" "$H[4-overlap]" "$T::test_usp_gpu_overlap_matches_single_device[4-lists-tensors]" > $L/tests_usp4.log 2>&1; echo "usp 4-GPU tests rc=$? at $SECONDS s"; grep -E "passed|failed|FAILED|PASSED" $L/tests_usp4.log | cut -c1-200 | tail -6; save
nvidia-smi --query-gpu=timestamp,index,clocks.sm,power.draw,temperature.gpu --format=csv -lms 250 > $L/smi.csv 2>&1 &
SMI=$!
PROF_OUT=$L timeout 200 torchrun --standalone --nproc-per-node=$NG $D/prof_b2b.py > $L/prof_b2b.log 2>&1; echo "prof rc=$? at $SECONDS s"; kill $SMI; grep -vE "^W1|UserWarning|warn_once|^\s*$" $L/prof_b2b.log | cut -c1-330 | head -40; gzip -f $L/trace_*.json; cp $L/prof_b2b.json $OUT/ 2>/dev/null; save
echo "left $(left) s"
timeout $(( $(left) - 100 )) torchrun --standalone --nproc-per-node=$NG benchmarks/bench_usp.py --shapes 2 --no-yunchang --no-host --configs ulysses,ring --out $OUT > $L/bench_usp.log 2>&1; echo "bench_usp rc=$? at $SECONDS s"; grep -E "xdit_ops|single-GPU" $L/bench_usp.log | head -6 | cut -c1-200; save
echo "left $(left) s"
CUDA_VISIBLE_DEVICES=0,1 timeout $(( $(left) - 5 )) python3 -m pytest -q -rfEs -p no:cacheprovider "$T::test_usp_gpu_overlap_matches_single_device[2-default-tensors]" "$T::test_usp_gpu_cuda_graph_overlap[2-default]" "$H[2-overlap]" > $L/tests_usp2.log 2>&1; echo "usp 2-GPU tests rc=$? at $SECONDS s"; grep -E "passed|failed|^FAILED" $L/tests_usp2.log | tail -3; save
