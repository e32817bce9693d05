#pragma once
// Host memory exhaustion as ddim::Error(OutOfMemory): the public entry points (loading, planning,
// sampling) run their work through with_host_memory_errors, so that std::bad_alloc, a buffer
// larger than the address space (std::length_error) or a thread that cannot be started
// (std::system_error: EAGAIN / ENOMEM) reach the caller as an error with a message, and the
// process can go on (e.g. plan a smaller session).
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>
#include <system_error>

#include "ddim/error.hpp"

namespace ddim {

template <class F>
auto with_host_memory_errors(const std::string& what, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    throw Error(ErrorCode::OutOfMemory, what + ": out of host memory");
  } catch (const std::length_error& e) {
    throw Error(ErrorCode::OutOfMemory, what + ": a buffer larger than the address space was needed (" + e.what() + ")");
  } catch (const std::system_error& e) {
    if (e.code().value() == EAGAIN || e.code().value() == ENOMEM)
      throw Error(ErrorCode::OutOfMemory, what + ": cannot start a thread (" + e.what() + "): out of memory or of threads");
    throw;
  }
}

// This machine's physical memory in bytes (the largest value when unknown).
inline std::uint64_t physical_memory_bytes() noexcept {
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page <= 0) return std::numeric_limits<std::uint64_t>::max();
  return static_cast<std::uint64_t>(pages) * static_cast<std::uint64_t>(page);
}

// Refuses, before anything is allocated, a buffer larger than the machine's memory: an
// allocation the kernel grants lazily would otherwise be filled page by page until the process
// is killed. ddim::Error(OutOfMemory) naming `what` and both sizes.
inline void check_fits_host_memory(std::uint64_t bytes, const std::string& what) {
  const std::uint64_t total = physical_memory_bytes();
  if (bytes > total)
    throw Error(ErrorCode::OutOfMemory, what + " needs " + std::to_string(bytes) + " bytes, more than this machine's " +
                                            std::to_string(total) + " bytes of memory");
}

}  // namespace ddim
