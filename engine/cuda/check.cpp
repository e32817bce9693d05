#include "cuda/check.hpp"

#include <cstdio>

namespace ddim::cuda {
namespace {

std::string where(const char* call, const char* file, int line) {
  const char* base = file;
  for (const char* p = file; *p; ++p)
    if (*p == '/') base = p + 1;
  return std::string(call) + " (" + base + ":" + std::to_string(line) + ")";
}

}  // namespace

bool is_sticky(cudaError_t e) noexcept {
  switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorHardwareStackError:
    case cudaErrorAssert:
    case cudaErrorLaunchTimeout:
    case cudaErrorECCUncorrectable:
    case cudaErrorContextIsDestroyed:
    case cudaErrorDevicesUnavailable:
    case cudaErrorUnknown:
      return true;
    default:
      return false;
  }
}

ErrorCode error_code_of(cudaError_t e) noexcept {
  if (e == cudaErrorMemoryAllocation) return ErrorCode::OutOfMemory;
  if (is_sticky(e)) return ErrorCode::DeviceLost;
  return ErrorCode::Internal;
}

void throw_cuda(cudaError_t e, const char* call, const char* file, int line) {
  if (!is_sticky(e)) (void)cudaGetLastError();  // clear a non-sticky error so later calls start clean
  throw Error(error_code_of(e), std::string("cuda: ") + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ") in " +
                                    where(call, file, line));
}

void throw_cublas(cublasStatus_t s, const char* call, const char* file, int line) {
  // EXECUTION_FAILED is a lost device only when the CUDA context holds a sticky error (a kernel
  // that could not launch, or a capture-related refusal, leaves the context usable).
  const cudaError_t pending = s == CUBLAS_STATUS_EXECUTION_FAILED ? cudaPeekAtLastError() : cudaSuccess;
  const ErrorCode code = s == CUBLAS_STATUS_ALLOC_FAILED ? ErrorCode::OutOfMemory
                         : s == CUBLAS_STATUS_EXECUTION_FAILED && is_sticky(pending) ? ErrorCode::DeviceLost
                                                                                     : ErrorCode::Internal;
  throw Error(code, std::string("cublas: ") + cublasGetStatusName(s) + " (" + cublasGetStatusString(s) + ") in " +
                        where(call, file, line));
}

void throw_cudnn(cudnnStatus_t s, const char* call, const char* file, int line) {
  char detail[512] = {0};
  cudnnGetLastErrorString(detail, sizeof detail);
  const ErrorCode code = s == CUDNN_STATUS_ALLOC_FAILED ? ErrorCode::OutOfMemory
                         : s == CUDNN_STATUS_EXECUTION_FAILED ? ErrorCode::DeviceLost
                         : s == CUDNN_STATUS_NOT_SUPPORTED ? ErrorCode::Unsupported
                                                            : ErrorCode::Internal;
  std::string message = std::string("cudnn: ") + cudnnGetErrorString(s) + " in " + where(call, file, line);
  if (detail[0]) message += ": " + std::string(detail);
  throw Error(code, message);
}

void check_launch(const char* kernel) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw_cuda(e, kernel, "kernel launch", 0);
}

}  // namespace ddim::cuda
