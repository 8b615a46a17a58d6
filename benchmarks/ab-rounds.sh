#!/bin/bash
# Two or more builds of SeqPar against PyTorch, round by round: each round runs the ring of issue 17 (zigzag causal,
# 16 ranks, L 16384, H 8, D 128, bf16, forward and backward) once per variant, then PyTorch SDPA bf16 on 16 threads,
# all back to back, so that each variant's ratio to PyTorch is taken minutes apart at most (the host drifts by 2x).
#   VARIANTS="name=binary[:ENV=VALUE,...] ..."   e.g. VARIANTS="old=.device/old/seqpar new=.device/bin/seqpar"
#   ARGS_name="..."                             options added to that variant's bench attention (e.g. --balance speed)
#   LAUNCH_name="..."                           that variant's ranks and placement (default: -np 16 --bind-to core), e.g.
#                                               LAUNCH_x4="-np 4 --map-by slot:PE=4 --bind-to core" ARGS_x4="--threads 4"
# Results in $OUT: rounds-NAME.jsonl (the variant's lines and PyTorch's, tagged by round) and rounds-NAME.txt
# (benchmarks/peers/rounds.py: per-round ratios and medians). ROUNDS (default 5), MPIRUN_FLAGS as in common.sh.
OUT=${OUT:-benchmarks/results/ab}
. "$(dirname "$0")/common.sh"
export OMP_NUM_THREADS=1
PEER="python3 $(dirname "$0")/peers/torch_sdpa.py"
[ -n "${VARIANTS:-}" ] || { echo "ab-rounds.sh: set VARIANTS=\"name=binary[:ENV=VALUE,...] ...\"" >&2; exit 64; }
for v in $VARIANTS; do
    bin=${v#*=}; bin=${bin%%:*}
    [ -x "$bin" ] || { echo "ab-rounds.sh: variant $v: $bin is not an executable" >&2; exit 64; }
done
mkdir -p "$OUT"
for round in $(seq 1 "${ROUNDS:-5}"); do
    for v in $VARIANTS; do
        name=${v%%=*}; rest=${v#*=}; bin=${rest%%:*}; envs=""; xs=""; args="ARGS_$name"; launch="LAUNCH_$name"
        [ "$rest" != "$bin" ] && envs=${rest#*:}
        for e in ${envs//,/ }; do export "${e?}"; xs="$xs -x ${e%%=*}"; done
        $MPIRUN ${!launch:--np 16 --bind-to core} $xs "$bin" bench attention --algorithm ring --layout zigzag --causal --seq-len 16384 --heads 8 \
            --head-dim 128 --precision bf16 --repeats 3 --warmup 1 --no-baseline ${!args:-} --json 2>> "$OUT/log.txt" \
            | sed "s/^{/{\"round\": $round, /" >> "$OUT/rounds-$name.jsonl"
        for e in ${envs//,/ }; do unset "${e%%=*}"; done
    done
    peer=$($PEER --threads 16 --seq-len 16384 --heads 8 --head-dim 128 --causal --backward --dtype bfloat16 2>> "$OUT/log.txt" | sed "s/^{/{\"round\": $round, /")
    for v in $VARIANTS; do echo "$peer" >> "$OUT/rounds-${v%%=*}.jsonl"; done
done
for v in $VARIANTS; do
    python3 "$(dirname "$0")/peers/rounds.py" "$OUT/rounds-${v%%=*}.jsonl" > "$OUT/rounds-${v%%=*}.txt"
done
