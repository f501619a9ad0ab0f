/* cuBLAS(Lt) error checking for the files of kernels/cuda/ that call
 * cuBLAS (gemm.cu; any other may include this). Real build only: under
 * LP_CUDA_EMU there is no cuBLAS. */
#ifndef LP_KERNELS_CUDA_GEMM_CUH
#define LP_KERNELS_CUDA_GEMM_CUH

#include "kernels/cuda/cuda.cuh"

#ifndef LP_CUDA_EMU
#include <cublasLt.h>

/* Records a failed cuBLAS call (status name, statement, file:line) in the
 * sticky status; true when s was an error. */
bool lp_cublas_check(struct lp_cuda *cu, cublasStatus_t s, const char *stmt, const char *file,
                     int line);

/* LP_CUBLAS_CHECK(cu, cublasLtMatmul(...)): false (and the failure
 * recorded) when the call failed, like LP_CUDA_CHECK. */
#define LP_CUBLAS_CHECK(cu, stmt) (!lp_cublas_check((cu), (stmt), #stmt, __FILE__, __LINE__))
#endif

#endif
