#!/usr/bin/env bash
# Session 20, 2 GPUs (issues 3/4), run 111: the 2-GPU FP8-wire and FP8-ring GPU tests after the
# sampled statistics (the tests compare the wire and ring, whose statistics stay exact, with
# single-device fp8_attention under XDIT_OPS_FP8_STATS=exact).
set -u
export PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
timeout 300 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; tail -1 $L/build.log; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
timeout 200 python3 -m pytest -q -rfEs -p no:cacheprovider tests/ops/test_usp_fp8_wire.py tests/ops/test_usp_fp8_ring.py -k "gpu and 2" > $L/tests_wire.log 2>&1; echo "wire tests rc=$? at $SECONDS s"; grep -E "passed|failed|^FAILED|Error" $L/tests_wire.log | cut -c1-300 | tail -6; save
