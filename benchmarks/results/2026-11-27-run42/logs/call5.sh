#!/usr/bin/env bash
# Session 10 call 5 (run 42): overlap flags v2 (batched memops): memop latency, GPU tests, bench_usp, profile.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logsE; mkdir -p $L; NG=$(nvidia-smi -L | wc -l); CMT=$(head -1 commitsE.txt)
nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/e.tgz -C /tmp logsE; }
cp s10_*.py /tmp/
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
rm -rf /tmp/srcE; mkdir -p /tmp/srcE && tar xf headE.tar -C /tmp/srcE
( cd /tmp/srcE && PYTHONPATH=/tmp/site XDIT_OPS_SKIP_SM90=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > $L/build_E.log 2>&1; echo E build rc=$? at $SECONDS s ); save
P="PYTHONPATH=/tmp/site:/tmp/srcE XDIT_OPS_GIT_COMMIT=$CMT"
( cd /tmp/srcE && env $P timeout 40 python3 /tmp/s10_memop_lat.py $L/memop_lat.json > $L/memop_lat.log 2>&1; echo "memop lat rc=$? at $SECONDS s"; grep "{" $L/memop_lat.log | cut -c1-200 ); save
( cd /tmp/srcE && env $P timeout 40 python3 -m pytest -q -rfE -p no:cacheprovider -m gpu tests/ops/test_stream_memops.py > $L/test_memops.log 2>&1; echo "memops tests rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed" $L/test_memops.log | tail -3 | cut -c1-250 ); save
( cd /tmp/srcE && env $P timeout 120 python3 -m pytest -x -q -rfE -s -p no:cacheprovider "tests/ops/test_usp_attention.py::test_usp_gpu_overlap_matches_single_device" "tests/ops/test_usp_attention.py::test_usp_gpu_cuda_graph_overlap" > $L/test_overlap.log 2>&1; echo "overlap tests rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed|Error" $L/test_overlap.log | tail -6 | cut -c1-300 ); save
( cd /tmp/srcE && env $P timeout 130 torchrun --standalone --nproc-per-node=$NG benchmarks/bench_usp.py --configs ulysses,ulysses-overlap-c2,ulysses-overlap-c3 --no-yunchang --no-host --out $L/bench > $L/bench_usp.log 2>&1; echo "bench_usp rc=$? at $SECONDS s"; grep -E "xdit_ops" $L/bench_usp.log | head -9 | cut -c1-200 ); save
( cd /tmp/srcE && env $P PS=16896 PH=24 timeout 60 torchrun --standalone --nproc-per-node=$NG /tmp/s10_prof_overlap.py $L > $L/prof_overlap.log 2>&1; echo "prof rc=$? at $SECONDS s"; gzip -f $L/trace_*.json ); save
echo "done at $SECONDS s"
