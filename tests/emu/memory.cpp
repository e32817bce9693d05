// Emulated device memory: allocations in one reserved 1 TiB address range, handed out by a bump
// pointer and never reused (so a freed pointer stays recognisably freed for the whole run), each
// with 512 bytes of redzone before it and 256-byte alignment, filled with 0xFF bytes (NaN in fp32,
// fp16 and bf16) when allocated.
//
// Shadow state, committed with the allocations:
//   * one uint32 per 8-byte granule: (allocation index + 1) << 4 | freed << 3 | (valid bytes - 1),
//     0 for redzones and never-allocated granules;
//   * one bit per byte: written since allocation (a kernel reading an unset byte is an
//     initcheck violation);
//   * one bit per 4 KiB page: copied before its first write by the running grid (the schedule
//     comparison restores the originals between runs).
// Callers hold the device lock.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <unordered_map>

#include "internal.hpp"

namespace ddim_emu::mem {
namespace {

constexpr std::uintptr_t kReserve = std::uintptr_t(1) << 40;
constexpr std::size_t kRedzone = 512;
constexpr std::size_t kAlign = 256;
constexpr std::uint32_t kFreed = 8;

std::uintptr_t align_up(std::uintptr_t v, std::uintptr_t a) { return (v + a - 1) / a * a; }
std::uintptr_t align_down(std::uintptr_t v, std::uintptr_t a) { return v / a * a; }

void* reserve(std::size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "[ddim-emu] cannot reserve %zu bytes of address space\n", bytes);
    std::abort();  // a test tool without its memory cannot report anything
  }
  return p;
}

// Makes [lo, hi) of a reserved region readable and writable (page-rounded).
void commit(void* region, std::uintptr_t lo, std::uintptr_t hi) {
  const std::uintptr_t page = std::uintptr_t(sysconf(_SC_PAGESIZE));
  const std::uintptr_t r = reinterpret_cast<std::uintptr_t>(region);
  const std::uintptr_t a = align_down(r + lo, page), b = align_up(r + hi, page);
  if (mprotect(reinterpret_cast<void*>(a), b - a, PROT_READ | PROT_WRITE) != 0) {
    std::fprintf(stderr, "[ddim-emu] cannot commit %zu bytes of emulated device memory\n", std::size_t(b - a));
    std::abort();
  }
}

struct State {
  std::uintptr_t base = 0;
  std::uintptr_t bump = 0;       // offset of the first unused byte
  std::uintptr_t committed = 0;  // offsets below this have committed data and shadow
  std::uint32_t* shadow = nullptr;
  std::uint8_t* init = nullptr;
  std::uint8_t* cow = nullptr;  // one bit per page
  std::vector<Allocation> allocs;
  std::size_t live = 0;
  bool snap = false;
  std::vector<std::uintptr_t> pages;
  std::vector<unsigned char> originals;
  std::unordered_map<std::uintptr_t, std::size_t> slot;

  State() {
    base = reinterpret_cast<std::uintptr_t>(reserve(kReserve));
    shadow = static_cast<std::uint32_t*>(reserve(kReserve / 8 * 4));
    init = static_cast<std::uint8_t*>(reserve(kReserve / 8));
    cow = static_cast<std::uint8_t*>(reserve(kReserve / kPage / 8));
    bump = 1 << 16;
  }
};

State* g_state = nullptr;

State& st() {
  if (!g_state) {
    g_state = new State();  // lives for the whole process
    g_base = g_state->base;
    g_size = kReserve;
  }
  return *g_state;
}

bool bit(const std::uint8_t* bits, std::uintptr_t i) { return (bits[i >> 3] >> (i & 7)) & 1u; }
void set_bit(std::uint8_t* bits, std::uintptr_t i) { bits[i >> 3] = std::uint8_t(bits[i >> 3] | (1u << (i & 7))); }

// Index into allocs of the allocation at or below offset `off` (by base), or -1.
long below(const State& s, std::uintptr_t a) {
  const auto it = std::upper_bound(s.allocs.begin(), s.allocs.end(), a,
                                    [](std::uintptr_t v, const Allocation& al) { return v < al.base; });
  return long(it - s.allocs.begin()) - 1;
}

}  // namespace

std::uintptr_t g_base = 0, g_size = 0;

std::size_t capacity() { return settings().device_memory; }
std::size_t live_bytes() { return g_state ? g_state->live : 0; }

