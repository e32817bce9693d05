#pragma once
// Checked CUDA / cuBLAS / cuDNN calls: every status becomes a ddim::Error naming the call, the
// file and line, and the library's message. Sticky CUDA errors (illegal address, launch failure,
// ...) that poison the context map to ErrorCode::DeviceLost; out of memory to OutOfMemory;
// everything else to Internal (a bug in ddim or an unexpected library state).
//
// cuDNN 9 statuses carry a category (the thousands) and a sub-code; classify_cudnn sorts them:
//   Refusal      3000-3004, 3010-3014 (graph pattern, shape, data type, layout, shared memory,
//                padding, launch parameters, CUDA-graph API, dynamic shape) and unknown 3xxx:
//                this engine / graph cannot do this convolution; the caller tries the next one
//                (a shorter fusion prefix, then the direct kernel). ErrorCode::Unsupported.
//   Environment  1001, 1002, 1005, 1008 and 3005-3009 (not initialised, sub-library version or
//                loading failure, licence, incompatible driver / runtime, architecture mismatch,
//                missing runtime prerequisite, sub-library unavailable) and unknown 1xxx: cuDNN
//                is unusable on this machine; the plan fails with the reason (never a silent
//                per-convolution fallback). CudnnEnvironmentError (ErrorCode::Unsupported).
//   OutOfMemory  4003, 4004 (host / device allocation inside cuDNN).
//   Execution    5000-5004: DeviceLost when the CUDA context holds a sticky error, else Internal.
//   Bug          everything else (bad parameters, internal errors): Internal.
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

enum class CudnnFailure { Refusal, Environment, OutOfMemory, Execution, Bug };
CudnnFailure classify_cudnn(cudnnStatus_t s) noexcept;

// cuDNN cannot be used here at all (CudnnFailure::Environment): the plan fails with this.
class CudnnEnvironmentError : public Error {
 public:
  explicit CudnnEnvironmentError(const std::string& message) : Error(ErrorCode::Unsupported, message) {}
};

// True for the errors after which the CUDA context is unusable (the process must be restarted
// to use the device again).
bool is_sticky(cudaError_t e) noexcept;
ErrorCode error_code_of(cudaError_t e) noexcept;

[[noreturn]] void throw_cuda(cudaError_t e, const char* call, const char* file, int line);
[[noreturn]] void throw_cublas(cublasStatus_t s, const char* call, const char* file, int line);
[[noreturn]] void throw_cudnn(cudnnStatus_t s, const char* call, const char* file, int line);
// cuDNN's name of s plus its last error message of this thread (one line, shortened).
std::string cudnn_status_text(cudnnStatus_t s);

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
