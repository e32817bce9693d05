// Running grids: every CUDA thread of a block is a fiber (its own 64 KiB stack) switched by a
// small assembly routine (x86-64; elsewhere ucontext), run cooperatively on the launching OS
// thread until it blocks at a barrier or a warp collective, or exits. Blocks run one after the
// other. The order of threads (initially, after every barrier, when a warp collective wakes its
// lanes) and of blocks is forward, reverse or seeded random.
//
// Checks:
//   * synccheck: __syncthreads must be reached by every thread of the block, at the same call
//     site; a warp collective must be reached by every lane its mask names (not exited, not
//     waiting elsewhere), with the same mask and the same kind of collective; a mask must name
//     the calling lane and only lanes that exist; a shuffle must not read a lane outside the mask.
//     A violation is reported and the emulator releases the waiting threads so the run finishes.
//   * racecheck on shared memory, per 2-byte granule: within one barrier interval (between two releases of
//     __syncthreads) two different threads touching one byte, at least one writing and not both
//     atomically, is a race unless both are lanes of one warp and a full-warp __syncwarp came in
//     between. A read of a shared byte no thread of the block wrote is an initcheck violation.
//     Shared memory is poisoned with 0xFF bytes before each block.
//   * schedule comparison: a grid runs twice, forward and then reverse (its first run) or random
//     (its second), from the same memory (the pages the first run wrote are restored from
//     copy-on-write snapshots); any difference in what they leave in device memory is reported.
//     Done for the first two runs of each kernel with each launch configuration (a sampling loop
//     repeats the same launches every step); every run gets all the other checks.
#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <array>
#include <map>
#include <random>
#include <set>
#include <tuple>

#include "internal.hpp"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// Where __shared__ variables live: the section kernel_prelude.hpp names (and the dynamic buffer),
// or, for the static locals of function templates (GCC ignores their section attribute), .bss.
// So the window is the executable's writable data, from __data_start to _end (the linker's
// symbols) plus that section: inside a kernel, instrumented code touches no other static data
// (the prelude's thread coordinates are thread-local, parameters and locals on the fiber's stack).
extern "C" char __start_ddim_emu_shared[];
extern "C" char __stop_ddim_emu_shared[];
extern "C" char __data_start[];
extern "C" char _end[];

namespace ddim_emu {

__thread const ThreadInfo* tls_thread = nullptr;
__thread const BlockInfo* tls_block = nullptr;
__thread std::uint8_t tls_mode = kOff;
const std::uintptr_t g_shared_lo = std::min(reinterpret_cast<std::uintptr_t>(__data_start),
                                            reinterpret_cast<std::uintptr_t>(__start_ddim_emu_shared));
const std::uintptr_t g_shared_size =
    std::max(reinterpret_cast<std::uintptr_t>(_end), reinterpret_cast<std::uintptr_t>(__stop_ddim_emu_shared)) - g_shared_lo;

namespace {

constexpr std::size_t kMaxDynamicShared = 227 * 1024;  // an H100's opt-in limit per block
constexpr std::size_t kDefaultDynamicShared = 48 * 1024;
constexpr std::size_t kStackBytes = 64 * 1024;

alignas(16) unsigned char g_dynamic_shared[kMaxDynamicShared] __attribute__((section("ddim_emu_shared")));

// ------------------------------------------------------------------ context switching
#if defined(__x86_64__)
// void ddim_emu_switch(void** save_sp, void* load_sp): saves the callee-saved registers on the
// current stack, stores the stack pointer in *save_sp, and resumes the context whose stack pointer
// is load_sp. The floating-point control state (MXCSR, x87 control word) is not switched: kernel
// code never changes it, so every fiber runs with the launching thread's.
extern "C" void ddim_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl ddim_emu_switch
  .type ddim_emu_switch, @function
ddim_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size ddim_emu_switch, .-ddim_emu_switch
)");
#endif

extern "C" [[noreturn]] void ddim_emu_fiber_entry();

struct Stack {
  unsigned char* base = nullptr;  // guard page, then kStackBytes
  unsigned char* top() const { return base + 4096 + kStackBytes; }
};

enum class State : std::uint8_t { Runnable, AtBarrier, AtWarp, Done };

struct Fiber {
  ThreadInfo info{};
  unsigned tid = 0, warp = 0, lane = 0;
  State state = State::Done;
  std::source_location site;
  std::uint64_t result = 0;
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
};

struct WarpInstance {
  bool used = false;
  WarpOp op = WarpOp::Sync;
  unsigned mask = 0, arrived = 0;
  int width = 32;
  std::source_location site;
  std::uint64_t value[32];
  int arg[32];
};

constexpr int kMaxInstances = 4;  // collectives with different masks waiting in one warp at once

struct Warp {
  unsigned present = 0;                            // lanes that exist
  std::array<WarpInstance, kMaxInstances> inst;   // collectives some lanes wait in
  std::uint32_t sync_epoch = 0;                    // completed full-warp __syncwarp
};

// The runnable threads, in the order they run next (each thread is queued at most once).
struct RunQueue {
  std::vector<unsigned> ring;
  std::size_t head = 0, count = 0;
  std::size_t mask = 0;
  void reset(std::size_t capacity) {
    std::size_t size = 1;
    while (size < capacity) size *= 2;
    ring.assign(size, 0);
    mask = size - 1;
    head = count = 0;
  }
  bool empty() const { return count == 0; }
  void push(unsigned t) {
    ring[(head + count) & mask] = t;
    ++count;
  }
  unsigned pop() {
    const unsigned t = ring[head];
    head = (head + 1) & mask;
    --count;
    return t;
  }
};

// Per 2-byte granule of the shared window (the smallest element a kernel stores there).
// 16 bytes: intervals and epochs are kept modulo 2^16 (every cell is cleared when the interval
// counter wraps); a thread id's bit 15 marks an atomic access, kNone an empty reader slot.
struct Cell {
  std::uint16_t w_interval = 0;  // barrier interval of the last write (0: never)
  std::uint16_t w_tid = 0;
  std::uint16_t w_epoch = 0;     // the writer's warp's sync epoch then
  std::uint16_t r_interval = 0;  // interval of the reads below
  std::uint16_t r_tid[2] = {0, 0};
  std::uint16_t r_epoch[2] = {0, 0};
};
constexpr std::uint16_t kNone = 0x7FFF, kAtomicBit = 0x8000;
static_assert(sizeof(Cell) == 16, "one cell per 2-byte granule");

enum class Order { Forward, Reverse, Random };
const char* order_name(Order o) { return o == Order::Forward ? "forward" : o == Order::Reverse ? "reverse" : "random"; }

struct Runner {
  // the grid
  const KernelLaunch* launch = nullptr;
  const KernelBody* body = nullptr;
  std::string kernel;
  Order order = Order::Forward;
  std::minstd_rand rng;
  bool uninit_shared_reported = false, divergence_reported = false;
  // the block
  BlockInfo info{};
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  RunQueue runq;
  unsigned live = 0, at_barrier = 0;
  std::uint32_t interval = 0, block_start = 0;  // barrier intervals (< 2^16, see next_interval)
  Fiber* current = nullptr;
  bool in_block = false;
#if defined(__x86_64__)
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler_ctx;
#endif
  std::vector<Stack> stacks;
  std::vector<Cell> cells;
  std::vector<unsigned> scratch;
  Stats stats;
  std::map<const void*, int> max_dynamic;
  std::set<const void*> loaded;
  // How often each (kernel, grid, block, shared bytes) was run in two orders.
  std::map<std::tuple<const void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, std::size_t>, int> compared;
};

Runner* const g_runner = new Runner();  // lives for the whole process
inline Runner& R() { return *g_runner; }


std::string coords(const uint3& v) {
  return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}
std::string site_text(const std::source_location& s) {
  std::string f = s.file_name();
  const auto slash = f.find_last_of('/');
  if (slash != std::string::npos) f = f.substr(slash + 1);
  return f + ":" + std::to_string(s.line());
}
std::string thread_text(unsigned tid) {
  const Fiber& f = R().fibers[tid];
  return "thread " + coords(f.info.thread_idx) + " (warp " + std::to_string(f.warp) + ", lane " + std::to_string(f.lane) + ")";
}

// Starts a new barrier interval (block_begin: the first of a block). The cells keep intervals in
// 16 bits: before the counter wraps, every cell is renumbered (written earlier in the running
// block: interval 1; anything older: never written; no reads) and counting restarts, so an old
// interval never aliases a new one. Returns the new interval.
std::uint32_t next_interval(bool block_begin) {
  Runner& r = R();
  if (r.interval + 1 >= 0xFFFF) {
    const std::uint32_t start = r.block_start;
    for (Cell& c : r.cells) {
      const bool this_block = !block_begin && c.w_interval != 0 && c.w_interval >= start;
      c = Cell{};
      if (this_block) c.w_interval = 1;
    }
    r.interval = 1;
    r.block_start = 1;
  }
  ++r.interval;
  if (block_begin) r.block_start = r.interval;
  return r.interval;
}

// A violation inside the running grid (report() limits how many one grid makes).
void grid_report(Check check, const std::string& text, cudaError_t e) { report(check, text, e); }

Stack& stack(std::size_t i) {
  Runner& r = R();
  while (r.stacks.size() <= i) {
    void* p = mmap(nullptr, 4096 + kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "[ddim-emu] cannot allocate a fiber stack\n");
      std::abort();
    }
    (void)mprotect(p, 4096, PROT_NONE);  // overflow faults instead of corrupting a neighbour
    r.stacks.push_back(Stack{static_cast<unsigned char*>(p)});
  }
  return r.stacks[i];
}

