// The CUDA runtime API of the emulated device (one device, described as an H100).
//
// Execution: an operation runs when it is enqueued, on the calling thread, under the device lock
// (or is recorded when its stream is capturing, and runs when its graph is launched). So the
// results never depend on timing; what the order of a real GPU would allow is checked instead:
//
// Stream-order checker. Each operation gets a vector clock: its stream's previous operations,
// the legacy default stream's implicit synchronisation with blocking streams (both ways), events
// it waits for, and everything the host has seen complete (stream / event / device
// synchronisation, a device-to-host cudaMemcpy) before it was enqueued. For every allocation it
// touches (byte ranges, read or written) it must be ordered after every earlier operation of
// another stream whose range overlaps, when either writes; if not, that is a StreamOrder
// violation (a race a real GPU could lose). As the CUDA documentation says, cudaMemcpy from
// pageable host memory to the device returns before the copy is done and cudaMemset is
// asynchronous: neither orders the host with later work on other streams.
//
// Stream capture (cudaStreamBeginCapture): operations on the stream are recorded; the rules
// enforced are those of the CUDA documentation: the legacy stream is unusable while a blocking
// stream captures (cudaErrorStreamCaptureImplicit, the capture is invalidated); synchronising a
// capturing stream, or cudaDeviceSynchronize while any stream captures (device-wide, whatever the
// capture mode), invalidates the capture (cudaErrorStreamCaptureUnsupported); potentially unsafe
// calls (cudaMalloc, cudaFree, synchronous copies and memsets, synchronisations) are refused by
// the thread's capture interaction mode (cudaThreadExchangeStreamCaptureMode); waiting on an
// event recorded outside the capture is cudaErrorStreamCaptureIsolation; cudaStreamEndCapture of
// an invalidated capture returns cudaErrorStreamCaptureInvalidated and no graph.
//
// Errors from violations inside an operation are asynchronous errors: the enqueueing thread's
// last error (cudaGetLastError) and the stream's next synchronisation report them, once (unlike
// a real GPU, the context is not lost: later tests keep running).
#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <thread>
#include <unordered_map>

#include "internal.hpp"

