#!/usr/bin/env bash
# The softmax-attention benchmark figures (issue 3), in one command per part, on the 16-core device machine
# (../shared/device/README.md) or any machine with the binary. Results go to $OUT (default benchmarks/results/softmax).
#
#   benchmarks/softmax-figures.sh overlap   ring overlap at 2 ranks: unbound with a core to spare (progress thread)
#                                           and bound to one core each (MPI_Test between tiles), L 128..1024
#                                           ($LENGTHS): short chunks, where the exchange is a sizeable part of a step
#   benchmarks/softmax-figures.sh memory    peak memory per rank, RSA versus ring, L 4096..32768 ($LENGTHS),
#                                           P 2, 4, 8 ($RANKS), ranks bound to cores ($BIND)
#   benchmarks/softmax-figures.sh kernel    blockwise kernel GFLOP/s over sgemm, D 64/128, L 4096/16384, causal and not
#
# SEQPAR is the binary (default .device/bin/seqpar, else .build/release/seqpar); MPIRUN_FLAGS is added to mpirun.
set -euo pipefail
part=${1:?"give a part: overlap, memory or kernel"}
OUT=${OUT:-benchmarks/results/softmax}
mkdir -p "$OUT"
. "$(dirname "$0")/common.sh"

case "$part" in
overlap)
    for binding in none core; do
        for L in ${LENGTHS:-128 256 512 1024}; do
            echo "# mpirun -np 2 --bind-to $binding $BIN bench overlap --seq-len $L --heads 8 --head-dim 128 --repeats 50 --warmup 3"
            $MPIRUN -np 2 --bind-to $binding "$BIN" bench overlap --seq-len "$L" --heads 8 --head-dim 128 --repeats 50 --warmup 3
        done
    done > "$OUT/overlap.txt"
    ;;
memory)
    echo "algorithm,ranks,seq_len,heads,head_dim,peak_rss_bytes_max,memory_estimate_bytes,forward_s" > "$OUT/memory.csv"
    for L in ${LENGTHS:-4096 8192 16384 32768}; do
        for P in ${RANKS:-2 4 8}; do
            for A in rsa ring; do
                $MPIRUN -np "$P" --bind-to "${BIND:-core}" "$BIN" attention --algorithm "$A" --seq-len "$L" --heads 8 --head-dim 64 --json \
                    | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); print(",".join(str(x) for x in [r["algorithm"], r["ranks"], r["seq_len"], r["heads"], r["head_dim"], max(r["peak_rss_bytes"]), r["memory_estimate_bytes"], r["time_s"]["forward"]["max"]]))' \
                    >> "$OUT/memory.csv"
            done
        done
    done
    ;;
kernel)
    echo "# $BIN bench kernel" > "$OUT/kernel.txt"
    "$BIN" bench kernel >> "$OUT/kernel.txt"
    ;;
*) echo "unknown part $part: give overlap, memory or kernel" >&2; exit 64 ;;
esac
