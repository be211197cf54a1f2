#!/usr/bin/env bash
# Session 16, one GPU (issue 4), branch fp8-latesum: the per-tile sm90ws kernel at padded head
# dim 128 with its row sums reduced across the quad once after the key loop (var 1) and with
# unsigned stage arithmetic too (var 2), selected by XDIT_OPS_FP8_WS_VAR (bf16 out). Build; SASS
# counts; the per-tile kernel-vs-emulation tests and gate under var 2 and var 1; the
# interleaved kernel-only A/B (logs/var_ab.py); bench_fp8_attention (the op with quantization)
# under var 0 and 2.
set -u
export PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
D=benchmarks/results/2026-11-27-run75/logs
timeout 240 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
SO=$(ls xdit_ops/_C_sm90*.so | head -1)
CUOBJ=$(command -v cuobjdump || ls /usr/local/cuda*/bin/cuobjdump 2>/dev/null | head -1)
$CUOBJ -sass $SO 2>/dev/null | awk '/Function :/{f=$3} /^ +\/\*[0-9a-f]+\*\//{n[f]++} /MUFU.EX2/{m[f]++} /FADD/{fa[f]++} /SHFL/{sh[f]++} /UIADD|ULOP|USHF|ULEA|UISETP|UIMAD|USEL|ULDC|UMOV|UPLOP/{u[f]++} END{for(k in n) if (k ~ /ws_kernelILi128E13__nv_bfloat16Lb1ELi2ELb1ELb0E/) print k, "instr", n[k], "mufu", m[k], "fadd", fa[k], "shfl", sh[k], "uniform", u[k]}' | sort > $L/sass_counts.txt; sed 's/_ZN8xdit_ops11fp8_sm90_ws23fp8_attention_ws_kernel//' $L/sass_counts.txt
PT="tests/ops/test_fp8_attention.py"
XDIT_OPS_FP8_WS_VAR=2 timeout 120 python3 -m pytest -q -rfEs -p no:cacheprovider "$PT::test_sm90ws_tile_k_scale_matches_emulation" "$PT::test_gate_gpu_tile_k_scale" > $L/tests_var2.log 2>&1; echo "var2 tests rc=$? at $SECONDS s"; tail -2 $L/tests_var2.log | cut -c1-300; save
XDIT_OPS_FP8_WS_VAR=1 timeout 90 python3 -m pytest -q -rfEs -p no:cacheprovider "$PT::test_sm90ws_tile_k_scale_matches_emulation" > $L/tests_var1.log 2>&1; echo "var1 tests rc=$? at $SECONDS s"; tail -1 $L/tests_var1.log | cut -c1-300; save
timeout 200 python3 $D/var_ab.py $OUT 1,16896,24,128 1,32760,40,128 1,4608,24,128 > $L/var_ab.log 2>&1; echo "var_ab rc=$? at $SECONDS s"; grep -v Warn $L/var_ab.log | cut -c1-260 | tail -12; save
for V in 0 2; do XDIT_OPS_FP8_WS_VAR=$V timeout 100 python3 benchmarks/bench_fp8_attention.py --impls sm90ws --shapes 1,16896,24,128 1,32760,40,128 --no-naive --out $OUT > $L/bench_fp8_var$V.log 2>&1; echo "bench var $V rc=$? at $SECONDS s"; grep -E "sm90ws|cudnn" $L/bench_fp8_var$V.log | cut -c1-200 | head -8; save; done