namespace ddim_emu {

namespace {

using Clock = std::vector<std::uint64_t>;

void join(Clock& a, const Clock& b) {
  if (a.size() < b.size()) a.resize(b.size(), 0);
  for (std::size_t i = 0; i < b.size(); ++i) a[i] = std::max(a[i], b[i]);
}
std::uint64_t at(const Clock& c, unsigned i) { return i < c.size() ? c[i] : 0; }

struct Graph {
  std::vector<Op> ops;
};

struct Stream {
  unsigned index = 0;  // 0: the legacy default stream
  unsigned flags = 0;
  Clock clock;
  std::uint64_t seq = 0;
  cudaError_t pending = cudaSuccess;  // asynchronous error for the next synchronisation
  // capture
  bool capturing = false, invalidated = false;
  cudaStreamCaptureMode mode = cudaStreamCaptureModeGlobal;
  std::thread::id thread;
  std::shared_ptr<Graph> graph;
  std::string invalid_reason;
  bool blocking() const { return !(flags & cudaStreamNonBlocking); }
};

struct Event {
  unsigned flags = 0;
  bool recorded = false, in_capture = false;
  Clock clock;
  std::chrono::steady_clock::time_point time;
};

struct Exec {
  std::vector<Op> ops;
};

struct Context {
  std::string name;
  unsigned stream = 0;
  std::uint64_t seq = 0;
  Clock clock;
  std::vector<OpTouch> touches;
  std::size_t last = 0;
  cudaError_t error = cudaSuccess;
  std::set<std::string> reported;
  int per_check[8] = {};
};

struct History {
  unsigned stream;
  std::uint64_t seq;
  std::uintptr_t lo, hi;
  bool write;
  std::string op;
};

struct Runtime {
  Stream legacy;
  std::set<Stream*> streams;  // live, created by cudaStreamCreate*
  std::set<Event*> events;
  std::set<Graph*> graphs;
  std::set<Exec*> execs;
  unsigned next_index = 1;
  Clock host;  // what the host has seen complete
  std::unordered_map<std::uint32_t, std::vector<History>> history;
  std::map<unsigned, unsigned> stream_flags;  // index -> flags, for messages
};

Runtime& rt() {
  static Runtime* r = new Runtime();
  return *r;
}

__thread Context* tls_op = nullptr;
__thread cudaError_t tls_last_error = cudaSuccess;
__thread cudaStreamCaptureMode tls_capture_mode = cudaStreamCaptureModeGlobal;

using Lock = std::lock_guard<std::recursive_mutex>;

std::string stream_text(unsigned index) {
  if (index == 0) return "the legacy default stream";
  const auto it = rt().stream_flags.find(index);
  const bool nb = it != rt().stream_flags.end() && (it->second & cudaStreamNonBlocking);
  return "stream #" + std::to_string(index) + (nb ? " (non-blocking)" : " (blocking)");
}

// The stream record of a handle, or null (an invalid handle).
Stream* resolve(cudaStream_t s) {
  if (s == nullptr || s == cudaStreamLegacy) return &rt().legacy;
  Stream* p = reinterpret_cast<Stream*>(s);
  return rt().streams.count(p) ? p : nullptr;
}

void invalidate(Stream& s, const std::string& why) {
  if (!s.capturing || s.invalidated) return;
  s.invalidated = true;
  s.invalid_reason = why;
  report(Check::Capture, "the capture on " + stream_text(s.index) + " is invalidated: " + why, cudaSuccess);
}

// A potentially unsafe call while captures are active (cudaThreadExchangeStreamCaptureMode):
// refused, and the captures it conflicts with invalidated.
cudaError_t unsafe_call(const char* call) {
  bool refused = false;
  for (Stream* s : rt().streams) {
    if (!s->capturing || s->invalidated) continue;
    const bool mine = s->thread == std::this_thread::get_id();
    if ((mine && s->mode != cudaStreamCaptureModeRelaxed) ||
        (!mine && tls_capture_mode == cudaStreamCaptureModeGlobal && s->mode == cudaStreamCaptureModeGlobal)) {
      invalidate(*s, std::string(call) + " was called while it captures (a potentially unsafe call)");
      refused = true;
    }
  }
  return refused ? cudaErrorStreamCaptureUnsupported : cudaSuccess;
}

// The legacy stream while blocking streams capture: an implicit dependency on the capture.
cudaError_t legacy_use(const char* call) {
  bool implicit = false;
  for (Stream* s : rt().streams)
    if (s->capturing && !s->invalidated && s->blocking()) {
      invalidate(*s, std::string(call) + " used the legacy default stream, which synchronises with this blocking stream");
      implicit = true;
    }
  return implicit ? cudaErrorStreamCaptureImplicit : cudaSuccess;
}

bool overlap(std::uintptr_t a0, std::uintptr_t a1, std::uintptr_t b0, std::uintptr_t b1) { return a0 < b1 && b0 < a1; }

// The stream-order check of a finished operation's accesses, then its history entries.
void commit(Context& c) {
  Runtime& r = rt();
  for (const OpTouch& t : c.touches) {
    std::vector<History>& h = r.history[t.alloc];
    // Forget what the host has seen complete: everything enqueued from now on is ordered after it.
    h.erase(std::remove_if(h.begin(), h.end(), [&](const History& e) { return at(r.host, e.stream) >= e.seq; }), h.end());
    for (int w = 0; w < 2; ++w) {
      const bool write = w == 1;
      const std::uintptr_t lo = write ? t.write_lo : t.read_lo, hi = write ? t.write_hi : t.read_hi;
      if (lo >= hi) continue;
      for (const History& e : h) {
        if (e.stream == c.stream || (!write && !e.write) || !overlap(lo, hi, e.lo, e.hi)) continue;
        if (at(c.clock, e.stream) >= e.seq) continue;
        const std::uintptr_t x = std::max(lo, e.lo);
        report(Check::StreamOrder,
               c.name + " on " + stream_text(c.stream) + (write ? " writes " : " reads ") + mem::describe(x) + ", which " +
                   e.op + " on " + stream_text(e.stream) + (e.write ? " writes" : " reads") +
                   " without being ordered before it (no stream, event or host synchronisation between them)",
               cudaSuccess);
        break;
      }
      h.push_back(History{c.stream, c.seq, lo, hi, write, c.name});
    }
    if (h.size() > 256) h.erase(h.begin(), h.begin() + long(h.size() - 256));
  }
}

// Runs an operation of `s` now, with its clock.
void execute(Stream& s, Op& op) {
  Runtime& r = rt();
  Clock clock = s.clock;
  join(clock, r.host);
  if (s.index == 0) {
    for (Stream* b : r.streams)
      if (b->blocking()) join(clock, b->clock);
  } else if (s.blocking()) {
    join(clock, r.legacy.clock);
  }
  s.seq += 1;
  if (clock.size() <= s.index) clock.resize(s.index + 1, 0);
  clock[s.index] = s.seq;
  s.clock = clock;
  Context c;
  c.name = op.name;
  c.stream = s.index;
  c.seq = s.seq;
  c.clock = std::move(clock);
  Context* outer = tls_op;
  tls_op = &c;
  op.run();
  tls_op = outer;
  commit(c);
  if (c.error != cudaSuccess) {
    s.pending = c.error;
    tls_last_error = c.error;
  }
}

// The asynchronous error a synchronisation of `s` reports (once).
cudaError_t take_pending(Stream& s) {
  const cudaError_t e = s.pending;
  s.pending = cudaSuccess;
  return e;
}

void host_sees(const Clock& c) { join(rt().host, c); }

cudaError_t copy_kind_check(void* dst, const void* src, std::size_t n, cudaMemcpyKind& kind, std::string& why) {
  const bool dd = mem::is_device(dst), sd = mem::is_device(src);
  if (kind == cudaMemcpyDefault) kind = dd ? (sd ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice) : (sd ? cudaMemcpyDeviceToHost : cudaMemcpyHostToHost);
  const bool want_dd = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  const bool want_sd = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if (kind != cudaMemcpyHostToDevice && kind != cudaMemcpyDeviceToHost && kind != cudaMemcpyDeviceToDevice &&
      kind != cudaMemcpyHostToHost)
    return cudaErrorInvalidMemcpyDirection;
  if (n == 0) return cudaSuccess;
  if (!dst || !src) {
    why = "a null pointer";
    return cudaErrorInvalidValue;
  }
  if (want_dd != dd || want_sd != sd) {
    why = std::string("the pointers do not match the direction: the destination is ") + (dd ? "device" : "host") +
          " memory, the source " + (sd ? "device" : "host") + " memory";
    return cudaErrorInvalidValue;
  }
  std::string w;
  if (dd && !mem::find(dst, n, &w)) {
    why = "the destination range is not inside one live allocation: " + w;
    return cudaErrorInvalidValue;
  }
  if (sd && !mem::find(src, n, &w)) {
    why = "the source range is not inside one live allocation: " + w;
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

Op copy_op(const char* name, void* dst, const void* src, std::size_t n, cudaMemcpyKind kind) {
  return Op{name, [=] {
              if (n == 0) return;
              if (kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice)
                mem::access(reinterpret_cast<std::uintptr_t>(src), n, Access::Read, false);
              if (kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice)
                mem::access(reinterpret_cast<std::uintptr_t>(dst), n, Access::Write, false);
              std::memmove(dst, src, n);
            }};
}

Op set_op(const char* name, void* p, int value, std::size_t n) {
  return Op{name, [=] {
              if (n == 0) return;
              mem::access(reinterpret_cast<std::uintptr_t>(p), n, Access::Write, false);
              std::memset(p, value, n);
            }};
}

cudaError_t api_error(cudaError_t e, Check check, const std::string& what) {
  if (e != cudaSuccess && !what.empty()) report(check, what, cudaSuccess);
  return set_last_error(e);
}

}  // namespace

// ------------------------------------------------------------------ internal interface

std::recursive_mutex& device_mutex() {
  static std::recursive_mutex* m = new std::recursive_mutex();
  return *m;
}

cudaError_t set_last_error(cudaError_t e) {
  if (e != cudaSuccess) tls_last_error = e;
  return e;
}

void touch(std::uint32_t alloc, std::uintptr_t a, std::size_t bytes, bool write) {
  Context* c = tls_op;
  if (!c || alloc == 0) return;
  OpTouch* t = nullptr;
  if (c->last < c->touches.size() && c->touches[c->last].alloc == alloc) t = &c->touches[c->last];
  else {
    for (std::size_t i = 0; i < c->touches.size(); ++i)
      if (c->touches[i].alloc == alloc) {
        t = &c->touches[i];
        c->last = i;
        break;
      }
    if (!t) {
      c->touches.push_back(OpTouch{alloc});
      c->last = c->touches.size() - 1;
      t = &c->touches.back();
    }
  }
  if (write) {
    t->write_lo = std::min(t->write_lo, a);
    t->write_hi = std::max(t->write_hi, a + bytes);
  } else {
    t->read_lo = std::min(t->read_lo, a);
    t->read_hi = std::max(t->read_hi, a + bytes);
  }
}

std::string context_text() {
  if (!tls_op) return "host";
  const std::string pos = kernel_position();
  return tls_op->name + (pos.empty() ? "" : ", " + pos);
}

// Called by report(): the running operation fails with `e` (asynchronously).
void fail_current_op(cudaError_t e) {
  if (tls_op && e != cudaSuccess && tls_op->error == cudaSuccess) tls_op->error = e;
}

bool should_report(Check check, const std::string& text) {
  if (!tls_op) return true;
  int& n = tls_op->per_check[int(check) & 7];
  if (n >= kMaxReportsPerCheck) return false;
  if (!tls_op->reported.insert(text).second) return false;
  ++n;
  return true;
}

bool capturing(cudaStream_t stream) {
  Lock lock(device_mutex());
  const Stream* s = resolve(stream);
  return s && s->capturing;
}

cudaError_t enqueue(cudaStream_t stream, Op op) {
  Lock lock(device_mutex());
  Stream* s = resolve(stream);
  if (!s) return cudaErrorInvalidResourceHandle;
  if (s->capturing) {
    if (s->invalidated) return cudaErrorStreamCaptureInvalidated;
    s->graph->ops.push_back(std::move(op));
    return cudaSuccess;
  }
  if (s->index == 0) {
    const cudaError_t e = legacy_use(op.name.c_str());
    if (e != cudaSuccess) return e;
  }
  execute(*s, op);
  return cudaSuccess;
}

}  // namespace ddim_emu

// ====================================================================== the C API

using namespace ddim_emu;

extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = tls_last_error;
  tls_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return tls_last_error; }

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
#define DDIM_EMU_ERR(x) \
  case x: return #x;
    DDIM_EMU_ERR(cudaSuccess)
    DDIM_EMU_ERR(cudaErrorInvalidValue)
    DDIM_EMU_ERR(cudaErrorMemoryAllocation)
    DDIM_EMU_ERR(cudaErrorInitializationError)
    DDIM_EMU_ERR(cudaErrorInvalidConfiguration)
    DDIM_EMU_ERR(cudaErrorInvalidPitchValue)
    DDIM_EMU_ERR(cudaErrorInvalidSymbol)
    DDIM_EMU_ERR(cudaErrorInvalidMemcpyDirection)
    DDIM_EMU_ERR(cudaErrorInsufficientDriver)
    DDIM_EMU_ERR(cudaErrorNoDevice)
    DDIM_EMU_ERR(cudaErrorInvalidDevice)
    DDIM_EMU_ERR(cudaErrorInvalidDeviceFunction)
    DDIM_EMU_ERR(cudaErrorInvalidResourceHandle)
    DDIM_EMU_ERR(cudaErrorIllegalState)
    DDIM_EMU_ERR(cudaErrorNotReady)
    DDIM_EMU_ERR(cudaErrorIllegalAddress)
    DDIM_EMU_ERR(cudaErrorLaunchOutOfResources)
    DDIM_EMU_ERR(cudaErrorLaunchTimeout)
    DDIM_EMU_ERR(cudaErrorLaunchFailure)
    DDIM_EMU_ERR(cudaErrorMisalignedAddress)
    DDIM_EMU_ERR(cudaErrorNotSupported)
    DDIM_EMU_ERR(cudaErrorStreamCaptureUnsupported)
    DDIM_EMU_ERR(cudaErrorStreamCaptureInvalidated)
    DDIM_EMU_ERR(cudaErrorStreamCaptureMerge)
    DDIM_EMU_ERR(cudaErrorStreamCaptureUnmatched)
    DDIM_EMU_ERR(cudaErrorStreamCaptureUnjoined)
    DDIM_EMU_ERR(cudaErrorStreamCaptureIsolation)
    DDIM_EMU_ERR(cudaErrorStreamCaptureImplicit)
    DDIM_EMU_ERR(cudaErrorCapturedEvent)
    DDIM_EMU_ERR(cudaErrorStreamCaptureWrongThread)
    DDIM_EMU_ERR(cudaErrorUnknown)
#undef DDIM_EMU_ERR
    default: return "cudaErrorUnknown (not named by the emulator)";
  }
}

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorIllegalState: return "the operation cannot be performed in the present state";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
    case cudaErrorStreamCaptureIsolation: return "dependency created on uncaptured work in another stream";
    case cudaErrorStreamCaptureImplicit: return "operation would make the legacy stream depend on a capturing blocking stream";
    case cudaErrorStreamCaptureWrongThread: return "attempt to terminate a thread-local capture sequence from another thread";
    default: return cudaGetErrorName(e);
  }
}

