// Regular-file input and all-or-nothing output for the ddim tool (see files.hpp).
#include "files.hpp"

#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <set>

#include "args.hpp"
#include "ddim/error.hpp"
#include "format/input_file.hpp"

namespace ddim::tools {
namespace fs = std::filesystem;
namespace {

using format::quote_path;

std::atomic<unsigned> g_temp_counter{0};

[[noreturn]] void io_error(std::string_view option, const std::string& what) {
  throw Error(ErrorCode::Io, std::string(option) + ": " + what);
}

// Follows symbolic links of the last component (a link to a link ...), so that an output written
// through a link replaces the file it points to; the directories are then made canonical.
fs::path resolve_target(const fs::path& path, std::string_view option) {
  fs::path current = fs::absolute(path);
  for (int hops = 0;; ++hops) {
    struct stat st {};
    if (::lstat(current.c_str(), &st) != 0 || !S_ISLNK(st.st_mode)) break;
    if (hops == 40) io_error(option, "cannot write " + quote_path(path.string()) + ": too many levels of symbolic links");
    std::error_code ec;
    const fs::path link = fs::read_symlink(current, ec);
    if (ec) io_error(option, "cannot write " + quote_path(path.string()) + ": " + ec.message());
    current = link.is_absolute() ? link : current.parent_path() / link;
  }
  std::error_code ec;
  const fs::path dir = fs::weakly_canonical(current.parent_path(), ec);
  return (ec ? current.parent_path() : dir) / current.filename();
}

// write(2) until done; errno on failure.
bool write_all(int fd, std::span<const std::uint8_t> bytes) {
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    if (n == 0) {
      errno = EIO;
      return false;
    }
    done += static_cast<std::size_t>(n);
  }
  return true;
}

void sync_directory(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  ::fsync(fd);  // best effort: some file systems do not sync directories (EINVAL)
  ::close(fd);
}

}  // namespace

std::vector<std::uint8_t> read_file(const fs::path& path, std::uint64_t max_bytes) {
  return format::InputFile(path).read_all(max_bytes);
}

OutputFiles::~OutputFiles() {
  if (committed_) return;
  for (const Entry& e : entries_)
    if (!e.temp.empty()) ::unlink(e.temp.c_str());
  for (auto it = created_dirs_.rbegin(); it != created_dirs_.rend(); ++it) ::rmdir(it->c_str());  // only when empty
}

fs::path OutputFiles::add(const fs::path& path, std::string_view option) {
  const std::string shown = quote_path(path.string());
  const std::string name = path.filename().string();
  if (path.empty() || name.empty() || name == "." || name == "..") {
    io_error(option, shown + " is not a file name (it names a directory)");
  }
  const fs::path target = resolve_target(path, option);
  const fs::path dir = target.parent_path();
  const long name_max = ::pathconf(dir.c_str(), _PC_NAME_MAX);
  const std::size_t limit = name_max > 0 ? static_cast<std::size_t>(name_max) : NAME_MAX;
  if (target.filename().string().size() > limit) {
    io_error(option, "cannot write " + shown + ": its file name is " + std::to_string(target.filename().string().size()) +
                         " bytes long, more than the file system allows (" + std::to_string(limit) + ")");
  }
  struct stat st {};
  const bool exists = ::stat(target.c_str(), &st) == 0;
  if (!exists && errno != ENOENT) io_error(option, "cannot write " + shown + ": " + std::strerror(errno));
  if (exists && S_ISDIR(st.st_mode)) io_error(option, shown + " is a directory");
  if (exists && !S_ISREG(st.st_mode)) {
    io_error(option, shown + " exists and is " + format::describe_file_type(static_cast<unsigned>(st.st_mode)) +
                         ", not a regular file; ddim replaces outputs atomically (a new file renamed over the old one) "
                         "and will not replace it: give the path of a regular file");
  }
  struct stat dst {};
  if (::stat(dir.c_str(), &dst) != 0 || !S_ISDIR(dst.st_mode)) {
    io_error(option, "cannot write " + shown + ": directory " + quote_path(path.parent_path().string()) + " does not exist");
  }
  for (const Entry& e : entries_) {
    struct stat other {};
    const bool same_file = e.target == target || (exists && ::stat(e.target.c_str(), &other) == 0 &&
                                                   other.st_dev == st.st_dev && other.st_ino == st.st_ino);
    if (same_file) {
      throw cli::UsageError(std::string(option) + " " + shown + " and " + e.option + " " + quote_path(e.given.string()) +
                            " name the same file; give each output its own path");
    }
  }
  entries_.push_back({path, target, {}, std::string(option), false});
  return target;
}

