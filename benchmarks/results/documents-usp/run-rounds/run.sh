#!/bin/bash
# Call C (8168c70): packed documents against padded and separate, in rounds.
source .device/env.sh
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
R=$OUT/r; mkdir -p $R
S=.device/bin/seqpar
$S --version > $R/info.txt 2>&1
timeout 540 mpirun -np 16 --bind-to core $S bench documents --algorithm ring --layout zigzag --causal --seq-len 65536 --draw 512,16384 --seed 1 --heads 8 --head-dim 128 --precision bf16 --repeats 3 --warmup 1 --rounds 3 > $R/documents-rounds.txt 2>> $R/log.txt
tar czf $OUT/results.tgz -C $OUT r
