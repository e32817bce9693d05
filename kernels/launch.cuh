#pragma once
// Kernel launches and dynamic shared memory, spelled so that the kernels also compile as C++ for
// the CUDA emulator (tests/emu, the CTest test gpu_emu), which runs them on the CPU with race,
// barrier and bounds checks. Under nvcc these are exactly the usual CUDA syntax:
//
//   DDIM_LAUNCH(grid, block, shared_bytes, stream, kernel<T>)(args...);
//       == kernel<T><<<grid, block, shared_bytes, stream>>>(args...);
//   DDIM_DYNAMIC_SHARED(unsigned char, smem);
//       == extern __shared__ __align__(16) unsigned char smem[];
//
// The kernel comes last (a template argument list may hold commas) and must name a function (or a
// constexpr pointer to one).
#if defined(DDIM_CUDA_EMU_KERNEL)
#define DDIM_LAUNCH(grid, block, shared_bytes, stream, ...) \
  ::ddim_emu::make_launcher(__VA_ARGS__, grid, block, shared_bytes, stream, ::ddim_emu::kernel_name<__VA_ARGS__>())
#define DDIM_DYNAMIC_SHARED(type, name) type* const name = static_cast<type*>(::ddim_emu::dynamic_shared())
#else
#define DDIM_LAUNCH(grid, block, shared_bytes, stream, ...) __VA_ARGS__<<<grid, block, shared_bytes, stream>>>
#define DDIM_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif
