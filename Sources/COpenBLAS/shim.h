// cblas.h from Debian's libopenblas-dev (pkg-config "openblas" puts its directory on the include path).
// OpenBLAS's cblas.h also declares openblas_set_num_threads / openblas_get_corename / openblas_get_config,
// which `seqpar info` reports.
#include <cblas.h>
