#!/usr/bin/env bash
# Session 16, call 1 on 4 GPUs: main at the session's start (fe7088a: the sm90ws Storage sizing
# and the plan's host_lists, neither run on a GPU yet). Build; then in parallel: the FP8 GPU
# tests on GPU 0 followed by an ncu source-level (SASS) profile of the head-dim-128 sm90ws
# kernel at (1,16896,24,128); the 2-GPU host-path tests on GPUs 2-3 (the host_lists mend). Then
# on all 4: where the Ulysses overlap's time goes at (1,32760,40,128) (logs/prof_overlap32k.py),
# the host time pieces at 4608 (bench_usp_host), and the 4-GPU test ids not run yet in the
# time left.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt; NG=$(nvidia-smi -L | wc -l)
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
left() { echo $(( ${BUDGET:-570} - SECONDS )); }
D=benchmarks/results/2026-11-27-run73/logs
timeout 240 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 120 python3 -m pytest -q -rfEs -p no:cacheprovider -m "gpu or sm90" tests/ops/test_fp8_attention.py tests/ops/test_fp8_impl_select.py > $L/tests_fp8.log 2>&1; echo "fp8 tests rc=$? at $SECONDS s" >> $L/bg.txt
  timeout 110 $NCU --clock-control none --section SourceCounters --section WarpStateStats --section SpeedOfLight -k regex:fp8_attention_ws_kernel --launch-skip 2 --launch-count 1 -o $L/ws128 python3 benchmarks/results/2026-11-27-run47/logs/prof_fp8.py 1,16896,24,128 > $L/ncu_ws128.log 2>&1; echo "ncu rc=$? at $SECONDS s" >> $L/bg.txt
  $NCU -i $L/ws128.ncu-rep --page source --csv --print-source sass > $L/ncu_ws128_sass.csv 2> $L/ncu_ws128_sass.err
  $NCU -i $L/ws128.ncu-rep --page details > $L/ncu_ws128_details.txt 2>&1
  gzip -f $L/ncu_ws128_sass.csv; rm -f $L/ws128.ncu-rep
) &
B1=$!
( export CUDA_VISIBLE_DEVICES=2,3; timeout 200 python3 -m pytest -q -rfEs -p no:cacheprovider -m "gpu or multigpu" tests/ops/test_usp_host_path.py "tests/ops/test_usp_attention.py::test_usp_gpu_overlap_matches_single_device[2-lists-lists]" > $L/tests_usp2.log 2>&1; echo "usp 2-GPU tests rc=$? at $SECONDS s" >> $L/bg.txt ) &
B2=$!
wait $B1 $B2; cat $L/bg.txt; grep -E "passed|failed|^FAILED" $L/tests_fp8.log $L/tests_usp2.log | cut -c1-220 | tail -8
grep -E "Duration|Issue Slots|No Eligible|Eligible Warps|Warp Cycles Per Issued|Compute \(SM\) Throughput|Stall" $L/ncu_ws128_details.txt | head -30; head -c 300 $L/ncu_ws128_sass.err; ls -la $L | head -30; save
PROF_OUT=$L timeout 200 torchrun --standalone --nproc-per-node=$NG $D/prof_overlap32k.py > $L/prof_overlap32k.log 2>&1; echo "prof rc=$? at $SECONDS s"; grep -vE "^W1|UserWarning|warn_once|^\s*$" $L/prof_overlap32k.log | cut -c1-400 | head -60; gzip -f $L/trace_*.json; cp $L/prof_overlap32k.json $OUT/ 2>/dev/null; save
timeout 90 torchrun --standalone --nproc-per-node=$NG benchmarks/bench_usp_host.py --out $OUT > $L/bench_usp_host.log 2>&1; echo "host bench rc=$? at $SECONDS s"; grep -vE "^W1|UserWarning" $L/bench_usp_host.log | tail -30 | cut -c1-200; save
echo "left $(left) s"
T=tests/ops/test_usp_attention.py; H=tests/ops/test_usp_host_path.py::test_usp_gpu_host_paths_agree
timeout $(( $(left) - 5 )) python3 -m pytest -v -rfEs -p no:cacheprovider "$H[4-overlap-equal]" "$T::test_usp_gpu_cuda_graph_overlap[4-default]" "$T::test_usp_gpu_matches_single_device[4]" > $L/tests_usp4.log 2>&1; echo "usp 4-GPU tests rc=$? at $SECONDS s"; grep -E "passed|failed|FAILED|PASSED" $L/tests_usp4.log | cut -c1-250 | tail -8; save
