#!/usr/bin/env bash
# Session 12 call 4 (run 50): main + fp8-exph2 (f16x2 exps, P.V-overlap variants) + the call graph without NCCL kernels.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logsD; mkdir -p $L; NG=$(nvidia-smi -L | wc -l); CMT=$(head -1 commitsD.txt)
nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/d.tgz -C /tmp logsD; }
left() { echo $(( 330 - SECONDS )); }
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
rm -rf /tmp/srcD; mkdir -p /tmp/srcD && tar xf headD.tar -C /tmp/srcD
( cd /tmp/srcD && PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > $L/build_D.log 2>&1; echo D build rc=$? at $SECONDS s ); save
P="PYTHONPATH=/tmp/site:/tmp/srcD XDIT_OPS_GIT_COMMIT=$CMT SRC=/tmp/srcD"
cd /tmp/srcD
( env $P CUDA_VISIBLE_DEVICES=3 timeout 110 python3 benchmarks/bench_fp8_attention.py --impls sm90ws --no-naive --shapes 1,16896,24,128 1,32760,40,128 --out $L/bench_fp8 > $L/bench_fp8.log 2>&1; echo "bench fp8 rc=$?" >> $L/bg.txt
  env $P CUDA_VISIBLE_DEVICES=3 timeout 75 python3 -m pytest -q -rfE -p no:cacheprovider -m "gpu or sm90" tests/ops/test_fp8_attention.py -k "h2 or f16x2 or pv_overlap" > $L/test_fp8_h2ov.log 2>&1; echo "fp8 h2/ov tests rc=$?" >> $L/bg.txt ) &
BG=$!
T=tests/ops/test_usp_graph.py::test_usp_gpu_graph_replay_equals_eager
( env $P CUDA_VISIBLE_DEVICES=0,1 timeout 170 python3 -m pytest -x -q -rfE -p no:cacheprovider "$T[2-push]" "$T[2-nccl]" "$T[2-ce]" > $L/test_graph2.log 2>&1; echo "graph tests x2 rc=$? at $SECONDS s"; grep -E "FAILED|ERROR|Error|passed|failed" $L/test_graph2.log | tail -8 | cut -c1-300 ); save
wait $BG; cat $L/bg.txt; grep -E "FAILED|passed|failed" $L/test_fp8_h2ov.log | tail -6 | cut -c1-250; grep -E "sm90ws|cudnn|target" $L/bench_fp8.log | cut -c1-150; save
if [ $(left) -gt 40 ]; then
( env $P timeout $(( $(left) - 5 )) torchrun --standalone --nproc-per-node=$NG benchmarks/bench_usp.py --shapes 0 --no-yunchang --configs ulysses,ring --out $L/bench > $L/bench_usp.log 2>&1; echo "bench_usp 4608 rc=$? at $SECONDS s"; grep -E "xdit_ops" $L/bench_usp.log | head -4 | cut -c1-220 ); save
fi
echo "done at $SECONDS s"