cudaError_t allocate(void** p, std::size_t bytes) {
  if (!p) return cudaErrorInvalidValue;
  *p = nullptr;
  if (bytes == 0) return cudaSuccess;
  State& s = st();
  if (bytes > capacity() || s.live + bytes > capacity()) return cudaErrorMemoryAllocation;
  const std::uintptr_t start = align_up(s.bump + kRedzone, kAlign), end = start + bytes;
  if (end + kRedzone > kReserve || s.allocs.size() >= (std::size_t(1) << 27)) return cudaErrorMemoryAllocation;
  const std::uintptr_t top = end + kRedzone;
  if (top > s.committed) {
    const std::uintptr_t lo = s.committed, hi = align_up(top, std::uintptr_t(1) << 20);  // 1 MiB steps
    commit(reinterpret_cast<void*>(s.base), lo, hi);
    commit(s.shadow, lo / 8 * 4, hi / 8 * 4);
    commit(s.init, lo / 8, hi / 8);
    commit(s.cow, lo / kPage / 8, hi / kPage / 8 + 1);
    s.committed = hi;
  }
  const std::uint32_t id = std::uint32_t(s.allocs.size() + 1);
  const std::uintptr_t g0 = start / 8, g1 = (end - 1) / 8;
  for (std::uintptr_t g = g0; g < g1; ++g) s.shadow[g] = id << 4 | 7u;
  const std::uintptr_t last_valid = end - g1 * 8;  // 1..8
  s.shadow[g1] = id << 4 | std::uint32_t(last_valid - 1);
  std::memset(reinterpret_cast<void*>(s.base + start), 0xFF, bytes);
  s.allocs.push_back(Allocation{s.base + start, bytes, false});
  s.bump = end;
  s.live += bytes;
  *p = reinterpret_cast<void*>(s.base + start);
  return cudaSuccess;
}

cudaError_t release(void* p) {
  if (!p) return cudaSuccess;
  State& s = st();
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(p);
  const long i = is_device(p) ? below(s, a) : -1;
  if (i < 0 || s.allocs[std::size_t(i)].base != a || s.allocs[std::size_t(i)].freed) {
    const bool twice = i >= 0 && s.allocs[std::size_t(i)].base == a;
    report(Check::Memcheck,
           std::string("cudaFree of ") + (twice ? "an allocation freed before: " : "a pointer that no cudaMalloc returned: ") +
               (is_device(p) ? describe(a) : "a host address"),
           cudaSuccess);
    return cudaErrorInvalidValue;
  }
  Allocation& al = s.allocs[std::size_t(i)];
  al.freed = true;
  const std::uintptr_t off = al.base - s.base;
  for (std::uintptr_t g = off / 8; g <= (off + al.size - 1) / 8; ++g) s.shadow[g] |= kFreed;
  // Give the pages back (whole pages inside the allocation only: the neighbours keep theirs).
  const std::uintptr_t page = std::uintptr_t(sysconf(_SC_PAGESIZE));
  const std::uintptr_t lo = align_up(al.base, page), hi = align_down(al.base + al.size, page);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
  s.live -= al.size;
  return cudaSuccess;
}

const Allocation* find(const void* p, std::size_t bytes, std::string* why) {
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(p);
  if (!is_device(p)) {
    if (why) *why = "not a device address";
    return nullptr;
  }
  State& s = st();
  const long i = below(s, a);
  if (i < 0) {
    if (why) *why = describe(a);
    return nullptr;
  }
  const Allocation& al = s.allocs[std::size_t(i)];
  if (al.freed || a + bytes > al.base + al.size) {
    if (why) *why = describe(a) + (al.freed ? "" : " (" + std::to_string(bytes) + " bytes from there)");
    return nullptr;
  }
  return &al;
}

std::string describe(std::uintptr_t a) {
  char buf[160];
  if (!g_state || !is_device(reinterpret_cast<void*>(a))) {
    std::snprintf(buf, sizeof buf, "0x%zx (not device memory)", std::size_t(a));
    return buf;
  }
  const State& s = *g_state;
  const long i = below(s, a);
  if (i < 0) {
    std::snprintf(buf, sizeof buf, "0x%zx (before every allocation)", std::size_t(a));
    return buf;
  }
  const Allocation& al = s.allocs[std::size_t(i)];
  if (a < al.base + al.size) {
    std::snprintf(buf, sizeof buf, "0x%zx = allocation #%ld (%zu bytes) + %zu%s", std::size_t(a), i + 1, al.size,
                  std::size_t(a - al.base), al.freed ? ", freed" : "");
  } else {
    const long j = i + 1;
    if (std::size_t(j) < s.allocs.size() && s.allocs[std::size_t(j)].base - a < a - (al.base + al.size))
      std::snprintf(buf, sizeof buf, "0x%zx = %zu bytes before allocation #%ld (%zu bytes)", std::size_t(a),
                    std::size_t(s.allocs[std::size_t(j)].base - a), j + 1, s.allocs[std::size_t(j)].size);
    else
      std::snprintf(buf, sizeof buf, "0x%zx = %zu bytes past the end of allocation #%ld (%zu bytes)%s", std::size_t(a),
                    std::size_t(a - (al.base + al.size)), i + 1, al.size, al.freed ? ", freed" : "");
  }
  return buf;
}

