#!/usr/bin/env bash
# Session 15, one GPU (issue 4), run 66: branch fp8-poly. Build; SASS instruction counts of the
# per-tile kernels (MUFU.EX2, FFMA, total, per kernel); the per-tile kernel-vs-emulation GPU
# tests with XDIT_OPS_FP8_EXP_POLY=4 (every 4th exponential pair on the FMA pipe) and without;
# the A/B (poly_ab.py: R = 0, 8, 4, 3, 2) at the four issue shapes.
set -u
export PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
timeout 240 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
SO=$(ls xdit_ops/_C_sm90*.so | head -1)
CUOBJ=$(command -v cuobjdump || ls /usr/local/cuda*/bin/cuobjdump 2>/dev/null | head -1)
$CUOBJ -sass $SO 2>/dev/null | awk '/Function :/{f=$3} /^ +\/\*[0-9a-f]+\*\//{n[f]++} /MUFU.EX2/{m[f]++} /FFMA/{ff[f]++} END{for(k in n) if (k ~ /ws_kernelILi(64|128)E13__nv_bfloat16Lb1E/) print k, "instr", n[k], "mufu_ex2", m[k], "ffma", ff[k]}' | sort > $L/sass_counts.txt; cat $L/sass_counts.txt | sed 's/_ZN8xdit_ops11fp8_sm90_ws23fp8_attention_ws_kernel//'
PT="tests/ops/test_fp8_attention.py"
XDIT_OPS_FP8_EXP_POLY=4 timeout 120 python3 -m pytest -q -rfEs -p no:cacheprovider "$PT::test_sm90ws_tile_k_scale_matches_emulation" "$PT::test_sm90ws_tile_k_scale_three_consumers_matches_emulation" "$PT::test_gate_gpu_tile_k_scale" > $L/tests_poly4.log 2>&1; echo "poly4 tests rc=$? at $SECONDS s"; tail -3 $L/tests_poly4.log | cut -c1-300; save
timeout 300 python3 benchmarks/results/2026-11-27-run66/logs/poly_ab.py $OUT 1,16896,24,128 2,4250,24,64 1,32760,40,128 1,4608,24,128 > $L/poly_ab.log 2>&1; echo "poly_ab rc=$? at $SECONDS s"; cat $L/poly_ab.log | grep -v Warn | cut -c1-220 | tail -24; save
