#!/usr/bin/env bash
# Session 9 call 3 (run 36b): FP8 ring + FP8 wire GPU tests, bench_usp --backend fp8 (with the sm_90a module).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logsH; mkdir -p $L; R=$PWD; NG=$(nvidia-smi -L | wc -l); CMT=$(head -1 commitsJ.txt)
nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/h.tgz -C /tmp logsH; }
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
mkdir -p /tmp/srcJ && tar xf headJ.tar -C /tmp/srcJ
( cd /tmp/srcJ && PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > $L/build_J.log 2>&1; echo J build rc=$? at $SECONDS s )
P="PYTHONPATH=/tmp/site:/tmp/srcJ XDIT_OPS_GIT_COMMIT=$CMT"
( cd /tmp/srcJ && env $P timeout 200 python3 -m pytest -x -q -rfE -s -p no:cacheprovider tests/ops/test_usp_fp8_ring.py -m "gpu or multigpu" > $L/test_fp8ring.log 2>&1; echo "fp8 ring tests rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed|Error" $L/test_fp8ring.log | tail -5 | cut -c1-250 ); save
( cd /tmp/srcJ && env $P timeout 150 torchrun --standalone --nproc-per-node=$NG benchmarks/bench_usp.py --backend fp8 --configs ring,ring-fp8wire,ring-nccl-fp8wire,hybrid,hybrid-fp8wire --no-yunchang --no-host --out $L/bench > $L/bench_usp_fp8.log 2>&1; echo "bench fp8 rc=$? at $SECONDS s"; grep -E "^\[1" $L/bench_usp_fp8.log | head -16 | cut -c1-170 ); save
( cd /tmp/srcJ && env $P timeout $((500-SECONDS)) python3 -m pytest -x -q -rfE -s -p no:cacheprovider tests/ops/test_usp_fp8_wire.py -m "gpu or multigpu" > $L/test_fp8wire.log 2>&1; echo "fp8 wire tests rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed|Error" $L/test_fp8wire.log | tail -5 | cut -c1-250 ); save
echo "done at $SECONDS s"
