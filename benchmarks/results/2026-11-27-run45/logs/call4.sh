#!/usr/bin/env bash
# Session 11 call 2 (run 44, same warm machine/build as call 1): FP8 wire/ring GPU tests after the review
# (ring under ceflags too), bench_usp on 2 GPUs (push, overlap c2/c3, ring, ring-ceflags).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logsB; mkdir -p $L; NG=$(nvidia-smi -L | wc -l); CMT=$(head -1 commitsC.txt)
save() { tar czf $OUT/b.tgz -C /tmp logsB; }
if [ ! -f /tmp/srcC/xdit_ops/_C*.so ] 2>/dev/null && ! ls /tmp/srcC/xdit_ops/_C*.so >/dev/null 2>&1; then
  pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
  rm -rf /tmp/srcC; mkdir -p /tmp/srcC && tar xf headC.tar -C /tmp/srcC
  ( cd /tmp/srcC && PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > $L/build_A.log 2>&1; echo A rebuild rc=$? at $SECONDS s )
fi
P="PYTHONPATH=/tmp/site:/tmp/srcC XDIT_OPS_GIT_COMMIT=$CMT SRC=/tmp/srcC"
cd /tmp/srcC
( env $P CUDA_VISIBLE_DEVICES=0,1 timeout 150 torchrun --standalone --nproc-per-node=2 benchmarks/bench_usp.py --configs ulysses,ulysses-overlap-c2,ulysses-overlap-c3,ring,ring-ceflags --no-yunchang --no-host --out $L/bench > $L/bench_usp2.log 2>&1; echo "bench_usp x2 rc=$? at $SECONDS s"; grep -E "xdit_ops" $L/bench_usp2.log | head -16 | cut -c1-200 ); save
( env $P timeout 110 python3 -m pytest -q -rfE -p no:cacheprovider "tests/ops/test_usp_fp8_wire.py::test_usp_fp8_wire_gpu[4]" > $L/test_fp8wire4.log 2>&1; echo "fp8 wire[4] rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed" $L/test_fp8wire4.log | tail -3 | cut -c1-250 ); save
( env $P timeout $((570-SECONDS)) python3 -m pytest -q -rfE -p no:cacheprovider "tests/ops/test_usp_fp8_ring.py::test_usp_fp8_ring_gpu[4]" > $L/test_fp8ring4_ceflags.log 2>&1; echo "fp8 ring[4] ceflags rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed" $L/test_fp8ring4_ceflags.log | tail -3 | cut -c1-250 ); save
echo "done at $SECONDS s"
