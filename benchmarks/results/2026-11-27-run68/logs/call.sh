#!/usr/bin/env bash
# Session 15, one GPU (issue 4), run 68: branch fp8-rowsum (P.V with N = Dp + 8). Build; SASS counts of the per-tile
# kernels (with and without the tensor-core row sums); the per-tile kernel-vs-emulation GPU
# tests and the gate without and under XDIT_OPS_FP8_ROWSUM=chains (fp32 sums in another order); the A/B (rowsum_ab.py) at the four issue shapes.
set -u
export PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
timeout 240 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
SO=$(ls xdit_ops/_C_sm90*.so | head -1)
CUOBJ=$(command -v cuobjdump || ls /usr/local/cuda*/bin/cuobjdump 2>/dev/null | head -1)
$CUOBJ -sass $SO 2>/dev/null | awk '/Function :/{f=$3} /^ +\/\*[0-9a-f]+\*\//{n[f]++} /MUFU.EX2/{m[f]++} /FADD/{fa[f]++} /HGMMA|QGMMA|IGMMA/{g[f]++} /SHFL/{sh[f]++} END{for(k in n) if (k ~ /ws_kernelILi(64|128)E13__nv_bfloat16Lb1E/) print k, "instr", n[k], "mufu", m[k], "fadd", fa[k], "gmma", g[k], "shfl", sh[k]}' | sort > $L/sass_counts.txt; sed 's/_ZN8xdit_ops11fp8_sm90_ws23fp8_attention_ws_kernel//' $L/sass_counts.txt
PT="tests/ops/test_fp8_attention.py"
timeout 150 python3 -m pytest -q -rfEs -p no:cacheprovider "$PT::test_sm90ws_tile_k_scale_matches_emulation" "$PT::test_sm90ws_tile_k_scale_three_consumers_matches_emulation" "$PT::test_sm90ws_three_consumers_are_bit_identical" "$PT::test_gate_gpu_tile_k_scale" "$PT::test_sm90_attention_matches_emulation" > $L/tests_default.log 2>&1; echo "default tests rc=$? at $SECONDS s"; tail -2 $L/tests_default.log | cut -c1-300; save
XDIT_OPS_FP8_ROWSUM=chains timeout 120 python3 -m pytest -q -rfEs -p no:cacheprovider "$PT::test_sm90ws_tile_k_scale_matches_emulation" "$PT::test_sm90ws_tile_k_scale_three_consumers_matches_emulation" "$PT::test_gate_gpu_tile_k_scale" > $L/tests_chains.log 2>&1; echo "chains tests rc=$? at $SECONDS s"; tail -3 $L/tests_chains.log | cut -c1-300; save
timeout 330 python3 benchmarks/results/2026-11-27-run68/logs/rowsum_ab.py $OUT 1,16896,24,128 2,4250,24,64 1,4608,24,128 1,32760,40,128 > $L/rowsum_ab.log 2>&1; echo "rowsum_ab rc=$? at $SECONDS s"; grep -v Warn $L/rowsum_ab.log | cut -c1-250 | tail -24; save
