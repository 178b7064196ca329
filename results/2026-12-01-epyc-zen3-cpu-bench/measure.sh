#!/bin/bash
# quiet-machine measurements on this CPU: bench (fp32 / bf16 / bf16 + channels-last, batch 256, roofline, profile,
# augmentation table, real data) twice, then the engine's own speed on a 1-epoch subset run in fp32 (auto) and bf16
cd /work/main
R=results/2026-12-01-epyc-zen3-cpu-bench
for i in 1 2; do
  echo "== bench b256 run $i $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  python bench.py --exp cpu --device cpu --batch-size 256 --modes fp32,bf16,channels_last --data-dir ~/data \
    --json --profile --out $R/b256_run$i
  echo "== end $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
done
for p in auto; do for i in 1 2; do
  echo "== engine cpu subset 5120, 1 epoch, precision $p, run $i $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  python run_train.py --exp cpu --data-dir ~/data --set subset=5120 --epochs 1 --set precision=$p \
    --set name=cpu_speed_${p}_$i --out $R/engine_speed
  echo "== end $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
done; done
