#pragma once
// Internals of the CUDA emulator shared by its implementation files (not included by kernels).
//
//   memory.cpp     device memory: one reserved address range, allocations with redzones, a shadow
//                  per 8-byte granule (allocation and addressable bytes), an initialised-bit per
//                  byte, and copy-on-write page snapshots for the schedule comparison
//   scheduler.cpp  fibers, blocks, barriers, warp collectives, the shared-memory race detector,
//                  grid runs under several thread / block orders
//   cudart.cpp     the CUDA runtime API: streams, events, capture and graphs, memcpy / memset,
//                  errors, device properties, and the stream-order checker
//   cublas.cpp     the cuBLAS calls the backend makes (column-major GEMM)
//   cudnn.cpp      cuDNN, reporting itself unavailable
//   hooks.cpp      the compiler's memory-access instrumentation entry points (__tsan_*)
//   reports.cpp    violation reports and the test-facing API (emu.hpp)
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "emu.hpp"
#include "runtime.hpp"

namespace ddim_emu {

enum class Access : std::uint8_t { Read, Write, Atomic };

// ------------------------------------------------------------------ the device lock
// Every API call and every operation's execution holds it: the emulated device runs one
// operation at a time, on the thread that enqueued it (or launched its graph).
std::recursive_mutex& device_mutex();

// ------------------------------------------------------------------ reports (reports.cpp)
// Records a violation found while running the current operation (kernel name, block and thread
// are added when inside a kernel), prints it unless expected, and makes the operation's stream
// report `async_error` at its next synchronisation (cudaSuccess: an API misuse with no error).
void report(Check check, const std::string& message, cudaError_t async_error);
// Context for messages: the running operation ("kernel k", "cudaMemcpyAsync", ...).
std::string context_text();

// ------------------------------------------------------------------ device memory (memory.cpp)
namespace mem {

struct Allocation {
  std::uintptr_t base = 0;
  std::size_t size = 0;
  bool freed = false;
};

// The reserved device address range (set by the first allocation).
extern std::uintptr_t g_base, g_size;
inline bool is_device(const void* p) { return reinterpret_cast<std::uintptr_t>(p) - g_base < g_size; }
cudaError_t allocate(void** p, std::size_t bytes);
cudaError_t release(void* p);  // cudaFree: p must be the base of a live allocation (or null)
std::size_t live_bytes();
std::size_t capacity();

// The live allocation holding [p, p + bytes) (bytes > 0), or null; `why` says what is wrong.
const Allocation* find(const void* p, std::size_t bytes, std::string* why);
// A readable description of an address: "allocation #7 (0x..., 4096 bytes) + 128".
std::string describe(std::uintptr_t a);

// Accesses by the running operation (kernels through the instrumentation hooks, the library
// stand-ins and memcpy / memset explicitly): bounds, use after free and, for kernel reads, the
// initialised bits; records the range for the stream-order checker. Returns false on a
// violation (already reported).
bool access(std::uintptr_t a, std::size_t bytes, Access kind, bool check_init);

// Copy-on-write snapshots of the pages the running grid writes, for the schedule comparison.
void snapshot_write(std::uintptr_t a, std::size_t bytes);  // the page copies of access(), alone
void snapshot_begin();
void snapshot_end();
// The pages written since snapshot_begin, with their contents before and now.
std::vector<std::uintptr_t> written_pages();
void copy_page(std::uintptr_t page, void* dst);               // current contents
const unsigned char* original_page(std::uintptr_t page);      // contents at first write
void restore_originals();                                      // every written page as it was
constexpr std::size_t kPage = 4096;

}  // namespace mem

// ------------------------------------------------------------------ shared memory (scheduler.cpp)
// The window of every __shared__ variable and the dynamic shared buffer (scheduler.cpp).
extern const std::uintptr_t g_shared_lo, g_shared_size;
inline bool is_shared(std::uintptr_t a) { return a - g_shared_lo < g_shared_size; }
// "block (x,y,z), thread (x,y,z) (warp w, lane l)" inside a kernel, else "".
std::string kernel_position();
void shared_access(std::uintptr_t a, std::size_t bytes, Access kind);

// What the instrumentation hooks do on this OS thread: kOff (host code: nothing), kCheck (a
// kernel's first run: every check), kSnapshot (a kernel's rerun in another order: only the
// copy-on-write snapshots of device pages it writes; every check found what it could in the first
// run, none depends on the order).
enum : std::uint8_t { kOff = 0, kCheck = 1, kSnapshot = 2 };
extern __thread std::uint8_t tls_mode;

// An access by kernel code (the hooks, the atomics): dispatched by tls_mode. Returns false when
// the access is invalid (already reported).
inline bool kernel_access(std::uintptr_t a, std::size_t bytes, Access kind) {
  const std::uint8_t mode = tls_mode;
  if (mode == kOff) return true;
  if (is_shared(a)) {
    if (mode == kCheck) shared_access(a, bytes, kind);
    return true;
  }
  if (a - mem::g_base < mem::g_size) {
    if (mode == kCheck) return mem::access(a, bytes, kind, true);
    if (kind != Access::Read) mem::snapshot_write(a, bytes);
  }
  return true;
}

// ------------------------------------------------------------------ operations (cudart.cpp)
// What the running operation touched, per allocation (for the stream-order checker).
struct OpTouch {
  std::uint32_t alloc = 0;
  std::uintptr_t read_lo = UINTPTR_MAX, read_hi = 0, write_lo = UINTPTR_MAX, write_hi = 0;
};
void touch(std::uint32_t alloc, std::uintptr_t a, std::size_t bytes, bool write);

// One unit of work on a stream: a kernel grid, a copy, a memset, a library call.
struct Op {
  std::string name;
  std::function<void()> run;
};
// Enqueues on `stream` (records it when the stream is capturing, else runs it now). Returns the
// error the enqueue itself reports (an invalid stream, a capture violation).
cudaError_t enqueue(cudaStream_t stream, Op op);
// True when `stream` is a valid stream in the middle of a capture.
bool capturing(cudaStream_t stream);
// Sets the calling thread's last error (cudaGetLastError) when e != cudaSuccess; returns e.
cudaError_t set_last_error(cudaError_t e);
// The running operation fails with `e` (an asynchronous error of its stream). should_report is
// true the first time the operation reports `text` (the schedule comparison reruns grids), for at
// most kMaxReportsPerCheck reports of one check per operation.
void fail_current_op(cudaError_t e);
constexpr int kMaxReportsPerCheck = 6;
bool should_report(Check check, const std::string& text);

// ------------------------------------------------------------------ kernels (scheduler.cpp)
cudaError_t validate_launch(const KernelLaunch& launch);  // also used for graph replays
void run_grid(const KernelLaunch& launch, const KernelBody& body);
std::size_t max_dynamic_shared(const void* function);    // cudaFuncSetAttribute's value (default 48 KiB)
void set_max_dynamic_shared(const void* function, int bytes);
// A kernel's module is loaded by its first launch or by cudaFuncGetAttributes (lazy loading).
void mark_loaded(const void* function);

// ------------------------------------------------------------------ settings
struct Settings {
  bool compare_schedules = true;  // every grid twice: forward, then reverse or random, compared
  bool all_schedules = false;     // forward, reverse and random (three runs) for every grid
  int compare_repeats = 2;        // compared runs per kernel and launch configuration (0: all)
  std::uint64_t seed = 1;         // of the random orders
  std::size_t device_memory = std::size_t(8) << 30;  // allocations beyond this fail (OutOfMemory)
};
Settings& settings();

}  // namespace ddim_emu
