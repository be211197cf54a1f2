#!/usr/bin/env bash
# Session 9 call 5 (run 39): fp8_attention eager host profile; FP8 wire/ring GPU tests [2] with the shared graph check.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logsL; mkdir -p $L; R=$PWD
save() { tar czf $OUT/l.tgz -C /tmp logsL; }
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
mkdir -p /tmp/srcL && tar xf headL.tar -C /tmp/srcL
( cd /tmp/srcL && PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > $L/build_L.log 2>&1; echo L build rc=$? at $SECONDS s )
( cd /tmp && cp $R/prof_fp8host.py /tmp/pf.py && SRC=/tmp/srcL PYTHONPATH=/tmp/site:/tmp/srcL timeout 40 python3 /tmp/pf.py > $L/prof_fp8host.log 2>&1; echo "prof rc=$? at $SECONDS s"; grep "===" $L/prof_fp8host.log ); save
P="PYTHONPATH=/tmp/site:/tmp/srcL"
( cd /tmp/srcL && env $P timeout 60 python3 -m pytest -x -q -rfE -s -p no:cacheprovider "tests/ops/test_usp_fp8_wire.py::test_usp_fp8_wire_gpu[2]" > $L/test_fp8wire2.log 2>&1; echo "fp8 wire [2] rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed" $L/test_fp8wire2.log | tail -3 | cut -c1-200 ); save
( cd /tmp/srcL && env $P timeout $((185-SECONDS)) python3 -m pytest -x -q -rfE -s -p no:cacheprovider "tests/ops/test_usp_fp8_ring.py::test_usp_fp8_ring_gpu[2]" > $L/test_fp8ring2.log 2>&1; echo "fp8 ring [2] rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed" $L/test_fp8ring2.log | tail -3 | cut -c1-200 ); save
echo "done at $SECONDS s"
