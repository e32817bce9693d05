// Reading and validating the container header. Nothing in the file is trusted: every size is
// derived with checked arithmetic, and the tensors' byte ranges must tile the data section exactly
// before anything is allocated from them. Each failure names the tensor or key and how to fix it.
#include "format/container.hpp"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>

#include "ddim/error.hpp"

namespace ddim::format {
namespace {

using detail::quote_name;
using nlohmann::json;

constexpr const char* kHint = "re-export the model with tools/export.py";
constexpr std::uint64_t kInt64Max = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());

[[noreturn]] void fail(const std::string& message) {
  throw Error(ErrorCode::InvalidFile, detail::bounded_message("model file: " + message + "; " + kHint));
}

std::string short_dump(const json& v) { return detail::short_json(v); }

std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string range_string(const TensorInfo& t) {
  return "[" + std::to_string(t.begin) + ", " + std::to_string(t.end) + ")";
}

std::optional<std::uint64_t> as_nonnegative_integer(const json& v) {
  if (v.is_number_unsigned()) return v.get<std::uint64_t>();
  if (v.is_number_integer()) {
    const auto s = v.get<std::int64_t>();
    if (s >= 0) return static_cast<std::uint64_t>(s);
  }
  return std::nullopt;
}

std::optional<DType> parse_dtype(const std::string& s) {
  for (const DType d : {DType::F32, DType::F16, DType::BF16, DType::F64}) {
    if (s == to_string(d)) return d;
  }
  return std::nullopt;
}

void parse_metadata(const json& v, std::map<std::string, std::string>& out) {
  if (!v.is_object()) fail("\"__metadata__\" must be an object of string values, found " + short_dump(v));
  for (const auto& item : v.items()) {
    if (!item.value().is_string()) {
      fail("\"__metadata__\" key " + quote_name(item.key()) + " must have a string value, found " +
           short_dump(item.value()));
    }
    out.emplace(item.key(), item.value().get<std::string>());
  }
}

TensorInfo parse_tensor(const std::string& name, const json& v, std::uint64_t data_size) {
  if (name.empty()) fail("a tensor has an empty name");
  const std::string what = "tensor " + quote_name(name);
  static constexpr const char* kKeys[] = {"dtype", "shape", "data_offsets"};
  if (!v.is_object()) {
    fail(what + ": the entry must be an object with \"dtype\", \"shape\" and \"data_offsets\", found " + short_dump(v));
  }
  for (const auto& item : v.items()) {
    if (std::find(std::begin(kKeys), std::end(kKeys), item.key()) == std::end(kKeys)) {
      fail(what + ": unknown key " + quote_name(item.key()) + " (an entry has exactly dtype, shape and data_offsets)");
    }
  }
  for (const char* key : kKeys) {
    if (!v.contains(key)) fail(what + ": missing \"" + key + "\"");
  }

  TensorInfo t;
  t.name = name;

  const json& dtype = v.at("dtype");
  if (!dtype.is_string()) fail(what + ": \"dtype\" must be a string such as \"F32\", found " + short_dump(dtype));
  const std::optional<DType> d = parse_dtype(dtype.get<std::string>());
  if (!d) {
    fail(what + ": unsupported dtype " + quote_name(dtype.get<std::string>()) + " (supported: F32, F16, BF16, F64)");
  }
  t.dtype = *d;

  const json& shape = v.at("shape");
  if (!shape.is_array()) fail(what + ": \"shape\" must be an array of integers, found " + short_dump(shape));
  if (shape.size() > static_cast<std::size_t>(kMaxRank)) {
    fail(what + ": rank " + std::to_string(shape.size()) + " exceeds the maximum of " + std::to_string(kMaxRank));
  }
  for (std::size_t i = 0; i < shape.size(); ++i) {
    const std::optional<std::uint64_t> dim = as_nonnegative_integer(shape[i]);
    if (!dim) {
      fail(what + ": shape[" + std::to_string(i) + "] must be a non-negative integer, found " + short_dump(shape[i]));
    }
    if (*dim > kInt64Max) fail(what + ": shape[" + std::to_string(i) + "] = " + std::to_string(*dim) + " is too large");
    t.shape.push_back(static_cast<std::int64_t>(*dim));
  }
  std::uint64_t numel = 0;
  const std::uint64_t elem = dtype_size(t.dtype);
  if (!detail::checked_numel(t.shape, numel) || numel > std::numeric_limits<std::uint64_t>::max() / elem) {
    fail(what + ": shape " + shape_string(t.shape) + " of " + to_string(t.dtype) +
         " is too large (its size in bytes overflows)");
  }
  const std::uint64_t nbytes = numel * elem;

  const json& offsets = v.at("data_offsets");
  if (!offsets.is_array() || offsets.size() != 2) {
    fail(what + ": \"data_offsets\" must be [begin, end], found " + short_dump(offsets));
  }
  const std::optional<std::uint64_t> begin = as_nonnegative_integer(offsets[0]);
  const std::optional<std::uint64_t> end = as_nonnegative_integer(offsets[1]);
  if (!begin || !end) {
    fail(what + ": \"data_offsets\" must be two non-negative integers, found " + short_dump(offsets));
  }
  t.begin = *begin;
  t.end = *end;
  if (t.end < t.begin || t.end - t.begin != nbytes) {
    fail(what + ": data_offsets " + range_string(t) + " do not match shape " + shape_string(t.shape) + " of " +
         to_string(t.dtype) + ", which needs " + std::to_string(nbytes) + " bytes");
  }
  if (t.end > data_size) {
    fail(what + ": data_offsets " + range_string(t) + " run past the end of the data section (" +
         std::to_string(data_size) + " bytes); the file is truncated");
  }
  return t;
}

// Sorts by offset and checks that the ranges are contiguous from 0 and end exactly at data_size.
void check_tiling(std::vector<TensorInfo>& tensors, std::uint64_t data_size) {
  std::sort(tensors.begin(), tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    if (a.begin != b.begin) return a.begin < b.begin;
    if (a.end != b.end) return a.end < b.end;
    return a.name < b.name;
  });
  std::uint64_t expected = 0;
  const TensorInfo* prev = nullptr;
  for (const TensorInfo& t : tensors) {
    if (t.begin > expected) {
      if (prev == nullptr) {
        fail("tensor " + quote_name(t.name) + " is the first in the data section but starts at byte " +
             std::to_string(t.begin) + ", not 0 (unused bytes)");
      }
      fail("gap of " + std::to_string(t.begin - expected) + " unused bytes between tensor " + quote_name(prev->name) +
           " " + range_string(*prev) + " and tensor " + quote_name(t.name) + " " + range_string(t));
    }
    if (t.begin < expected) {
      fail("tensor " + quote_name(t.name) + " " + range_string(t) + " overlaps tensor " + quote_name(prev->name) + " " +
           range_string(*prev));
    }
    expected = t.end;
    prev = &t;
  }
  if (expected != data_size) {  // each end is <= data_size, so there are bytes left over
    fail(std::to_string(data_size - expected) + " trailing bytes after the last tensor" +
         (prev ? " " + quote_name(prev->name) : std::string(" (the file has no tensors)")) +
         "; the data section must end where the last tensor ends");
  }
}

}  // namespace

