set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logs2; mkdir -p $L
cd /tmp/srcV
export PYTHONPATH=/tmp/site:/tmp/srcV XDIT_OPS_GIT_COMMIT=58e495c+vae-upsample-patch
timeout 200 torchrun --nproc-per-node=2 benchmarks/bench_vae.py --case flux_vae_8192 --iters 1 --skip-serial --out $L/bench_8192 > $L/bench_vae_8192_x2.log 2>&1; echo 8192 rc=$?
grep -iE "flux_vae_8192|out of memory|peak" $L/bench_vae_8192_x2.log | tail -8 | cut -c1-300
tar czf $OUT/v.tgz -C /tmp logs2
XDIT_OPS_TEST_VAE_CASES=kl,wan,qwen timeout 150 python3 -m pytest -q -s tests/models/test_vae.py -m gpu -p no:cacheprovider > $L/test_vae.log 2>&1; echo test rc=$?; tail -2 $L/test_vae.log | cut -c1-300
tar czf $OUT/v.tgz -C /tmp logs2
timeout 200 torchrun --nproc-per-node=2 benchmarks/bench_vae.py --case flux_vae_2048 --case flux_vae_4096 --out $L/bench_flux > $L/bench_vae_flux_x2.log 2>&1; echo flux rc=$?
grep -E "flux_vae" $L/bench_vae_flux_x2.log | tail -8 | cut -c1-300
echo "done at $SECONDS s"
tar czf $OUT/v.tgz -C /tmp logs2
