#include "cuda/device_memory.hpp"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

#include "plan/host_plan.hpp"
#include "cuda/check.hpp"

namespace ddim::cuda {

DeviceBuffer::DeviceBuffer(std::size_t bytes, const std::string& what) {
  if (bytes == 0) return;
  const cudaError_t e = cudaMalloc(&ptr_, bytes);
  if (e != cudaSuccess) {
    ptr_ = nullptr;
    if (e == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();
      std::size_t free_bytes = 0, total = 0;
      (void)cudaMemGetInfo(&free_bytes, &total);
      throw Error(ErrorCode::OutOfMemory, "cuda: out of device memory allocating " + std::to_string(bytes) + " bytes for " +
                                              what + " (" + std::to_string(free_bytes >> 20) + " MiB free of " +
                                              std::to_string(total >> 20) + " MiB)");
    }
    throw_cuda(e, ("cudaMalloc for " + what).c_str(), __FILE__, __LINE__);
  }
  bytes_ = bytes;
}

DeviceBuffer::~DeviceBuffer() {
  if (ptr_) (void)cudaFree(ptr_);  // a destructor cannot report; a lost device is reported elsewhere
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    if (ptr_) (void)cudaFree(ptr_);
    ptr_ = o.ptr_;
    bytes_ = o.bytes_;
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

bool DeviceBuffer::reserve(std::size_t bytes, const std::string& what) {
  if (bytes <= bytes_) return false;
  *this = DeviceBuffer();  // free first: the peak stays at the larger of the two
  *this = DeviceBuffer(bytes, what);
  return true;
}

namespace {

using graph::Node;
using graph::Op;

// Host staging of every parameter in its device layout, 256-byte aligned pieces.
class Staging {
 public:
  explicit Staging(DType t) : t_(t) {}
  // Appends `count` values converted to the element type; returns the piece's byte offset.
  std::size_t typed(const float* src, std::size_t count) {
    const std::size_t off = start(count * dtype_size(t_));
    for (std::size_t i = 0; i < count; ++i) put(off, i, src[i]);
    return off;
  }
  // KRSC from OIHW.
  std::size_t conv_krsc(const float* w, int cout, int cin, int kh, int kw) {
    const std::size_t off = start(std::size_t(cout) * cin * kh * kw * dtype_size(t_));
    for (int o = 0; o < cout; ++o)
      for (int c = 0; c < cin; ++c)
        for (int r = 0; r < kh; ++r)
          for (int s = 0; s < kw; ++s)
            put(off, ((std::size_t(o) * kh + r) * kw + s) * cin + c, w[((std::size_t(o) * cin + c) * kh + r) * kw + s]);
    return off;
  }
  std::size_t f32(const float* src, std::size_t count) {
    const std::size_t off = start(count * 4);
    if (src) std::memcpy(bytes_.data() + off, src, count * 4);  // else zeros
    return off;
  }
  std::vector<unsigned char>& bytes() { return bytes_; }

 private:
  std::size_t start(std::size_t n) {
    const std::size_t off = (bytes_.size() + 255) / 256 * 256;
    bytes_.resize(off + n, 0);
    return off;
  }
  void put(std::size_t off, std::size_t i, float v) {
    unsigned char* p = bytes_.data() + off;
    if (t_ == DType::F32) std::memcpy(p + 4 * i, &v, 4);
    else if (t_ == DType::F16) {
      const __half h = __float2half_rn(v);
      std::memcpy(p + 2 * i, &h, 2);
    } else {
      const __nv_bfloat16 h = __float2bfloat16_rn(v);
      std::memcpy(p + 2 * i, &h, 2);
    }
  }
  DType t_;
  std::vector<unsigned char> bytes_;
};

std::shared_ptr<DeviceWeights> upload(const Model& model, int device, DType t) {
  const Model::Impl& m = model.impl();
  const graph::Graph& g = m.graph;
  const std::vector<plan::NodeWeights> w = plan::resolve_node_weights(g, m);
  Staging st(t);
  constexpr std::size_t kNone = std::size_t(-1);
  struct Offsets {
    std::size_t weight = kNone, bias = kNone, gamma = kNone, beta = kNone, w_qkv = kNone, b_qkv = kNone, w_out = kNone,
                b_out = kNone, codebook = kNone;
  };
  std::vector<Offsets> off(g.nodes.size());
  for (std::size_t i = 0; i < g.nodes.size(); ++i) {
    const Node& n = g.nodes[i];
    const auto& p = w[i];
    const auto& x = g.values[n.inputs[0]];
    switch (n.op) {
      case Op::Conv2d:
        off[i].weight = st.conv_krsc(p[plan::kWeight], n.out_channels, x.c, n.kernel_h, n.kernel_w);
        if (p[plan::kBias]) off[i].bias = st.f32(p[plan::kBias], std::size_t(n.out_channels));
        break;
      case Op::Linear:
        off[i].weight = st.typed(p[plan::kWeight], std::size_t(n.out_features) * std::size_t(x.c));
        if (p[plan::kBias]) off[i].bias = st.f32(p[plan::kBias], std::size_t(n.out_features));
        break;
      case Op::GroupNorm:
        // Both are optional in the IR (ir.cpp: no required params). An absent gamma must stay a
        // null pointer (the kernel then uses 1, like the CPU); st.f32(nullptr) would upload zeros.
        if (p[plan::kWeight]) off[i].gamma = st.f32(p[plan::kWeight], std::size_t(x.c));
        if (p[plan::kBias]) off[i].beta = st.f32(p[plan::kBias], std::size_t(x.c));
        break;
      case Op::Attention: {
        const std::size_t d = std::size_t(n.inner_dim ? n.inner_dim : x.c), c = std::size_t(x.c);
        std::vector<float> qkv(3 * d * c), b(3 * d, 0.f);
        std::memcpy(qkv.data(), p[plan::kQWeight], d * c * 4);
        std::memcpy(qkv.data() + d * c, p[plan::kKWeight], d * c * 4);
        std::memcpy(qkv.data() + 2 * d * c, p[plan::kVWeight], d * c * 4);
        if (p[plan::kQBias]) std::memcpy(b.data(), p[plan::kQBias], d * 4);
        if (p[plan::kKBias]) std::memcpy(b.data() + d, p[plan::kKBias], d * 4);
        if (p[plan::kVBias]) std::memcpy(b.data() + 2 * d, p[plan::kVBias], d * 4);
        off[i].w_qkv = st.typed(qkv.data(), qkv.size());
        off[i].b_qkv = st.f32(b.data(), b.size());
        off[i].w_out = st.typed(p[plan::kOutWeight], c * d);
        if (p[plan::kOutBias]) off[i].b_out = st.f32(p[plan::kOutBias], c);
        break;
      }
      case Op::VectorQuantize:
        off[i].codebook = st.f32(p[plan::kWeight], std::size_t(n.entries) * std::size_t(x.c));
        break;
      default: break;  // no parameters
    }
  }
  auto dw = std::make_shared<DeviceWeights>();
  dw->device = device;
  dw->dtype = t;
  dw->storage = DeviceBuffer(st.bytes().size(), "the model weights (" + std::string(to_string(t)) + ")");
  // On a private stream, waited for: cudaMemcpy from pageable memory may return before the DMA
  // has landed (CUDA's "API synchronization behavior") and the legacy stream does not order the
  // executors' non-blocking streams; and a device-wide synchronisation would invalidate a stream
  // capture running on another thread. When this returns the weights are on the device.
  {
    struct Stream {
      cudaStream_t s = nullptr;
      ~Stream() {
        if (s) (void)cudaStreamDestroy(s);
      }
    } upload;
    DDIM_CUDA_CHECK(cudaStreamCreateWithFlags(&upload.s, cudaStreamNonBlocking));
    DDIM_CUDA_CHECK(cudaMemcpyAsync(dw->storage.get(), st.bytes().data(), st.bytes().size(), cudaMemcpyHostToDevice, upload.s));
    DDIM_CUDA_CHECK(cudaStreamSynchronize(upload.s));
  }
  const auto at = [&](std::size_t o) -> void* {
    return o == kNone ? nullptr : static_cast<unsigned char*>(dw->storage.get()) + o;
  };
  dw->nodes.resize(g.nodes.size());
  for (std::size_t i = 0; i < g.nodes.size(); ++i) {
    NodeDeviceParams& d = dw->nodes[i];
    d.weight = at(off[i].weight);
    d.bias = static_cast<const float*>(at(off[i].bias));
    d.gamma = static_cast<const float*>(at(off[i].gamma));
    d.beta = static_cast<const float*>(at(off[i].beta));
    d.w_qkv = at(off[i].w_qkv);
    d.b_qkv = static_cast<const float*>(at(off[i].b_qkv));
    d.w_out = at(off[i].w_out);
    d.b_out = static_cast<const float*>(at(off[i].b_out));
    d.codebook = static_cast<const float*>(at(off[i].codebook));
  }
  return dw;
}

}  // namespace

std::shared_ptr<const DeviceWeights> device_weights(const std::shared_ptr<const Model>& model, int device, DType dtype) {
  static std::mutex mutex;
  static std::map<std::tuple<const Model*, int, DType>, std::weak_ptr<DeviceWeights>> registry;
  const std::lock_guard<std::mutex> lock(mutex);
  auto& slot = registry[{model.get(), device, dtype}];
  if (auto existing = slot.lock()) return existing;
  // The weights also keep the model alive, so a new Model at the same address cannot alias
  // an entry still in use.
  std::shared_ptr<DeviceWeights> fresh = upload(*model, device, dtype);
  std::shared_ptr<DeviceWeights> shared(fresh.get(), [fresh, keep = std::shared_ptr<const Model>(model)](DeviceWeights*) mutable {
    fresh.reset();
    keep.reset();
  });
  slot = shared;
  for (auto it = registry.begin(); it != registry.end();)  // forget entries whose weights are gone
    it = it->second.expired() ? registry.erase(it) : std::next(it);
  return shared;
}

}  // namespace ddim::cuda
