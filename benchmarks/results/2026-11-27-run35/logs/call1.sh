#!/usr/bin/env bash
# Session 9 call 1 (run 35): nostack ring GPU tests + ring bench A/B, FP8-wire diag.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logsG; mkdir -p $L; R=$PWD; NG=$(nvidia-smi -L | wc -l); CMT=$(head -1 commits.txt)
nvidia-smi -L > $L/gpus.txt; nvidia-smi topo -m >> $L/gpus.txt
save() { tar czf $OUT/g.tgz -C /tmp logsG; }
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
mkdir -p /tmp/srcS && tar xf headM.tar -C /tmp/srcS
( cd /tmp/srcS && PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > $L/build_S.log 2>&1; echo S build rc=$? at $SECONDS s )
cp -r /tmp/srcS /tmp/srcO && cp $R/usp_stack.py /tmp/srcO/xdit_ops/ops/usp_attention.py
( cd /tmp/srcS && PYTHONPATH=/tmp/site:/tmp/srcS timeout 170 python3 -m pytest -q -rA -s -p no:cacheprovider tests/ops/test_usp_attention.py -m multigpu > $L/test_usp_S.log 2>&1; echo "usp tests rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed|Error" $L/test_usp_S.log | sort | uniq | tail -8 | cut -c1-250 ); save
for V in S O; do ( cd /tmp/src$V && PYTHONPATH=/tmp/site:/tmp/src$V XDIT_OPS_GIT_COMMIT=$CMT-$V timeout 130 torchrun --nproc-per-node=$NG benchmarks/bench_usp.py --configs ring --no-yunchang --out $L/bench_$V > $L/bench_ring_$V.log 2>&1; echo "bench $V rc=$? at $SECONDS s"; grep -vE "Warning|warn|^W1|\*\*\*" $L/bench_ring_$V.log | tail -8 | cut -c1-230 ); save; done
( cd /tmp && cp $R/diag_wire2.py /tmp/dw2.py && SRC=/tmp/srcS PYTHONPATH=/tmp/site:/tmp/srcS timeout 170 torchrun --nproc-per-node=2 /tmp/dw2.py auto triton > $L/diag_wire2.log 2>&1; echo diag rc=$? at $SECONDS s; grep -E "OK|FAILED|Error|rror:|done" $L/diag_wire2.log | head -20 | cut -c1-300 ); save
echo "done at $SECONDS s"
