#!/usr/bin/env bash
# Session 10 call 2 (run 40, same warm machine): cuDNN layout A/B, pack tests, FP8 wire/ring GPU tests on 2 and 4 GPUs.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logsB; mkdir -p $L; CMT=$(head -1 commitsA.txt)
save() { tar czf $OUT/b.tgz -C /tmp logsB; }
cp s10_*.py /tmp/ 2>/dev/null
if [ ! -f /tmp/srcA/xdit_ops/_C_sm90*.so ]; then
  pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
  mkdir -p /tmp/srcA && tar xf headA.tar -C /tmp/srcA
  ( cd /tmp/srcA && PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > $L/build_A.log 2>&1; echo A build rc=$? at $SECONDS s )
fi
P="PYTHONPATH=/tmp/site:/tmp/srcA XDIT_OPS_GIT_COMMIT=$CMT SRC=/tmp/srcA"
( cd /tmp/srcA && env $P timeout 90 python3 /tmp/s10_layout_ab.py $L/layout_ab.json > $L/layout_ab.log 2>&1; echo "layout A/B rc=$? at $SECONDS s"; grep "{" $L/layout_ab.log | cut -c1-330 ); save
( cd /tmp/srcA && env $P timeout 100 python3 -m pytest -x -q -rfE -s -p no:cacheprovider "tests/ops/test_usp_fp8_wire.py::test_usp_fp8_wire_gpu[4]" > $L/test_fp8wire4.log 2>&1; echo "fp8 wire [4] rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed|Error" $L/test_fp8wire4.log | tail -4 | cut -c1-250 ); save
( cd /tmp/srcA && env $P timeout 100 python3 -m pytest -x -q -rfE -s -p no:cacheprovider "tests/ops/test_usp_fp8_ring.py::test_usp_fp8_ring_gpu[4]" > $L/test_fp8ring4.log 2>&1; echo "fp8 ring [4] rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed|Error" $L/test_fp8ring4.log | tail -4 | cut -c1-250 ); save
( cd /tmp/srcA && env $P timeout 80 python3 -m pytest -x -q -rfE -s -p no:cacheprovider "tests/ops/test_usp_fp8_wire.py::test_usp_fp8_wire_gpu[2]" "tests/ops/test_usp_fp8_ring.py::test_usp_fp8_ring_gpu[2]" > $L/test_fp8wr2.log 2>&1; echo "fp8 wire+ring [2] rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed|Error" $L/test_fp8wr2.log | tail -4 | cut -c1-250 ); save
( cd /tmp/srcA && env $P timeout $((585-SECONDS)) python3 -m pytest -q -rfE -p no:cacheprovider -m gpu tests/ops/test_ulysses_pack.py > $L/test_pack.log 2>&1; echo "pack tests rc=$? at $SECONDS s"; tail -2 $L/test_pack.log | cut -c1-250 ); save
echo "done at $SECONDS s"
