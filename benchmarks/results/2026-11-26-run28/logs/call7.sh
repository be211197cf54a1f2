set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logs7; mkdir -p $L
if [ ! -d /tmp/site ]; then pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1; fi
export PYTHONPATH=/tmp/site:$PWD
XDIT_OPS_SKIP_SM90=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > $L/build.log 2>&1; echo build rc=$?
timeout 45 torchrun --nproc-per-node=2 repro.py fix > $L/repro_fix.log 2>&1; echo fix rc=$?; grep -E " ok |Timeout|File \"/work" $L/repro_fix.log | head -12 | cut -c1-200
tar czf $OUT/d.tgz -C /tmp logs7
timeout 100 python3 dbg.py > $L/dbg_cases.log 2>&1; echo cases rc=$?; grep -E "PASSED|FAILED|File \"/work" $L/dbg_cases.log | head -20 | cut -c1-250
tar czf $OUT/d.tgz -C /tmp logs7
timeout 45 torchrun --nproc-per-node=2 repro.py nofix > $L/repro_nofix.log 2>&1; echo nofix rc=$?; grep -E " ok |Timeout|File \"/work" $L/repro_nofix.log | head -12 | cut -c1-200
tar czf $OUT/d.tgz -C /tmp logs7
