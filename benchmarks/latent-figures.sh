#!/usr/bin/env bash
# The latent-attention figures (issue 5), here or on the 16-core device machine (../shared/device/README.md).
# Results go to $OUT (default benchmarks/results/latent).
#
#   benchmarks/latent-figures.sh decode     decode-step latency, TP-MLA vs TPLA, L 8K/32K/128K, H 16 and 128, d_c 512,
#                                           d_r 64, d_v 128, at P = $RANKS (default 2), ranks bound to cores
#   benchmarks/latent-figures.sh accuracy   TPLA's relative difference from MLA for none/hadamard/pca at P = 2, 4, 8,
#                                           random inputs and inputs with 8 outlier latent channels (simulation backend)
#
# SEQPAR is the binary (default .device/bin/seqpar, else .build/release/seqpar); MPIRUN_FLAGS is added to mpirun.
set -euo pipefail
part=${1:?"give a part: decode or accuracy"}
OUT=${OUT:-benchmarks/results/latent}
mkdir -p "$OUT"
. "$(dirname "$0")/common.sh"
tag=${TAG:-$(hostname)}

case "$part" in
decode)
    for P in ${RANKS:-2}; do
        cmd="$MPIRUN -np $P --bind-to core $BIN bench latent --algorithm tp-mla tpla --seq-len 8192 32768 131072 --heads 16 128 --repeats ${REPEATS:-20} --warmup 3"
        echo "# $cmd"
        $cmd
    done > "$OUT/decode-$tag.txt"
    ;;
accuracy)
    echo "ranks,transform,outlier_channels,tpla_vs_mla" > "$OUT/accuracy.csv"
    for P in 2 4 8; do
        for T in none hadamard pca; do
            for N in 0 8; do
                "$BIN" attention --algorithm tpla --transform "$T" --outlier-channels "$N" --seq-len 4096 --heads 16 \
                    --latent-dim 512 --rope-dim 64 --v-dim 128 --ranks "$P" --json \
                    | sed -n 's/.*"tpla_vs_mla":\([^,}]*\).*/'"$P,$T,$N"',\1/p' >> "$OUT/accuracy.csv"
            done
        done
    done
    ;;
*) echo "unknown part $part: give decode or accuracy" >&2; exit 64 ;;
esac