// ---------------------------------------------------------------- device

cudaError_t cudaGetDeviceCount(int* count) {
  if (!count) return set_last_error(cudaErrorInvalidValue);
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : set_last_error(cudaErrorInvalidDevice); }

cudaError_t cudaGetDevice(int* device) {
  if (!device) return set_last_error(cudaErrorInvalidValue);
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int* v) {
  if (!v) return set_last_error(cudaErrorInvalidValue);
  *v = CUDART_VERSION;
  return cudaSuccess;
}

cudaError_t cudaRuntimeGetVersion(int* v) {
  if (!v) return set_last_error(cudaErrorInvalidValue);
  *v = CUDART_VERSION;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int device) {
  if (!p) return set_last_error(cudaErrorInvalidValue);
  if (device != 0) return set_last_error(cudaErrorInvalidDevice);
  std::memset(p, 0, sizeof *p);
  std::snprintf(p->name, sizeof p->name, "NVIDIA H100 80GB HBM3 (ddim CUDA emulator)");
  p->totalGlobalMem = std::size_t(80) << 30;
  p->sharedMemPerBlock = 48 * 1024;
  p->regsPerBlock = 65536;
  p->warpSize = 32;
  p->memPitch = 2147483647;
  p->maxThreadsPerBlock = 1024;
  p->maxThreadsDim[0] = 1024;
  p->maxThreadsDim[1] = 1024;
  p->maxThreadsDim[2] = 64;
  p->maxGridSize[0] = 2147483647;
  p->maxGridSize[1] = 65535;
  p->maxGridSize[2] = 65535;
  p->totalConstMem = 65536;
  p->major = 9;
  p->minor = 0;
  p->textureAlignment = 512;
  p->multiProcessorCount = 132;
  p->concurrentKernels = 1;
  p->ECCEnabled = 1;
  p->asyncEngineCount = 3;
  p->unifiedAddressing = 1;
  p->memoryBusWidth = 5120;
  p->l2CacheSize = 50 * 1024 * 1024;
  p->maxThreadsPerMultiProcessor = 2048;
  p->sharedMemPerMultiprocessor = 228 * 1024;
  p->regsPerMultiprocessor = 65536;
  p->managedMemory = 1;
  p->cooperativeLaunch = 1;
  p->sharedMemPerBlockOptin = 227 * 1024;
  p->maxBlocksPerMultiProcessor = 32;
  p->reservedSharedMemPerBlock = 1024;
  p->clusterLaunch = 1;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (!value) return set_last_error(cudaErrorInvalidValue);
  if (device != 0) return set_last_error(cudaErrorInvalidDevice);
  cudaDeviceProp p;
  cudaGetDeviceProperties(&p, 0);
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = p.maxThreadsPerBlock; break;
    case cudaDevAttrMaxBlockDimX: *value = p.maxThreadsDim[0]; break;
    case cudaDevAttrMaxBlockDimY: *value = p.maxThreadsDim[1]; break;
    case cudaDevAttrMaxBlockDimZ: *value = p.maxThreadsDim[2]; break;
    case cudaDevAttrMaxGridDimX: *value = p.maxGridSize[0]; break;
    case cudaDevAttrMaxGridDimY: *value = p.maxGridSize[1]; break;
    case cudaDevAttrMaxGridDimZ: *value = p.maxGridSize[2]; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = int(p.sharedMemPerBlock); break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = int(p.sharedMemPerBlockOptin); break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = int(p.sharedMemPerMultiprocessor); break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMultiProcessorCount: *value = p.multiProcessorCount; break;
    case cudaDevAttrComputeCapabilityMajor: *value = p.major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = p.minor; break;
    case cudaDevAttrL2CacheSize: *value = p.l2CacheSize; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = p.maxThreadsPerMultiProcessor; break;
    case cudaDevAttrMaxRegistersPerBlock: *value = p.regsPerBlock; break;
    case cudaDevAttrGlobalMemoryBusWidth: *value = p.memoryBusWidth; break;
    case cudaDevAttrUnifiedAddressing: *value = 1; break;
    default: return set_last_error(cudaErrorInvalidValue);
  }
  return cudaSuccess;
}

