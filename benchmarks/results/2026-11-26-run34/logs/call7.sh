#!/usr/bin/env bash
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
mkdir -p /tmp/s && tar xf headM.tar -C /tmp/s && cd /tmp/s
PYTHONPATH=/tmp/site XDIT_OPS_SKIP_SM90=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1; echo build rc=$? at $SECONDS
PYTHONPATH=/tmp/site:/tmp/s timeout 75 python3 -m pytest -x -q -s -p no:cacheprovider "tests/ops/test_usp_fp8_wire.py::test_usp_fp8_wire_gpu[2]" > $OUT/wire2.log 2>&1; echo wire rc=$? at $SECONDS
grep -E "Error|assert|FAILED|passed|failed" $OUT/wire2.log | head -20 | cut -c1-300
