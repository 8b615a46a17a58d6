#!/usr/bin/env bash
# The scaling figures (issue 6), one command per part, for the 16-core device machine (../shared/device/README.md)
# or any machine with the binary. Results go under $RESULTS (default benchmarks/results/scaling).
#
#   benchmarks/scaling-figures.sh calibrate  kernel rates with 1, 2, 4, 8 and 16 ranks at once (bench kernel: softmax,
#                                            D 64, full, L 2048/4096/16384; linear at the sweeps' per-rank shapes and
#                                            decay 1) and bench comm at 2, 4, 8 and 16 ranks: what seqpar model is
#                                            calibrated from (CALIBRATION_RANKS to change the rank counts)
#   benchmarks/scaling-figures.sh calibrate-linear  the linear kernel at the shapes LASP's sweeps give a rank (H 16:
#                                            512-8192 tokens; H 1: 4096-65536), 1, 2, 4, 8 and 16 ranks at once, and
#                                            bench comm at 2, 4, 8 and 16 ranks: the model's LASP calibration
#   benchmarks/scaling-figures.sh lasp       weak, strong and strong64k sweeps of LASP-1 and LASP-2 only, into
#                                            RESULTS/lasp-{weak,strong,strong64k} (with calibrate-linear, one session)
#   benchmarks/scaling-figures.sh weak       launch/scaling weak: 2048 tokens per rank, H 16, D 64, causal, every
#                                            algorithm, 1..16 ranks
#   benchmarks/scaling-figures.sh strong     launch/scaling strong: L 8192, H 16, D 64, causal, every algorithm
#   benchmarks/scaling-figures.sh strong64k  launch/scaling strong: ring (zigzag) and LASP-2 at L 65536, H 1, D 64
#   benchmarks/scaling-figures.sh lasp-chunks  LASP-1 and LASP-2 in one launch at 16 ranks (RANKS_LASP), 128 to 4096
#                                            tokens per rank, H 16, D 64, causal, forward and backward: where the
#                                            chain's P-1 dependent hops show against the AllGather
#   benchmarks/scaling-figures.sh ring16     ring (zigzag) at 16 ranks, weak point (2048 tokens per rank, H 16) and
#                                            strong point (L 65536, H 1), each against the one-rank baseline run alone
#                                            and run on every rank at once (--busy-baseline)
#   benchmarks/scaling-figures.sh interleaved  the model's validation with its calibration on the same host minutes
#                                            before and after each point: at each rank count in turn, the forward
#                                            kernels (softmax 256-16384 tokens, linear at LASP's shapes) and bench
#                                            comm, then that rank count's weak, strong and strong64k points (as the
#                                            parts above), then the kernels again; on one rank also MLA decode at
#                                            the latent widths TPLA gives a rank (512/P). Writes calibration-*.jsonl,
#                                            weak/, strong/, strong64k/ (merged over rank counts, with CSV and SVG) and
#                                            validation.txt; RANKS="1 2 4" then RANKS="8 16" with the same RESULTS
#                                            splits it over two calls (the merge and validation run after each); the
#                                            calibration files grow with each call: give a new RESULTS for a new run
#   benchmarks/scaling-figures.sh peer       PyTorch SDPA with 16 threads vs SeqPar ring on 16 ranks vs dense on one
#                                            rank with 16 BLAS threads, L 16384, H 16, D 64, causal
#
# SEQPAR is the binary (default .device/bin/seqpar, else .build/release/seqpar); MPIRUN_FLAGS is added to mpirun.
set -euo pipefail
part=${1:?"give a part: interleaved, calibrate, calibrate-linear, weak, strong, strong64k, lasp, lasp-chunks, ring16 or peer"}
RESULTS=${RESULTS:-benchmarks/results/scaling}
RANKS=${RANKS:-1 2 4 8 16}
mkdir -p "$RESULTS"
. "$(dirname "$0")/common.sh"
export SEQPAR="$BIN"

# Runs the command given on `seqpar` with each rank count in NPS (bound to cores), echoing it to stderr first.
at_ranks() {
    local nps=$1 n; shift
    for n in $nps; do
        echo "# $MPIRUN -np $n --bind-to core $BIN $*" >&2
        $MPIRUN -np "$n" --bind-to core "$BIN" "$@"
    done
}
COMM_SIZES="8 512 32768 262144 2097152 16777216"