cudaError_t cudaDeviceGetPCIBusId(char* id, int len, int device) {
  if (!id || len <= 0) return set_last_error(cudaErrorInvalidValue);
  if (device != 0) return set_last_error(cudaErrorInvalidDevice);
  std::snprintf(id, std::size_t(len), "0000:00:00.0");
  return cudaSuccess;
}

cudaError_t cudaMemGetInfo(std::size_t* free_bytes, std::size_t* total) {
  Lock lock(device_mutex());
  if (!free_bytes || !total) return set_last_error(cudaErrorInvalidValue);
  *total = std::size_t(80) << 30;
  const std::size_t cap = std::min(*total, mem::capacity());
  *free_bytes = cap - std::min(cap, mem::live_bytes());
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) {
  Lock lock(device_mutex());
  Runtime& r = rt();
  bool invalidated = false;
  for (Stream* s : r.streams)
    if (s->capturing && !s->invalidated) {
      invalidate(*s, "cudaDeviceSynchronize was called while it captured (a device-wide synchronisation)");
      invalidated = true;
    }
  if (invalidated) return set_last_error(cudaErrorStreamCaptureUnsupported);
  host_sees(r.legacy.clock);
  cudaError_t e = take_pending(r.legacy);
  for (Stream* s : r.streams) {
    host_sees(s->clock);
    const cudaError_t p = take_pending(*s);
    if (e == cudaSuccess) e = p;
  }
  return set_last_error(e);
}

