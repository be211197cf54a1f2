#!/usr/bin/env bash
# Session 9 call 2 (run 36): merge vector kernels + push v2: GPU tests, microbenches, bench_usp A/B.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logsG; mkdir -p $L; R=$PWD; NG=$(nvidia-smi -L | wc -l); CMT=$(head -1 commitsI.txt)
nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/g.tgz -C /tmp logsG; }
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
mkdir -p /tmp/srcI && tar xf headI.tar -C /tmp/srcI
( cd /tmp/srcI && PYTHONPATH=/tmp/site XDIT_OPS_SKIP_SM90=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > $L/build_I.log 2>&1; echo I build rc=$? at $SECONDS s )
P="PYTHONPATH=/tmp/site:/tmp/srcI XDIT_OPS_GIT_COMMIT=$CMT"
( cd /tmp/srcI && env $P timeout 100 python3 -m pytest -q -rfE -p no:cacheprovider -m gpu tests/ops/test_merge_attention_partials.py tests/ops/test_merge_attention_states.py > $L/test_merge.log 2>&1; echo "merge tests rc=$? at $SECONDS s"; tail -3 $L/test_merge.log | cut -c1-250 ); save
( cd /tmp/srcI && env $P timeout 60 python3 benchmarks/bench_merge.py --out $L/bench > $L/bench_merge.log 2>&1; echo "bench_merge rc=$? at $SECONDS s"; grep -vE "Warning|warn" $L/bench_merge.log | tail -14 | cut -c1-220 ); save
( cd /tmp/srcI && env $P timeout 110 python3 -m pytest -q -rfE -p no:cacheprovider -m gpu tests/ops/test_ulysses_pack.py > $L/test_pack.log 2>&1; echo "pack tests rc=$? at $SECONDS s"; tail -3 $L/test_pack.log | cut -c1-250 ); save
( cd /tmp/srcI && env $P timeout 100 torchrun --standalone --nproc-per-node=$NG benchmarks/bench_ulysses_push.py --out $L/bench > $L/bench_push.log 2>&1; echo "bench_push rc=$? at $SECONDS s"; grep -vE "Warning|warn|^W1|\*\*\*" $L/bench_push.log | tail -16 | cut -c1-220 ); save
( cd /tmp/srcI && env $P timeout 130 python3 -m pytest -q -rfE -s -p no:cacheprovider tests/ops/test_usp_attention.py -m multigpu > $L/test_usp_I.log 2>&1; echo "usp tests rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed" $L/test_usp_I.log | tail -4 | cut -c1-250 ); save
for V in old new; do
  if [ $V = old ]; then E="XDIT_OPS_PUSH_KERNEL=v1 XDIT_OPS_MERGE_IMPL=scalar"; else E="XDIT_OPS_PUSH_KERNEL=v2 XDIT_OPS_MERGE_IMPL=auto"; fi
  [ $SECONDS -gt 500 ] && break
  ( cd /tmp/srcI && env $P $E timeout 90 torchrun --standalone --nproc-per-node=$NG benchmarks/bench_usp.py --configs ulysses,ring --no-yunchang --no-host --out $L/bench_usp_$V > $L/bench_usp_$V.log 2>&1; echo "bench_usp $V rc=$? at $SECONDS s"; grep -E "^\[1" $L/bench_usp_$V.log | head -6 | cut -c1-160 ); save
done
echo "done at $SECONDS s"
