#pragma once
// Checked CUDA / cuBLAS / cuDNN calls: every status becomes a ddim::Error naming the call, the
// file and line, and the library's message. Sticky CUDA errors (illegal address, launch failure,
// ...) that poison the context map to ErrorCode::DeviceLost; out of memory to OutOfMemory;
// everything else to Internal (a bug in ddim or an unexpected library state).
//
//   DDIM_CUDA_CHECK(cudaMemcpyAsync(...));
//   DDIM_CUBLAS_CHECK(cublasGemmEx(...));
//   DDIM_CUDNN_CHECK(cudnnBackendFinalize(desc));
//   check_launch("group_norm");  // after a <<<...>>> launch
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <cudnn.h>

#include <string>

#include "ddim/error.hpp"

namespace ddim::cuda {

// True for the errors after which the CUDA context is unusable (the process must be restarted
// to use the device again).
bool is_sticky(cudaError_t e) noexcept;
ErrorCode error_code_of(cudaError_t e) noexcept;

[[noreturn]] void throw_cuda(cudaError_t e, const char* call, const char* file, int line);
[[noreturn]] void throw_cublas(cublasStatus_t s, const char* call, const char* file, int line);
[[noreturn]] void throw_cudnn(cudnnStatus_t s, const char* call, const char* file, int line);

// After a kernel launch: throws when the launch failed (bad configuration, or a sticky error
// from earlier work). Does not synchronise.
void check_launch(const char* kernel);

}  // namespace ddim::cuda

#define DDIM_CUDA_CHECK(call)                                                                  \
  do {                                                                                         \
    const cudaError_t ddim_status_ = (call);                                                   \
    if (ddim_status_ != cudaSuccess) ::ddim::cuda::throw_cuda(ddim_status_, #call, __FILE__, __LINE__); \
  } while (0)

#define DDIM_CUBLAS_CHECK(call)                                                                \
  do {                                                                                         \
    const cublasStatus_t ddim_status_ = (call);                                                \
    if (ddim_status_ != CUBLAS_STATUS_SUCCESS)                                                 \
      ::ddim::cuda::throw_cublas(ddim_status_, #call, __FILE__, __LINE__);                     \
  } while (0)

#define DDIM_CUDNN_CHECK(call)                                                                 \
  do {                                                                                         \
    const cudnnStatus_t ddim_status_ = (call);                                                 \
    if (ddim_status_ != CUDNN_STATUS_SUCCESS) ::ddim::cuda::throw_cudnn(ddim_status_, #call, __FILE__, __LINE__); \
  } while (0)
