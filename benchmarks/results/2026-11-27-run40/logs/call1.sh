#!/usr/bin/env bash
# Session 10 call 1 (run 40): session 9's review mends on GPUs (merge, fp8, usp multigpu tests),
# bench_merge, the fp8-eager host-time A/B, the copy-engine overlap microbenchmark.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logsA; mkdir -p $L; NG=$(nvidia-smi -L | wc -l); CMT=$(head -1 commitsA.txt)
nvidia-smi -L > $L/gpus.txt; nvidia-smi topo -m > $L/topo.txt 2>&1
save() { tar czf $OUT/a.tgz -C /tmp logsA; }
cp s10_*.py /tmp/ 2>/dev/null
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
mkdir -p /tmp/srcA && tar xf headA.tar -C /tmp/srcA
( cd /tmp/srcA && PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > $L/build_A.log 2>&1; echo A build rc=$? at $SECONDS s ); save
P="PYTHONPATH=/tmp/site:/tmp/srcA XDIT_OPS_GIT_COMMIT=$CMT SRC=/tmp/srcA"
( cd /tmp/srcA && env $P timeout 80 python3 -m pytest -q -rfE -p no:cacheprovider -m gpu tests/ops/test_merge_attention_partials.py tests/ops/test_merge_attention_states.py > $L/test_merge.log 2>&1; echo "merge tests rc=$? at $SECONDS s"; tail -2 $L/test_merge.log | cut -c1-250 ); save
( cd /tmp/srcA && env $P timeout 60 python3 benchmarks/bench_merge.py --out $L/bench > $L/bench_merge.log 2>&1; echo "bench_merge rc=$? at $SECONDS s"; grep -vE "Warning|warn" $L/bench_merge.log | tail -14 | cut -c1-200 ); save
( cd /tmp/srcA && env $P timeout 120 python3 -m pytest -q -rfE -p no:cacheprovider tests/ops/test_fp8_attention.py tests/ops/test_fp8_impl_select.py -m "gpu or sm90" > $L/test_fp8.log 2>&1; echo "fp8 tests rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed" $L/test_fp8.log | tail -4 | cut -c1-250 ); save
( cd /tmp/srcA && env $P timeout 60 python3 /tmp/s10_prof_fp8host_ab.py $L/fp8host_ab.json > $L/fp8host_ab.log 2>&1; echo "fp8 host A/B rc=$? at $SECONDS s"; grep "{" $L/fp8host_ab.log | cut -c1-160 ); save
( cd /tmp/srcA && env $P timeout 90 python3 /tmp/s10_ce_overlap.py $L/ce_overlap.json > $L/ce_overlap.log 2>&1; echo "ce overlap rc=$? at $SECONDS s"; tail -5 $L/ce_overlap.log | cut -c1-400 ); save
( cd /tmp/srcA && env $P timeout $((580-SECONDS)) python3 -m pytest -q -rfE -s -p no:cacheprovider tests/ops/test_usp_attention.py -m multigpu > $L/test_usp.log 2>&1; echo "usp tests rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed" $L/test_usp.log | tail -4 | cut -c1-250 ); save
echo "done at $SECONDS s"
