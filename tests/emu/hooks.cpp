// The entry points of the compiler's memory-access instrumentation. Kernel translation units are
// compiled with -fsanitize=thread (GCC and Clang emit a call before every load and store of
// instrumented code, with the address and the size), but no sanitizer runtime is linked: these
// definitions are the runtime. Outside kernel code (tls_mode kOff: host code in the same
// translation units, such as the launchers) they return at once; inside it, shared-memory
// addresses go to the race detector and device addresses to the bounds / initialisation checks.
// Everything else (the thread's stack, kernel parameters) is not checked.
#include <cstddef>
#include <cstdint>

#include "internal.hpp"

namespace {

inline void on_access(const volatile void* p, std::size_t bytes, ddim_emu::Access kind) {
  ddim_emu::kernel_access(reinterpret_cast<std::uintptr_t>(p), bytes, kind);
}

template <class T>
T atomic_rmw(volatile T* a, T v, int op) {
  on_access(a, sizeof(T), ddim_emu::Access::Atomic);
  switch (op) {
    case 0: return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);
    case 1: return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);
    case 2: return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);
    case 3: return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);
    case 4: return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);
    case 5: return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);
    default: return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST);
  }
}

}  // namespace

using ddim_emu::Access;

extern "C" {

void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}

#define DDIM_EMU_HOOK(n)                                                                        \
  void __tsan_read##n(void* p) { on_access(p, n, Access::Read); }                              \
  void __tsan_write##n(void* p) { on_access(p, n, Access::Write); }                            \
  void __tsan_unaligned_read##n(void* p) { on_access(p, n, Access::Read); }                    \
  void __tsan_unaligned_write##n(void* p) { on_access(p, n, Access::Write); }                  \
  void __tsan_volatile_read##n(void* p) { on_access(p, n, Access::Read); }                     \
  void __tsan_volatile_write##n(void* p) { on_access(p, n, Access::Write); }                   \
  void __tsan_unaligned_volatile_read##n(void* p) { on_access(p, n, Access::Read); }           \
  void __tsan_unaligned_volatile_write##n(void* p) { on_access(p, n, Access::Write); }
DDIM_EMU_HOOK(1)
DDIM_EMU_HOOK(2)
DDIM_EMU_HOOK(4)
DDIM_EMU_HOOK(8)
DDIM_EMU_HOOK(16)
#undef DDIM_EMU_HOOK

void __tsan_read_range(void* p, std::size_t n) { on_access(p, n, Access::Read); }
void __tsan_write_range(void* p, std::size_t n) { on_access(p, n, Access::Write); }

#define DDIM_EMU_ATOMICS(bits, T)                                                                            \
  T __tsan_atomic##bits##_load(const volatile T* a, int) {                                                   \
    on_access(a, sizeof(T), Access::Atomic);                                                                 \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                             \
  }                                                                                                          \
  void __tsan_atomic##bits##_store(volatile T* a, T v, int) {                                                \
    on_access(a, sizeof(T), Access::Atomic);                                                                 \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                                \
  }                                                                                                          \
  T __tsan_atomic##bits##_exchange(volatile T* a, T v, int) { return atomic_rmw<T>(a, v, 0); }               \
  T __tsan_atomic##bits##_fetch_add(volatile T* a, T v, int) { return atomic_rmw<T>(a, v, 1); }              \
  T __tsan_atomic##bits##_fetch_sub(volatile T* a, T v, int) { return atomic_rmw<T>(a, v, 2); }              \
  T __tsan_atomic##bits##_fetch_and(volatile T* a, T v, int) { return atomic_rmw<T>(a, v, 3); }              \
  T __tsan_atomic##bits##_fetch_or(volatile T* a, T v, int) { return atomic_rmw<T>(a, v, 4); }               \
  T __tsan_atomic##bits##_fetch_xor(volatile T* a, T v, int) { return atomic_rmw<T>(a, v, 5); }              \
  T __tsan_atomic##bits##_fetch_nand(volatile T* a, T v, int) { return atomic_rmw<T>(a, v, 6); }             \
  int __tsan_atomic##bits##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {                    \
    on_access(a, sizeof(T), Access::Atomic);                                                                 \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                  \
  }                                                                                                          \
  int __tsan_atomic##bits##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                      \
    on_access(a, sizeof(T), Access::Atomic);                                                                 \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                  \
  }                                                                                                          \
  T __tsan_atomic##bits##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                          \
    on_access(a, sizeof(T), Access::Atomic);                                                                 \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                        \
    return c;                                                                                                \
  }
DDIM_EMU_ATOMICS(8, char)
DDIM_EMU_ATOMICS(16, short)
DDIM_EMU_ATOMICS(32, int)
DDIM_EMU_ATOMICS(64, long)
#undef DDIM_EMU_ATOMICS

void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

}  // extern "C"
