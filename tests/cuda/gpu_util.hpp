#pragma once
// Helpers of the GPU tests (tests/cuda/*.cpp, doctest test suite "gpu"). Without a CUDA device the
// test main excludes the suite and says so; `ctest -R gpu` then reports the suite as skipped
// (return code 77), never as passed.
//
// DevBuf<T>: a device buffer with guard bytes on both sides, filled with a pattern at creation;
// check_guards() reports any write outside [data, data + count). Host conversions to fp16 / bf16
// round to nearest even (cuda_fp16.h / cuda_bf16.h host functions).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/kernels.hpp"

namespace ddim::test::gpu {

using ddim::cuda::DType;

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) FAIL(what << ": " << cudaGetErrorName(e) << " " << cudaGetErrorString(e));
}
#define GPU_CHECK(call) ::ddim::test::gpu::check((call), #call)

// Raw device bytes with kGuard guard bytes before and after.
class DevBytes {
 public:
  static constexpr std::size_t kGuard = 256;
  static constexpr unsigned char kPattern = 0xA5;
  explicit DevBytes(std::size_t bytes) : bytes_(bytes) {
    GPU_CHECK(cudaMalloc(&base_, bytes + 2 * kGuard));
    GPU_CHECK(cudaMemset(base_, kPattern, bytes + 2 * kGuard));
    GPU_CHECK(cudaStreamSynchronize(nullptr));
  }
  ~DevBytes() { cudaFree(base_); }
  DevBytes(const DevBytes&) = delete;
  DevBytes& operator=(const DevBytes&) = delete;
  void* data() const { return static_cast<unsigned char*>(base_) + kGuard; }
  std::size_t bytes() const { return bytes_; }
  void upload(const void* host) {
    GPU_CHECK(cudaMemcpy(data(), host, bytes_, cudaMemcpyHostToDevice));
    GPU_CHECK(cudaStreamSynchronize(nullptr));
  }
  // Every byte of the buffer (not the guards) set to `byte`, complete on return.
  void fill(int byte) {
    GPU_CHECK(cudaMemset(data(), byte, bytes_));
    GPU_CHECK(cudaStreamSynchronize(nullptr));
  }
  void download(void* host) const { GPU_CHECK(cudaMemcpy(host, data(), bytes_, cudaMemcpyDeviceToHost)); }
  // True when both guard regions still hold the pattern.
  bool guards_intact() const {
    std::vector<unsigned char> g(kGuard);
    for (std::size_t off : {std::size_t(0), kGuard + bytes_}) {
      GPU_CHECK(cudaMemcpy(g.data(), static_cast<unsigned char*>(base_) + off, kGuard, cudaMemcpyDeviceToHost));
      for (unsigned char b : g)
        if (b != kPattern) return false;
    }
    return true;
  }

 private:
  void* base_ = nullptr;
  std::size_t bytes_;
};

inline std::size_t dsize(DType t) { return t == DType::F32 ? 4 : 2; }

// Under the CUDA emulator (tests/emu, the CTest test gpu_emu) the suite runs on the CPU, with every
// check on: a case whose GPU size would take minutes there runs at a smaller size instead, with
// the same code paths (the same kernels, buckets and branches). on_gpu_or_emulated(gpu, emu)
// picks the size; the README lists the cases it shrinks.
#if defined(DDIM_CUDA_EMU)
inline constexpr bool kEmulated = true;
#else
inline constexpr bool kEmulated = false;
#endif
template <class T>
constexpr T on_gpu_or_emulated(T gpu, T emulated) {
  return kEmulated ? emulated : gpu;
}

