#!/usr/bin/env bash
# Session 7 call 3 (nvidia-h100-x4): push-overlap (po-rebased: main + XDIT_OPS_USP_CHUNKS for the
# push): kernel GPU twins, every multigpu usp test, then bench_usp x4 and x2 A/B (push vs push-c2).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logs3; mkdir -p $L
nvidia-smi --query-gpu=name,memory.total --format=csv > $L/gpus.txt
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
CP=$(cat commitP.txt)
rm -rf /tmp/srcP; mkdir -p /tmp/srcP && tar xf headP.tar -C /tmp/srcP
( cd /tmp/srcP && PYTHONPATH=/tmp/site XDIT_OPS_SKIP_SM90=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 \
    python3 setup.py build_ext --inplace > $L/build_P.log 2>&1; echo P build rc=$? )
echo "built at $SECONDS s"
save() { tar czf $OUT/c3.tgz -C /tmp logs3; }
cd /tmp/srcP; export PYTHONPATH=/tmp/site:/tmp/srcP
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/ops/test_ulysses_pack.py -m gpu -k push \
    > $L/test_pack_P.log 2>&1; echo "pack rc=$?"; tail -1 $L/test_pack_P.log | cut -c1-200
save
timeout 330 python3 -m pytest -q -p no:cacheprovider tests/ops/test_usp_attention.py -m multigpu -rA \
    > $L/test_usp_P.log 2>&1; echo "usp rc=$?"; grep -E "PASSED|FAILED|ERROR|passed|failed" $L/test_usp_P.log | cut -c1-200 | tail -10
save; echo "tested at $SECONDS s"
XDIT_OPS_GIT_COMMIT=$CP timeout $((500 - SECONDS)) torchrun --nproc-per-node=4 benchmarks/bench_usp.py \
    --configs ulysses,ulysses-push,ulysses-push-c2 --no-yunchang --out $L/bench_x4 > $L/bench_usp_P_x4.log 2>&1
echo "bench x4 rc=$?"; grep -E "^shape \(|xdit_ops" $L/bench_usp_P_x4.log | head -12 | cut -c1-170
save
CUDA_VISIBLE_DEVICES=0,1 XDIT_OPS_GIT_COMMIT=$CP timeout $((585 - SECONDS)) torchrun --nproc-per-node=2 benchmarks/bench_usp.py \
    --configs ulysses,ulysses-push-c2 --no-yunchang --out $L/bench_x2 > $L/bench_usp_P_x2.log 2>&1
echo "bench x2 rc=$?"; grep -E "^shape \(|xdit_ops" $L/bench_usp_P_x2.log | head -9 | cut -c1-170
save; echo "done at $SECONDS s"
