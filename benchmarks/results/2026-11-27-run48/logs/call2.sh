#!/usr/bin/env bash
# Session 12 call 2 (run 48): main with the op's own call graph (XDIT_OPS_USP_GRAPH); quantizer launch sweep.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logsB; mkdir -p $L; NG=$(nvidia-smi -L | wc -l); CMT=$(head -1 commitsB.txt)
nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/b.tgz -C /tmp logsB; }
left() { echo $(( 560 - SECONDS )); }
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
rm -rf /tmp/srcB; mkdir -p /tmp/srcB && tar xf headB.tar -C /tmp/srcB; cp s12_qsweep.py /tmp/srcB/
( cd /tmp/srcB && PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > $L/build_B.log 2>&1; echo B build rc=$? at $SECONDS s ); save
P="PYTHONPATH=/tmp/site:/tmp/srcB XDIT_OPS_GIT_COMMIT=$CMT SRC=/tmp/srcB"
cd /tmp/srcB
T=tests/ops/test_usp_graph.py
( env $P timeout 200 python3 -m pytest -q -rfE -p no:cacheprovider "$T::test_usp_gpu_graph_replay_equals_eager" -k "4-" > $L/test_graph4.log 2>&1; echo "graph tests x4 rc=$? at $SECONDS s"; grep -E "FAILED|ERROR|passed|failed" $L/test_graph4.log | tail -8 | cut -c1-300 ); save
( env $P XDIT_OPS_USP_GRAPH=0 timeout 60 torchrun --standalone --nproc-per-node=$NG benchmarks/bench_usp.py --shapes 0 --configs ulysses,ring --no-yunchang --out $L/bench0 > $L/bench_usp_g0.log 2>&1; echo "bench_usp graph=0 rc=$? at $SECONDS s"; grep -E "xdit_ops|host" $L/bench_usp_g0.log | head -8 | cut -c1-220 ); save
( env $P timeout 60 torchrun --standalone --nproc-per-node=$NG benchmarks/bench_usp.py --shapes 0 --configs ulysses,ring --no-yunchang --out $L/bench > $L/bench_usp_auto.log 2>&1; echo "bench_usp graph=auto rc=$? at $SECONDS s"; grep -E "xdit_ops|host" $L/bench_usp_auto.log | head -8 | cut -c1-220 ); save
( env $P timeout 90 python3 s12_qsweep.py $L/qsweep.json > $L/qsweep.log 2>&1; echo "qsweep rc=$? at $SECONDS s"; cat $L/qsweep.log | cut -c1-160 ); save
( env $P timeout $(( $(left) - 5 )) python3 -m pytest -q -rfE -p no:cacheprovider tests/ops/test_usp_attention.py "$T::test_usp_gpu_graph_replay_equals_eager" -m multigpu -k "cuda_graph or 2-push or 2-ce" > $L/test_graph2.log 2>&1; echo "graph tests x2 + cuda graph rc=$? at $SECONDS s"; grep -E "FAILED|ERROR|passed|failed" $L/test_graph2.log | tail -8 | cut -c1-300 ); save
echo "done at $SECONDS s"
