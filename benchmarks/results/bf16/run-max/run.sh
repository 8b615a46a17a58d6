#!/bin/bash
# The bf16 forward's softmax pass on AMX: the row maxima timed apart (bench kernel's max column), one core.
source .device/env.sh
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
R=$OUT/r; mkdir -p $R
S=.device/bin/seqpar
$S --version
for i in 1 2; do
  taskset -c 3 $S bench kernel --seq-len 1024 4096 --heads 8 --head-dim 128 --mask both --forward-only --precision bf16 --repeats 5 --warmup 1 > $R/kernel-$i.txt 2>&1
  grep -v "^#" $R/kernel-$i.txt
done
tar czf $OUT/results.tgz -C $OUT r