bool access(std::uintptr_t a, std::size_t bytes, Access kind, bool check_init) {
  if (bytes == 0) return true;
  State& s = st();
  const std::uintptr_t off = a - s.base;
  const char* verb = kind == Access::Read ? "read" : kind == Access::Write ? "write" : "atomic";
  if (off >= s.committed || off + bytes > s.committed) {
    report(Check::Memcheck, std::string("invalid ") + verb + " of " + std::to_string(bytes) + " bytes at " + describe(a),
           cudaErrorIllegalAddress);
    return false;
  }
  const std::uintptr_t g0 = off / 8, g1 = (off + bytes - 1) / 8;
  const std::uint32_t s0 = s.shadow[g0], id = s0 >> 4;
  bool ok = id != 0 && !(s0 & kFreed);
  for (std::uintptr_t g = g0; ok && g <= g1; ++g) {
    const std::uint32_t sg = s.shadow[g];
    if ((sg >> 4) != id || (sg & kFreed)) ok = false;
    else if ((sg & 7u) != 7u) {  // the allocation's last granule: bytes past `valid` are outside
      const std::uintptr_t last = std::min<std::uintptr_t>(off + bytes - 1, g * 8 + 7) - g * 8;
      if (last > (sg & 7u)) ok = false;
    }
  }
  if (!ok) {
    const bool freed = id != 0 && (s0 & kFreed);
    report(Check::Memcheck,
           std::string(freed ? "use after free: " : "out-of-bounds ") + verb + " of " + std::to_string(bytes) + " bytes at " +
               describe(a),
           cudaErrorIllegalAddress);
    return false;
  }
  const bool write = kind != Access::Read;
  if (kind != Access::Write && check_init) {
    for (std::uintptr_t i = off; i < off + bytes; ++i)
      if (!bit(s.init, i)) {
        report(Check::Initcheck,
               std::to_string(bytes) + "-byte read of uninitialised device memory at " + describe(s.base + i) +
                   " (nothing wrote it since cudaMalloc)",
               cudaErrorLaunchFailure);
        break;
      }
  }
  if (write) {
    if (s.snap) snapshot_write(a, bytes);
    for (std::uintptr_t i = off; i < off + bytes; ++i) set_bit(s.init, i);
  }
  touch(id, a, bytes, write);
  return true;
}

void snapshot_write(std::uintptr_t a, std::size_t bytes) {
  State& s = st();
  const std::uintptr_t off = a - s.base;
  if (!s.snap || bytes == 0 || off >= s.committed || off + bytes > s.committed) return;
  for (std::uintptr_t p = off / kPage; p <= (off + bytes - 1) / kPage; ++p)
    if (!bit(s.cow, p)) {
      set_bit(s.cow, p);
      const std::uintptr_t page = s.base + p * kPage;
      s.slot.emplace(page, s.originals.size());
      s.pages.push_back(page);
      s.originals.insert(s.originals.end(), reinterpret_cast<const unsigned char*>(page),
                         reinterpret_cast<const unsigned char*>(page) + kPage);
    }
}

void snapshot_begin() {
  State& s = st();
  s.snap = true;
  s.pages.clear();
  s.originals.clear();
  s.slot.clear();
}

void snapshot_end() {
  State& s = st();
  for (std::uintptr_t page : s.pages) {
    const std::uintptr_t p = (page - s.base) / kPage;
    s.cow[p >> 3] = std::uint8_t(s.cow[p >> 3] & ~(1u << (p & 7)));
  }
  s.snap = false;
  s.pages.clear();
  s.originals.clear();
  s.slot.clear();
}

std::vector<std::uintptr_t> written_pages() { return st().pages; }

void copy_page(std::uintptr_t page, void* dst) { std::memcpy(dst, reinterpret_cast<const void*>(page), kPage); }

const unsigned char* original_page(std::uintptr_t page) {
  State& s = st();
  return s.originals.data() + s.slot.at(page);
}

void restore_originals() {
  State& s = st();
  for (std::uintptr_t page : s.pages) std::memcpy(reinterpret_cast<void*>(page), original_page(page), kPage);
}

}  // namespace ddim_emu::mem
