#!/usr/bin/env bash
# Session 13, last call on 2 GPUs: build, bench_usp_host, bench_usp at all three shapes (2-GPU rows).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
timeout 200 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site XDIT_OPS_GIT_COMMIT=$CMT
timeout 100 torchrun --standalone --nproc-per-node=2 benchmarks/bench_usp_host.py --out $OUT > $L/bench_usp_host.log 2>&1; echo "host bench rc=$? at $SECONDS s"; tail -4 $L/bench_usp_host.log | cut -c1-300; save
timeout 270 torchrun --standalone --nproc-per-node=2 benchmarks/bench_usp.py --shapes all --no-yunchang --configs ulysses,ring --out $OUT > $L/bench_usp.log 2>&1; echo "bench rc=$? at $SECONDS s"; grep -A8 "host time" $L/bench_usp.log | cut -c1-220; grep "xdit_ops " $L/bench_usp.log | head -8 | cut -c1-200; save
