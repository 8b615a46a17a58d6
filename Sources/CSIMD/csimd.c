// See include/csimd.h. Compiled for any x86-64: the AVX-512 code is confined to functions with a target attribute,
// reached only after seqpar_has_avx512bf16() said yes.
#include "csimd.h"

#if defined(__x86_64__) && defined(__clang__)
#include <immintrin.h>

int seqpar_has_avx512bf16(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
        && __builtin_cpu_supports("avx512bf16");
}

#define SEQPAR_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma")))

/// 2^x for x <= 0: VectorMath.exp2NonPositive, lane for lane (x = n + r, |r| <= 1/2, degree-5 polynomial, 0 below -126).
SEQPAR_AVX512BF16 static inline __m512 exp2_non_positive(__m512 x) {
    const __m512 lower = _mm512_set1_ps(-126.0f), magic = _mm512_set1_ps(12582912.0f);
    const __m512 xc = _mm512_max_ps(x, lower);
    const __m512 t = _mm512_add_ps(xc, magic);
    const __m512 r = _mm512_sub_ps(xc, _mm512_sub_ps(t, magic));
    __m512 p = _mm512_set1_ps(1.3333558e-3f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    const __m512i n = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(0x4B400000));
    const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23));
    const __mmask16 inRange = _mm512_cmp_ps_mask(x, lower, _CMP_GE_OQ);
    return _mm512_maskz_mov_ps(inRange, _mm512_mul_ps(p, scale));
}

SEQPAR_AVX512BF16 float seqpar_exp2_to_bf16_avx512(const float *p, long n, float a, float b, uint16_t *dst) {
    const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
    __m512 acc = _mm512_setzero_ps();
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 e = exp2_non_positive(_mm512_fmsub_ps(_mm512_loadu_ps(p + i), va, vb));
        _mm256_storeu_si256((__m256i *)(dst + i), (__m256i)_mm512_cvtneps_pbh(e));
        acc = _mm512_add_ps(acc, e);
    }
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        // Lanes past the row read -inf: their exponential is 0 and adds nothing.
        const __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(-__builtin_inff()), m, p + i);
        const __m512 e = exp2_non_positive(_mm512_fmsub_ps(x, va, vb));
        _mm256_mask_storeu_epi16(dst + i, m, (__m256i)_mm512_cvtneps_pbh(e));
        acc = _mm512_add_ps(acc, e);
    }
    return _mm512_reduce_add_ps(acc);
}

#else
int seqpar_has_avx512bf16(void) { return 0; }
float seqpar_exp2_to_bf16_avx512(const float *p, long n, float a, float b, uint16_t *dst) {
    (void)p; (void)n; (void)a; (void)b; (void)dst;
    __builtin_trap();  // unreachable: callers check seqpar_has_avx512bf16() first
}
#endif
