// cuDNN under emulation: unavailable. cudnnCreate fails with CUDNN_STATUS_NOT_INITIALIZED (and the
// message below in cudnnGetLastErrorString), so the CUDA backend runs every convolution on its
// direct-convolution kernel, which the emulator does run. Every other call fails the same way.
// cuDNN's engines are closed-source device code: the GPU check on a real GPU covers them.
#include <cudnn.h>

#include <cstdio>
#include <cstring>

namespace {
constexpr const char* kMessage = "cuDNN is not available under the ddim CUDA emulator (tests/emu)";
}

extern "C" {

size_t cudnnGetVersion(void) { return CUDNN_VERSION; }

const char* cudnnGetErrorString(cudnnStatus_t status) {
  switch (status) {
    case CUDNN_STATUS_SUCCESS: return "CUDNN_STATUS_SUCCESS";
    case CUDNN_STATUS_NOT_INITIALIZED: return "CUDNN_STATUS_NOT_INITIALIZED";
    default: return "CUDNN_STATUS (not named by the emulator)";
  }
}

void cudnnGetLastErrorString(char* message, size_t max_size) {
  if (message && max_size > 0) std::snprintf(message, max_size, "%s", kMessage);
}

cudnnStatus_t cudnnCreate(cudnnHandle_t* handle) {
  if (handle) *handle = nullptr;
  return CUDNN_STATUS_NOT_INITIALIZED;
}
cudnnStatus_t cudnnDestroy(cudnnHandle_t) { return CUDNN_STATUS_NOT_INITIALIZED; }
cudnnStatus_t cudnnSetStream(cudnnHandle_t, cudaStream_t) { return CUDNN_STATUS_NOT_INITIALIZED; }
cudnnStatus_t cudnnGetStream(cudnnHandle_t, cudaStream_t*) { return CUDNN_STATUS_NOT_INITIALIZED; }
cudnnStatus_t cudnnBackendCreateDescriptor(cudnnBackendDescriptorType_t, cudnnBackendDescriptor_t* d) {
  if (d) *d = nullptr;
  return CUDNN_STATUS_NOT_INITIALIZED;
}
cudnnStatus_t cudnnBackendDestroyDescriptor(cudnnBackendDescriptor_t) { return CUDNN_STATUS_NOT_INITIALIZED; }
cudnnStatus_t cudnnBackendFinalize(cudnnBackendDescriptor_t) { return CUDNN_STATUS_NOT_INITIALIZED; }
cudnnStatus_t cudnnBackendSetAttribute(cudnnBackendDescriptor_t, cudnnBackendAttributeName_t, cudnnBackendAttributeType_t,
                                       int64_t, const void*) {
  return CUDNN_STATUS_NOT_INITIALIZED;
}
cudnnStatus_t cudnnBackendGetAttribute(cudnnBackendDescriptor_t const, cudnnBackendAttributeName_t,
                                       cudnnBackendAttributeType_t, int64_t, int64_t*, void*) {
  return CUDNN_STATUS_NOT_INITIALIZED;
}
cudnnStatus_t cudnnBackendExecute(cudnnHandle_t, cudnnBackendDescriptor_t, cudnnBackendDescriptor_t) {
  return CUDNN_STATUS_NOT_INITIALIZED;
}

}  // extern "C"
