#!/usr/bin/env bash
# Session 8 GPU calls. usage: bash /tmp/c.sh STEP...  (steps: build diag err pack uspM vaeM prof uspC vaeC heads benchvae)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logsN; mkdir -p $L; R=$PWD; NG=$(nvidia-smi -L | wc -l)
read CMT CCT < <(tr '\n' ' ' < commits.txt)
save() { tar czf $OUT/n.tgz -C /tmp logsN; }
t() {  # t VARIANT NAME TIMEOUT ARGS...
  local v=$1 n=$2 to=$3; shift 3
  ( cd /tmp/src$v && PYTHONPATH=/tmp/site:/tmp/src$v timeout $to python3 -m pytest -q -rA -p no:cacheprovider "$@" > $L/$n.log 2>&1; echo "$n rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed|Error" $L/$n.log | tail -5 | cut -c1-250 )
  save
}
for s in "$@"; do case $s in
build)
  pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
  for v in M C; do
    rm -rf /tmp/src$v; mkdir -p /tmp/src$v && tar xf head$v.tar -C /tmp/src$v
    ( cd /tmp/src$v && PYTHONPATH=/tmp/site XDIT_OPS_SKIP_SM90=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 \
        python3 setup.py build_ext --inplace > $L/build_$v.log 2>&1; echo $v build rc=$? ) &
  done
  wait; echo "built at $SECONDS s NG=$NG" ;;
diag) ( cd /tmp && cp $R/diag_err2.py /tmp/d.py && PYTHONPATH=/tmp/site:/tmp/srcM timeout 100 python3 /tmp/d.py > $L/diag_err2.log 2>&1; echo diag rc=$?; cut -c1-300 $L/diag_err2.log | head -30 ); save ;;
err) t M test_errors 120 tests/ops/test_ulysses_pack.py tests/ops/test_merge_attention_states.py -m gpu -k "bad" ;;
pack) t M test_pack 200 tests/ops/test_ulysses_pack.py -m gpu ;;
uspM) t M test_usp_M 420 tests/ops/test_usp_attention.py -m multigpu ;;
vaeM) t M test_vae_M 200 tests/models/test_vae.py -k nccl ;;
prof) ( cd /tmp && PYTHONPATH=/tmp/site:/tmp/srcM PROF_OUT=$L cp $R/prof_push.py /tmp/prof_push.py && PYTHONPATH=/tmp/site:/tmp/srcM PROF_OUT=$L timeout 200 torchrun --nproc-per-node=$NG /tmp/prof_push.py > $L/prof.log 2>&1; echo prof rc=$?; grep -v Warning $L/prof.log | cut -c1-180 | head -60 ); save ;;
uspC) t C test_usp_C 420 tests/ops/test_usp_attention.py -m multigpu -k "graph" ;;
vaeC) t C test_vae_C 200 tests/models/test_vae.py -k nccl ;;
heads) ( cd /tmp && cp $R/attn_heads.py /tmp/ah.py && PYTHONPATH=/tmp/site OUT=$L timeout 120 python3 /tmp/ah.py > $L/attn_heads.log 2>&1; echo heads rc=$?; cut -c1-200 $L/attn_heads.log ); save ;;
benchvae) [ "$NG" -ge 4 ] && ( cd /tmp/srcC && PYTHONPATH=/tmp/site:/tmp/srcC XDIT_OPS_GIT_COMMIT=$CCT timeout 200 torchrun --nproc-per-node=4 \
      benchmarks/bench_vae.py --case wan21_vae_81f_832x480 --case flux_vae_2048 --out $L/bench_vae_C > $L/bench_vae_C.log 2>&1; echo vaeC rc=$?
    grep -E "flux_vae|wan21" $L/bench_vae_C.log | tail -4 | cut -c1-200 ); save ;;
host) ( cd /tmp && cp $R/prof_host.py /tmp/ph.py && PYTHONPATH=/tmp/site:/tmp/srcM timeout 150 torchrun --nproc-per-node=$NG /tmp/ph.py > $L/prof_host.log 2>&1; echo host rc=$?; grep -E "===" $L/prof_host.log ); save ;;
host2) ( cd /tmp && cp $R/prof_host2.py /tmp/ph2.py && PYTHONPATH=/tmp/site:/tmp/srcM timeout 120 torchrun --nproc-per-node=$NG /tmp/ph2.py > $L/prof_host2.log 2>&1; echo host2 rc=$?; grep -E "^rank|Error" $L/prof_host2.log ); save ;;
esac; done
save; echo "done at $SECONDS s"
