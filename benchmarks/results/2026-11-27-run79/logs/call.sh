#!/usr/bin/env bash
# Session 16, one GPU (issue 4), run 79, branch fp8-epi: the sm90ws epilogue with its V-scale
# loads hoisted, 1 / l per row and 4-byte pair stores (every kernel), against the epilogue
# before (XDIT_OPS_FP8_EPI=old for the bf16 per-tile kernels at padded 128 / 2 consumers and 64 /
# 3 consumers). Build; SASS counts; the interleaved kernel-only A/B with a bit-identity check
# (logs/epi_ab.py); the FP8 GPU tests; bench_fp8_attention at the four shapes.
set -u
export PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
D=benchmarks/results/2026-11-27-run79/logs
timeout 240 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
SO=$(ls xdit_ops/_C_sm90*.so | head -1)
CUOBJ=$(command -v cuobjdump || ls /usr/local/cuda*/bin/cuobjdump 2>/dev/null | head -1)
$CUOBJ -sass $SO 2>/dev/null | awk '/Function :/{f=$3} /^ +\/\*[0-9a-f]+\*\//{n[f]++} /STG/{st[f]++} /LDG/{ld[f]++} /MUFU.RCP/{r[f]++} END{for(k in n) print k, "instr", n[k], "stg", st[k], "ldg", ld[k], "rcp", r[k]}' | sort > $L/sass_counts.txt; sed 's/_ZN8xdit_ops11fp8_sm90_ws23fp8_attention_ws_kernel//' $L/sass_counts.txt | grep -E "nv_bfloat16Lb1" | cut -c1-170
timeout 150 python3 $D/epi_ab.py $OUT 1,16896,24,128 1,4608,24,128 2,4250,24,64 1,32760,40,128 > $L/epi_ab.log 2>&1; echo "epi_ab rc=$? at $SECONDS s"; grep -v Warn $L/epi_ab.log | cut -c1-200 | tail -8; save
timeout 150 python3 -m pytest -q -rfEs -p no:cacheprovider -m "gpu or sm90" tests/ops/test_fp8_attention.py tests/ops/test_fp8_impl_select.py > $L/tests_fp8.log 2>&1; echo "fp8 tests rc=$? at $SECONDS s"; grep -E "passed|failed|^FAILED" $L/tests_fp8.log | cut -c1-200 | tail -6; save
timeout 200 python3 benchmarks/bench_fp8_attention.py --impls sm90ws --no-naive --out $OUT > $L/bench_fp8.log 2>&1; echo "bench rc=$? at $SECONDS s"; grep -E "cudnn|ktile" $L/bench_fp8.log | cut -c1-150 | head -16; save