void start_fiber(Fiber& f, Stack& s) {
#if defined(__x86_64__)
  auto* sp = reinterpret_cast<std::uintptr_t*>(reinterpret_cast<std::uintptr_t>(s.top()) & ~std::uintptr_t(15));
  *--sp = 0;  // the entry's (never used) return address: keeps the ABI's stack alignment
  *--sp = reinterpret_cast<std::uintptr_t>(&ddim_emu_fiber_entry);
  for (int i = 0; i < 6; ++i) *--sp = 0;  // rbp rbx r12 r13 r14 r15
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = s.base + 4096;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(&ddim_emu_fiber_entry), 0);
#endif
}

// From the scheduler to fiber f.
void switch_to(Fiber& f) {
  Runner& r = R();
  r.current = &f;
  tls_thread = &f.info;
  ++r.stats.switches;
#if defined(__x86_64__)
  ddim_emu_switch(&r.scheduler_sp, f.sp);
#else
  swapcontext(&r.scheduler_ctx, &f.ctx);
#endif
}

// The running fiber f stops (it blocked or exited): the next runnable fiber runs, switched to
// directly, or the scheduler when none is left. Returns when f is resumed.
void leave(Fiber& f) {
  Runner& r = R();
  while (!r.runq.empty()) {
    Fiber& next = r.fibers[r.runq.pop()];
    if (next.state != State::Runnable) continue;
    if (&next == &f) return;
    r.current = &next;
    tls_thread = &next.info;
    ++r.stats.switches;
#if defined(__x86_64__)
    ddim_emu_switch(&f.sp, next.sp);
#else
    swapcontext(&f.ctx, &next.ctx);
#endif
    return;
  }
#if defined(__x86_64__)
  ddim_emu_switch(&f.sp, r.scheduler_sp);
#else
  swapcontext(&f.ctx, &r.scheduler_ctx);
#endif
}

// The threads tids[0 .. n) become runnable, queued in the grid's order (tids is reordered).
void wake(unsigned* tids, std::size_t n) {
  Runner& r = R();
  if (r.order == Order::Reverse) std::reverse(tids, tids + n);
  else if (r.order == Order::Random)
    for (std::size_t i = n; i > 1; --i) std::swap(tids[i - 1], tids[r.rng() % i]);
  for (std::size_t i = 0; i < n; ++i) {
    r.fibers[tids[i]].state = State::Runnable;
    r.runq.push(tids[i]);
  }
}
void wake(std::vector<unsigned>& tids) { wake(tids.data(), tids.size()); }

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::Sync: return "__syncwarp";
    case WarpOp::ShflIdx: return "__shfl_sync";
    case WarpOp::ShflXor: return "__shfl_xor_sync";
    case WarpOp::ShflUp: return "__shfl_up_sync";
    case WarpOp::ShflDown: return "__shfl_down_sync";
    case WarpOp::Ballot: return "__ballot_sync";
    case WarpOp::All: return "__all_sync";
    case WarpOp::Any: return "__any_sync";
  }
  return "?";
}

std::string hex(unsigned v) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", v);
  return b;
}