// ---------------------------------------------------------------- memory

cudaError_t cudaMalloc(void** p, std::size_t bytes) {
  Lock lock(device_mutex());
  if (const cudaError_t e = unsafe_call("cudaMalloc"); e != cudaSuccess) return set_last_error(e);
  return set_last_error(mem::allocate(p, bytes));
}

cudaError_t cudaFree(void* p) {
  Lock lock(device_mutex());
  if (const cudaError_t e = unsafe_call("cudaFree"); e != cudaSuccess) return set_last_error(e);
  // cudaFree synchronises the device before freeing.
  Runtime& r = rt();
  host_sees(r.legacy.clock);
  for (Stream* s : r.streams) host_sees(s->clock);
  return set_last_error(mem::release(p));
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t n, cudaMemcpyKind kind, cudaStream_t stream) {
  Lock lock(device_mutex());
  std::string why;
  if (const cudaError_t e = copy_kind_check(dst, src, n, kind, why); e != cudaSuccess)
    return api_error(e, Check::Memcheck, "cudaMemcpyAsync of " + std::to_string(n) + " bytes: " + why);
  return set_last_error(enqueue(stream, copy_op("cudaMemcpyAsync", dst, src, n, kind)));
}

cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t n, cudaMemcpyKind kind) {
  Lock lock(device_mutex());
  std::string why;
  if (const cudaError_t e = copy_kind_check(dst, src, n, kind, why); e != cudaSuccess)
    return api_error(e, Check::Memcheck, "cudaMemcpy of " + std::to_string(n) + " bytes: " + why);
  if (const cudaError_t e = unsafe_call("cudaMemcpy"); e != cudaSuccess) return set_last_error(e);
  if (const cudaError_t e = legacy_use("cudaMemcpy"); e != cudaSuccess) return set_last_error(e);
  Runtime& r = rt();
  // From pageable host memory the copy starts after the legacy stream's earlier work and returns
  // once the data is staged, before it lands: the host learns nothing about the copy itself.
  if (kind == cudaMemcpyHostToDevice) host_sees(r.legacy.clock);
  Op op = copy_op("cudaMemcpy", dst, src, n, kind);
  execute(r.legacy, op);
  if (kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyHostToHost) host_sees(r.legacy.clock);
  return set_last_error(take_pending(r.legacy));
}

