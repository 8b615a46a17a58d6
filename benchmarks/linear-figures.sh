#!/usr/bin/env bash
# The linear-attention benchmark figures (issue 4), one command per part, here or on the 16-core device machine
# (../shared/device/README.md). Results go to $OUT (default benchmarks/results/linear).
#
#   benchmarks/linear-figures.sh compare    LASP-2 vs LASP-1 vs ring attention (causal, zigzag) at the same L, H, D:
#                                           forward and backward step time at P = $RANKS (default 4 8 16), L 16384
#                                           ($COMPARE_L), H 8, D 128, ranks bound to cores
#   benchmarks/linear-figures.sh lasp       LASP-2 vs LASP-1 alone on a longer sequence (L $LASP_L, default 262144)
#   benchmarks/linear-figures.sh longest    the longest L LASP-2 runs forward+backward at P = 2 (H 8, D 128), from the
#                                           memory estimate's own limit, and its tokens/s
#
# SEQPAR is the binary (default .device/bin/seqpar, else .build/release/seqpar); MPIRUN_FLAGS is added to mpirun.
set -euo pipefail
part=${1:?"give a part: compare, lasp or longest"}
OUT=${OUT:-benchmarks/results/linear}
mkdir -p "$OUT"
. "$(dirname "$0")/common.sh"
tag=${TAG:-$(hostname)}

case "$part" in
compare)
    for P in ${RANKS:-4 8 16}; do
        cmd="$MPIRUN -np $P --bind-to core $BIN bench attention --algorithm lasp2 lasp1 ring --seq-len ${COMPARE_L:-16384} --heads 8 --head-dim 128 --causal --layout zigzag --repeats 3 --warmup 1"
        echo "# $cmd"
        $cmd
    done > "$OUT/compare-$tag.txt"
    ;;
lasp)
    for P in ${RANKS:-4 8 16}; do
        cmd="$MPIRUN -np $P --bind-to core $BIN bench attention --algorithm lasp2 lasp1 --seq-len ${LASP_L:-262144} --heads 8 --head-dim 128 --decay 0.99 --repeats 5 --warmup 1"
        echo "# $cmd"
        $cmd
    done > "$OUT/lasp-$tag.txt"
    ;;
longest)
    # The memory estimate names the longest L that fits; run exactly that.
    limit=$( { $BIN attention --algorithm lasp2 --seq-len 100000000 --heads 8 --head-dim 128 --backward --ranks 2 2>&1 || true; } | sed -n 's/.*use at most about --seq-len \([0-9]*\).*/\1/p')
    L=${LONGEST_L:-$limit}
    cmd="$MPIRUN -np 2 --bind-to core $BIN bench attention --algorithm lasp2 --seq-len $L --heads 8 --head-dim 128 --repeats 2 --warmup 0"
    { echo "# estimate's limit at P = 2: --seq-len $limit"; echo "# $cmd"; $cmd; } > "$OUT/longest-$tag.txt"
    ;;
*) echo "unknown part $part: give compare, lasp or longest" >&2; exit 64 ;;
esac
