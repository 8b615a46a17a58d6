#!/usr/bin/env bash
# The bf16 figures (issue 17) on the 16-core device (AMX), SeqPar and PyTorch SDPA side by side in one call.
# Results go to $OUT (default benchmarks/results/bf16). Parts (default: all of them):
#
#   benchmarks/bf16-figures.sh kernel   one core: the blockwise kernel in fp32 and bf16, L 4096, H 4, D 64/128, causal and
#                                       full, forward and backward, each over its baseline (OpenBLAS sgemm, oneDNN bf16
#                                       matmul) measured in the same run; PyTorch SDPA on one thread, fp32 and bf16, on
#                                       the same problems
#   benchmarks/bf16-figures.sh ring     16 ranks: ring zigzag causal, L 16384, H 8, D 128, forward+backward, fp32 and bf16
#                                       (two launches each), and PyTorch SDPA with 16 threads on the same problem
#   benchmarks/bf16-figures.sh latent   decode step at 32K context, TP-MLA and TPLA, H 16 and 128, 4 ranks, fp32 then bf16
#   benchmarks/bf16-figures.sh lasp     LASP-2 (with LASP-1 beside it), 16 ranks, L 262144, H 8, D 128, decay 0.99,
#                                       forward and backward, fp32 then bf16
#   benchmarks/bf16-figures.sh rounds   the ring's bf16 figure of issue 17 as rounds (ROUNDS, default 5): SeqPar's ring
#                                       (16 ranks, zigzag causal, L 16384, H 8, D 128, forward and backward, median of 3
#                                       after a warm-up) then PyTorch SDPA bf16 on 16 threads, back to back in each round;
#                                       rounds.txt has each round's ratio and their median (benchmarks/peers/rounds.py)
#   benchmarks/bf16-figures.sh ceiling  the kernel alone on all 16 cores at once (16 ranks, each its own problem): the
#                                       host's rate per rank when every core computes, at the ring's block size (1024
#                                       queries, causal) and at L 4096, fp32 and bf16: what a 16-rank ring can reach
#   benchmarks/bf16-figures.sh verbose  oneDNN's choice of implementation for each of the kernel's products
#
# SEQPAR is the binary (default .device/bin/seqpar, else .build/release/seqpar); MPIRUN_FLAGS is added to mpirun.
# Build the device bundle for AVX-512 (SEQPAR_TARGET_CPU=skylake-avx512 ../shared/device/bundle): the dev machines
# have AVX2 only, and the bf16 kernels' softmax runs 1.6x faster on 512-bit vectors (run-0b1cbf2).
# KERNEL_FLAGS is added to bench kernel (e.g. --seq-len 1024 for a quick run).
set -uo pipefail
OUT=${OUT:-benchmarks/results/bf16}
. "$(dirname "$0")/common.sh"
export OMP_NUM_THREADS=1
PEER="python3 $(dirname "$0")/peers/torch_sdpa.py"
parts=${*:-kernel ring rounds ceiling latent lasp verbose}
for part in $parts; do  # every name checked before anything runs or writes
    case "$part" in kernel|ring|rounds|ceiling|latent|lasp|verbose) ;;
    *) echo "unknown part $part: give kernel, ring, rounds, ceiling, latent, lasp or verbose" >&2; exit 64 ;;
    esac
done
mkdir -p "$OUT"
"$BIN" info > "$OUT/info.txt" 2>&1

for part in $parts; do
case "$part" in
kernel)
    echo "# $BIN bench kernel --seq-len 4096 --head-dim 64 128 --heads 4 --precision fp32 bf16 ${KERNEL_FLAGS:-}" >> "$OUT/kernel.txt"
    "$BIN" bench kernel --seq-len 4096 --head-dim 64 128 --heads 4 --precision fp32 bf16 ${KERNEL_FLAGS:-} >> "$OUT/kernel.txt" 2>&1
    for D in 64 128; do
        for causal in "" --causal; do
            for dtype in float32 bfloat16; do
                $PEER --threads 1 --seq-len 4096 --heads 4 --head-dim $D $causal --backward --dtype $dtype >> "$OUT/peer-kernel.jsonl" 2>> "$OUT/log.txt"
            done
        done
    done
    ;;
ring)
    for precision in fp32 bf16 fp32 bf16; do
        $MPIRUN -np 16 --bind-to core "$BIN" attention --algorithm ring --layout zigzag --causal --seq-len 16384 --heads 8 --head-dim 128 \
            --backward --precision $precision --json >> "$OUT/ring.jsonl" 2>> "$OUT/log.txt"
    done
    for dtype in bfloat16 float32; do
        $PEER --threads 16 --seq-len 16384 --heads 8 --head-dim 128 --causal --backward --dtype $dtype >> "$OUT/peer-ring.jsonl" 2>> "$OUT/log.txt"
    done
    ;;
rounds)
    for round in $(seq 1 "${ROUNDS:-5}"); do
        $MPIRUN -np 16 --bind-to core "$BIN" bench attention --algorithm ring --layout zigzag --causal --seq-len 16384 --heads 8 \
            --head-dim 128 --precision bf16 --repeats 3 --warmup 1 --no-baseline --json 2>> "$OUT/log.txt" \
            | sed "s/^{/{\"round\": $round, /" >> "$OUT/rounds.jsonl"
        $PEER --threads 16 --seq-len 16384 --heads 8 --head-dim 128 --causal --backward --dtype bfloat16 2>> "$OUT/log.txt" \
            | sed "s/^{/{\"round\": $round, /" >> "$OUT/rounds.jsonl"
    done
    python3 "$(dirname "$0")/peers/rounds.py" "$OUT/rounds.jsonl" > "$OUT/rounds.txt"
    ;;
ceiling)
    echo "# $MPIRUN -np 16 --bind-to core $BIN bench kernel --seq-len 1024 4096 --head-dim 128 --heads 8 --mask causal --forward-only --precision fp32 bf16" >> "$OUT/ceiling.txt"
    $MPIRUN -np 16 --bind-to core "$BIN" bench kernel --seq-len 1024 4096 --head-dim 128 --heads 8 --mask causal --forward-only \
        --precision fp32 bf16 >> "$OUT/ceiling.txt" 2>> "$OUT/log.txt"
    ;;
latent)
    for precision in fp32 bf16; do
        $MPIRUN -np 4 --bind-to core "$BIN" bench latent --algorithm tp-mla tpla --seq-len 32768 --heads 16 128 --repeats 20 --warmup 3 \
            --precision $precision --json >> "$OUT/latent.jsonl" 2>> "$OUT/log.txt"
    done
    ;;
lasp)
    for precision in fp32 bf16; do
        $MPIRUN -np 16 --bind-to core "$BIN" bench attention --algorithm lasp2 lasp1 --seq-len 262144 --heads 8 --head-dim 128 --decay 0.99 \
            --repeats 3 --warmup 1 --no-baseline --precision $precision --json >> "$OUT/lasp.jsonl" 2>> "$OUT/log.txt"
    done
    ;;
verbose)
    DNNL_VERBOSE=1 "$BIN" bench kernel --seq-len 1024 --head-dim 128 --precision bf16 --repeats 1 --warmup 0 --mask causal 2>&1 \
        | grep -E 'verbose,(create|exec)' | awk -F, -v OFS=, '{NF--; print}' | sort | uniq -c | sort -rn | head -40 > "$OUT/verbose.txt"
    ;;
esac
done