cudaError_t cudaMemsetAsync(void* p, int value, std::size_t n, cudaStream_t stream) {
  Lock lock(device_mutex());
  std::string why;
  if (n > 0 && !mem::find(p, n, &why))
    return api_error(cudaErrorInvalidValue, Check::Memcheck, "cudaMemsetAsync of " + std::to_string(n) + " bytes: " + why);
  return set_last_error(enqueue(stream, set_op("cudaMemsetAsync", p, value, n)));
}

cudaError_t cudaMemset(void* p, int value, std::size_t n) {
  Lock lock(device_mutex());
  std::string why;
  if (n > 0 && !mem::find(p, n, &why))
    return api_error(cudaErrorInvalidValue, Check::Memcheck, "cudaMemset of " + std::to_string(n) + " bytes: " + why);
  if (const cudaError_t e = unsafe_call("cudaMemset"); e != cudaSuccess) return set_last_error(e);
  if (const cudaError_t e = legacy_use("cudaMemset"); e != cudaSuccess) return set_last_error(e);
  Op op = set_op("cudaMemset", p, value, n);
  execute(rt().legacy, op);
  return cudaSuccess;
}

// ---------------------------------------------------------------- streams

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags) {
  Lock lock(device_mutex());
  if (!s || (flags & ~unsigned(cudaStreamNonBlocking))) return set_last_error(cudaErrorInvalidValue);
  Runtime& r = rt();
  auto* st = new Stream();
  st->index = r.next_index++;
  st->flags = flags;
  r.streams.insert(st);
  r.stream_flags[st->index] = flags;
  *s = reinterpret_cast<cudaStream_t>(st);
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t* s) { return cudaStreamCreateWithFlags(s, cudaStreamDefault); }

cudaError_t cudaStreamGetDevice(cudaStream_t s, int* device) {
  Lock lock(device_mutex());
  if (!device) return set_last_error(cudaErrorInvalidValue);
  if (!resolve(s)) return set_last_error(cudaErrorInvalidResourceHandle);
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attr, const void* p) {
  Lock lock(device_mutex());
  if (!attr) return set_last_error(cudaErrorInvalidValue);
  std::memset(attr, 0, sizeof *attr);
  if (mem::is_device(p)) {
    attr->type = cudaMemoryTypeDevice;
    attr->device = 0;
    attr->devicePointer = const_cast<void*>(p);
  } else {
    attr->type = cudaMemoryTypeUnregistered;  // ordinary host memory, as CUDA 11+ reports it
    attr->device = -2;
    attr->hostPointer = const_cast<void*>(p);
  }
  return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t s) {
  Lock lock(device_mutex());
  Stream* st = resolve(s);
  if (!st || st->index == 0) return set_last_error(cudaErrorInvalidResourceHandle);
  if (st->capturing) {
    invalidate(*st, "cudaStreamDestroy of the capturing stream");
    return set_last_error(cudaErrorStreamCaptureUnsupported);
  }
  rt().streams.erase(st);
  delete st;
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  Lock lock(device_mutex());
  Stream* st = resolve(s);
  if (!st) return set_last_error(cudaErrorInvalidResourceHandle);
  if (st->capturing) {
    invalidate(*st, "cudaStreamSynchronize of the capturing stream");
    return set_last_error(cudaErrorStreamCaptureUnsupported);
  }
  if (st->index == 0) {
    if (const cudaError_t e = legacy_use("cudaStreamSynchronize(legacy stream)"); e != cudaSuccess) return set_last_error(e);
    for (Stream* b : rt().streams)
      if (b->blocking()) host_sees(b->clock);
  }
  host_sees(st->clock);
  return set_last_error(take_pending(*st));
}

