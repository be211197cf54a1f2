#!/usr/bin/env bash
# Session 7 call 4 (nvidia-h100-x4): do C++ TORCH_CHECK failures of our CUDA ops raise or crash
# (push-overlap's error test segfaulted in call 3)?; the copy-engine transports' GPU test
# (XDIT_OPS_TEST_CE=1: ce Ulysses, ce ring on 2 and 4 GPUs, hybrid 2x2) after the sync fix.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logs4; mkdir -p $L; R=$PWD
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
CM=$(cat commits.txt)
rm -rf /tmp/srcM; mkdir -p /tmp/srcM && tar xf headM.tar -C /tmp/srcM
( cd /tmp/srcM && PYTHONPATH=/tmp/site XDIT_OPS_SKIP_SM90=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 \
    python3 setup.py build_ext --inplace > $L/build_M.log 2>&1; echo M build rc=$? )
save() { tar czf $OUT/c4.tgz -C /tmp logs4; }
cd /tmp/srcM; export PYTHONPATH=/tmp/site:/tmp/srcM
mkdir -p /tmp/diag && cp $R/diag_err.py /tmp/diag/
( cd /tmp && timeout 200 python3 /tmp/diag/diag_err.py > $L/diag_err.log 2>&1; echo "diag rc=$?"; cut -c1-400 $L/diag_err.log )
save
XDIT_OPS_TEST_CE=1 timeout 420 python3 -m pytest -q -p no:cacheprovider tests/ops/test_usp_attention.py -m multigpu \
    -k gpu_matches_single_device -rA > $L/test_usp_ce.log 2>&1; echo "ce test rc=$?"
grep -E "PASSED|FAILED|ERROR|passed|failed|Timeout|File \"/tmp/srcM/xdit" $L/test_usp_ce.log | cut -c1-200 | tail -14
save; echo "done at $SECONDS s"
