// Regular-file-only input: checked with stat before the open, opened non-blocking (so a FIFO
// swapped in between never blocks) and checked again with fstat on the open descriptor.
#include "format/input_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "ddim/error.hpp"

namespace ddim::format {
namespace {

[[noreturn]] void io_error(const std::string& message) { throw Error(ErrorCode::Io, message); }

void check_regular(const struct stat& st, const std::string& display) {
  if (S_ISREG(st.st_mode)) return;
  if (S_ISDIR(st.st_mode)) io_error("cannot read " + display + ": it is a directory, not a file");
  io_error("cannot read " + display + ": it is " + describe_file_type(static_cast<unsigned>(st.st_mode)) +
           ", not a regular file (ddim reads models and inputs from regular files only)");
}

}  // namespace

std::string quote_path(std::string_view path) {
  constexpr std::size_t kMax = 256;
  std::string out = "'";
  for (std::size_t i = 0; i < path.size() && i < kMax; ++i) {
    const auto c = static_cast<unsigned char>(path[i]);
    if (c == '\n') {
      out += "\\n";
    } else if (c < 0x20 || c == 0x7F) {
      static constexpr char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 0xF];
    } else {
      out += static_cast<char>(c);
    }
  }
  if (path.size() > kMax) out += "...";
  return out + "'";
}

std::string describe_file_type(unsigned mode) {
  switch (mode & S_IFMT) {
    case S_IFREG: return "a regular file";
    case S_IFDIR: return "a directory";
    case S_IFIFO: return "a FIFO (named pipe)";
    case S_IFCHR: return "a character device";
    case S_IFBLK: return "a block device";
    case S_IFSOCK: return "a socket";
    case S_IFLNK: return "a symbolic link";
  }
  return "a special file";
}

InputFile::InputFile(const std::filesystem::path& path) : display_(quote_path(path.string())) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) io_error("cannot open " + display_ + ": " + std::strerror(errno));
  check_regular(st, display_);
  // O_NONBLOCK: if the path was replaced by a FIFO since the stat, the open still returns at once.
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd_ < 0) io_error("cannot open " + display_ + ": " + std::strerror(errno));
  try {
    if (::fstat(fd_, &st) != 0) io_error("cannot read " + display_ + ": " + std::strerror(errno));
    check_regular(st, display_);
    const int flags = ::fcntl(fd_, F_GETFL);
    if (flags >= 0) ::fcntl(fd_, F_SETFL, flags & ~O_NONBLOCK);
    size_ = static_cast<std::uint64_t>(st.st_size);
    if (size_ == 0) {
      // Pseudo-files (/proc, /sys) report 0 bytes and yet have content: say so, rather than
      // calling the file empty.
      char probe = 0;
      ssize_t got;
      do {
        got = ::pread(fd_, &probe, 1, 0);
      } while (got < 0 && errno == EINTR);
      if (got > 0) {
        io_error("cannot read " + display_ + ": it reports a size of 0 bytes but has content (a pseudo-file such as "
                 "those under /proc); copy it to a regular file first");
      }
    }
  } catch (...) {
    ::close(fd_);
    throw;
  }
}

InputFile::~InputFile() {
  if (fd_ >= 0) ::close(fd_);
}

void InputFile::read_at(std::uint64_t offset, std::span<std::uint8_t> out) const {
  std::size_t done = 0;
  while (done < out.size()) {
    const ssize_t got = ::pread(fd_, out.data() + done, out.size() - done, static_cast<off_t>(offset + done));
    if (got < 0) {
      if (errno == EINTR) continue;
      io_error("cannot read " + display_ + " at byte " + std::to_string(offset + done) + ": " + std::strerror(errno));
    }
    if (got == 0) {
      io_error("cannot read " + display_ + ": it ends at byte " + std::to_string(offset + done) + ", before the " +
               std::to_string(size_) + " bytes it had when opened (did it change while being read?)");
    }
    done += static_cast<std::size_t>(got);
  }
}

std::vector<std::uint8_t> InputFile::read_all(std::uint64_t max_bytes) const {
  if (size_ > max_bytes) {
    throw Error(ErrorCode::InvalidFile, display_ + " is " + std::to_string(size_) + " bytes, more than the limit of " +
                                            std::to_string(max_bytes) + " bytes for this kind of file");
  }
  std::vector<std::uint8_t> bytes(static_cast<std::size_t>(size_));
  read_at(0, bytes);
  return bytes;
}

}  // namespace ddim::format