namespace detail {

bool checked_numel(const std::vector<std::int64_t>& shape, std::uint64_t& numel) noexcept {
  std::uint64_t n = 1;
  for (const std::int64_t d : shape) {
    if (d < 0) return false;
    const auto ud = static_cast<std::uint64_t>(d);
    if (ud != 0 && n > kInt64Max / ud) return false;
    n *= ud;
  }
  numel = n;
  return true;
}

}  // namespace detail

const char* to_string(DType d) noexcept {
  switch (d) {
    case DType::F32:
      return "F32";
    case DType::F16:
      return "F16";
    case DType::BF16:
      return "BF16";
    case DType::F64:
      return "F64";
  }
  return "unknown";
}

std::size_t dtype_size(DType d) noexcept {
  switch (d) {
    case DType::F32:
      return 4;
    case DType::F16:
      return 2;
    case DType::BF16:
      return 2;
    case DType::F64:
      return 8;
  }
  return 0;
}

std::int64_t TensorInfo::numel() const {
  std::uint64_t n = 0;
  if (!detail::checked_numel(shape, n)) {
    throw Error(ErrorCode::InvalidArgument,
                "tensor " + quote_name(name) + ": shape " + shape_string(shape) + " is negative or overflows");
  }
  return static_cast<std::int64_t>(n);
}

const TensorInfo* Container::find(const std::string& name) const {
  for (const TensorInfo& t : tensors) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

std::uint64_t read_header_length(std::span<const std::uint8_t> first8, std::uint64_t file_size) {
  if (first8.size() < 8 || file_size < 8) {
    fail("the file is " + std::to_string(std::min<std::uint64_t>(file_size, first8.size())) +
         " bytes long, too short for the 8-byte header length (truncated, or not a model file)");
  }
  std::uint64_t n = 0;
  for (std::size_t i = 0; i < 8; ++i) n |= static_cast<std::uint64_t>(first8[i]) << (8 * i);
  if (n > kMaxHeaderBytes) {
    fail("header length " + std::to_string(n) + " exceeds the limit of " + std::to_string(kMaxHeaderBytes) +
         " bytes (corrupt, or not a model file)");
  }
  if (n > file_size - 8) {
    fail("header length " + std::to_string(n) + " runs past the end of the file (" + std::to_string(file_size) +
         " bytes; truncated)");
  }
  return n;
}

Container parse_header(std::span<const std::uint8_t> header_json, std::uint64_t file_size) {
  const std::uint64_t n = header_json.size();
  if (file_size < 8 || file_size - 8 < n) {
    fail("a header of " + std::to_string(n) + " bytes does not fit in a file of " + std::to_string(file_size) +
         " bytes (truncated)");
  }
  const std::uint64_t data_size = file_size - 8 - n;
  const std::string_view text(reinterpret_cast<const char*>(header_json.data()), header_json.size());
  const json header = parse_json_strict(text, "model file header", "tensor name");
  if (!header.is_object()) {
    fail(std::string("the header must be a JSON object mapping tensor names to entries, found ") + header.type_name());
  }
  const std::size_t count = header.size() - (header.contains("__metadata__") ? 1 : 0);
  if (count > kMaxTensors) {
    fail("the header lists " + std::to_string(count) + " tensors, more than the limit of " +
         std::to_string(kMaxTensors));
  }

  Container c;
  c.header_bytes = n;
  c.data_begin = 8 + n;
  c.tensors.reserve(count);
  for (const auto& item : header.items()) {
    if (item.key() == "__metadata__") {
      parse_metadata(item.value(), c.metadata);
    } else {
      c.tensors.push_back(parse_tensor(item.key(), item.value(), data_size));
    }
  }
  check_tiling(c.tensors, data_size);
  return c;
}

}  // namespace ddim::format
