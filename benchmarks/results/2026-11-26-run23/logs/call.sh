#!/usr/bin/env bash
# Fused int->fp32 conversion on the RS sm90ws kernel: O = unpatched main (b7eae7c), F = O + fused_conversion_on_rs.patch,
# W = O + fused_conversion_on_rs_v2.patch, C (optional control) = O + fused_conversion_on_rs_control.patch.
# Same GPU for every timing (GPU 0, one after another). Written for kind nvidia-h100-x2 (32 cores), run with carry [".whl"].
# Prepare on the dev machine first (in /work/main, at the commit the patches were made on):
#   git archive -o headO.tar HEAD
#   for v in F W C; do rm -rf /tmp/fc_$v && mkdir /tmp/fc_$v && tar xf headO.tar -C /tmp/fc_$v; done
#   (cd /tmp/fc_F && git apply /work/notes/fused_conversion_on_rs.patch)
#   (cd /tmp/fc_W && git apply /work/notes/fused_conversion_on_rs_v2.patch)
#   (cd /tmp/fc_C && git apply /work/notes/fused_conversion_on_rs_control.patch)
#   for v in F W C; do tar cf head$v.tar -C /tmp/fc_$v .; done
#   cp /work/notes/fc_bitwise.py /work/notes/fused_conversion_on_rs.call.template.sh .   # delete these and head?.tar after the run
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
VARIANTS="O F W C"   # drop C to save ~1.5 min
SHAPES="1,16896,24,128 1,32760,40,128 2,4250,24,64"
L=/tmp/logs; mkdir -p $L; R=$PWD
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
for v in $VARIANTS; do
  mkdir -p /tmp/src$v && tar xf head$v.tar -C /tmp/src$v
  ( cd /tmp/src$v && PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=6 python3 setup.py build_ext --inplace > $L/build_$v.log 2>&1; echo $v build rc=$? ) &
done
mkdir -p /tmp/srcV && tar xf headV.tar -C /tmp/srcV
( cd /tmp/srcV && PYTHONPATH=/tmp/site XDIT_OPS_SKIP_SM90=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=6 python3 setup.py build_ext --inplace > $L/build_V.log 2>&1; echo V build rc=$? ) &
wait; ls /tmp/src?/xdit_ops/_C*.so; echo "builds done at $SECONDS s"
# GPU tests of the two candidates, one per GPU
( cd /tmp/srcF && PYTHONPATH=/tmp/site:/tmp/srcF CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m pytest -q tests/ops/test_fp8_attention.py tests/ops/test_fp8_impl_select.py -m "gpu or sm90" -p no:cacheprovider > $L/test_fp8_F.log 2>&1; echo F tests rc=$? > $L/rcF ) &
( cd /tmp/srcW && PYTHONPATH=/tmp/site:/tmp/srcW CUDA_VISIBLE_DEVICES=1 timeout 150 python3 -m pytest -q tests/ops/test_fp8_attention.py tests/ops/test_fp8_impl_select.py -m "gpu or sm90" -p no:cacheprovider > $L/test_fp8_W.log 2>&1; echo W tests rc=$? > $L/rcW ) &
wait; cat $L/rcF $L/rcW; tail -2 $L/test_fp8_F.log | cut -c1-300; tail -2 $L/test_fp8_W.log | cut -c1-300; echo "tests done at $SECONDS s"
# Bitwise: every variant's out/lse against O's (same inputs; expected identical)
for v in $VARIANTS; do
  ( cd /tmp/src$v && PYTHONPATH=/tmp/site:/tmp/src$v CUDA_VISIBLE_DEVICES=0 timeout 120 python3 $R/fc_bitwise.py save $L/bits_$v.pt > $L/bits_$v.log 2>&1; echo $v bits rc=$? )
done
python3 fc_bitwise.py compare $(for v in $VARIANTS; do echo $L/bits_$v.pt; done) > $L/bits_compare.log 2>&1; echo compare rc=$?; tail -1 $L/bits_compare.log
# Timings: every variant on GPU 0, then O again (drift check)
n=0
for v in $VARIANTS O; do
  n=$((n + 1)); log=$L/bench_fp8_${n}_$v.log
  ( cd /tmp/src$v && PYTHONPATH=/tmp/site:/tmp/src$v XDIT_OPS_GIT_COMMIT=58e495c+fc-$v CUDA_VISIBLE_DEVICES=0 timeout 100 python3 benchmarks/bench_fp8_attention.py --quick --no-naive --impls sm90ws --shapes $SHAPES --out $L/bench_${n}_$v > $log 2>&1; echo $v bench rc=$? )
  grep -E "cudnn|sm90ws" $log | cut -c1-140
  tar czf $OUT/fc.tgz -C /tmp logs   # partial results survive a timeout
done
echo "all done at $SECONDS s"
tar czf $OUT/fc.tgz -C /tmp logs
