#!/usr/bin/env bash
# Session 8 final GPU call (run 34): FP8 wire diag + tests + bench x4, built with the sm_90a module.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logsG; mkdir -p $L; R=$PWD; NG=$(nvidia-smi -L | wc -l); CMT=$(head -1 commits.txt)
save() { tar czf $OUT/g.tgz -C /tmp logsG; }
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
mkdir -p /tmp/srcS && tar xf headM.tar -C /tmp/srcS
( cd /tmp/srcS && PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > $L/build_S.log 2>&1; echo S build rc=$? at $SECONDS s )
#: skip diag ( cd /tmp && cp $R/diag_wire.py /tmp/dw.py && PYTHONPATH=/tmp/site:/tmp/srcS timeout 150 torchrun --nproc-per-node=$NG /tmp/dw.py > $L/diag_wire.log 2>&1; echo diag rc=$? at $SECONDS s; grep -E "^impl|Error" $L/diag_wire.log | cut -c1-300 ); save
( cd /tmp/srcS && PYTHONPATH=/tmp/site:/tmp/srcS timeout 200 python3 -m pytest -q -rA -p no:cacheprovider tests/ops/test_usp_fp8_wire.py -m "gpu or multigpu" > $L/wire_S.log 2>&1; echo "wire rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed|AssertionError" $L/wire_S.log | sort | uniq | tail -8 | cut -c1-250 ); save
( cd /tmp/srcS && PYTHONPATH=/tmp/site:/tmp/srcS XDIT_OPS_GIT_COMMIT=$CMT timeout 260 torchrun --nproc-per-node=$NG benchmarks/bench_usp.py --backend fp8 --configs ulysses,ulysses-nccl,ulysses-fp8wire --no-yunchang --no-host --out $L/bench > $L/bench_usp_fp8.log 2>&1; echo "bench rc=$? at $SECONDS s"; grep -vE "Warning|warn|^W1|\*\*\*" $L/bench_usp_fp8.log | tail -16 | cut -c1-230 ); save
( cd /tmp && cp $R/prof_push.py /tmp/pp.py && PYTHONPATH=/tmp/site:/tmp/srcS PROF_OUT=$L PROF_MODE=ring timeout 120 torchrun --nproc-per-node=$NG /tmp/pp.py > $L/prof_ring.log 2>&1; echo ring prof rc=$? at $SECONDS s; grep -vE "Warning|warn|^W1|\*\*\*" $L/prof_ring.log | cut -c1-170 | head -60 ); save
if [ -f $R/pushbench.py ]; then ( cd /tmp && cp $R/pushbench.py /tmp/pb.py && OUT_DIR=$L PYTHONPATH=/tmp/site timeout 120 torchrun --nproc-per-node=$NG /tmp/pb.py > $L/pushbench.log 2>&1; echo pushbench rc=$? at $SECONDS s; grep -vE "Warning|warn|^W1|\*\*\*" $L/pushbench.log | tail -30 | cut -c1-200 ); save; fi
echo "done at $SECONDS s"
