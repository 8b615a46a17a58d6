#!/usr/bin/env bash
# A/B of --balance equal vs speed on the device, ring zigzag (weak and strong64k points), allgather zigzag, LASP-2.
tar xzf .devpack/device.tar.gz
source .device/env.sh
export PMIX_MCA_pcompress_base_silence_warning=1 OPENBLAS_NUM_THREADS=1
B=.device/bin/seqpar; R=$OUT/balance; mkdir -p $R
lscpu > $R/lscpu.txt
M="mpirun --allow-run-as-root -np"
run() { echo "# $*" >> $R/commands.txt; "$@" --json >> $R/balance.jsonl 2>> $R/log.txt; }
start=$(date +%s)
for round in 1 2 3; do
  run $M 16 --bind-to core $B bench attention --algorithm ring --layout zigzag --causal --seq-len 32768 --heads 16 --head-dim 64 --baseline-seq-len 2048 --forward-only --repeats 3 --warmup 1 --balance equal speed
  run $M 16 --bind-to core $B bench attention --algorithm ring --layout zigzag --causal --seq-len 65536 --heads 1 --head-dim 64 --baseline-seq-len 16384 --forward-only --repeats 3 --warmup 1 --balance equal speed
  echo "round $round $(( $(date +%s) - start )) s" >> $R/log.txt
done
run $M 16 --bind-to core $B bench attention --algorithm allgather lasp2 --layout zigzag --causal --seq-len 32768 --heads 16 --head-dim 64 --baseline-seq-len 2048 --forward-only --repeats 3 --warmup 1 --balance equal speed
run $M 8 --bind-to core $B bench attention --algorithm ring --layout zigzag --causal --seq-len 16384 --heads 16 --head-dim 64 --baseline-seq-len 2048 --forward-only --repeats 3 --warmup 1 --balance equal speed
echo "done $(( $(date +%s) - start )) s" >> $R/log.txt
tail -3 $R/log.txt
jq -r '"\(.ranks) \(.algorithm) \(.seq_len) \(.balance) \(.time_s) eff=\(.efficiency)"' $R/balance.jsonl
