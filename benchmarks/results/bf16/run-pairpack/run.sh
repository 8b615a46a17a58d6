#!/bin/bash
# Packing V and K without oneDNN's reorder (PairedRowsLayout): checks, one-core kernel A/B, ring rounds A/B vs PyTorch.
source .device/env.sh
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
R=$OUT/r; mkdir -p $R
S=.device/bin/seqpar
$S --version > $R/info.txt 2>&1; cat $R/info.txt
{
mpirun -np 4 $S attention --algorithm ring --layout zigzag --causal --backward --precision bf16 --seq-len 4096 --heads 4 --kv-heads 2 --head-dim 128 --check 2>&1 | grep -E "check:|rror|differs"
mpirun -np 2 $S attention --algorithm ring --backward --precision bf16 --seq-len 2000 --heads 4 --head-dim 64 --check --doc-lens 900,1100 2>&1 | grep -E "check:|rror|differs"
$S attention --algorithm dense --backward --precision bf16 --seq-len 1536 --heads 8 --kv-heads 2 --head-dim 128 --check 2>&1 | grep -E "check:|rror|differs"
} > $R/checks.txt 2>&1
cat $R/checks.txt
K="bench kernel --seq-len 1024 2048 --head-dim 128 --heads 8 --mask both --precision bf16 --repeats 5 --warmup 1"
for i in 1 2; do for mode in reorder fast off; do
  SEQPAR_BF16_PACK=$mode taskset -c 3 $S $K > $R/kernel-$mode-$i.txt 2>&1
  echo "== $mode $i"; grep -vE "^#" $R/kernel-$mode-$i.txt | head -12
done; done
OUT=$R ROUNDS=3 VARIANTS="fast=$S reorder=$S:SEQPAR_BF16_PACK=reorder" timeout 300 benchmarks/ab-rounds.sh
for v in fast reorder; do [ -s $R/rounds-$v.txt ] || python3 benchmarks/peers/rounds.py $R/rounds-$v.jsonl > $R/rounds-$v.txt; echo "== $v"; cat $R/rounds-$v.txt; done
tar czf $OUT/results.tgz -C $OUT r
