// Hand-vectorised rows of the bf16 softmax kernels for CPUs with AVX512-BF16 (Cooper Lake, Sapphire Rapids and later),
// whose vcvtneps2bf16 rounds sixteen floats to bf16 (nearest, ties to even) in one instruction, where portable code
// needs five integer operations and a narrowing. The same polynomial and operation order as the Swift kernels
// (VectorMath.exp2NonPositive, expToBF16): the results agree with them to the last bit of each exponential.
// Callers check seqpar_has_avx512bf16() first; on other CPUs (and other architectures) the Swift code runs.
#ifndef SEQPAR_CSIMD_H
#define SEQPAR_CSIMD_H
#include <stdint.h>

/// 1 where this CPU and OS run the functions below (AVX-512 F/BW/VL with its register state enabled, and AVX512-BF16).
int seqpar_has_avx512bf16(void);

/// dst[j] = bf16(2^(p[j] * a - b)) for j < n, where p[j] * a <= b (a softmax row: a = scale * log2(e), b = its max
/// times that); returns the sum of the fp32 exponentials, before rounding.
float seqpar_exp2_to_bf16_avx512(const float *p, long n, float a, float b, uint16_t *dst);

#endif
