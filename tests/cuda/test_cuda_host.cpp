// Host-side code of the CUDA backend that needs no device (runs on every machine with a CUDA
// build, GPU or not): the sorting of cuDNN 9's status codes (engine/cuda/check.hpp).
#include <cudnn.h>
#include <doctest/doctest.h>

#include <string>

#include "cuda/check.hpp"
#include "ddim/error.hpp"

using namespace ddim;
using cuda::CudnnFailure;

namespace {

cudnnStatus_t status(int code) { return static_cast<cudnnStatus_t>(code); }

// The ddim::Error throw_cudnn raises for `code`; environment errors are recognised by type.
struct Thrown {
  ErrorCode code = ErrorCode::Internal;
  bool environment = false;
  std::string message;
};
Thrown thrown(int code) {
  try {
    cuda::throw_cudnn(status(code), "cudnnBackendFinalize(test)", __FILE__, __LINE__);
  } catch (const cuda::CudnnEnvironmentError& e) {
    return {e.code(), true, e.what()};
  } catch (const Error& e) {
    return {e.code(), false, e.what()};
  }
  return {};
}

}  // namespace

TEST_CASE("cuda host: cuDNN 9 statuses are sorted by sub-code, not compared as base codes") {
  // Refusals of this convolution: the caller falls back (a shorter fusion, then the direct kernel).
  for (int c : {3000, 3001, 3002, 3003, 3004, 3010, 3011, 3012, 3013, 3014, 3099}) {
    CAPTURE(c);
    CHECK(cuda::classify_cudnn(status(c)) == CudnnFailure::Refusal);
    const Thrown t = thrown(c);
    CHECK(t.code == ErrorCode::Unsupported);
    CHECK(!t.environment);
  }
  // cuDNN unusable on this machine: the plan fails with the reason.
  for (int c : {1001, 1002, 1005, 1008, 3005, 3006, 3007, 3008, 3009, 1099}) {
    CAPTURE(c);
    CHECK(cuda::classify_cudnn(status(c)) == CudnnFailure::Environment);
    const Thrown t = thrown(c);
    CHECK(t.environment);
    CHECK(t.code == ErrorCode::Unsupported);
    CHECK(t.message.find("cuDNN cannot be used on this machine") != std::string::npos);
  }
  for (int c : {4003, 4004}) {
    CAPTURE(c);
    CHECK(cuda::classify_cudnn(status(c)) == CudnnFailure::OutOfMemory);
    CHECK(thrown(c).code == ErrorCode::OutOfMemory);
  }
  // Execution failures: a lost device only with a sticky CUDA error, which a fresh process lacks.
  for (int c : {5000, 5001, 5002, 5003, 5004}) {
    CAPTURE(c);
    CHECK(cuda::classify_cudnn(status(c)) == CudnnFailure::Execution);
    CHECK(thrown(c).code == ErrorCode::Internal);
  }
  for (int c : {2000, 2002, 2008, 4000, 4001, 4002, 1003}) {
    CAPTURE(c);
    CHECK(cuda::classify_cudnn(status(c)) == CudnnFailure::Bug);
    CHECK(thrown(c).code == ErrorCode::Internal);
  }
  CHECK(thrown(3011).message.find("cudnnBackendFinalize(test)") != std::string::npos);  // names the call
}