void OutputFiles::make_directory(const fs::path& dir, std::string_view option) {
  const std::string shown = quote_path(dir.string());
  std::error_code ec;
  if (fs::is_directory(dir, ec)) return;
  if (fs::exists(fs::symlink_status(dir, ec))) io_error(option, shown + " exists and is not a directory");
  // Create one level at a time, remembering what was created so that a failure can remove it.
  std::vector<fs::path> missing;
  fs::path start = fs::absolute(dir).lexically_normal();
  if (start.filename().empty()) start = start.parent_path();  // "out/" -> "out"
  for (fs::path p = start; !p.empty() && !fs::exists(fs::symlink_status(p, ec)); p = p.parent_path()) {
    missing.push_back(p);
    if (p == p.parent_path()) break;
  }
  for (auto it = missing.rbegin(); it != missing.rend(); ++it) {
    if (::mkdir(it->c_str(), 0777) != 0 && errno != EEXIST) {
      io_error(option, "cannot create " + shown + ": " + std::strerror(errno));
    }
    created_dirs_.push_back(*it);
  }
  if (!fs::is_directory(dir, ec)) io_error(option, "cannot create " + shown);
}

OutputFiles::Entry& OutputFiles::find(const fs::path& path) {
  for (Entry& e : entries_)
    if (e.given == path) return e;
  throw Error(ErrorCode::Internal, "output " + quote_path(path.string()) + " was not registered");
}

void OutputFiles::stage(const fs::path& path, std::span<const std::uint8_t> bytes) {
  Entry& e = find(path);
  if (e.staged) throw Error(ErrorCode::Internal, "output " + quote_path(path.string()) + " was written twice");
  const std::string shown = quote_path(path.string());
  const fs::path dir = e.target.parent_path();
  // A short name (a long target name plus a suffix could pass the file system's name limit).
  int fd = -1;
  fs::path temp;
  for (int attempt = 0; fd < 0; ++attempt) {
    temp = dir / (".ddim-" + std::to_string(::getpid()) + "-" + std::to_string(g_temp_counter.fetch_add(1)) + ".tmp");
    fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0 && (errno != EEXIST || attempt == 100)) {
      io_error(e.option, "cannot write " + shown + ": " + std::strerror(errno));
    }
  }
  e.temp = temp;
  struct stat old {};
  if (::stat(e.target.c_str(), &old) == 0 && S_ISREG(old.st_mode)) ::fchmod(fd, old.st_mode & 07777);  // keep its mode
  const bool ok = write_all(fd, bytes) && ::fsync(fd) == 0;
  const int saved = errno;
  const bool closed = ::close(fd) == 0;
  if (!ok || !closed) {
    ::unlink(temp.c_str());
    e.temp.clear();
    io_error(e.option, "cannot write " + shown + ": " + std::strerror(ok ? errno : saved) +
                           " (nothing was written: an existing file there is unchanged)");
  }
  e.staged = true;
}

void OutputFiles::commit() {
  for (const Entry& e : entries_) {
    if (!e.staged) throw Error(ErrorCode::Internal, "output " + quote_path(e.given.string()) + " was never written");
    // Checked again just before the renames: a directory that appeared meanwhile would make one
    // rename fail after others had replaced their targets.
    struct stat st {};
    if (::lstat(e.target.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) {
      io_error(e.option, "cannot write " + quote_path(e.given.string()) + ": it is now " +
                             format::describe_file_type(static_cast<unsigned>(st.st_mode)) + "; nothing was replaced");
    }
  }
  std::set<fs::path> dirs;
  for (const Entry& e : entries_) dirs.insert(e.target.parent_path());
  // The temporary files' directory entries are on disk before any rename (the files themselves
  // were synced when staged); after the renames the directories are synced again, which makes the
  // new names durable.
  for (const fs::path& dir : dirs) sync_directory(dir);
  for (std::size_t i = 0; i < entries_.size(); ++i) {
    Entry& e = entries_[i];
    if (::rename(e.temp.c_str(), e.target.c_str()) != 0) {
      const int saved = errno;
      std::string replaced;
      for (std::size_t j = 0; j < i; ++j) replaced += (j ? ", " : "") + quote_path(entries_[j].given.string());
      io_error(e.option, "cannot write " + quote_path(e.given.string()) + ": " + std::strerror(saved) +
                             (replaced.empty() ? std::string(" (nothing was replaced)") : "; already replaced: " + replaced));
    }
    e.temp.clear();
  }
  for (const fs::path& dir : dirs) sync_directory(dir);
  committed_ = true;
}

void write_file_atomic(const fs::path& path, std::span<const std::uint8_t> bytes, std::string_view option) {
  OutputFiles out;
  out.add(path, option);
  out.stage(path, bytes);
  out.commit();
}

}  // namespace ddim::tools
