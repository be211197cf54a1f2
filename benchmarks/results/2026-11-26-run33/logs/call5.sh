#!/usr/bin/env bash
# Session 8 final GPU call: FP8 wire (tests, bench x4 with and without the sm_90a module), host split of the push.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logsF; mkdir -p $L; R=$PWD; NG=$(nvidia-smi -L | wc -l); CMT=$(cat commits.txt | head -1)
save() { tar czf $OUT/f.tgz -C /tmp logsF; }
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
mkdir -p /tmp/srcM /tmp/srcS && tar xf headM.tar -C /tmp/srcM && tar xf headM.tar -C /tmp/srcS
( cd /tmp/srcS && S0=$SECONDS && PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > $L/build_S.log 2>&1; echo "S build rc=$? in $((SECONDS-S0)) s" > $L/build_S.done ) &
( cd /tmp/srcM && PYTHONPATH=/tmp/site XDIT_OPS_SKIP_SM90=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=8 python3 setup.py build_ext --inplace > $L/build_M.log 2>&1; echo M build rc=$? at $SECONDS s )
t() {  # t VARIANT NAME TIMEOUT ARGS...
  local v=$1 n=$2 to=$3; shift 3
  ( cd /tmp/src$v && PYTHONPATH=/tmp/site:/tmp/src$v timeout $to python3 -m pytest -q -rA -p no:cacheprovider "$@" > $L/$n.log 2>&1; echo "$n rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed|Error" $L/$n.log | tail -6 | cut -c1-250 )
  save
}
t M wire_M 200 tests/ops/test_usp_fp8_wire.py -m "gpu or multigpu"
( cd /tmp && cp $R/prof_host2.py /tmp/ph2.py && PYTHONPATH=/tmp/site:/tmp/srcM timeout 90 torchrun --nproc-per-node=$NG /tmp/ph2.py > $L/prof_host2.log 2>&1; echo host2 rc=$?; grep -E "^rank|Error" $L/prof_host2.log | cut -c1-250 ); save
for i in $(seq 1 60); do [ -f $L/build_S.done ] && break; sleep 3; done; cat $L/build_S.done 2>/dev/null || echo "S build not done at $SECONDS s"
V=M; grep -q "rc=0" $L/build_S.done 2>/dev/null && V=S
( cd /tmp/src$V && PYTHONPATH=/tmp/site:/tmp/src$V XDIT_OPS_GIT_COMMIT=$CMT timeout 240 torchrun --nproc-per-node=$NG benchmarks/bench_usp.py --backend fp8 --configs ulysses,ulysses-nccl,ulysses-fp8wire --no-yunchang --no-host --out $L/bench > $L/bench_usp_fp8_$V.log 2>&1; echo "bench ($V) rc=$? at $SECONDS s"; grep -vE "Warning|warn|^W1|\*\*\*" $L/bench_usp_fp8_$V.log | tail -14 | cut -c1-220 ); save
[ $V = S ] && t S wire_S 150 tests/ops/test_usp_fp8_wire.py -m "multigpu"
save; echo "done at $SECONDS s"