// Computes every participant's result, frees the instance and wakes the others; `self_lane` (if a
// participant) continues.
void complete(Warp& w, unsigned warp_index, WarpInstance& inst, unsigned self_lane) {
  Runner& r = R();
  const unsigned mask = inst.arrived;
  unsigned woken[32];
  std::size_t n_woken = 0;
  std::uint64_t ballot = 0;
  for (unsigned l = 0; l < 32; ++l)
    if (mask >> l & 1u) ballot |= std::uint64_t(inst.value[l] != 0) << l;
  const bool shuffle = inst.op == WarpOp::ShflIdx || inst.op == WarpOp::ShflXor || inst.op == WarpOp::ShflUp ||
                       inst.op == WarpOp::ShflDown;
  for (unsigned l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    std::uint64_t res = 0;
    const unsigned seg = l & ~unsigned(inst.width - 1), end = seg + unsigned(inst.width);
    const unsigned a = unsigned(inst.arg[l]);
    unsigned src = l;
    switch (inst.op) {
      case WarpOp::Sync: break;
      case WarpOp::ShflIdx: src = seg + (a & unsigned(inst.width - 1)); break;
      case WarpOp::ShflXor: src = l ^ a; if (src >= end) src = l; break;
      case WarpOp::ShflUp: src = l >= a && l - a >= seg ? l - a : l; break;
      case WarpOp::ShflDown: src = l + a < end ? l + a : l; break;
      case WarpOp::Ballot: res = ballot; break;
      case WarpOp::All: res = ballot == (mask & 0xffffffffull) ? 1 : 0; break;
      case WarpOp::Any: res = ballot != 0 ? 1 : 0; break;
    }
    if (shuffle) {
      if (src > 31 || !(mask >> src & 1u)) {
        grid_report(Check::Synccheck,
                    std::string(op_name(inst.op)) + " at " + site_text(inst.site) + ": lane " + std::to_string(l) +
                        " of warp " + std::to_string(warp_index) + " reads lane " + std::to_string(src) +
                        ", which does not take part (mask " + hex(inst.mask) + ")",
                    cudaErrorLaunchFailure);
        res = 0;
      } else {
        res = inst.value[src];
      }
    }
    const unsigned tid = warp_index * 32 + l;
    r.fibers[tid].result = res;
    if (l != self_lane) woken[n_woken++] = tid;
  }
  if (inst.op == WarpOp::Sync && mask == w.present) ++w.sync_epoch;
  inst.used = false;
  wake(woken, n_woken);
}

// Nothing is runnable and threads are left: a barrier to release, or a deadlock to report and
// break.
void resolve_stall() {
  Runner& r = R();
  unsigned at_warp = 0;
  for (const Fiber& f : r.fibers) at_warp += f.state == State::AtWarp;
  if (at_warp > 0) {
    // Warp collectives that cannot complete: name who is missing and where they are.
    for (unsigned wi = 0; wi < r.warps.size(); ++wi) {
      Warp& w = r.warps[wi];
      for (WarpInstance& inst : w.inst) {
        if (!inst.used) continue;
        std::string where;
        for (unsigned l = 0; l < 32; ++l) {
          if (!(inst.mask >> l & 1u) || (inst.arrived >> l & 1u)) continue;
          const Fiber& f = r.fibers[wi * 32 + l];
          where += (where.empty() ? "" : "; ") + std::string("lane ") + std::to_string(l) +
                   (f.state == State::Done        ? " exited"
                    : f.state == State::AtBarrier ? " waits in __syncthreads at " + site_text(f.site)
                                                  : " waits in another warp collective at " + site_text(f.site));
        }
        grid_report(Check::Synccheck,
                    std::string(op_name(inst.op)) + " at " + site_text(inst.site) + " in warp " + std::to_string(wi) +
                        " with mask " + hex(inst.mask) + " is never reached by every lane it names: " + where,
                    cudaErrorLaunchFailure);
        complete(w, wi, inst, 32);  // release the lanes that arrived
      }
    }
    return;
  }
  // Every remaining thread waits in __syncthreads.
  std::vector<unsigned>& waiting = r.scratch;
  waiting.clear();
  bool same_site = true;
  const Fiber* first = nullptr;
  for (const Fiber& f : r.fibers)
    if (f.state == State::AtBarrier) {
      waiting.push_back(f.tid);
      if (!first) first = &f;
      else if (f.site.line() != first->site.line() || std::strcmp(f.site.file_name(), first->site.file_name()) != 0)
        same_site = false;
    }
  const unsigned total = unsigned(r.fibers.size());
  if ((waiting.size() != total || !same_site) && !r.divergence_reported) {
    r.divergence_reported = true;
    std::map<std::string, unsigned> sites;
    for (unsigned t : waiting) ++sites[site_text(r.fibers[t].site)];
    std::string text = "__syncthreads ";
    if (sites.size() > 1) {
      text += "divergence: the threads wait at different barriers (";
      bool comma = false;
      for (const auto& [site, count] : sites) {
        text += (comma ? ", " : "") + site + ": " + std::to_string(count) + " threads";
        comma = true;
      }
      text += ")";
    } else {
      text += "at " + sites.begin()->first + " is reached by " + std::to_string(waiting.size()) + " of the block's " +
              std::to_string(total) + " threads; the others exited";
    }
    grid_report(Check::Synccheck, text, cudaErrorLaunchFailure);
  }
  r.at_barrier = 0;
  next_interval(false);
  wake(waiting);
}

