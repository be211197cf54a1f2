#!/usr/bin/env bash
# Session 17, 4 GPUs (issue 3): branch ring-host (the fast path's key without K/V shapes, the
# switches found absent by one set test, _plain's functions bound once; the barrier ring's call
# graph with its static K/V in the ring's first buffer, no fill copies). Build; the A/B of the
# host time against the base (this patch reversed in a copy of the package), twice in turn;
# the call graphs' nodes (both); the GPU tests of the changed paths; bench_usp at 4608 (both).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt; NG=$(nvidia-smi -L | wc -l)
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
D=benchmarks/results/2026-11-27-run85/logs
timeout 240 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
rm -rf /tmp/base; mkdir -p /tmp/base; cp -r xdit_ops benchmarks /tmp/base/
R=$(pwd)
(cd /tmp/base && patch -R -p1 < $R/$D/ring_host.patch > $L/patch.log 2>&1); echo "patch rc=$?"; grep -c "_NO_SWITCHES" /tmp/base/xdit_ops/ops/usp_attention.py xdit_ops/ops/usp_attention.py
(cd /tmp/base && PYTHONPATH=/tmp/site:/tmp/base python3 -c "import xdit_ops.ops.usp_attention as u, sys; print('base imports', sys.modules['xdit_ops.ops.usp_attention'].__file__, hasattr(sys.modules['xdit_ops.ops.usp_attention'], '_NO_SWITCHES'))")
for i in 1 2; do
  timeout 80 torchrun --standalone --nproc-per-node=$NG benchmarks/bench_usp_host.py --out $OUT/new$i > $L/host_new$i.log 2>&1; echo "host new$i rc=$?"
  (cd /tmp/base && PYTHONPATH=/tmp/site:/tmp/base timeout 80 torchrun --standalone --nproc-per-node=$NG benchmarks/bench_usp_host.py --out $OUT/base$i > $L/host_base$i.log 2>&1; echo "host base$i rc=$?")
  grep -hE "^\| *\[|ulysses|ring" $L/host_new$i.log $L/host_base$i.log | grep -v Warn | cut -c1-200 | head -8
done; save
OUT=$OUT/new timeout 60 torchrun --standalone --nproc-per-node=$NG $D/graph_nodes.py > $L/nodes_new.log 2>&1; echo "nodes new rc=$?"; grep -vE "^W1|Warn|warn" $L/nodes_new.log | head -60 | cut -c1-160
(cd /tmp/base && mkdir -p $OUT/base && OUT=$OUT/base PYTHONPATH=/tmp/site:/tmp/base timeout 60 torchrun --standalone --nproc-per-node=$NG $R/$D/graph_nodes.py > $L/nodes_base.log 2>&1; echo "nodes base rc=$?"); grep -E "^(ring|ulysses) " $L/nodes_base.log; save
G=tests/ops/test_usp_graph.py
timeout 280 python3 -m pytest -v -rfEs -p no:cacheprovider "$G::test_usp_gpu_ring_graph_statics_are_the_ring_buffer" "$G::test_usp_gpu_graph_replay_equals_eager[4-ce]" "$G::test_usp_gpu_graph_replay_equals_eager[2-ce]" "$G::test_usp_gpu_graph_replay_equals_eager[4-ceflags]" "$G::test_usp_gpu_graph_replay_equals_eager[4-hybrid]" "$G::test_usp_gpu_graph_replay_equals_eager[4-push]" "$G::test_usp_gpu_graph_replay_equals_eager[4-overlap]" tests/ops/test_graph_call.py > $L/tests.log 2>&1; echo "tests rc=$? at $SECONDS s"; grep -E "passed|failed|FAILED|PASSED" $L/tests.log | cut -c1-200 | tail -14; save
timeout 100 torchrun --standalone --nproc-per-node=$NG benchmarks/bench_usp.py --shapes 0 --configs ulysses,ring --no-yunchang --out $OUT/new > $L/bench_new.log 2>&1; echo "bench new rc=$?"
(cd /tmp/base && PYTHONPATH=/tmp/site:/tmp/base timeout 100 torchrun --standalone --nproc-per-node=$NG benchmarks/bench_usp.py --shapes 0 --configs ulysses,ring --no-yunchang --out $OUT/base > $L/bench_base.log 2>&1; echo "bench base rc=$?")
grep -hE "ulysses|ring" $L/bench_new.log $L/bench_base.log | grep -vE "Warn|warn" | cut -c1-220 | head -12; save
echo "done at $SECONDS s"