cudaError_t cudaStreamQuery(cudaStream_t s) {
  Lock lock(device_mutex());
  Stream* st = resolve(s);
  if (!st) return set_last_error(cudaErrorInvalidResourceHandle);
  if (st->capturing) {
    invalidate(*st, "cudaStreamQuery of the capturing stream");
    return set_last_error(cudaErrorStreamCaptureUnsupported);
  }
  host_sees(st->clock);  // everything enqueued has run: the query reports it complete
  return set_last_error(take_pending(*st));
}

cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags) {
  Lock lock(device_mutex());
  Stream* st = resolve(s);
  Event* ev = reinterpret_cast<Event*>(e);
  if (!st || !rt().events.count(ev)) return set_last_error(cudaErrorInvalidResourceHandle);
  if (flags != 0) return set_last_error(cudaErrorInvalidValue);
  if (st->capturing) {
    if (st->invalidated) return set_last_error(cudaErrorStreamCaptureInvalidated);
    if (ev->recorded && !ev->in_capture) {
      invalidate(*st, "cudaStreamWaitEvent on an event recorded outside the capture");
      return set_last_error(cudaErrorStreamCaptureIsolation);
    }
    return cudaSuccess;
  }
  if (ev->in_capture) return set_last_error(cudaErrorStreamCaptureIsolation);
  join(st->clock, ev->clock);
  return cudaSuccess;
}

cudaError_t cudaThreadExchangeStreamCaptureMode(cudaStreamCaptureMode* mode) {
  if (!mode) return set_last_error(cudaErrorInvalidValue);
  std::swap(*mode, tls_capture_mode);
  return cudaSuccess;
}

cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode) {
  Lock lock(device_mutex());
  Stream* st = resolve(s);
  if (!st) return set_last_error(cudaErrorInvalidResourceHandle);
  if (st->index == 0) return set_last_error(cudaErrorStreamCaptureUnsupported);
  if (st->capturing) return set_last_error(cudaErrorIllegalState);
  st->capturing = true;
  st->invalidated = false;
  st->invalid_reason.clear();
  st->mode = mode;
  st->thread = std::this_thread::get_id();
  st->graph = std::make_shared<Graph>();
  return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* graph) {
  Lock lock(device_mutex());
  Stream* st = resolve(s);
  if (!st || !graph) return set_last_error(cudaErrorInvalidValue);
  if (!st->capturing) return set_last_error(cudaErrorIllegalState);
  if (st->mode != cudaStreamCaptureModeRelaxed && st->thread != std::this_thread::get_id())
    return set_last_error(cudaErrorStreamCaptureWrongThread);
  st->capturing = false;
  *graph = nullptr;
  if (st->invalidated) {
    st->graph.reset();
    return set_last_error(cudaErrorStreamCaptureInvalidated);
  }
  auto* g = new Graph(std::move(*st->graph));
  st->graph.reset();
  rt().graphs.insert(g);
  *graph = reinterpret_cast<cudaGraph_t>(g);
  return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus* status) {
  Lock lock(device_mutex());
  Stream* st = resolve(s);
  if (!st || !status) return set_last_error(cudaErrorInvalidValue);
  if (st->index == 0) {
    for (Stream* b : rt().streams)
      if (b->capturing && b->blocking()) return set_last_error(cudaErrorStreamCaptureImplicit);
  }
  *status = !st->capturing ? cudaStreamCaptureStatusNone
            : st->invalidated ? cudaStreamCaptureStatusInvalidated
                              : cudaStreamCaptureStatusActive;
  return cudaSuccess;
}

// ---------------------------------------------------------------- events

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags) {
  Lock lock(device_mutex());
  if (!e) return set_last_error(cudaErrorInvalidValue);
  auto* ev = new Event();
  ev->flags = flags;
  rt().events.insert(ev);
  *e = reinterpret_cast<cudaEvent_t>(ev);
  return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t* e) { return cudaEventCreateWithFlags(e, cudaEventDefault); }