void run_block(const uint3& block_idx) {
  Runner& r = R();
  const dim3 bd = r.launch->block;
  const unsigned n = bd.x * bd.y * bd.z;
  r.info.block_idx = block_idx;
  r.fibers.assign(n, Fiber{});
  r.warps.assign((n + 31) / 32, Warp{});
  for (unsigned w = 0; w < r.warps.size(); ++w)
    r.warps[w].present = n - w * 32 >= 32 ? 0xffffffffu : (1u << (n - w * 32)) - 1u;
  std::vector<unsigned> order(n);
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = r.fibers[t];
    f.tid = t;
    f.warp = t / 32;
    f.lane = t % 32;
    f.info.thread_idx = uint3{t % bd.x, (t / bd.x) % bd.y, t / (bd.x * bd.y)};
    f.state = State::Runnable;
    start_fiber(f, stack(t));
    order[t] = t;
  }
  // Dynamic shared memory is garbage at block start: 0xFF bytes (NaN in every float type). (A read
  // of any shared byte the block did not write is reported anyway, by the initcheck above.)
  std::memset(g_dynamic_shared, 0xFF, r.launch->shared_bytes);
  next_interval(true);
  r.runq.reset(n);
  r.live = n;
  r.at_barrier = 0;
  wake(order);
  ++r.stats.blocks;
  r.stats.threads += n;
  r.in_block = true;
  for (;;) {
    while (!r.runq.empty()) {
      Fiber& f = r.fibers[r.runq.pop()];
      if (f.state != State::Runnable) continue;
      switch_to(f);
    }
    if (r.live == 0) break;
    resolve_stall();
  }
  r.in_block = false;
  r.current = nullptr;
  tls_thread = nullptr;
}

void run_blocks(Order order, std::uint64_t seed, std::uint8_t mode) {
  Runner& r = R();
  r.order = order;
  r.rng.seed(std::uint32_t(seed ^ (seed >> 32)));
  const dim3 g = r.launch->grid;
  const std::size_t count = std::size_t(g.x) * g.y * g.z;
  std::vector<std::size_t> blocks(count);
  for (std::size_t i = 0; i < count; ++i) blocks[i] = i;
  if (order == Order::Reverse) std::reverse(blocks.begin(), blocks.end());
  else if (order == Order::Random) std::shuffle(blocks.begin(), blocks.end(), r.rng);
  r.info.block_dim = r.launch->block;
  r.info.grid_dim = g;
  tls_block = &r.info;
  tls_mode = mode;
  for (std::size_t b : blocks)
    run_block(uint3{unsigned(b % g.x), unsigned((b / g.x) % g.y), unsigned(b / (std::size_t(g.x) * g.y))});
  tls_mode = kOff;
  tls_block = nullptr;
}

// The kernel's name from kernel_name<K>()'s __PRETTY_FUNCTION__, without the namespaces.
std::string kernel_text(const char* pretty) {
  std::string s = pretty;
  const auto k = s.find("K = ");
  if (k != std::string::npos) s = s.substr(k + 4, s.rfind(']') - k - 4);
  for (const char* ns : {"ddim::cuda::{anonymous}::", "ddim::cuda::", "{anonymous}::", "ddim::"}) {
    for (auto p = s.find(ns); p != std::string::npos; p = s.find(ns)) s.erase(p, std::strlen(ns));
  }
  return s;
}

std::string float_text(const unsigned char* p) {
  float f;
  std::uint32_t u;
  std::memcpy(&f, p, 4);
  std::memcpy(&u, p, 4);
  char b[64];
  std::snprintf(b, sizeof b, "%.9g (0x%08x)", double(f), u);
  return b;
}

}  // namespace

extern "C" [[noreturn]] void ddim_emu_fiber_entry() {
  Runner& r = R();
  Fiber& f = *r.current;
  try {
    r.body->run_thread();
  } catch (const std::exception& e) {
    grid_report(Check::Memcheck, std::string("kernel code threw: ") + e.what(), cudaErrorLaunchFailure);
  } catch (...) {
    grid_report(Check::Memcheck, "kernel code threw an exception", cudaErrorLaunchFailure);
  }
  f.state = State::Done;
  --r.live;
  leave(f);
  __builtin_unreachable();
}

// ------------------------------------------------------------------ kernel-facing API

void syncthreads(std::source_location at) {
  Runner& r = R();
  Fiber& f = *r.current;
  f.state = State::AtBarrier;
  f.site = at;
  ++r.at_barrier;
  leave(f);
}

