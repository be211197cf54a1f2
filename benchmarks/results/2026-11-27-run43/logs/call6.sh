#!/usr/bin/env bash
# Session 10 call 6 (run 43): overlap path with host-time templates: GPU tests, bench_usp push vs overlap c2/c3.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logsF; mkdir -p $L; NG=$(nvidia-smi -L | wc -l); CMT=$(head -1 commitsF.txt)
nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/f.tgz -C /tmp logsF; }
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
rm -rf /tmp/srcF; mkdir -p /tmp/srcF && tar xf headF.tar -C /tmp/srcF
( cd /tmp/srcF && PYTHONPATH=/tmp/site XDIT_OPS_SKIP_SM90=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > $L/build_F.log 2>&1; echo F build rc=$? at $SECONDS s ); save
P="PYTHONPATH=/tmp/site:/tmp/srcF XDIT_OPS_GIT_COMMIT=$CMT"
( cd /tmp/srcF && env $P timeout 110 python3 -m pytest -x -q -rfE -s -p no:cacheprovider "tests/ops/test_usp_attention.py::test_usp_gpu_overlap_matches_single_device" "tests/ops/test_usp_attention.py::test_usp_gpu_cuda_graph_overlap" > $L/test_overlap.log 2>&1; echo "overlap tests rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed|Error" $L/test_overlap.log | tail -6 | cut -c1-300 ); save
( cd /tmp/srcF && env $P timeout 120 torchrun --standalone --nproc-per-node=$NG benchmarks/bench_usp.py --configs ulysses,ulysses-overlap-c2,ulysses-overlap-c3 --no-yunchang --no-host --out $L/bench > $L/bench_usp.log 2>&1; echo "bench_usp rc=$? at $SECONDS s"; grep -E "xdit_ops|host" $L/bench_usp.log | head -14 | cut -c1-200 ); save
echo "done at $SECONDS s"
