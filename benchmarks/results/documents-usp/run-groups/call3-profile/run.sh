#!/bin/bash
# Issue 18, call 3: document groups (4f593b8), packed documents, profiled, 3 rounds.
source .device/env.sh
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
R=$OUT/r; mkdir -p $R
S=.device/bin/seqpar
timeout 450 mpirun -np 16 --bind-to core $S bench documents --algorithm ring --layout zigzag --causal --seq-len 65536 --draw 512,16384 --seed 1 --heads 8 --head-dim 128 --precision bf16 --repeats 3 --warmup 1 --rounds 3 --profile --json > $R/documents-profile.jsonl 2>> $R/log.txt
python3 - <<'PY' | tee $R/documents-profile.txt
import json,os
R=os.environ['OUT']+'/r'
for l in open(f'{R}/documents-profile.jsonl'):
  d=json.loads(l)
  p=d.get('profile_ranks')
  line='%-9s %-9s time %.3f s  over_sum %.2f (%s-%s)' % (d['run'], d['direction'], d['time_s'], d['over_sum'], d.get('over_sum_min'), d.get('over_sum_max'))
  print(line)
  if p:
    for x in p:
      s=x['seconds']
      print('   rank %2d  %.3f s  gemm %.3f softmax %.3f comm %.3f other %.3f' % (x['rank'], s, s*x['gemm'], s*x['softmax'], s*x['communication'], s*x['other']))
PY
tar czf $OUT/results.tgz -C $OUT r
