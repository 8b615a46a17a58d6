// oneDNN's C API (Debian's libdnnl-dev, 2.x: the op-descriptor form, dnnl_matmul_desc_init then
// dnnl_primitive_desc_create) for the bf16 path. Types and constants only: nothing here links libdnnl. SeqPar loads
// libdnnl.so.2 with dlopen when a bf16 kernel first runs, so that fp32 runs (the reference path) need no oneDNN at all,
// and a machine without it gets an error naming the package instead of a loader failure at start-up.
// The typedefs below give each function we look up its exact C type, taken from the header itself.
#include <oneapi/dnnl/dnnl.h>
#include <dlfcn.h>

typedef __typeof__(&dnnl_engine_create) seqpar_dnnl_engine_create;
typedef __typeof__(&dnnl_stream_create) seqpar_dnnl_stream_create;
typedef __typeof__(&dnnl_stream_destroy) seqpar_dnnl_stream_destroy;
typedef __typeof__(&dnnl_memory_desc_init_by_strides) seqpar_dnnl_memory_desc_init_by_strides;
typedef __typeof__(&dnnl_matmul_desc_init) seqpar_dnnl_matmul_desc_init;
typedef __typeof__(&dnnl_primitive_attr_create) seqpar_dnnl_primitive_attr_create;
typedef __typeof__(&dnnl_primitive_attr_destroy) seqpar_dnnl_primitive_attr_destroy;
typedef __typeof__(&dnnl_primitive_attr_set_post_ops) seqpar_dnnl_primitive_attr_set_post_ops;
typedef __typeof__(&dnnl_post_ops_create) seqpar_dnnl_post_ops_create;
typedef __typeof__(&dnnl_post_ops_destroy) seqpar_dnnl_post_ops_destroy;
typedef __typeof__(&dnnl_post_ops_append_sum) seqpar_dnnl_post_ops_append_sum;
typedef __typeof__(&dnnl_primitive_desc_create) seqpar_dnnl_primitive_desc_create;
typedef __typeof__(&dnnl_primitive_desc_destroy) seqpar_dnnl_primitive_desc_destroy;
typedef __typeof__(&dnnl_primitive_desc_query) seqpar_dnnl_primitive_desc_query;
typedef __typeof__(&dnnl_primitive_create) seqpar_dnnl_primitive_create;
typedef __typeof__(&dnnl_primitive_execute) seqpar_dnnl_primitive_execute;
typedef __typeof__(&dnnl_primitive_destroy) seqpar_dnnl_primitive_destroy;
typedef __typeof__(&dnnl_memory_destroy) seqpar_dnnl_memory_destroy;
typedef __typeof__(&dnnl_memory_create) seqpar_dnnl_memory_create;
typedef __typeof__(&dnnl_memory_set_data_handle) seqpar_dnnl_memory_set_data_handle;
typedef __typeof__(&dnnl_get_effective_cpu_isa) seqpar_dnnl_get_effective_cpu_isa;
typedef __typeof__(&dnnl_version) seqpar_dnnl_version;
typedef __typeof__(&dnnl_memory_desc_init_by_tag) seqpar_dnnl_memory_desc_init_by_tag;
typedef __typeof__(&dnnl_primitive_desc_query_md) seqpar_dnnl_primitive_desc_query_md;
typedef __typeof__(&dnnl_memory_desc_get_size) seqpar_dnnl_memory_desc_get_size;
typedef __typeof__(&dnnl_memory_desc_equal) seqpar_dnnl_memory_desc_equal;
typedef __typeof__(&dnnl_reorder_primitive_desc_create) seqpar_dnnl_reorder_primitive_desc_create;
/// libgomp's, which oneDNN threads with: one thread per rank unless OMP_NUM_THREADS says otherwise.
typedef void (*seqpar_omp_set_num_threads)(int);

/// DNNL_ARG_* are macros Swift imports as plain Int32s already; DNNL_RUNTIME_DIM_VAL is INT64_MIN (not imported).
static inline int64_t seqpar_dnnl_runtime_dim(void) { return DNNL_RUNTIME_DIM_VAL; }
