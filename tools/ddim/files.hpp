#pragma once
// Files in and out for the ddim tool.
//
// In: read_file reads a regular file only (format::InputFile: a FIFO, a device or a directory is
// refused before it is opened for reading), within a size limit.
//
// Out: OutputFiles makes a command's outputs all or nothing. Every output is registered before
// the work starts (its path checked and resolved, two outputs naming one file refused), then
// written to a temporary file beside its target and flushed to disk (fsync), and only when every
// output has been written are they renamed over their targets (then the directories are synced).
// A failure anywhere leaves every target as it was: no partial file, no earlier output replaced,
// no temporary file left behind.
//
// Existing targets: a regular file is replaced whole; a symbolic link is written through (the
// link stays, the file it points to is replaced); a directory, a device, a FIFO or a socket is
// refused with a message (an atomic rename would replace the device with a regular file).
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace ddim::tools {

// Reads a whole regular file of at most max_bytes. ddim::Error(Io) naming the path when it cannot
// be opened or read or is not a regular file; ddim::Error(InvalidFile) when it is too large.
std::vector<std::uint8_t> read_file(const std::filesystem::path& path, std::uint64_t max_bytes = std::uint64_t{1} << 32);

class OutputFiles {
 public:
  OutputFiles() = default;
  // Removes the temporary files of an uncommitted set, and the directories make_directory created
  // when they are still empty.
  ~OutputFiles();
  OutputFiles(const OutputFiles&) = delete;
  OutputFiles& operator=(const OutputFiles&) = delete;

  // Registers the output `path` of `option` ("--out") and returns the file it will replace (links
  // resolved). ddim::Error(Io) when it cannot be an output file: no file name, a directory, an
  // existing non-regular file, a missing directory, a name longer than the file system allows;
  // cli::UsageError when another output of the set names the same file.
  std::filesystem::path add(const std::filesystem::path& path, std::string_view option);

  // Creates `dir` (and its parents) for `option` ("--out-dir") unless it exists; ddim::Error(Io)
  // when it cannot, or when it exists and is not a directory.
  void make_directory(const std::filesystem::path& dir, std::string_view option);

  // Writes the bytes of a registered output (add() first, with the same path) to its temporary
  // file and syncs it. ddim::Error(Io) naming the output on any failure (a full disk, a file size
  // limit, ...); the target is untouched.
  void stage(const std::filesystem::path& path, std::span<const std::uint8_t> bytes);

  // Renames every staged file over its target, then syncs the targets' directories. Every output
  // registered must have been staged.
  void commit();

 private:
  struct Entry {
    std::filesystem::path given, target, temp;
    std::string option;
    bool staged = false;
  };
  Entry& find(const std::filesystem::path& path);
  std::vector<Entry> entries_;
  std::vector<std::filesystem::path> created_dirs_;
  bool committed_ = false;
};

// One output written atomically: OutputFiles with one file. ddim::Error(Io) on failure.
void write_file_atomic(const std::filesystem::path& path, std::span<const std::uint8_t> bytes,
                       std::string_view option = "output");

}  // namespace ddim::tools
