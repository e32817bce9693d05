#pragma once
// The CUDA backend's host-side entry points (no CUDA types here).
#include <memory>

#include "backend.hpp"
#include "ddim/error.hpp"

namespace ddim::cuda {

int device_count() noexcept;  // 0 without a usable driver/device; never throws
std::unique_ptr<Executor> make_executor(const ExecutorContext& ctx, const SessionOptions& options);

}  // namespace ddim::cuda
