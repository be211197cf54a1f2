#!/usr/bin/env bash
# Session 7 call 2 (nvidia-h100-x4): bench_vae x4 (all default cases, then Flux 8192^2 without
# serial) at main; the usp NCCL test of auto-push (its default transport is the push).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logs2; mkdir -p $L
nvidia-smi --query-gpu=name,memory.total --format=csv > $L/gpus.txt
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
read CM CA < <(tr '\n' ' ' < commits.txt)
for v in M A; do
  [ -f /tmp/src$v/setup.py ] && ls /tmp/src$v/xdit_ops/_C*.so > /dev/null 2>&1 && { echo "$v kept"; continue; }
  mkdir -p /tmp/src$v && tar xf head$v.tar -C /tmp/src$v
  ( cd /tmp/src$v && PYTHONPATH=/tmp/site XDIT_OPS_SKIP_SM90=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 \
      python3 setup.py build_ext --inplace > $L/build_$v.log 2>&1; echo $v build rc=$? ) &
done
wait
echo "built at $SECONDS s"
save() { tar czf $OUT/c2.tgz -C /tmp logs2; }
( cd /tmp/srcM && PYTHONPATH=/tmp/site:/tmp/srcM XDIT_OPS_GIT_COMMIT=$CM timeout 330 torchrun --nproc-per-node=4 \
    benchmarks/bench_vae.py --out $L/bench_vae_x4 > $L/bench_vae_x4.log 2>&1; echo vae rc=$?
  grep -E "flux_vae|wan21" $L/bench_vae_x4.log | tail -8 | cut -c1-300 )
save; echo "vae at $SECONDS s"
( cd /tmp/srcM && PYTHONPATH=/tmp/site:/tmp/srcM XDIT_OPS_GIT_COMMIT=$CM timeout $((470 - SECONDS)) torchrun --nproc-per-node=4 \
    benchmarks/bench_vae.py --case flux_vae_8192 --iters 1 --skip-serial --out $L/bench_vae_8192_x4 > $L/bench_vae_8192_x4.log 2>&1; echo 8192 rc=$?
  grep -iE "flux_vae_8192|out of memory" $L/bench_vae_8192_x4.log | tail -4 | cut -c1-300 )
save; echo "8192 at $SECONDS s"
( cd /tmp/srcA && PYTHONPATH=/tmp/site:/tmp/srcA timeout $((580 - SECONDS)) python3 -m pytest -q -p no:cacheprovider \
    tests/ops/test_usp_attention.py -m multigpu -k "gpu_matches_single_device or graph" -rA \
    > $L/test_usp_A.log 2>&1; echo "test A rc=$?"; grep -E "PASSED|FAILED|ERROR|passed|failed" $L/test_usp_A.log | cut -c1-200 | tail -8 )
save; echo "done at $SECONDS s"
