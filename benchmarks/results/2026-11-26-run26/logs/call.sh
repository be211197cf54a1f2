set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logs4; mkdir -p $L
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD XDIT_OPS_GIT_COMMIT=$(cat commit.txt)
XDIT_OPS_SKIP_SM90=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > $L/build.log 2>&1; echo build rc=$?
timeout 120 python3 -m pytest -q -x tests/ops/test_ulysses_pack.py -m gpu -k push -p no:cacheprovider > $L/test_push_kernels.log 2>&1; echo kernels rc=$?; tail -1 $L/test_push_kernels.log
timeout 300 python3 -m pytest -q -x tests/ops/test_usp_attention.py -m multigpu -k "matches_single_device and 2 or graph_push" -p no:cacheprovider > $L/test_usp_gpu.log 2>&1; echo usp rc=$?; tail -3 $L/test_usp_gpu.log | cut -c1-300
tar czf $OUT/r.tgz -C /tmp logs4
timeout 240 torchrun --nproc-per-node=2 benchmarks/bench_usp.py --configs ulysses,ulysses-push --no-yunchang --out $L/bench > $L/bench_usp_x2.log 2>&1; echo bench rc=$?
grep -E "shape|ulysses" $L/bench_usp_x2.log | cut -c1-200
tar czf $OUT/r.tgz -C /tmp logs4