std::uint64_t warp_collective(WarpOp op, unsigned mask, std::uint64_t value, int arg, int width, std::source_location at) {
  Runner& r = R();
  Fiber& f = *r.current;
  Warp& w = r.warps[f.warp];
  const unsigned bit = 1u << f.lane;
  const auto what = [&] { return std::string(op_name(op)) + " at " + site_text(at) + " (" + thread_text(f.tid) + ")"; };
  if (!(mask & bit)) {
    grid_report(Check::Synccheck, what() + ": the mask " + hex(mask) + " does not name the calling lane", cudaErrorLaunchFailure);
    mask |= bit;
  }
  if (mask & ~w.present) {
    grid_report(Check::Synccheck,
                what() + ": the mask " + hex(mask) + " names lanes that do not exist (the warp has " +
                    std::to_string(__builtin_popcount(w.present)) + " threads)",
                cudaErrorLaunchFailure);
    mask &= w.present;
  }
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    grid_report(Check::Synccheck, what() + ": width " + std::to_string(width) + " is not a power of two <= 32",
                cudaErrorLaunchFailure);
    width = 32;
  }
  WarpInstance* inst = nullptr;
  for (WarpInstance& i : w.inst)
    if (i.used && i.mask == mask && !(i.arrived & bit)) {
      inst = &i;
      break;
    }
  if (!inst) {
    for (const WarpInstance& i : w.inst)
      if (i.used && (i.mask & mask) && i.mask != mask)
        grid_report(Check::Synccheck,
                    what() + " with mask " + hex(mask) + " overlaps " + op_name(i.op) + " at " + site_text(i.site) +
                        " with mask " + hex(i.mask) + " waiting in the same warp",
                    cudaErrorLaunchFailure);
    for (WarpInstance& i : w.inst)
      if (!i.used) {
        inst = &i;
        break;
      }
    if (!inst) {
      grid_report(Check::Synccheck, what() + ": more than " + std::to_string(kMaxInstances) +
                                        " warp collectives with different masks wait in one warp", cudaErrorLaunchFailure);
      return 0;
    }
    inst->used = true;
    inst->op = op;
    inst->mask = mask;
    inst->arrived = 0;
    inst->width = width;
    inst->site = at;
  } else if (inst->op != op || inst->width != width) {
    grid_report(Check::Synccheck,
                what() + " meets " + op_name(inst->op) + " at " + site_text(inst->site) +
                    ": lanes of one warp must call the same collective with the same mask and width",
                cudaErrorLaunchFailure);
  }
  inst->value[f.lane] = value;
  inst->arg[f.lane] = arg;
  inst->arrived |= bit;
  if (inst->arrived == inst->mask) {
    complete(w, f.warp, *inst, f.lane);
    return f.result;
  }
  f.state = State::AtWarp;
  f.site = at;
  leave(f);
  return f.result;
}

unsigned atomic_u32(unsigned* p, AtomicOp op, unsigned v) {
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(p);
  if (!is_shared(a) && !mem::is_device(p)) {
    grid_report(Check::Memcheck, "atomic on " + mem::describe(a), cudaErrorIllegalAddress);
    return 0;
  }
  if (!kernel_access(a, 4, Access::Atomic)) return 0;
  const unsigned old = *p;
  switch (op) {
    case AtomicOp::Add: *p = old + v; break;
    case AtomicOp::Or: *p = old | v; break;
    case AtomicOp::And: *p = old & v; break;
    case AtomicOp::Max: *p = std::max(old, v); break;
    case AtomicOp::Min: *p = std::min(old, v); break;
    case AtomicOp::Exch: *p = v; break;
  }
  return old;
}

float atomic_add_f32(float* p, float v) {
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(p);
  if (!is_shared(a) && !mem::is_device(p)) {
    grid_report(Check::Memcheck, "atomic on " + mem::describe(a), cudaErrorIllegalAddress);
    return 0.f;
  }
  if (!kernel_access(a, 4, Access::Atomic)) return 0.f;
  const float old = *p;
  *p = old + v;
  return old;
}

void* dynamic_shared() { return g_dynamic_shared; }

// ------------------------------------------------------------------ shared-memory checks

