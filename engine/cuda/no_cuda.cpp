// Built when the CUDA backend is disabled (DDIM_CUDA=OFF or no nvcc): no CUDA device exists.
#include "cuda/cuda_backend.hpp"

namespace ddim::cuda {

int device_count() noexcept { return 0; }

std::unique_ptr<Executor> make_executor(const ExecutorContext&, const SessionOptions&) {
  throw Error(ErrorCode::Unsupported, "this build of ddim has no CUDA backend (configure with -DDDIM_CUDA=ON)");
}

}  // namespace ddim::cuda
