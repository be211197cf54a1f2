#!/usr/bin/env bash
# Session 11 call 5 (run 46): main 26e2131: FP8 K-scale auto + new quantizer grid/V loop (fp8-kauto), the 256-key
# tile variant (fp8-wide); usp auto transports by size + push blocks default; host-path test after its fix.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logsE; mkdir -p $L; NG=$(nvidia-smi -L | wc -l); CMT=$(head -1 commitsE.txt)
nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/e.tgz -C /tmp logsE; }
left() { echo $(( 500 - SECONDS )); }
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
rm -rf /tmp/srcE; mkdir -p /tmp/srcE && tar xf headE.tar -C /tmp/srcE
cp s11_oldq_launcher.py s11_oldq_kernels.py /tmp/
( cd /tmp/srcE && PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 XDIT_OPS_PTXAS_VERBOSE=1 python3 setup.py build_ext --inplace > $L/build_E.log 2>&1; echo E build rc=$? at $SECONDS s ); save
P="PYTHONPATH=/tmp/site:/tmp/srcE XDIT_OPS_GIT_COMMIT=$CMT SRC=/tmp/srcE"
cd /tmp/srcE
( env $P timeout 100 python3 -m pytest -q -rfE -p no:cacheprovider tests/ops/test_fp8_attention.py tests/ops/test_fp8_impl_select.py -m "gpu or sm90" > $L/test_fp8.log 2>&1; echo "fp8 tests rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed" $L/test_fp8.log | tail -8 | cut -c1-250 ); save
( env $P timeout 100 python3 benchmarks/bench_fp8_attention.py --impls sm90ws --no-naive --out $L/bench > $L/bench_fp8.log 2>&1; echo "bench_fp8 rc=$? at $SECONDS s"; grep -E "sm90ws|triton_quant|cudnn|target" $L/bench_fp8.log | cut -c1-150 ); save
T=tests/ops/test_usp_attention.py
( env $P timeout 150 python3 -m pytest -q -rfE -p no:cacheprovider $T::test_usp_gpu_matches_single_device $T::test_usp_gpu_cuda_graph_push > $L/test_usp.log 2>&1; echo "usp tests rc=$? at $SECONDS s"; grep -E "FAILED|ERROR|passed|failed" $L/test_usp.log | tail -6 | cut -c1-300 ); save
( env $P timeout 70 torchrun --standalone --nproc-per-node=$NG benchmarks/bench_usp.py --configs ulysses,ring --no-yunchang --no-host --out $L/bench > $L/bench_usp.log 2>&1; echo "bench_usp (auto) rc=$? at $SECONDS s"; grep -E "xdit_ops|paths" $L/bench_usp.log | head -8 | cut -c1-200 ); save
( env $P timeout $(left) python3 -m pytest -q -rfE -p no:cacheprovider tests/ops/test_usp_host_path.py -m multigpu > $L/test_host.log 2>&1; echo "host path tests rc=$? at $SECONDS s"; grep -E "FAILED|ERROR|passed|failed" $L/test_host.log | tail -6 | cut -c1-300 ); save
if [ $(left) -gt 80 ]; then ( env $P timeout $(left) python3 -m pytest -q -rfE -p no:cacheprovider "tests/ops/test_usp_fp8_wire.py::test_usp_fp8_wire_gpu[2]" "tests/ops/test_usp_fp8_ring.py::test_usp_fp8_ring_gpu[2]" > $L/test_fp8wr2.log 2>&1; echo "fp8 wire/ring [2] rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed" $L/test_fp8wr2.log | tail -4 | cut -c1-250 ); save; fi
if [ $(left) -gt 30 ]; then
  mkdir -p /tmp/srcEo && cp -r /tmp/srcE/xdit_ops /tmp/srcE/benchmarks /tmp/srcEo/ && cp /tmp/s11_oldq_launcher.py /tmp/srcEo/xdit_ops/triton/fp8_attention.py && cp /tmp/s11_oldq_kernels.py /tmp/srcEo/xdit_ops/triton/kernels/fp8_attention.py
  ( cd /tmp/srcEo && env PYTHONPATH=/tmp/site:/tmp/srcEo XDIT_OPS_GIT_COMMIT=$CMT-oldquant timeout $(left) python3 benchmarks/bench_fp8_attention.py --impls sm90ws --no-naive --no-ktile256 --shapes 1,16896,24,128 1,32760,40,128 --out $L/bench_oldq > $L/bench_fp8_oldq.log 2>&1; echo "bench_fp8 old quantizer rc=$? at $SECONDS s"; grep -E "triton_quant|_total" $L/bench_fp8_oldq.log | cut -c1-120 ); save
fi
echo "done at $SECONDS s"
