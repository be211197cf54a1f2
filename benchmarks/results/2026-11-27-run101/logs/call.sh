#!/usr/bin/env bash
# Session 19, one GPU (issue 4), run 101: the quantization pass in one cooperative launch
# (quantize_pass_kernel, XDIT_OPS_FP8_PASS). Build; the pass's and the launch GPU tests; the
# pass alone by mode (pass_ab.py); the GPU time per queued op call with the fused pass and with
# the three kernels (run 91's gaps.py).
set -u
export PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
R=benchmarks/results/2026-11-27-run101/logs
timeout 240 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
timeout 150 python3 -m pytest -q -rfEs -p no:cacheprovider -m "gpu or sm90" tests/ops/test_triton_launch.py tests/ops/test_fp8_attention.py -k "pass or fast_path or launch" > $L/tests_pass.log 2>&1; echo "pass tests rc=$? at $SECONDS s"; grep -E "passed|failed|^FAILED|Error" $L/tests_pass.log | cut -c1-300 | tail -8; save
timeout 150 python3 $R/pass_ab.py $OUT > $L/pass_ab.log 2>&1; echo "pass_ab rc=$? at $SECONDS s"; cut -c1-400 $L/pass_ab.log | tail -12; save
mkdir -p $OUT/fused $OUT/three
timeout 60 python3 benchmarks/results/2026-11-27-run91/logs/gaps.py $OUT/fused 1,16896,24,128 1,4608,24,128 > $L/gaps_fused.log 2>&1; echo "gaps fused rc=$? at $SECONDS s"; grep -E "_kernel\"|span|^\(" -A1 $L/gaps_fused.log | grep -vE "^--|\[$" | head -30; save
XDIT_OPS_FP8_PASS=three timeout 60 python3 benchmarks/results/2026-11-27-run91/logs/gaps.py $OUT/three 1,16896,24,128 1,4608,24,128 > $L/gaps_three.log 2>&1; echo "gaps three rc=$? at $SECONDS s"; grep -E "span" $L/gaps_three.log | head; save
