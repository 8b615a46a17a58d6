// cblas.h from Debian's libopenblas-dev (pkg-config "openblas" puts its directory on the include path).
// OpenBLAS's cblas.h also declares openblas_set_num_threads / openblas_get_corename / openblas_get_config,
// which `seqpar info` reports.
#include <cblas.h>

#include <stddef.h>
// LAPACK's symmetric eigensolver (divide and conquer), which OpenBLAS ships: the PCA transform of latent attention
// uses it on d_c x d_c second-moment matrices. Fortran convention: every argument by pointer, column-major, and the
// hidden lengths of the two character arguments at the end.
void dsyevd_(const char *jobz, const char *uplo, const int *n, double *a, const int *lda, double *w,
             double *work, const int *lwork, int *iwork, const int *liwork, int *info, size_t jobz_len, size_t uplo_len);