void shared_access(std::uintptr_t a, std::size_t bytes, Access kind) {
  Runner& r = R();
  if (!r.in_block || !r.current) return;
  const std::uintptr_t dyn = reinterpret_cast<std::uintptr_t>(g_dynamic_shared);
  if (a + bytes > dyn + r.launch->shared_bytes && a < dyn + kMaxDynamicShared && a + bytes > dyn) {
    grid_report(Check::Memcheck,
                std::to_string(bytes) + "-byte access to dynamic shared memory at offset " + std::to_string(a - dyn) +
                    ", past the launch's " + std::to_string(r.launch->shared_bytes) + " bytes (" + thread_text(r.current->tid) + ")",
                cudaErrorIllegalAddress);
    return;
  }
  if (r.cells.empty()) r.cells.resize(g_shared_size / 2 + 1);
  const Fiber& f = *r.current;
  const std::uint16_t tid = std::uint16_t(f.tid);
  const std::uint16_t now = std::uint16_t(r.interval), start = std::uint16_t(r.block_start);
  const std::uint16_t epoch = std::uint16_t(r.warps[f.warp].sync_epoch);
  const bool atomic = kind == Access::Atomic;
  const std::uint16_t me = atomic ? std::uint16_t(tid | kAtomicBit) : tid;
  // Whether an access by `other` (bit 15: atomic) in this interval is ordered before this one:
  // the same thread, both atomic, or a full-warp __syncwarp of this warp since.
  const auto ordered = [&](std::uint16_t other, std::uint16_t e) {
    const unsigned o = other & 0x7FFFu;
    return o == tid || (atomic && (other & kAtomicBit)) || (o / 32 == f.warp && epoch != e);
  };
  const auto where = [&](std::uintptr_t p) {
    return p >= dyn && p < dyn + kMaxDynamicShared ? "dynamic shared memory + " + std::to_string(p - dyn)
                                                   : "static __shared__ data at " + hex(unsigned(p - g_shared_lo)) + " in the data window";
  };
  const auto race = [&](const char* what, std::uintptr_t p, std::uint16_t other, const char* verb) {
    grid_report(Check::Racecheck,
                std::string(what) + " on " + where(p) + ": " + thread_text(tid) + verb + thread_text(other & 0x7FFFu) +
                    " in the same barrier interval (no __syncthreads / __syncwarp between)",
                cudaErrorLaunchFailure);
  };
  const std::uintptr_t lo = (a - g_shared_lo) / 2, hi = (a + bytes - 1 - g_shared_lo) / 2;
  for (std::uintptr_t i = lo; i <= hi; ++i) {
    Cell& c = r.cells[i];
    const std::uintptr_t p = g_shared_lo + 2 * i;
    if (kind != Access::Write) {  // a read (an atomic reads too)
      if (c.w_interval < start || c.w_interval == 0) {
        if (!atomic && !r.uninit_shared_reported) {
          r.uninit_shared_reported = true;
          grid_report(Check::Initcheck,
                      thread_text(tid) + " reads " + where(p) + ", which no thread of the block wrote", cudaErrorLaunchFailure);
        }
      } else if (c.w_interval == now && !ordered(c.w_tid, c.w_epoch)) {
        race("read after write", p, c.w_tid, " reads what it was written by ");
        return;
      }
    }
    if (kind != Access::Read) {  // a write (an atomic writes too)
      if (c.w_interval == now && !ordered(c.w_tid, c.w_epoch)) {
        race("write after write", p, c.w_tid, " writes what is also written by ");
        return;
      }
      if (c.r_interval == now)
        for (int k = 0; k < 2; ++k)
          if (c.r_tid[k] != kNone && !ordered(c.r_tid[k], c.r_epoch[k])) {
            race("write after read", p, c.r_tid[k], " writes what is read by ");
            return;
          }
      c.w_interval = now;
      c.w_tid = me;
      c.w_epoch = epoch;
    }
    if (kind != Access::Write) {
      if (c.r_interval != now) {
        c.r_interval = now;
        c.r_tid[0] = me;
        c.r_epoch[0] = epoch;
        c.r_tid[1] = kNone;
      } else if (c.r_tid[1] == kNone && (c.r_tid[0] & 0x7FFFu) != tid) {
        // The first two distinct readers are kept: a later writer conflicts with at least one
        // of them (it cannot be both), which is all a report needs. Further reads store nothing.
        c.r_tid[1] = me;
        c.r_epoch[1] = epoch;
      }
    }
  }
}

// ------------------------------------------------------------------ grids

std::string kernel_position() {
  Runner& r = R();
  if (!r.in_block || !r.current) return "";
  return "block " + coords(r.info.block_idx) + ", " + thread_text(r.current->tid);
}

std::size_t max_dynamic_shared(const void* function) {
  const auto it = R().max_dynamic.find(function);
  return it == R().max_dynamic.end() ? kDefaultDynamicShared : std::size_t(it->second);
}

