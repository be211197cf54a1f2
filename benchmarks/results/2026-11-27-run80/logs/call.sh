#!/usr/bin/env bash
# Session 16, one GPU (issue 4), run 80, branch fp8-epi (= run 79's code): the epilogue A/B
# again where run 79 was noisy: (1,32760,40,128) three times, (1,16896,24,128) and
# (1,4608,24,128) once more (run 79's logs/epi_ab.py).
set -u
export PYTHONUNBUFFERED=1
CMT=${CMT:-unknown}
L=/tmp/logs; mkdir -p $L; rm -f $L/*; nvidia-smi -L > $L/gpus.txt
save() { tar czf $OUT/logs.tgz -C /tmp logs; }
D=benchmarks/results/2026-11-27-run79/logs
timeout 240 bash python/tools/gpu_check.sh /tmp/gc --only build > $L/build.log 2>&1; echo "build rc=$? at $SECONDS s"; save
export PYTHONPATH=/tmp/site:. XDIT_OPS_GIT_COMMIT=$CMT
for i in 1 2 3; do timeout 60 python3 $D/epi_ab.py $OUT/a$i 1,32760,40,128 > $L/epi_ab_32k_$i.log 2>&1; echo "32k $i rc=$?"; grep -v Warn $L/epi_ab_32k_$i.log | cut -c1-120; done; save
timeout 60 python3 $D/epi_ab.py $OUT/b 1,16896,24,128 1,4608,24,128 > $L/epi_ab_small.log 2>&1; echo "small rc=$?"; grep -v Warn $L/epi_ab_small.log | cut -c1-120; save
