#!/usr/bin/env bash
# Session 11 call 3 (run 45): trial12 = main 8806d0a + host-time2 (cb7bf0e): the tensor host path's GPU tests,
# the usp multigpu tests again (host-time touched every CE path), bench_usp lists vs tensors (eager, graph, host).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logsC; mkdir -p $L; NG=$(nvidia-smi -L | wc -l); CMT=$(head -1 commitsC.txt)
nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/c.tgz -C /tmp logsC; }
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
rm -rf /tmp/srcC; mkdir -p /tmp/srcC && tar xf headC.tar -C /tmp/srcC
( cd /tmp/srcC && PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > $L/build_C.log 2>&1; echo C build rc=$? at $SECONDS s ); save
P="PYTHONPATH=/tmp/site:/tmp/srcC XDIT_OPS_GIT_COMMIT=$CMT SRC=/tmp/srcC"
cd /tmp/srcC
T=tests/ops/test_usp_attention.py
( env $P timeout 40 python3 -m pytest -q -rfE -p no:cacheprovider tests/ops/test_stream_memops.py -m gpu > $L/test_memops.log 2>&1; echo "memops tests rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed" $L/test_memops.log | tail -3 | cut -c1-250 ); save
( env $P timeout 150 python3 -m pytest -x -q -rfE -p no:cacheprovider tests/ops/test_usp_host_path.py -m multigpu > $L/test_host.log 2>&1; echo "host path tests rc=$? at $SECONDS s"; grep -E "FAILED|ERROR|passed|failed" $L/test_host.log | tail -4 | cut -c1-300 ); save
( env $P timeout 200 python3 -m pytest -q -rfE -p no:cacheprovider $T::test_usp_gpu_matches_single_device $T::test_usp_gpu_cuda_graph_ring_flags $T::test_usp_gpu_overlap_matches_single_device $T::test_usp_gpu_cuda_graph_overlap $T::test_usp_gpu_cuda_graph > $L/test_usp.log 2>&1; echo "usp tests rc=$? at $SECONDS s"; grep -E "FAILED|ERROR|passed|failed" $L/test_usp.log | tail -6 | cut -c1-300 ); save
for h in lists tensors; do
( env $P XDIT_OPS_USP_HOST=$h timeout $(( (575-SECONDS) / 2 )) torchrun --standalone --nproc-per-node=$NG benchmarks/bench_usp.py --configs ulysses,ulysses-overlap-c2,ring,ring-ceflags --no-yunchang --out $L/bench > $L/bench_usp_$h.log 2>&1; echo "bench_usp $h rc=$? at $SECONDS s"; grep -E "xdit_ops|host" $L/bench_usp_$h.log | grep -v floor | head -24 | cut -c1-200 ); save
done
echo "done at $SECONDS s"
