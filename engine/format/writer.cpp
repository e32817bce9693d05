// Writing the container: tensors in the order given with contiguous data, the JSON header padded
// with spaces to a multiple of 8 bytes (as the safetensors package does), metadata verbatim.
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>

#include "ddim/error.hpp"
#include "format/container.hpp"

namespace ddim::format {
namespace {

[[noreturn]] void bad_argument(const std::string& detail) {
  throw Error(ErrorCode::InvalidArgument, "serialize: " + detail);
}

}  // namespace

std::vector<std::uint8_t> serialize(const std::vector<TensorData>& tensors,
                                    const std::map<std::string, std::string>& metadata) {
  if (tensors.size() > kMaxTensors) {
    bad_argument(std::to_string(tensors.size()) + " tensors, more than the limit of " + std::to_string(kMaxTensors));
  }
  nlohmann::json header = nlohmann::json::object();
  std::uint64_t offset = 0;
  for (const TensorData& t : tensors) {
    const std::string what = "tensor " + detail::quote_name(t.name);
    if (t.name.empty()) bad_argument("a tensor has an empty name");
    if (t.name == "__metadata__") bad_argument(what + ": the name is reserved for the metadata");
    if (header.contains(t.name)) bad_argument(what + ": duplicate tensor name");
    if (t.shape.size() > static_cast<std::size_t>(kMaxRank))
      bad_argument(what + ": rank above " + std::to_string(kMaxRank));
    std::uint64_t numel = 0;
    const std::size_t elem = dtype_size(t.dtype);
    if (elem == 0) bad_argument(what + ": unknown dtype");
    if (!detail::checked_numel(t.shape, numel) || numel > t.bytes.size() / elem || numel * elem != t.bytes.size()) {
      bad_argument(what + ": " + std::to_string(t.bytes.size()) + " bytes do not match its shape and dtype " +
                   to_string(t.dtype));
    }
    nlohmann::json entry = nlohmann::json::object();
    entry["dtype"] = to_string(t.dtype);
    entry["shape"] = t.shape;
    entry["data_offsets"] = nlohmann::json::array({offset, offset + t.bytes.size()});
    header[t.name] = std::move(entry);
    offset += t.bytes.size();
  }
  if (!metadata.empty()) {
    nlohmann::json meta = nlohmann::json::object();
    for (const auto& [key, value] : metadata) meta[key] = value;
    header["__metadata__"] = std::move(meta);
  }

  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {
    bad_argument(std::string("a tensor name or metadata string is not valid UTF-8 (") + e.what() + ")");
  }
  text.append((8 - text.size() % 8) % 8, ' ');
  if (text.size() > kMaxHeaderBytes) {
    bad_argument("the header would be " + std::to_string(text.size()) + " bytes, above the limit of " +
                 std::to_string(kMaxHeaderBytes));
  }

  std::vector<std::uint8_t> out;
  out.reserve(8 + text.size() + offset);
  const std::uint64_t n = text.size();
  for (std::size_t i = 0; i < 8; ++i) out.push_back(static_cast<std::uint8_t>(n >> (8 * i)));
  out.insert(out.end(), text.begin(), text.end());
  for (const TensorData& t : tensors) out.insert(out.end(), t.bytes.begin(), t.bytes.end());
  return out;
}

void write_file(const std::string& path, const std::vector<std::uint8_t>& bytes) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) {
    throw Error(ErrorCode::Io, "cannot open " + detail::quote_name(path) + " for writing: " + std::strerror(errno));
  }
  errno = 0;
  const std::size_t written = bytes.empty() ? 0 : std::fwrite(bytes.data(), 1, bytes.size(), f);
  int err = written == bytes.size() ? 0 : (errno != 0 ? errno : EIO);
  if (std::fclose(f) != 0 && err == 0) err = errno != 0 ? errno : EIO;
  if (err != 0) {
    throw Error(ErrorCode::Io, "cannot write " + detail::quote_name(path) + ": " + std::strerror(err));
  }
}

}  // namespace ddim::format
