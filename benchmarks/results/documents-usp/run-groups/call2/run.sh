#!/bin/bash
# Issue 18, call 2: one ring (8168c70) first, then document groups (4f593b8), packed documents in rounds.
source .device/env.sh
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
R=$OUT/r; mkdir -p $R
S=.device/bin/seqpar
O=/tmp/seqpar-8168c70; [ -x $O ] || { xz -dc .device/seqpar-8168c70.xz > $O; chmod +x $O; }
{ $S --version; $O --version; } > $R/info.txt 2>&1
A="bench documents --algorithm ring --layout zigzag --causal --seq-len 65536 --draw 512,16384 --seed 1 --heads 8 --head-dim 128 --precision bf16 --repeats 3 --warmup 1"
timeout 250 mpirun -np 16 --bind-to core $O $A --rounds 3 > $R/one-ring.txt 2>> $R/log.txt
grep -E "^(packed|separate)" $R/one-ring.txt
timeout 300 mpirun -np 16 --bind-to core $S $A --rounds 4 > $R/groups.txt 2>> $R/log.txt
grep -E "^(packed|separate)" $R/groups.txt
tar czf $OUT/results.tgz -C $OUT r
