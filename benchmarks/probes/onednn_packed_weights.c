// Probe: oneDNN's bf16 matmul at the softmax kernel's tile shapes, with the weights (B) as the kernel passes them today
// (plain row-major bf16, K^T read transposed for S = Q K^T) against weights reordered once into the layout the
// primitive asks for (format `any`), as a kernel could do once per kv head and reuse across query tiles.
// Prints one JSON line per case: us per call, GFLOP/s, and the reorder's cost for the tile (us).
// Build: gcc -O2 onednn_packed_weights.c -o /tmp/packed -ldnnl ; run with OMP_NUM_THREADS=1.
#include <dnnl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#define CK(x) do { dnnl_status_t s_ = (x); if (s_ != dnnl_success) { fprintf(stderr, "%s: %d\n", #x, s_); exit(1); } } while (0)
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
static dnnl_engine_t eng; static dnnl_stream_t st;

static void strided(dnnl_memory_desc_t *d, long r, long c, long rs, long cs, dnnl_data_type_t t) {
    dnnl_dims_t dims = {r, c}, strides = {rs, cs};
    CK(dnnl_memory_desc_init_by_strides(d, 2, dims, t, strides));
}

// M x K (row-major A) times K x N (B: transposed storage when transB, i.e. an N x K row-major matrix), fp32 C.
static void run(const char *name, long M, long N, long K, int transB, int packed, int reps) {
    dnnl_memory_desc_t a, bplain, b, c;
    strided(&a, M, K, K, 1, dnnl_bf16);
    strided(&bplain, K, N, transB ? 1 : N, transB ? K : 1, dnnl_bf16);
    strided(&c, M, N, N, 1, dnnl_f32);
    if (packed) { dnnl_dims_t dims = {K, N}; CK(dnnl_memory_desc_init_by_tag(&b, 2, dims, dnnl_bf16, dnnl_format_tag_any)); }
    else b = bplain;
    dnnl_matmul_desc_t md; CK(dnnl_matmul_desc_init(&md, &a, &b, NULL, &c));
    dnnl_primitive_attr_t attr; CK(dnnl_primitive_attr_create(&attr));
    dnnl_post_ops_t ops; CK(dnnl_post_ops_create(&ops)); CK(dnnl_post_ops_append_sum(ops, 1.0f));
    CK(dnnl_primitive_attr_set_post_ops(attr, ops));
    dnnl_primitive_desc_t pd; CK(dnnl_primitive_desc_create(&pd, &md, attr, eng, NULL));
    const char *impl; dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl);
    const dnnl_memory_desc_t *wmd = dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
    dnnl_memory_desc_t bw = *wmd;
    dnnl_primitive_t p; CK(dnnl_primitive_create(&p, pd));
    size_t bsize = dnnl_memory_desc_get_size(&bw), psize = dnnl_memory_desc_get_size(&bplain);
    void *A = aligned_alloc(64, M * K * 2 + 64), *Bp = aligned_alloc(64, psize + 64), *Bw = aligned_alloc(64, bsize + 64), *C = aligned_alloc(64, M * N * 4 + 64);
    memset(A, 0x3f, M * K * 2); memset(Bp, 0x3f, psize); memset(C, 0, M * N * 4);
    dnnl_memory_t ma, mbp, mbw, mc;
    CK(dnnl_memory_create(&ma, &a, eng, A)); CK(dnnl_memory_create(&mbp, &bplain, eng, Bp));
    CK(dnnl_memory_create(&mbw, &bw, eng, Bw)); CK(dnnl_memory_create(&mc, &c, eng, C));
    double reorder_us = 0;
    if (packed) {
        dnnl_primitive_desc_t rpd; CK(dnnl_reorder_primitive_desc_create(&rpd, &bplain, eng, &bw, eng, NULL));
        dnnl_primitive_t r; CK(dnnl_primitive_create(&r, rpd));
        dnnl_exec_arg_t ra[2] = {{DNNL_ARG_FROM, mbp}, {DNNL_ARG_TO, mbw}};
        for (int i = 0; i < 3; i++) CK(dnnl_primitive_execute(r, st, 2, ra));
        double best = 1e9;
        for (int k = 0; k < 5; k++) { double t0 = now(); for (int i = 0; i < reps; i++) CK(dnnl_primitive_execute(r, st, 2, ra)); double dt = (now() - t0) / reps; if (dt < best) best = dt; }
        reorder_us = best * 1e6;
        dnnl_primitive_destroy(r); dnnl_primitive_desc_destroy(rpd);
    }
    dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, ma}, {DNNL_ARG_WEIGHTS, packed ? mbw : mbp}, {DNNL_ARG_DST, mc}};
    for (int i = 0; i < 3; i++) CK(dnnl_primitive_execute(p, st, 3, args));
    double best = 1e9;
    for (int k = 0; k < 5; k++) { double t0 = now(); for (int i = 0; i < reps; i++) CK(dnnl_primitive_execute(p, st, 3, args)); double dt = (now() - t0) / reps; if (dt < best) best = dt; }
    int nblk = bw.format_kind == dnnl_blocked ? bw.format_desc.blocking.inner_nblks : 0;
    char blk[128] = ""; int o = 0;
    for (int i = 0; i < nblk; i++) o += snprintf(blk + o, sizeof blk - o, "%ld%c", (long)bw.format_desc.blocking.inner_blks[i], 'a' + (int)bw.format_desc.blocking.inner_idxs[i]);
    printf("{\"case\":\"%s\",\"M\":%ld,\"N\":%ld,\"K\":%ld,\"transB\":%d,\"packed\":%d,\"us_per_call\":%.2f,\"gflops\":%.1f,\"reorder_us\":%.2f,"
           "\"weights_strides\":[%ld,%ld],\"inner_blocks\":\"%s\",\"impl\":\"%s\"}\n",
           name, M, N, K, transB, packed, best * 1e6, 2.0 * M * N * K / best / 1e9, reorder_us,
           (long)bw.format_desc.blocking.strides[0], (long)bw.format_desc.blocking.strides[1], blk, impl);
    dnnl_primitive_destroy(p); dnnl_primitive_desc_destroy(pd); dnnl_primitive_attr_destroy(attr); dnnl_post_ops_destroy(ops);
    dnnl_memory_destroy(ma); dnnl_memory_destroy(mbp); dnnl_memory_destroy(mbw); dnnl_memory_destroy(mc);
    free(A); free(Bp); free(Bw); free(C);
}

int main(void) {
    CK(dnnl_engine_create(&eng, dnnl_cpu, 0)); CK(dnnl_stream_create(&st, eng, dnnl_stream_default_flags));
    printf("{\"isa\":%d,\"version\":\"%d.%d.%d\"}\n", (int)dnnl_get_effective_cpu_isa(), dnnl_version()->major, dnnl_version()->minor, dnnl_version()->patch);
    long Ds[2] = {64, 128}, Ms[3] = {128, 256, 512};
    for (int di = 0; di < 2; di++) for (int mi = 0; mi < 3; mi++) for (int packed = 0; packed < 2; packed++) {
        long D = Ds[di], M = Ms[mi];
        run("S=QK^T", M, 512, D, 1, packed, 100);   // scores of a query tile against a key tile
        run("O+=PV", M, D, 512, 0, packed, 100);    // P (M x 512 keys) times the V tile
        run("dQ+=dSK", M, D, 512, 0, packed, 100);  // the backward's dS K: K tile read plain (not transposed)
    }
    return 0;
}
