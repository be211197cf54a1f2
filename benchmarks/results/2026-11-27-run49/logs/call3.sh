#!/usr/bin/env bash
# Session 12 call 3 (run 49): main + fp8-ktile64 + usp-uneven + the call graph's side-stream capture.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logsC; mkdir -p $L; NG=$(nvidia-smi -L | wc -l); CMT=$(head -1 commitsC.txt)
nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/c.tgz -C /tmp logsC; }
left() { echo $(( 440 - SECONDS )); }
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
rm -rf /tmp/srcC; mkdir -p /tmp/srcC && tar xf headC.tar -C /tmp/srcC
( cd /tmp/srcC && PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > $L/build_C.log 2>&1; echo C build rc=$? at $SECONDS s ); save
P="PYTHONPATH=/tmp/site:/tmp/srcC XDIT_OPS_GIT_COMMIT=$CMT SRC=/tmp/srcC"
cd /tmp/srcC
# GPU 3 in the background: FP8 head dim 64 per-tile kernel (tests, then the bench)
( env $P CUDA_VISIBLE_DEVICES=3 timeout 110 python3 -m pytest -q -rfE -p no:cacheprovider -m "gpu or sm90" tests/ops/test_fp8_attention.py tests/ops/test_fp8_impl_select.py -k "tile_k_scale or ktile or head_dim_64 or auto_on_hopper or auto_k_scale or gate_gpu" > $L/test_fp8_k64.log 2>&1; echo "fp8 k64 tests rc=$?" >> $L/bg.txt
  env $P CUDA_VISIBLE_DEVICES=3 timeout 100 python3 benchmarks/bench_fp8_attention.py --impls triton sm90ws --shapes 2,4250,24,64 --no-naive --out $L/bench_fp8 > $L/bench_fp8_k64.log 2>&1; echo "bench fp8 k64 rc=$?" >> $L/bg.txt ) &
BG=$!
T=tests/ops/test_usp_graph.py::test_usp_gpu_graph_replay_equals_eager
( env $P CUDA_VISIBLE_DEVICES=0,1 timeout 175 python3 -m pytest -x -q -rfE -p no:cacheprovider "$T[2-push]" "$T[2-ce]" "$T[2-nccl]" "$T[2-ceflags]" > $L/test_graph2.log 2>&1; echo "graph tests x2 rc=$? at $SECONDS s"; grep -E "FAILED|ERROR|Error|passed|failed" $L/test_graph2.log | tail -8 | cut -c1-300 ); save
wait $BG; cat $L/bg.txt; grep -E "FAILED|passed|failed" $L/test_fp8_k64.log | tail -6 | cut -c1-250; grep -E "sm90ws|triton|cudnn" $L/bench_fp8_k64.log | cut -c1-150; save
( env $P timeout 110 torchrun --standalone --nproc-per-node=$NG benchmarks/bench_usp.py --shapes 1,2 --no-yunchang --no-host --configs ulysses,ulysses-overlap-equal --chunks 1,4,1 1,8,1 --out $L/bench > $L/bench_usp_chunks.log 2>&1; echo "bench_usp chunks rc=$? at $SECONDS s"; grep -E "xdit_ops|single-GPU|skip" $L/bench_usp_chunks.log | head -16 | cut -c1-200 ); save
( env $P timeout $(( $(left) - 3 )) python3 -m pytest -x -q -rfE -p no:cacheprovider "tests/ops/test_usp_attention.py::test_usp_gpu_overlap_matches_single_device[4-default-tensors]" "tests/ops/test_usp_attention.py::test_usp_gpu_cuda_graph[False]" "$T[4-hybrid]" "$T[4-push]" "tests/ops/test_usp_attention.py::test_usp_gpu_cuda_graph_overlap[4-default]" > $L/test_x4.log 2>&1; echo "x4 tests rc=$? at $SECONDS s"; grep -E "FAILED|ERROR|Error|passed|failed" $L/test_x4.log | tail -8 | cut -c1-300 ); save
echo "done at $SECONDS s"
