set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logs5; mkdir -p $L
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD XDIT_OPS_GIT_COMMIT=$(cat commit.txt)
TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > $L/build.log 2>&1; echo build rc=$?; ls xdit_ops/*.so
timeout 200 python3 -m pytest -q -x tests/ops/test_usp_attention.py -m multigpu -k "matches_single_device and 2 or graph_push" -p no:cacheprovider > $L/test_usp_gpu.log 2>&1; echo usp rc=$?; tail -2 $L/test_usp_gpu.log | cut -c1-300
tar czf $OUT/r.tgz -C /tmp logs5
timeout 270 torchrun --nproc-per-node=2 benchmarks/bench_usp.py --configs ulysses,ulysses-nccl,ring,ring-nccl --out $L/bench > $L/bench_usp_x2.log 2>&1; echo bench rc=$?
grep -E "^shape \(|xdit_ops|yunchang" $L/bench_usp_x2.log | head -24 | cut -c1-160
tar czf $OUT/r.tgz -C /tmp logs5
timeout 120 torchrun --nproc-per-node=2 benchmarks/bench_usp.py --configs ulysses --backend fp8 --no-host --no-yunchang --out $L/bench_fp8 > $L/bench_usp_fp8_x2.log 2>&1; echo fp8 rc=$?
grep -E "^shape \(|xdit_ops|fp8" $L/bench_usp_fp8_x2.log | head -12 | cut -c1-160
echo "done at $SECONDS s"
tar czf $OUT/r.tgz -C /tmp logs5
