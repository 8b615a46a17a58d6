#!/usr/bin/env bash
# The figures of issue 18 on the 16-core device: packed documents and USP (Ulysses x ring), each part one launch.
# Results go to $OUT (default benchmarks/results/documents-usp). Parts (default: both):
#
#   benchmarks/documents-usp-figures.sh documents   16 ranks, ring attention, causal, 64K tokens of documents drawn
#                                                   between 512 and 16K (seeded), H 8, D 128, bf16, forward and
#                                                   backward: packed (zigzag per document, and contiguous) against the
#                                                   same documents padded to the longest and against each run alone,
#                                                   in 4 rounds in turn (about 3 minutes a layout on the 16-core device)
#   benchmarks/documents-usp-figures.sh usp         16 ranks, L 65536, H 16, D 128, causal zigzag, bf16, forward and
#                                                   backward: ring, Ulysses, USP 4x4 and USP 2x8 in one launch
#   benchmarks/documents-usp-figures.sh netns       on a machine that allows network namespaces (root): two hosts of
#                                                   two ranks (launch/netns-hosts), ring, Ulysses and USP 2x2 forward
#                                                   and backward: the bytes that cross between the hosts
#
# SEQPAR is the binary (default .device/bin/seqpar, else .build/release/seqpar); MPIRUN_FLAGS is added to mpirun.
# DOC_FLAGS and USP_FLAGS are added to the two benches (e.g. --seq-len 8192 for a quick run).
set -uo pipefail
OUT=${OUT:-benchmarks/results/documents-usp}
mkdir -p "$OUT"
. "$(dirname "$0")/common.sh"
export OMP_NUM_THREADS=1
parts=${*:-documents usp}

"$BIN" info > "$OUT/info.txt" 2>&1

for part in $parts; do
case "$part" in
documents)
    for layout in zigzag contiguous; do
        cmd="$MPIRUN -np 16 --bind-to core $BIN bench documents --algorithm ring --layout $layout --causal --seq-len 65536 --draw 512,16384 --seed 1 --heads 8 --head-dim 128 --precision bf16 --repeats 3 --warmup 1 --rounds 4 ${DOC_FLAGS:-}"
        echo "# $cmd" >> "$OUT/documents.txt"
        $cmd >> "$OUT/documents.txt" 2>> "$OUT/log.txt"
    done
    ;;
usp)
    cmd="$MPIRUN -np 16 --bind-to core $BIN bench attention --algorithm ring ulysses usp --ulysses-degree 4 2 --seq-len 65536 --heads 16 --head-dim 128 --causal --layout zigzag --precision bf16 --repeats 1 --warmup 1 --no-baseline ${USP_FLAGS:-}"
    echo "# $cmd" >> "$OUT/usp.txt"
    $cmd >> "$OUT/usp.txt" 2>> "$OUT/log.txt"
    ;;
netns)
    for a in "ring" "ulysses" "usp --ulysses-degree 2"; do
        cmd="launch/netns-hosts run -n 2 --np 4 --prefix spfig -- $(realpath "$BIN") attention --algorithm $a --layout zigzag --causal --backward --seq-len 1024 --heads 4 --kv-heads 2 --head-dim 64 --json"
        echo "# $cmd" >> "$OUT/cross-host.txt"
        $cmd 2>> "$OUT/log.txt" | tail -1 | python3 -c 'import json, sys
r = json.loads(sys.stdin.read())
print(r["algorithm"], "U=%s" % r.get("ulysses_degree", "-"), "hosts", [p["host"] for p in r["per_rank"]],
      "bytes across hosts: forward", r["cross_host_bytes_forward"], "backward", r.get("cross_host_bytes_backward"),
      "; all bytes sent: forward", sum(p["forward"]["bytes_sent"] for p in r["per_rank"]), "backward", sum(p["backward"]["bytes_sent"] for p in r["per_rank"]))' >> "$OUT/cross-host.txt"
    done
    ;;
*) echo "unknown part $part: documents, usp or netns" >&2; exit 2 ;;
esac
done
