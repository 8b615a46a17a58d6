# Sourced by the benchmarks/*-figures.sh scripts: the binary, one BLAS thread per rank, and the MPI launcher.
# SEQPAR is the binary (default .device/bin/seqpar, else .build/release/seqpar); MPIRUN_FLAGS is added to mpirun.
BIN=${SEQPAR:-$( [ -x .device/bin/seqpar ] && echo .device/bin/seqpar || echo .build/release/seqpar )}
export OPENBLAS_NUM_THREADS=1
MPIRUN="$(command -v orterun || command -v mpirun) ${MPIRUN_FLAGS:-}"
[ "$(id -u)" = 0 ] && MPIRUN="$MPIRUN --allow-run-as-root"
