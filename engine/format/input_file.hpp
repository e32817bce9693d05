#pragma once
// Reading input files without trusting them: only a regular file is opened for reading (a FIFO,
// a device or a socket would block or stream forever, a directory would read as nothing), its
// size comes from the open file, and every read is exact (a file that shrinks while it is read is
// an error, never a short buffer). Used by Model::load and by the ddim tool's .npy and PNG readers.
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace ddim::format {

class InputFile {
 public:
  // Opens `path`. ddim::Error(Io) naming the path when it is missing or unreadable, when it is a
  // directory or anything else that is not a regular file (the message says what it is), and when
  // it reports a size of 0 but has content (a pseudo-file such as those under /proc).
  explicit InputFile(const std::filesystem::path& path);
  ~InputFile();
  InputFile(const InputFile&) = delete;
  InputFile& operator=(const InputFile&) = delete;

  std::uint64_t size() const noexcept { return size_; }
  // The path as error messages show it (quote_path).
  const std::string& display_name() const noexcept { return display_; }

  // Reads exactly out.size() bytes at `offset`. ddim::Error(Io) when the read fails or the file
  // ends early (it changed while being read).
  void read_at(std::uint64_t offset, std::span<std::uint8_t> out) const;
  // The whole file. ddim::Error(InvalidFile) naming the size and the limit when it is larger than
  // max_bytes, before anything is allocated.
  std::vector<std::uint8_t> read_all(std::uint64_t max_bytes) const;

 private:
  int fd_ = -1;
  std::uint64_t size_ = 0;
  std::string display_;
};

// A path for an error message: in single quotes, control characters escaped (\n, \xNN), cut short
// when longer than 256 characters, so a message stays one bounded line.
std::string quote_path(std::string_view path);

// What a file of this st_mode is, for messages: "a directory", "a FIFO (named pipe)",
// "a character device", ...
std::string describe_file_type(unsigned mode);

}  // namespace ddim::format