void set_max_dynamic_shared(const void* function, int bytes) { R().max_dynamic[function] = bytes; }

void mark_loaded(const void* function) { R().loaded.insert(function); }

cudaError_t validate_launch(const KernelLaunch& l) {
  const dim3 b = l.block, g = l.grid;
  if (b.x == 0 || b.y == 0 || b.z == 0 || b.x > 1024 || b.y > 1024 || b.z > 64 ||
      std::size_t(b.x) * b.y * b.z > 1024)
    return cudaErrorInvalidConfiguration;
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535)
    return cudaErrorInvalidConfiguration;
  if (l.shared_bytes > max_dynamic_shared(l.function)) return cudaErrorInvalidValue;
  return cudaSuccess;
}

void run_grid(const KernelLaunch& launch, const KernelBody& body) {
  Runner& r = R();
  r.launch = &launch;
  r.body = &body;
  r.kernel = kernel_text(launch.name);
  r.uninit_shared_reported = r.divergence_reported = false;
  const std::uint64_t index = r.stats.launches++;
  const Settings& s = settings();
  // The schedule comparison, for the first compare_repeats runs of each kernel with each launch
  // configuration (a sampling loop launches the same ones every step; every run is checked).
  const dim3 g = launch.grid, b = launch.block;
  int& compared = r.compared[{launch.function, g.x, g.y, g.z, b.x, b.y, b.z, launch.shared_bytes}];
  if (!s.compare_schedules || compared >= s.compare_repeats) {
    run_blocks(Order::Forward, 0, kCheck);
    return;
  }
  const int round = compared++;
  mem::snapshot_begin();
  run_blocks(Order::Forward, 0, kCheck);
  // What the forward run left in every page it wrote.
  std::map<std::uintptr_t, std::vector<unsigned char>> first;
  for (std::uintptr_t page : mem::written_pages()) {
    std::vector<unsigned char>& v = first[page];
    v.resize(mem::kPage);
    mem::copy_page(page, v.data());
  }
  std::vector<Order> others;
  if (s.all_schedules) others = {Order::Reverse, Order::Random};
  else others = {round % 2 == 0 ? Order::Reverse : Order::Random};
  for (Order o : others) {
    mem::restore_originals();
    const std::uint64_t seed = s.seed * 0x9E3779B97F4A7C15ull + index;
    run_blocks(o, seed, kSnapshot);
    ++r.stats.grid_reruns;
    std::vector<unsigned char> now(mem::kPage);
    for (std::uintptr_t page : mem::written_pages()) {
      mem::copy_page(page, now.data());
      const auto it = first.find(page);
      const unsigned char* ref = it != first.end() ? it->second.data() : mem::original_page(page);
      if (std::memcmp(now.data(), ref, mem::kPage) == 0) continue;
      std::size_t i = 0;
      while (now[i] == ref[i]) ++i;
      i &= ~std::size_t(3);
      report(Check::Schedule,
             "kernel " + r.kernel + ": the result depends on the order threads and blocks run in: at " +
                 mem::describe(page + i) + " the forward order left " + float_text(ref + i) + ", the " + order_name(o) +
                 " order (seed " + std::to_string(seed) + ") " + float_text(now.data() + i) +
                 " (a race on global memory, or a read of another block's output)",
             cudaErrorLaunchFailure);
      break;
    }
  }
  mem::snapshot_end();
}

void launch_kernel(const KernelLaunch& launch, std::shared_ptr<const KernelBody> body) {
  std::lock_guard<std::recursive_mutex> lock(device_mutex());
  const cudaError_t e = validate_launch(launch);
  if (e != cudaSuccess) {
    set_last_error(e);
    return;
  }
  if (R().loaded.insert(launch.function).second && capturing(launch.stream))
    report(Check::Capture,
           "kernel " + kernel_text(launch.name) +
               " is launched for the first time inside a stream capture: with CUDA's lazy loading (the default) its module "
               "is loaded there; load it before capturing (an eager launch, or cudaFuncGetAttributes)",
           cudaSuccess);
  Op op;
  op.name = "kernel " + kernel_text(launch.name);
  op.run = [launch, body = std::move(body)] { run_grid(launch, *body); };
  const cudaError_t q = enqueue(launch.stream, std::move(op));
  if (q != cudaSuccess) set_last_error(q);
}

Stats stats() {
  std::lock_guard<std::recursive_mutex> lock(device_mutex());
  return R().stats;
}

}  // namespace ddim_emu
