#!/usr/bin/env bash
# Session 10 call 3 (run 41): the overlap path (stream memops + CE copies + chunked push) and push v3:
# GPU tests, then bench_usp (ulysses push vs overlap c2/c3) and bench_ulysses_push (v3 rows).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logsC; mkdir -p $L; NG=$(nvidia-smi -L | wc -l); CMT=$(head -1 commitsC.txt)
nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/c.tgz -C /tmp logsC; }
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
mkdir -p /tmp/srcC && tar xf headC.tar -C /tmp/srcC
( cd /tmp/srcC && PYTHONPATH=/tmp/site XDIT_OPS_SKIP_SM90=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > $L/build_C.log 2>&1; echo C build rc=$? at $SECONDS s; grep -i " error" $L/build_C.log | head -5 ); save
P="PYTHONPATH=/tmp/site:/tmp/srcC XDIT_OPS_GIT_COMMIT=$CMT"
( cd /tmp/srcC && env $P timeout 60 python3 -m pytest -q -rfE -p no:cacheprovider -m gpu tests/ops/test_stream_memops.py > $L/test_memops.log 2>&1; echo "memops tests rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed|Error" $L/test_memops.log | tail -5 | cut -c1-250 ); save
( cd /tmp/srcC && env $P timeout 120 python3 -m pytest -q -rfE -p no:cacheprovider -m gpu tests/ops/test_ulysses_pack.py -k "chunk or head_offset or blocks or cuda_graph or need_v2" > $L/test_pack.log 2>&1; echo "pack tests rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed" $L/test_pack.log | tail -5 | cut -c1-250 ); save
( cd /tmp/srcC && env $P timeout 150 python3 -m pytest -x -q -rfE -s -p no:cacheprovider "tests/ops/test_usp_attention.py::test_usp_gpu_overlap_matches_single_device" > $L/test_overlap.log 2>&1; echo "overlap tests rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed|Error|error" $L/test_overlap.log | tail -6 | cut -c1-300 ); save
( cd /tmp/srcC && env $P timeout 100 python3 -m pytest -x -q -rfE -s -p no:cacheprovider "tests/ops/test_usp_attention.py::test_usp_gpu_cuda_graph_overlap" > $L/test_overlap_graph.log 2>&1; echo "overlap graph tests rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed|Error|error" $L/test_overlap_graph.log | tail -6 | cut -c1-300 ); save
( cd /tmp/srcC && env $P timeout 150 torchrun --standalone --nproc-per-node=$NG benchmarks/bench_usp.py --configs ulysses,ulysses-overlap-c2,ulysses-overlap-c3 --no-yunchang --no-host --out $L/bench > $L/bench_usp.log 2>&1; echo "bench_usp rc=$? at $SECONDS s"; grep -E "^\[1|xdit_ops" $L/bench_usp.log | head -12 | cut -c1-200 ); save
( cd /tmp/srcC && env $P timeout 90 torchrun --standalone --nproc-per-node=$NG benchmarks/bench_ulysses_push.py --out $L/bench > $L/bench_push.log 2>&1; echo "bench_push rc=$? at $SECONDS s"; grep -vE "Warning|warn|^W1|\*\*\*" $L/bench_push.log | grep -E "push_out|out_copy|push_out\+copy" | head -24 | cut -c1-200 ); save
echo "done at $SECONDS s"
