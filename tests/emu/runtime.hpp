#pragma once
// The emulator's interface to kernel code (tests/emu/kernel_prelude.hpp and kernels/launch.cuh):
// the running thread's coordinates, barriers and warp collectives, atomics, dynamic shared memory
// and kernel launches. Implemented in tests/emu/scheduler.cpp; see tests/emu/README.md.
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <source_location>
#include <tuple>
#include <type_traits>
#include <utility>

namespace ddim_emu {

// The coordinates of the running CUDA thread and of its block (valid inside kernel code only).
struct ThreadInfo {
  uint3 thread_idx;
};
struct BlockInfo {
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
extern __thread const ThreadInfo* tls_thread;
extern __thread const BlockInfo* tls_block;
inline const ThreadInfo* current_thread() { return tls_thread; }
inline const BlockInfo* current_block() { return tls_block; }

// Block barrier (__syncthreads): every thread of the block must reach the same barrier.
void syncthreads(std::source_location at);

// Warp collectives. Every lane named in `mask` must take part (with the same mask and the same
// kind of collective). `arg`: the source lane (ShflIdx), the lane mask (ShflXor) or the delta
// (ShflUp / ShflDown); `width`: the shuffle's segment width (a power of two <= 32). Returns the
// shuffled value's bits, the ballot, or the vote (0 / 1); Sync returns 0.
enum class WarpOp : std::uint8_t { Sync, ShflIdx, ShflXor, ShflUp, ShflDown, Ballot, All, Any };
std::uint64_t warp_collective(WarpOp op, unsigned mask, std::uint64_t value, int arg, int width, std::source_location at);

enum class AtomicOp : std::uint8_t { Add, Or, And, Max, Min, Exch };
unsigned atomic_u32(unsigned* p, AtomicOp op, unsigned v);
float atomic_add_f32(float* p, float v);

// The dynamic shared memory of the running block (the launch's byte count; 16-byte aligned).
void* dynamic_shared();

// One thread's execution of a kernel with its (copied) parameters.
struct KernelBody {
  virtual ~KernelBody() = default;
  virtual void run_thread() const = 0;
};

struct KernelLaunch {
  dim3 grid, block;
  std::size_t shared_bytes = 0;
  cudaStream_t stream = nullptr;
  const void* function = nullptr;  // identifies the kernel (cudaFuncSetAttribute)
  const char* name = "";           // __PRETTY_FUNCTION__ of kernel_name<K>
};
// Validates the configuration like cudaLaunchKernel (an error becomes the thread's last error),
// then runs the grid now, or records it when the stream is capturing.
void launch_kernel(const KernelLaunch& launch, std::shared_ptr<const KernelBody> body);

template <auto K>
const char* kernel_name() {
  return __PRETTY_FUNCTION__;
}

template <class... P>
struct Launcher {
  void (*kernel)(P...);
  KernelLaunch launch;
  // Arguments convert to the kernel's parameter types as in a call; the copies are the kernel's
  // parameters (every thread starts from them).
  void operator()(std::type_identity_t<P>... args) const {
    using Params = std::tuple<std::decay_t<P>...>;
    struct Body final : KernelBody {
      void (*k)(P...);
      Params params;
      Body(void (*kk)(P...), Params p) : k(kk), params(std::move(p)) {}
      void run_thread() const override { std::apply(k, params); }
    };
    launch_kernel(launch, std::make_shared<const Body>(kernel, Params(args...)));
  }
};

template <class... P>
Launcher<P...> make_launcher(void (*kernel)(P...), dim3 grid, dim3 block, std::size_t shared_bytes, cudaStream_t stream,
                             const char* name) {
  return Launcher<P...>{kernel, KernelLaunch{grid, block, shared_bytes, stream, reinterpret_cast<const void*>(kernel), name}};
}

}  // namespace ddim_emu
