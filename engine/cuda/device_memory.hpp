#pragma once
// Owning device allocations and the model weights on a device.
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "cuda/kernels.hpp"
#include "model_impl.hpp"

namespace ddim::cuda {

// One cudaMalloc'ed block. Allocation failure is ddim::Error(OutOfMemory) naming `what`.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(std::size_t bytes, const std::string& what);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr, o.bytes_ = 0; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* get() const { return ptr_; }
  template <class T> T* as() const { return static_cast<T*>(ptr_); }
  std::size_t bytes() const { return bytes_; }
  // Grow-only: reallocates (contents lost) when smaller than `bytes`; returns true if it did.
  bool reserve(std::size_t bytes, const std::string& what);

 private:
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
};

// A model's parameters on one device in the layouts the CUDA executor uses, uploaded once and
// shared by every session on that device with the same element type:
//   conv weights KRSC (cout, kh, kw, cin) and linear / projection weights (out, in) of the
//   element type; the attention's q, k, v projections concatenated into one (3d, c) matrix with
//   one (3d) bias; every bias and every GroupNorm gamma / beta fp32.
struct NodeDeviceParams {
  const void* weight = nullptr;  // conv (KRSC) or linear (out, in)
  const float* bias = nullptr;
  const float* gamma = nullptr, *beta = nullptr;  // group_norm
  const void* w_qkv = nullptr;                     // attention (3d, c)
  const float* b_qkv = nullptr;                    // (3d); zeros where the model has no bias
  const void* w_out = nullptr;                     // attention (c, d)
  const float* b_out = nullptr;
  const float* codebook = nullptr;  // vector_quantize (entries, c), fp32
};
struct DeviceWeights {
  int device = 0;
  DType dtype = DType::F32;
  DeviceBuffer storage;
  std::vector<NodeDeviceParams> nodes;  // per node of the model's graph
};
// The shared copy for (model, device, dtype): made (and uploaded synchronously) on first use,
// freed when the last session using it goes. Thread-safe. The calling thread's current device
// must be `device`.
std::shared_ptr<const DeviceWeights> device_weights(const std::shared_ptr<const Model>& model, int device, DType dtype);

}  // namespace ddim::cuda
