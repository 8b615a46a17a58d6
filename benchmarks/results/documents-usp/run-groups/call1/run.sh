#!/bin/bash
# Issue 18: ring document groups (new bundle) against one ring (8168c70), packed documents in rounds.
source .device/env.sh
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
R=$OUT/r; mkdir -p $R
S=.device/bin/seqpar
O=/tmp/seqpar-8168c70; xz -dc .device/seqpar-8168c70.xz > $O; chmod +x $O
{ $S --version; $O --version; } > $R/info.txt 2>&1
cat $R/info.txt
A="bench documents --algorithm ring --layout zigzag --causal --seq-len 65536 --draw 512,16384 --seed 1 --heads 8 --head-dim 128 --precision bf16 --repeats 3 --warmup 1"
mpirun -np 4 $S attention --algorithm ring --layout zigzag --causal --backward --doc-lens 1000,1,2000,700,300 --heads 4 --kv-heads 2 --head-dim 64 --check --precision bf16 2>&1 | grep -E "check:|rror" | tee $R/check.txt
timeout 290 mpirun -np 16 --bind-to core $S $A --rounds 4 > $R/groups.txt 2>> $R/log.txt
cat $R/groups.txt
timeout 250 mpirun -np 16 --bind-to core $O $A --rounds 3 > $R/one-ring.txt 2>> $R/log.txt
cat $R/one-ring.txt
tail -5 $R/log.txt
tar czf $OUT/results.tgz -C $OUT r
