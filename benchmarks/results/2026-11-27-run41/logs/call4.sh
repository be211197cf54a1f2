#!/usr/bin/env bash
# Session 10 call 4 (run 41, warm machine): memops test fixed; bench_usp ulysses v2 vs v3 push-out; profile overlap vs push at 16896.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logsD; mkdir -p $L; NG=$(nvidia-smi -L | wc -l); CMT=$(head -1 commitsC.txt)
save() { tar czf $OUT/d.tgz -C /tmp logsD; }
cp s10_prof_overlap.py /tmp/
cp tests/ops/test_stream_memops.py /tmp/srcC/tests/ops/test_stream_memops.py
P="PYTHONPATH=/tmp/site:/tmp/srcC XDIT_OPS_GIT_COMMIT=$CMT"
( cd /tmp/srcC && env $P timeout 60 python3 -m pytest -q -rfE -p no:cacheprovider -m gpu tests/ops/test_stream_memops.py > $L/test_memops.log 2>&1; echo "memops tests rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed|Error" $L/test_memops.log | tail -5 | cut -c1-250 ); save
for V in v2 v3; do
( cd /tmp/srcC && env $P XDIT_OPS_PUSH_KERNEL=$V timeout 100 torchrun --standalone --nproc-per-node=$NG benchmarks/bench_usp.py --configs ulysses --no-yunchang --no-host --out $L/bench_$V > $L/bench_usp_$V.log 2>&1; echo "bench_usp $V rc=$? at $SECONDS s"; grep -E "xdit_ops" $L/bench_usp_$V.log | head -3 | cut -c1-200 ); save
done
( cd /tmp/srcC && env $P timeout 100 torchrun --standalone --nproc-per-node=$NG /tmp/s10_prof_overlap.py $L > $L/prof_overlap.log 2>&1; echo "prof rc=$? at $SECONDS s"; grep -E "===|ulysses|attention|Memcpy|memops|cudnn|sm90|Kernel" $L/prof_overlap.log | head -40 | cut -c1-200 ); save
gzip -f $L/trace_*.json 2>/dev/null; save
echo "done at $SECONDS s"
