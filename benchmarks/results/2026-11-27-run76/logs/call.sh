#!/usr/bin/env bash
# Session 16, one GPU (issue 4), run 76, branch fp8-latesum: var 3 = the unsigned stage arithmetic alone, against 0 and 2 (run 75: 2 won). Build; SASS counts; tests under var 3; the kernel-only A/B twice (orders 0,2,3 and 2,3,0).
set -u
export PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
D=benchmarks/results/2026-11-27-run76/logs
timeout 240 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
SO=$(ls xdit_ops/_C_sm90*.so | head -1)
CUOBJ=$(command -v cuobjdump || ls /usr/local/cuda*/bin/cuobjdump 2>/dev/null | head -1)
$CUOBJ -sass $SO 2>/dev/null | awk '/Function :/{f=$3} /^ +\/\*[0-9a-f]+\*\//{n[f]++} /MUFU.EX2/{m[f]++} /FADD/{fa[f]++} /SHFL/{sh[f]++} /UIADD|ULOP|USHF|ULEA|UISETP|UIMAD|USEL|ULDC|UMOV|UPLOP/{u[f]++} END{for(k in n) if (k ~ /ws_kernelILi128E13__nv_bfloat16Lb1ELi2ELb1ELb0E/) print k, "instr", n[k], "mufu", m[k], "fadd", fa[k], "shfl", sh[k], "uniform", u[k]}' | sort > $L/sass_counts.txt; sed 's/_ZN8xdit_ops11fp8_sm90_ws23fp8_attention_ws_kernel//' $L/sass_counts.txt
PT="tests/ops/test_fp8_attention.py"
XDIT_OPS_FP8_WS_VAR=3 timeout 120 python3 -m pytest -q -rfEs -p no:cacheprovider "$PT::test_sm90ws_tile_k_scale_matches_emulation" "$PT::test_gate_gpu_tile_k_scale" > $L/tests_var3.log 2>&1; echo "var3 tests rc=$? at $SECONDS s"; tail -2 $L/tests_var3.log | cut -c1-300; save
AB_VARS=0,2,3 timeout 200 python3 $D/var_ab.py $OUT 1,16896,24,128 1,32760,40,128 1,4608,24,128 > $L/var_ab.log 2>&1; echo "var_ab rc=$? at $SECONDS s"; grep -v Warn $L/var_ab.log | cut -c1-200 | tail -12; save
AB_VARS=2,3,0 timeout 150 python3 $D/var_ab.py $OUT/second 1,16896,24,128 1,32760,40,128 > $L/var_ab2.log 2>&1; echo "var_ab 2 rc=$? at $SECONDS s"; grep -v Warn $L/var_ab2.log | cut -c1-120 | tail -8; save
