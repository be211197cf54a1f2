set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logs6; mkdir -p $L
if [ ! -d /tmp/site ]; then pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1; fi
export PYTHONPATH=/tmp/site:$PWD
XDIT_OPS_SKIP_SM90=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > $L/build.log 2>&1; echo build rc=$?
timeout 80 python3 dbg.py graph > $L/dbg_graph.log 2>&1; echo graph rc=$?; grep -E "PASSED|FAILED|Error|File \"/" $L/dbg_graph.log | grep -v site-packages | head -30 | cut -c1-250
tar czf $OUT/d.tgz -C /tmp logs6
timeout 120 python3 dbg.py cases > $L/dbg_cases.log 2>&1; echo cases rc=$?; grep -E "PASSED|FAILED|Error|Thread|File \"/" $L/dbg_cases.log | head -60 | cut -c1-250
tar czf $OUT/d.tgz -C /tmp logs6
