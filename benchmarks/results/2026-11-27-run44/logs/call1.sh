#!/usr/bin/env bash
# Session 11 call 1 (run 44): main 4507889 + kscale-tile (trial11): the review's usp GPU tests,
# ceflags ring + push v3 in the every-case worker, the FP8 per-tile K scale tests + bench, ring vs ring-ceflags.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logsA; mkdir -p $L; NG=$(nvidia-smi -L | wc -l); CMT=$(head -1 commitsA.txt)
nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/a.tgz -C /tmp logsA; }
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
rm -rf /tmp/srcA; mkdir -p /tmp/srcA && tar xf headA.tar -C /tmp/srcA
( cd /tmp/srcA && PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > $L/build_A.log 2>&1; echo A build rc=$? at $SECONDS s ); save
P="PYTHONPATH=/tmp/site:/tmp/srcA XDIT_OPS_GIT_COMMIT=$CMT SRC=/tmp/srcA"
cd /tmp/srcA
T=tests/ops/test_usp_attention.py
( env $P timeout 230 python3 -m pytest -q -rfE -p no:cacheprovider $T::test_usp_gpu_matches_single_device $T::test_usp_gpu_cuda_graph_ring_flags $T::test_usp_gpu_overlap_matches_single_device $T::test_usp_gpu_cuda_graph_overlap $T::test_usp_gpu_cuda_graph $T::test_usp_gpu_cuda_graph_push > $L/test_usp.log 2>&1; echo "usp tests rc=$? at $SECONDS s"; grep -E "FAILED|ERROR|passed|failed" $L/test_usp.log | tail -8 | cut -c1-300 ); save
( env $P timeout 60 python3 -m pytest -q -rfE -p no:cacheprovider tests/ops/test_ulysses_pack.py -m gpu -k cuda_graph > $L/test_pack.log 2>&1; echo "pack graph tests rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed" $L/test_pack.log | tail -3 | cut -c1-250 ); save
( env $P timeout 100 python3 -m pytest -q -rfE -p no:cacheprovider tests/ops/test_fp8_attention.py tests/ops/test_fp8_impl_select.py -m "gpu or sm90" > $L/test_fp8.log 2>&1; echo "fp8 tests rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed" $L/test_fp8.log | tail -6 | cut -c1-250 ); save
( env $P timeout 100 python3 benchmarks/bench_fp8_attention.py --impls sm90ws --no-naive --out $L/bench > $L/bench_fp8.log 2>&1; echo "bench_fp8 rc=$? at $SECONDS s"; grep -vE "Warn|warn" $L/bench_fp8.log | tail -30 | cut -c1-220 ); save
( env $P timeout $((575-SECONDS)) torchrun --standalone --nproc-per-node=$NG benchmarks/bench_usp.py --configs ring,ring-ceflags --no-yunchang --no-host --out $L/bench > $L/bench_usp.log 2>&1; echo "bench_usp rc=$? at $SECONDS s"; grep -E "xdit_ops|ring" $L/bench_usp.log | head -14 | cut -c1-200 ); save
echo "done at $SECONDS s"
