#!/usr/bin/env bash
# Session 14, one GPU (issue 4): ncu of the FP8 op at head dim 64 under auto (sm90ws, per-tile K
# scale, 3 consumer warpgroups issuing freely) at (2,4250,24,64): the attention kernel with the
# full set (where the 3-consumer kernel's time goes), the quantization pass's three kernels with
# speed of light and memory. The ncu target is run 47's logs/prof_fp8.py (four op calls).
set -u
export PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
timeout 200 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
PROF=benchmarks/results/2026-11-27-run47/logs/prof_fp8.py
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
timeout 150 $NCU --clock-control none --set full -k regex:fp8_attention_ws_kernel --launch-skip 2 --launch-count 1 -o $L/prof_c3 python3 $PROF 2,4250,24,64 > $L/ncu_c3.log 2>&1; echo "ncu c3 rc=$? at $SECONDS s"
$NCU -i $L/prof_c3.ncu-rep --page details > $L/ncu_c3_details.txt 2>&1; rm -f $L/prof_c3.ncu-rep
grep -E "Duration|Throughput|Issue Slots|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|No Eligible|Eligible Warps|Active Warps" $L/ncu_c3_details.txt | head -24; save
timeout 90 $NCU --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis -k regex:"kv_stats|quantize" --launch-skip 6 --launch-count 3 python3 $PROF 2,4250,24,64 > $L/ncu_quant.log 2>&1; echo "ncu quant rc=$? at $SECONDS s"; grep -E "kv_stats|quantize_|Duration|DRAM Throughput" $L/ncu_quant.log | cut -c1-120 | head -16; save
