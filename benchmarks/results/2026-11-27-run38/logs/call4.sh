#!/usr/bin/env bash
# Session 9 call 4 (run 36c): FP8 wire + FP8 ring GPU tests on 2 GPUs with one process group per worker.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logsK; mkdir -p $L; CMT=$(head -1 commitsK.txt)
save() { tar czf $OUT/k.tgz -C /tmp logsK; }
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
mkdir -p /tmp/srcK && tar xf headK.tar -C /tmp/srcK
( cd /tmp/srcK && PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > $L/build_K.log 2>&1; echo K build rc=$? at $SECONDS s )
P="PYTHONPATH=/tmp/site:/tmp/srcK XDIT_OPS_GIT_COMMIT=$CMT"
( cd /tmp/srcK && env $P timeout 170 python3 -m pytest -x -q -rfE -s -p no:cacheprovider "tests/ops/test_usp_fp8_wire.py::test_usp_fp8_wire_gpu[2]" > $L/test_fp8wire2.log 2>&1; echo "fp8 wire [2] rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed|Error" $L/test_fp8wire2.log | tail -4 | cut -c1-250 ); save
( cd /tmp/srcK && env $P timeout $((400-SECONDS)) python3 -m pytest -x -q -rfE -s -p no:cacheprovider "tests/ops/test_usp_fp8_ring.py::test_usp_fp8_ring_gpu[2]" > $L/test_fp8ring2.log 2>&1; echo "fp8 ring [2] rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed|Error" $L/test_fp8ring2.log | tail -4 | cut -c1-250 ); save
echo "done at $SECONDS s"