cudaError_t cudaEventDestroy(cudaEvent_t e) {
  Lock lock(device_mutex());
  Event* ev = reinterpret_cast<Event*>(e);
  if (!rt().events.erase(ev)) return set_last_error(cudaErrorInvalidResourceHandle);
  delete ev;
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
  Lock lock(device_mutex());
  Event* ev = reinterpret_cast<Event*>(e);
  Stream* st = resolve(s);
  if (!rt().events.count(ev) || !st) return set_last_error(cudaErrorInvalidResourceHandle);
  if (st->capturing) {
    if (st->invalidated) return set_last_error(cudaErrorStreamCaptureInvalidated);
    ev->recorded = true;
    ev->in_capture = true;
    return cudaSuccess;
  }
  if (st->index == 0)
    if (const cudaError_t c = legacy_use("cudaEventRecord"); c != cudaSuccess) return set_last_error(c);
  Op op{"cudaEventRecord", [] {}};
  execute(*st, op);
  ev->recorded = true;
  ev->in_capture = false;
  ev->clock = st->clock;
  ev->time = std::chrono::steady_clock::now();
  return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  Lock lock(device_mutex());
  Event* ev = reinterpret_cast<Event*>(e);
  if (!rt().events.count(ev)) return set_last_error(cudaErrorInvalidResourceHandle);
  if (ev->in_capture) return set_last_error(cudaErrorStreamCaptureUnsupported);
  if (const cudaError_t u = unsafe_call("cudaEventSynchronize"); u != cudaSuccess) return set_last_error(u);
  host_sees(ev->clock);
  return cudaSuccess;
}

cudaError_t cudaEventQuery(cudaEvent_t e) {
  Lock lock(device_mutex());
  Event* ev = reinterpret_cast<Event*>(e);
  if (!rt().events.count(ev)) return set_last_error(cudaErrorInvalidResourceHandle);
  if (ev->in_capture) return set_last_error(cudaErrorStreamCaptureUnsupported);
  host_sees(ev->clock);
  return cudaSuccess;
}

cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  Lock lock(device_mutex());
  Event* ea = reinterpret_cast<Event*>(a);
  Event* eb = reinterpret_cast<Event*>(b);
  if (!ms) return set_last_error(cudaErrorInvalidValue);
  if (!rt().events.count(ea) || !rt().events.count(eb)) return set_last_error(cudaErrorInvalidResourceHandle);
  if ((ea->flags | eb->flags) & cudaEventDisableTiming) return set_last_error(cudaErrorInvalidResourceHandle);
  if (!ea->recorded || !eb->recorded || ea->in_capture || eb->in_capture) return set_last_error(cudaErrorInvalidResourceHandle);
  *ms = std::chrono::duration<float, std::milli>(eb->time - ea->time).count();
  return cudaSuccess;
}

// ---------------------------------------------------------------- graphs

cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long flags) {
  Lock lock(device_mutex());
  Graph* g = reinterpret_cast<Graph*>(graph);
  if (!exec || !rt().graphs.count(g) || flags != 0) return set_last_error(cudaErrorInvalidValue);
  auto* x = new Exec{g->ops};
  rt().execs.insert(x);
  *exec = reinterpret_cast<cudaGraphExec_t>(x);
  return cudaSuccess;
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s) {
  Lock lock(device_mutex());
  Exec* x = reinterpret_cast<Exec*>(exec);
  if (!rt().execs.count(x)) return set_last_error(cudaErrorInvalidValue);
  if (!resolve(s)) return set_last_error(cudaErrorInvalidResourceHandle);
  for (const Op& op : x->ops)
    if (const cudaError_t e = enqueue(s, op); e != cudaSuccess) return set_last_error(e);
  return cudaSuccess;
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
  Lock lock(device_mutex());
  Exec* x = reinterpret_cast<Exec*>(exec);
  if (!rt().execs.erase(x)) return set_last_error(cudaErrorInvalidValue);
  delete x;
  return cudaSuccess;
}

cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
  Lock lock(device_mutex());
  Graph* g = reinterpret_cast<Graph*>(graph);
  if (!rt().graphs.erase(g)) return set_last_error(cudaErrorInvalidValue);
  delete g;
  return cudaSuccess;
}

// ---------------------------------------------------------------- functions

cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void* func) {
  Lock lock(device_mutex());
  if (!attr) return set_last_error(cudaErrorInvalidValue);
  if (!func) return set_last_error(cudaErrorInvalidDeviceFunction);
  mark_loaded(func);
  std::memset(attr, 0, sizeof *attr);
  attr->maxThreadsPerBlock = 1024;
  attr->numRegs = 32;
  attr->ptxVersion = 90;
  attr->binaryVersion = 90;
  attr->maxDynamicSharedSizeBytes = int(max_dynamic_shared(func));
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  Lock lock(device_mutex());
  if (!func) return set_last_error(cudaErrorInvalidDeviceFunction);
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > 227 * 1024) return set_last_error(cudaErrorInvalidValue);
    set_max_dynamic_shared(func, value);
    return cudaSuccess;
  }
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) return cudaSuccess;
  return set_last_error(cudaErrorInvalidValue);
}

}  // extern "C"
