#!/usr/bin/env bash
# Session 12 call 1 (run 47): main 5837b52: the FP8 emulation test under K-scale auto/token, bench_usp under
# auto transports (4 and 2 GPUs), ncu of the FP8 per-tile kernel and the quantizer at (1,16896,24,128).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=/tmp/logsA; mkdir -p $L; NG=$(nvidia-smi -L | wc -l); CMT=$(head -1 commitsA.txt)
nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/a.tgz -C /tmp logsA; }
left() { echo $(( 540 - SECONDS )); }
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
rm -rf /tmp/srcA; mkdir -p /tmp/srcA && tar xf headA.tar -C /tmp/srcA; cp s12_prof.py /tmp/srcA/
( cd /tmp/srcA && PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > $L/build_A.log 2>&1; echo A build rc=$? at $SECONDS s ); save
P="PYTHONPATH=/tmp/site:/tmp/srcA XDIT_OPS_GIT_COMMIT=$CMT SRC=/tmp/srcA"
cd /tmp/srcA
( env $P timeout 90 python3 -m pytest -q -rfE -p no:cacheprovider tests/ops/test_fp8_attention.py -m "gpu or sm90" -k "emulation_and_compiles" > $L/test_fp8.log 2>&1; echo "fp8 emu tests rc=$? at $SECONDS s"; grep -E "FAILED|passed|failed" $L/test_fp8.log | tail -5 | cut -c1-250 ); save
( env $P timeout 100 torchrun --standalone --nproc-per-node=$NG benchmarks/bench_usp.py --configs ulysses,ulysses-push,ring,ring-ce --no-yunchang --no-host --out $L/bench > $L/bench_usp4.log 2>&1; echo "bench_usp x$NG rc=$? at $SECONDS s"; grep -E "xdit_ops|planned|single-GPU" $L/bench_usp4.log | head -16 | cut -c1-220 ); save
( env $P CUDA_VISIBLE_DEVICES=0,1 timeout 100 torchrun --standalone --nproc-per-node=2 benchmarks/bench_usp.py --configs ulysses,ulysses-push,ring,ring-ce --no-yunchang --no-host --out $L/bench > $L/bench_usp2.log 2>&1; echo "bench_usp x2 rc=$? at $SECONDS s"; grep -E "xdit_ops|planned|single-GPU" $L/bench_usp2.log | head -16 | cut -c1-220 ); save
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ] && [ $(left) -gt 60 ]; then
  ( env $P timeout $(( $(left) - 20 )) $NCU --clock-control none --set full -k regex:fp8_attention_ws_kernel --launch-skip 2 --launch-count 1 -o $L/prof_ktile python3 s12_prof.py 1,16896,24,128 > $L/ncu_ktile.log 2>&1; echo "ncu ktile rc=$? at $SECONDS s"; $NCU -i $L/prof_ktile.ncu-rep --page details > $L/ncu_ktile_details.txt 2>&1; grep -E "Duration|Throughput|Issue Slots|Registers|Achieved Occupancy|Warp Cycles Per Issued|No Eligible" $L/ncu_ktile_details.txt | head -30 ); save
fi
if [ -n "$NCU" ] && [ $(left) -gt 40 ]; then
  ( env $P timeout $(( $(left) - 10 )) $NCU --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis -k regex:quantize --launch-skip 2 --launch-count 3 python3 s12_prof.py 1,16896,24,128 > $L/ncu_quant.log 2>&1; echo "ncu quant rc=$? at $SECONDS s"; grep -E "quantize|Duration|DRAM Throughput|Memory Throughput" $L/ncu_quant.log | head -20 ); save
fi
echo "done at $SECONDS s"
