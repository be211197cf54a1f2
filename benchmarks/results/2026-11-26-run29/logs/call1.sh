#!/usr/bin/env bash
# Session 7 call 1 (nvidia-h100-x4): verify the symmetric-memory sync fix on 2 and 4 GPUs
# (push-first usp NCCL test), then bench_usp x4 of auto-push (ulysses = auto = push) with yunchang.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logs1; mkdir -p $L
nvidia-smi --query-gpu=name,memory.total --format=csv > $L/gpus.txt; nvidia-smi topo -m >> $L/gpus.txt 2>&1
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
read CM CA < <(tr '\n' ' ' < commits.txt)
for v in M A; do
  mkdir -p /tmp/src$v && tar xf head$v.tar -C /tmp/src$v
  ( cd /tmp/src$v && PYTHONPATH=/tmp/site XDIT_OPS_SKIP_SM90=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 \
      python3 setup.py build_ext --inplace > $L/build_$v.log 2>&1; echo $v build rc=$? ) &
done
wait
echo "built at $SECONDS s"
save() { tar czf $OUT/c1.tgz -C /tmp logs1; }
( cd /tmp/srcM && PYTHONPATH=/tmp/site:/tmp/srcM timeout 330 python3 -m pytest -q -p no:cacheprovider \
    tests/ops/test_usp_attention.py -m multigpu -k "gpu_matches_single_device or graph" -rA \
    > $L/test_usp_M.log 2>&1; echo "test M rc=$?"; grep -E "PASSED|FAILED|ERROR|passed|failed" $L/test_usp_M.log | cut -c1-200 | tail -8 )
save; echo "tested at $SECONDS s"
( cd /tmp/srcA && PYTHONPATH=/tmp/site:/tmp/srcA XDIT_OPS_GIT_COMMIT=$CA timeout $((575 - SECONDS)) torchrun --nproc-per-node=4 \
    benchmarks/bench_usp.py --configs ulysses,ulysses-nccl,ring,ring-nccl,hybrid --out $L/bench_x4 \
    > $L/bench_usp_x4.log 2>&1; echo bench rc=$?; grep -E "^shape \(|xdit_ops|yunchang" $L/bench_usp_x4.log | cut -c1-170 )
save; echo "done at $SECONDS s"
