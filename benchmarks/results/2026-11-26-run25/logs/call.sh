set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logs3; mkdir -p $L; R=$PWD
if [ ! -f /tmp/srcO/xdit_ops/_C.cpython-312-x86_64-linux-gnu.so ]; then
  pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
  mkdir -p /tmp/srcO && tar xf headO.tar -C /tmp/srcO
  (cd /tmp/srcO && PYTHONPATH=/tmp/site XDIT_OPS_SKIP_SM90=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > $L/build.log 2>&1; echo build rc=$?)
fi
cd /tmp/srcO && export PYTHONPATH=/tmp/site:/tmp/srcO
timeout 240 torchrun --nproc-per-node=2 $R/prof/prof_uly_gpu.py > $L/prof_uly_gpu.log 2>&1; echo prof rc=$?
grep -v Warning $L/prof_uly_gpu.log | tail -60 | cut -c1-200
tar czf $OUT/p.tgz -C /tmp logs3
