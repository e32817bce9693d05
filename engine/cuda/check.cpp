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

CudnnFailure classify_cudnn(cudnnStatus_t s) noexcept {
  const int code = static_cast<int>(s);
  switch (code) {
    case 1001: case 1002: case 1005: case 1008:
    case 3005: case 3006: case 3007: case 3008: case 3009:
      return CudnnFailure::Environment;
    case 4003: case 4004:
      return CudnnFailure::OutOfMemory;
    default: break;
  }
  switch (code / 1000) {
    case 1: return code == 1003 || code == 1004 || code == 1006 || code == 1007 ? CudnnFailure::Bug : CudnnFailure::Environment;
    case 3: return CudnnFailure::Refusal;
    case 5: return CudnnFailure::Execution;
    default: return CudnnFailure::Bug;
  }
}

std::string cudnn_status_text(cudnnStatus_t s) {
  std::string text = cudnnGetErrorString(s);
  char detail[512] = {0};
  cudnnGetLastErrorString(detail, sizeof detail);
  if (detail[0]) {
    std::string d(detail);
    for (char& c : d)
      if (c == '\n') c = ' ';  // one-line messages
    if (d.size() > 240) d = d.substr(0, 240) + "...";
    text += " (" + d + ")";
  }
  return text;
}

void throw_cudnn(cudnnStatus_t s, const char* call, const char* file, int line) {
  const std::string message = std::string("cudnn: ") + cudnn_status_text(s) + " in " + where(call, file, line);
  switch (classify_cudnn(s)) {
    case CudnnFailure::Refusal: throw Error(ErrorCode::Unsupported, message);
    case CudnnFailure::Environment: throw CudnnEnvironmentError("cuDNN cannot be used on this machine: " + message);
    case CudnnFailure::OutOfMemory: throw Error(ErrorCode::OutOfMemory, message);
    case CudnnFailure::Execution: {
      // A lost device only when the CUDA context holds a sticky error.
      const cudaError_t pending = cudaPeekAtLastError();
      throw Error(is_sticky(pending) ? ErrorCode::DeviceLost : ErrorCode::Internal, message);
    }
    case CudnnFailure::Bug: break;
  }
  throw Error(ErrorCode::Internal, message);
}

void check_launch(const char* kernel) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw_cuda(e, kernel, "kernel launch", 0);
}

}  // namespace ddim::cuda