# The linear kernel at the shapes LASP's sweeps give a rank (H 16: 512-8192 tokens; H 1: 4096-65536) with NP ranks at
# once; further arguments go to bench kernel.
linear_kernels() {
    local np=$1; shift
    for shape in "--heads 16 --seq-len 512 1024 2048 4096 8192" "--heads 1 --seq-len 4096 16384 65536"; do
        at_ranks "$np" bench kernel --kernel linear $shape --head-dim 64 --repeats 3 --warmup 1 --json "$@"
    done
}

# The forward kernels the sweeps' points run at NP ranks at once: softmax per head at their per-rank lengths, linear at
# LASP's shapes.
forward_kernels() {
    local np=$1
    at_ranks "$np" bench kernel --kernel softmax --seq-len 256 512 1024 2048 4096 8192 16384 --head-dim 64 --mask full --forward-only --repeats 3 --warmup 1 --json
    linear_kernels "$np" --decay 1 --forward-only
}

case "$part" in
interleaved)
    for np in $RANKS; do
        forward_kernels "$np" >> "$RESULTS/calibration-kernel.jsonl"
        [ "$np" -gt 1 ] && at_ranks "$np" bench comm --size $COMM_SIZES --json >> "$RESULTS/calibration-comm.jsonl"
        if [ "$np" -eq 1 ]; then
            for w in 512 256 128 64 32; do
                at_ranks 1 bench latent --algorithm mla --seq-len 32768 262144 --heads 16 --latent-dim $w --repeats 20 --warmup 3 --json
            done >> "$RESULTS/calibration-latent.jsonl"
        fi
        # One rank count per call, no per-launch baseline: efficiency comes from the merged sweep's one-rank point.
        base=$([ "$np" -eq 1 ] || echo --no-baseline)
        launch/scaling weak --ranks "$np" $base --tokens-per-rank 2048 --heads 16 --head-dim 64 --repeats 2 --warmup 1 --out "$RESULTS/weak/p$np"
        launch/scaling strong --ranks "$np" $base --seq-len 8192 --heads 16 --head-dim 64 --repeats 2 --warmup 1 --decode-len 262144 --out "$RESULTS/strong/p$np"
        launch/scaling strong --ranks "$np" $base --algorithms "ring:zigzag lasp2" --seq-len 65536 --heads 1 --head-dim 64 --repeats 2 --warmup 1 --out "$RESULTS/strong64k/p$np"
        forward_kernels "$np" >> "$RESULTS/calibration-kernel.jsonl"
    done
    for sweep in weak:weak strong:strong strong64k:strong; do
        dir=${sweep%%:*} mode=${sweep##*:}
        # Rank counts in order, from every call so far.
        for n in $(ls -d "$RESULTS/$dir"/p* | sed 's/.*\/p//' | sort -n); do
            grep -hs '^{' "$RESULTS/$dir/p$n/$mode.jsonl" || echo "no $dir figures at $n ranks (see $RESULTS/$dir/p$n/$mode.log)" >&2
        done > "$RESULTS/$dir/$mode.jsonl"
        "$BIN" report "$RESULTS/$dir/$mode.jsonl" --mode "$mode" --out "$RESULTS/$dir/$mode" --title "$dir scaling, calibration interleaved" \
            || echo "no $dir report yet: it needs the one-rank point (RANKS with 1, in this RESULTS)" >&2
    done
    sweeps="$RESULTS/weak/weak.jsonl $RESULTS/strong/strong.jsonl $RESULTS/strong64k/strong.jsonl"
    "$BIN" model validate --calibration "$RESULTS/calibration-kernel.jsonl" "$RESULTS/calibration-comm.jsonl" "$RESULTS/calibration-latent.jsonl" $sweeps \
        -- $sweeps > "$RESULTS/validation.txt" || true
    tail -1 "$RESULTS/validation.txt" >&2
    ;;
calibrate)
    CALIBRATION_RANKS=${CALIBRATION_RANKS:-1 2 4 8 16}
    for np in $CALIBRATION_RANKS; do
        at_ranks "$np" bench kernel --kernel softmax --seq-len 2048 4096 16384 --head-dim 64 --mask full --repeats 3 --warmup 1 --json
        linear_kernels "$np" --decay 1
    done > "$RESULTS/calibration-kernel.jsonl"
    at_ranks "$(echo " $CALIBRATION_RANKS " | sed 's/ 1 / /')" bench comm --size $COMM_SIZES --json > "$RESULTS/calibration-comm.jsonl"
    ;;
