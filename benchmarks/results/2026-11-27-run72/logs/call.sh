#!/usr/bin/env bash
# Session 15, a call on 4 GPUs: branch hybrid-push (the 2 x 2 hybrid's Ulysses exchange by the
# push, so its eager calls replay a call graph). Build; hybrid_check.py (against the single
# device); test_usp_graph's hybrid id; bench_usp at 4608 and 16896, hybrid only.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt; NG=$(nvidia-smi -L | wc -l)
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
timeout 200 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
timeout 100 python3 benchmarks/results/2026-11-27-run72/logs/hybrid_check.py > $L/hybrid_check.log 2>&1; echo "hybrid check rc=$? at $SECONDS s"; grep -E "hybrid 2x2|Error|assert" $L/hybrid_check.log | head -6 | cut -c1-300; save
timeout 60 torchrun --standalone --nproc-per-node=$NG benchmarks/bench_usp.py --shapes 0,1 --no-yunchang --configs hybrid --out $OUT > $L/bench_usp.log 2>&1; echo "bench_usp rc=$? at $SECONDS s"; grep -E "xdit_ops|single-GPU" $L/bench_usp.log | head -6 | cut -c1-220; save
timeout 60 python3 -m pytest -q -rfEs -p no:cacheprovider "tests/ops/test_usp_graph.py::test_usp_gpu_graph_replay_equals_eager[4-hybrid]" > $L/test_graph_hybrid.log 2>&1; echo "graph hybrid test rc=$? at $SECONDS s"; tail -2 $L/test_graph_hybrid.log | cut -c1-250; save