// Host float values rounded to the element type, as raw bytes.
inline std::vector<unsigned char> encode(const std::vector<float>& x, DType t) {
  std::vector<unsigned char> out(x.size() * dsize(t));
  for (std::size_t i = 0; i < x.size(); ++i) {
    if (t == DType::F32) std::memcpy(out.data() + 4 * i, &x[i], 4);
    else if (t == DType::F16) {
      const __half h = __float2half_rn(x[i]);
      std::memcpy(out.data() + 2 * i, &h, 2);
    } else {
      const __nv_bfloat16 h = __float2bfloat16_rn(x[i]);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}
inline std::vector<float> decode(const std::vector<unsigned char>& b, DType t) {
  const std::size_t n = b.size() / dsize(t);
  std::vector<float> out(n);
  for (std::size_t i = 0; i < n; ++i) {
    if (t == DType::F32) std::memcpy(&out[i], b.data() + 4 * i, 4);
    else if (t == DType::F16) {
      __half h;
      std::memcpy(&h, b.data() + 2 * i, 2);
      out[i] = __half2float(h);
    } else {
      __nv_bfloat16 h;
      std::memcpy(&h, b.data() + 2 * i, 2);
      out[i] = __bfloat162float(h);
    }
  }
  return out;
}
// The values as the device sees them after rounding to t (the CPU reference's input).
inline std::vector<float> rounded(const std::vector<float>& x, DType t) { return decode(encode(x, t), t); }

// A device tensor of type t holding x (rounded), with guards.
struct DevTensor {
  DType t;
  std::size_t count;
  DevBytes mem;
  DevTensor(const std::vector<float>& x, DType type) : t(type), count(x.size()), mem(x.size() * dsize(type)) {
    const auto b = encode(x, t);
    mem.upload(b.data());
  }
  DevTensor(std::size_t n, DType type) : t(type), count(n), mem(n * dsize(type)) {}
  void* data() const { return mem.data(); }
  std::vector<float> read() const {
    std::vector<unsigned char> b(count * dsize(t));
    mem.download(b.data());
    return decode(b, t);
  }
};

inline std::vector<float> random_vector(std::size_t n, std::uint32_t seed, float lo = -1.f, float hi = 1.f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = d(gen);
  return v;
}

// (n, c, hw) <-> (n, hw, c) on the host.
inline std::vector<float> nchw_to_nhwc(const std::vector<float>& x, int n, int c, int hw) {
  std::vector<float> y(x.size());
  for (int b = 0; b < n; ++b)
    for (int ch = 0; ch < c; ++ch)
      for (int p = 0; p < hw; ++p) y[(std::size_t(b) * hw + p) * c + ch] = x[(std::size_t(b) * c + ch) * hw + p];
  return y;
}
inline std::vector<float> nhwc_to_nchw(const std::vector<float>& x, int n, int c, int hw) {
  std::vector<float> y(x.size());
  for (int b = 0; b < n; ++b)
    for (int ch = 0; ch < c; ++ch)
      for (int p = 0; p < hw; ++p) y[(std::size_t(b) * c + ch) * hw + p] = x[(std::size_t(b) * hw + p) * c + ch];
  return y;
}

struct Diff {
  double max_abs = 0, max_rel = 0;  // rel: |a - b| / max(|b|, floor)
  std::size_t non_finite = 0;
};
// Compares got against the reference; floor keeps the relative error of values near 0 sane.
inline Diff compare(const std::vector<float>& got, const std::vector<float>& ref, double floor = 1e-3) {
  REQUIRE(got.size() == ref.size());
  Diff d;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) {
      ++d.non_finite;
      continue;
    }
    const double e = std::fabs(double(got[i]) - double(ref[i]));
    d.max_abs = std::max(d.max_abs, e);
    d.max_rel = std::max(d.max_rel, e / std::max(std::fabs(double(ref[i])), floor));
  }
  return d;
}

// Unit roundoff of the element type: 2^-24 (fp32), 2^-11 (fp16), 2^-8 (bf16).
inline double unit_roundoff(DType t) { return t == DType::F32 ? 0x1p-24 : t == DType::F16 ? 0x1p-11 : 0x1p-8; }

inline void sync() { GPU_CHECK(cudaDeviceSynchronize()); }

}  // namespace ddim::test::gpu