calibrate-linear)
    for np in 1 2 4 8 16; do linear_kernels "$np"; done > "$RESULTS/calibration-linear.jsonl"
    at_ranks "2 4 8 16" bench comm --size $COMM_SIZES --json > "$RESULTS/calibration-linear-comm.jsonl"
    ;;
lasp)
    launch/scaling weak --ranks "$RANKS" --algorithms "lasp1 lasp2" --tokens-per-rank 2048 --heads 16 --head-dim 64 --repeats 3 --warmup 1 --out "$RESULTS/lasp-weak"
    launch/scaling strong --ranks "$RANKS" --algorithms "lasp1 lasp2" --seq-len 8192 --heads 16 --head-dim 64 --repeats 3 --warmup 1 --out "$RESULTS/lasp-strong"
    launch/scaling strong --ranks "$RANKS" --algorithms "lasp2" --seq-len 65536 --heads 1 --head-dim 64 --repeats 3 --warmup 1 --out "$RESULTS/lasp-strong64k"
    ;;
weak)
    launch/scaling weak --ranks "$RANKS" --tokens-per-rank 2048 --heads 16 --head-dim 64 --repeats 2 --warmup 1 --out "$RESULTS/weak"
    ;;
strong)
    launch/scaling strong --ranks "$RANKS" --seq-len 8192 --heads 16 --head-dim 64 --repeats 2 --warmup 1 --decode-len 262144 --out "$RESULTS/strong"
    ;;
strong64k)
    launch/scaling strong --ranks "$RANKS" --algorithms "ring:zigzag lasp2" --seq-len 65536 --heads 1 --head-dim 64 --repeats 2 --warmup 1 --out "$RESULTS/strong64k"
    ;;
lasp-chunks)
    for t in 128 256 512 1024 2048 4096; do
        at_ranks "${RANKS_LASP:-16}" bench attention --algorithm lasp1 lasp2 --causal --seq-len $((${RANKS_LASP:-16} * t)) --heads 16 --head-dim 64 \
            --repeats 10 --warmup 2 --no-baseline --json
    done > "$RESULTS/lasp-chunks.jsonl"
    ;;
ring16)
    for busy in "" --busy-baseline; do
        at_ranks 16 bench attention --algorithm ring --layout zigzag --causal --seq-len 32768 --heads 16 --head-dim 64 --baseline-seq-len 2048 \
            --forward-only --repeats 3 --warmup 1 $busy --json
        at_ranks 16 bench attention --algorithm ring --layout zigzag --causal --seq-len 65536 --heads 1 --head-dim 64 --baseline-seq-len 16384 \
            --forward-only --repeats 3 --warmup 1 $busy --json
    done > "$RESULTS/ring16.jsonl"
    ;;
peer)
    {
        echo "# python3 benchmarks/peers/torch_sdpa.py --seq-len 16384 --heads 16 --head-dim 64 --causal --threads 16 --repeats 3"
        python3 benchmarks/peers/torch_sdpa.py --seq-len 16384 --heads 16 --head-dim 64 --causal --threads 16 --repeats 3
        echo "# $MPIRUN -np 16 --bind-to core $BIN bench attention --algorithm ring --layout zigzag --causal --seq-len 16384 --heads 16 --head-dim 64 --forward-only --no-baseline --repeats 3 --json"
        $MPIRUN -np 16 --bind-to core "$BIN" bench attention --algorithm ring --layout zigzag --causal --seq-len 16384 --heads 16 --head-dim 64 --forward-only --no-baseline --repeats 3 --json
        echo "# OPENBLAS_NUM_THREADS=16 $BIN bench attention --algorithm dense --causal --seq-len 16384 --heads 16 --head-dim 64 --forward-only --no-baseline --repeats 3 --json"
        OPENBLAS_NUM_THREADS=16 "$BIN" bench attention --algorithm dense --causal --seq-len 16384 --heads 16 --head-dim 64 --forward-only --no-baseline --repeats 3 --json
    } > "$RESULTS/peer.jsonl"
    ;;
*) echo "unknown part '$part': give interleaved, calibrate, calibrate-linear, weak, strong, strong64k, lasp, lasp-chunks, ring16 or peer" >&2; exit 2 ;;
esac
