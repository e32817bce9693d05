// The CUDA backend's entry points: device discovery and the executor (cuda/cuda_executor.hpp).
#include <cuda_runtime_api.h>

#include "cuda/cuda_backend.hpp"
#include "cuda/cuda_executor.hpp"

namespace ddim::cuda {

int device_count() noexcept {
  int count = 0;
  // Fails with cudaErrorInsufficientDriver / cudaErrorNoDevice on machines without a GPU: that
  // simply means no CUDA device.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the non-sticky error
    return 0;
  }
  return count;
}

std::unique_ptr<Executor> make_executor(const ExecutorContext& ctx, const SessionOptions& options) {
  return std::make_unique<CudaExecutor>(ctx, options);
}

}  // namespace ddim::cuda
