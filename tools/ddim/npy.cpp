// .npy reader and writer (NumPy format versions 1.0, 2.0, 3.0).
//
// Layout: "\x93NUMPY", major, minor, header length (u16 LE for 1.0, u32 LE for 2.0/3.0), then
// the header: a Python dict literal {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
// padded with spaces and ended by '\n', then the raw little-endian data in C order.
#include "npy.hpp"

#include <algorithm>
#include <array>
#include <bit>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <optional>
#include <string_view>

#include "ddim/error.hpp"
#include "format/input_file.hpp"

namespace ddim::tools {
namespace {

constexpr std::uint8_t kMagic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
constexpr std::uint64_t kMaxHeaderBytes = 1u << 16;  // numpy itself writes a few hundred
constexpr std::size_t kMaxDims = 64;                 // numpy's NPY_MAXDIMS

[[noreturn]] void fail(const std::string& name, const std::string& what) {
  throw Error(ErrorCode::InvalidFile, name + ": " + what);
}

std::size_t item_size(NpyDtype dtype) {
  switch (dtype) {
    case NpyDtype::F32: case NpyDtype::I32: return 4;
    case NpyDtype::F64: case NpyDtype::I64: return 8;
  }
  return 0;
}

const char* descr_of(NpyDtype dtype) {
  switch (dtype) {
    case NpyDtype::F32: return "<f4";
    case NpyDtype::F64: return "<f8";
    case NpyDtype::I32: return "<i4";
    case NpyDtype::I64: return "<i8";
  }
  return "?";
}

std::optional<NpyDtype> dtype_of(std::string_view descr) {
  for (NpyDtype d : {NpyDtype::F32, NpyDtype::F64, NpyDtype::I32, NpyDtype::I64}) {
    if (descr == descr_of(d)) return d;
  }
  return std::nullopt;
}

// A printable, bounded rendering of header text for error messages.
std::string quote_header(std::string_view text) {
  std::string out;
  for (char ch : text.substr(0, 160)) {
    const auto u = static_cast<unsigned char>(ch);
    if (u >= 32 && u < 127) {
      out += ch;
    } else if (ch == '\n') {
      out += "\\n";
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", u);
      out += buf;
    }
  }
  if (text.size() > 160) out += "...";
  return out;
}

// The header dict, parsed as a tiny subset of Python literals: strings (no escapes), True,
// False, tuples of non-negative integers.
struct HeaderDict {
  std::optional<std::string> descr;
  std::optional<bool> fortran_order;
  std::optional<std::vector<std::int64_t>> shape;
};

class HeaderParser {
 public:
  HeaderParser(std::string_view text, const std::string& name) : text_(text), name_(name) {}

  HeaderDict parse() {
    HeaderDict dict;
    skip_ws();
    expect('{');
    skip_ws();
    while (peek() != '}') {
      const std::string key = parse_string();
      skip_ws();
      expect(':');
      skip_ws();
      if (key == "descr") {
        if (dict.descr) error("duplicate key 'descr'");
        if (peek() == '[') error("structured dtypes are not supported");
        dict.descr = parse_string();
      } else if (key == "fortran_order") {
        if (dict.fortran_order) error("duplicate key 'fortran_order'");
        dict.fortran_order = parse_bool();
      } else if (key == "shape") {
        if (dict.shape) error("duplicate key 'shape'");
        dict.shape = parse_shape();
      } else {
        error("unexpected key '" + key + "' (expected descr, fortran_order, shape)");
      }
      skip_ws();
      if (peek() == ',') {
        ++pos_;
        skip_ws();
      } else if (peek() != '}') {
        error("expected ',' or '}'");
      }
    }
    ++pos_;
    skip_ws();
    if (pos_ != text_.size()) error("unexpected text after the closing '}'");
    if (!dict.descr) error("missing key 'descr'");
    if (!dict.fortran_order) error("missing key 'fortran_order'");
    if (!dict.shape) error("missing key 'shape'");
    return dict;
  }

 private:
  [[noreturn]] void error(const std::string& what) const {
    fail(name_, "malformed .npy header at offset " + std::to_string(pos_) + ": " + what + " (header: " +
                    quote_header(text_) + ")");
  }
  char peek() const { return pos_ < text_.size() ? text_[pos_] : '\0'; }
  void skip_ws() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\n' || text_[pos_] == '\r')) {
      ++pos_;
    }
  }
  void expect(char ch) {
    if (peek() != ch) error(std::string("expected '") + ch + "'");
    ++pos_;
  }
  std::string parse_string() {
    const char quote = peek();
    if (quote != '\'' && quote != '"') error("expected a quoted string");
    const std::size_t start = ++pos_;
    while (pos_ < text_.size() && text_[pos_] != quote) {
      if (text_[pos_] == '\\' || text_[pos_] == '\n') error("unsupported character in a string");
      ++pos_;
    }
    if (pos_ >= text_.size()) error("unterminated string");
    return std::string(text_.substr(start, pos_++ - start));
  }
  bool parse_bool() {
    if (text_.substr(pos_, 4) == "True") {
      pos_ += 4;
      return true;
    }
    if (text_.substr(pos_, 5) == "False") {
      pos_ += 5;
      return false;
    }
    error("expected True or False");
  }
  std::vector<std::int64_t> parse_shape() {
    std::vector<std::int64_t> shape;
    bool trailing_comma = false;
    expect('(');
    skip_ws();
    while (peek() != ')') {
      if (shape.size() >= kMaxDims) error("more than " + std::to_string(kMaxDims) + " dimensions");
      if (peek() == '-') error("negative dimension");
      const char* begin = text_.data() + pos_;
      const char* end = text_.data() + text_.size();
      std::uint64_t value = 0;
      const auto [ptr, ec] = std::from_chars(begin, end, value);
      if (ec == std::errc::result_out_of_range ||
          (ec == std::errc() && value > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))) {
        error("dimension out of range");
      }
      if (ec != std::errc() || ptr == begin) error("expected a dimension (a non-negative integer)");
      pos_ += static_cast<std::size_t>(ptr - begin);
      shape.push_back(static_cast<std::int64_t>(value));
      trailing_comma = false;
      skip_ws();
      if (peek() == ',') {
        ++pos_;
        trailing_comma = true;
        skip_ws();
      } else if (peek() != ')') {
        error("expected ',' or ')' in the shape");
      }
    }
    // Python needs the comma of a 1-tuple: "(5)" is the integer 5, not a shape.
    if (shape.size() == 1 && !trailing_comma) error("a 1-element shape needs a trailing comma, e.g. (5,)");
    ++pos_;
    return shape;
  }

  std::string_view text_;
  const std::string& name_;
  std::size_t pos_ = 0;
};

std::uint32_t load_le32(const std::uint8_t* p) {
  return static_cast<std::uint32_t>(p[0]) | static_cast<std::uint32_t>(p[1]) << 8 |
         static_cast<std::uint32_t>(p[2]) << 16 | static_cast<std::uint32_t>(p[3]) << 24;
}

// Checks magic and version from the first bytes (at most 12 needed) and returns the offset of
// the end of the header, checked against total_size.
std::uint64_t npy_header_end(std::span<const std::uint8_t> first, std::uint64_t total_size, const std::string& name,
                             int* major_out) {
  if (first.size() < 8 || !std::equal(std::begin(kMagic), std::end(kMagic), first.begin())) {
    fail(name, "not a .npy file (it does not start with \"\\x93NUMPY\")");
  }
  const int major = first[6], minor = first[7];
  if (!((major == 1 || major == 2 || major == 3) && minor == 0)) {
    fail(name, ".npy format version " + std::to_string(major) + "." + std::to_string(minor) +
                   " is not supported (1.0, 2.0 and 3.0 are)");
  }
  const std::size_t length_bytes = major == 1 ? 2 : 4;
  if (first.size() < 8 + length_bytes) fail(name, "file ends inside the .npy preamble");
  const std::uint64_t header_len =
      major == 1 ? static_cast<std::uint64_t>(first[8] | first[9] << 8) : load_le32(first.data() + 8);
  if (header_len > kMaxHeaderBytes) {
    fail(name, ".npy header length " + std::to_string(header_len) + " exceeds the limit of " +
                   std::to_string(kMaxHeaderBytes) + " bytes");
  }
  const std::uint64_t end = 8 + length_bytes + header_len;
  if (end > total_size) {
    fail(name, ".npy header length " + std::to_string(header_len) + " runs past the end of the file (" +
                   std::to_string(total_size) + " bytes)");
  }
  *major_out = major;
  return end;
}

bool checked_mul(std::uint64_t a, std::uint64_t b, std::uint64_t* out) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return false;
  *out = a * b;
  return true;
}

// Parses the header and checks everything against the accepted dtypes; `hint` says what to save
// instead of an unsupported dtype.
NpyHeader parse_checked(std::span<const std::uint8_t> bytes, std::uint64_t total_size, const std::string& name,
                        std::span<const NpyDtype> accepted, const char* hint) {
  int major = 0;
  const std::uint64_t end = npy_header_end(bytes, total_size, name, &major);
  if (bytes.size() < end) fail(name, "file ends inside the .npy header");
  const std::size_t start = major == 1 ? 10 : 12;
  const std::string_view text(reinterpret_cast<const char*>(bytes.data()) + start, static_cast<std::size_t>(end) - start);
  const HeaderDict dict = HeaderParser(text, name).parse();

  NpyHeader header;
  header.major_version = major;
  header.data_offset = end;
  const std::string& descr = *dict.descr;
  const std::optional<NpyDtype> dtype = dtype_of(descr);
  if (!dtype || std::find(accepted.begin(), accepted.end(), *dtype) == accepted.end()) {
    std::string little = descr;
    if (!little.empty() && little[0] == '>') little[0] = '<';
    const std::optional<NpyDtype> swapped = dtype_of(little);
    if (descr[0] == '>' && swapped && std::find(accepted.begin(), accepted.end(), *swapped) != accepted.end()) {
      fail(name, "dtype '" + descr + "' is big-endian; save little-endian data (a.astype('" + little + "'))");
    }
    fail(name, "dtype '" + descr + "' is not supported; " + hint);
  }
  header.dtype = *dtype;
  header.shape = *dict.shape;

  std::uint64_t count = 1;
  for (std::int64_t d : header.shape) {
    if (!checked_mul(count, static_cast<std::uint64_t>(d), &count) ||
        count > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
      fail(name, "shape " + shape_to_string(header.shape) + " is too large (its element count overflows)");
    }
  }
  std::uint64_t data_bytes = 0;
  if (!checked_mul(count, item_size(header.dtype), &data_bytes)) {
    fail(name, "shape " + shape_to_string(header.shape) + " is too large (its byte size overflows)");
  }
  header.count = count;
  header.data_bytes = data_bytes;

  if (*dict.fortran_order) {
    // Fortran and C order agree when at most one dimension is longer than 1.
    const auto long_dims = std::count_if(header.shape.begin(), header.shape.end(), [](std::int64_t d) { return d > 1; });
    if (long_dims > 1) {
      fail(name, "fortran_order True is not supported; save a C-ordered array (np.ascontiguousarray(a))");
    }
  }

  const std::uint64_t available = total_size - end;
  const std::string what = "shape " + shape_to_string(header.shape) + " of '" + descr + "' needs " +
                           std::to_string(data_bytes) + " data bytes";
  if (available < data_bytes) fail(name, "data is truncated: " + what + ", the file has " + std::to_string(available));
  if (available > data_bytes) {
    fail(name, std::to_string(available - data_bytes) + " trailing bytes after the data (" + what + ")");
  }
  return header;
}

constexpr NpyDtype kF32Only[] = {NpyDtype::F32};
constexpr const char* kF32Hint = "save float32 (a.astype(np.float32))";
constexpr NpyDtype kTimestepDtypes[] = {NpyDtype::I32, NpyDtype::I64, NpyDtype::F32, NpyDtype::F64};
constexpr const char* kTimestepHint = "save int32, int64, float32 or float64 timesteps";

template <typename T>
T load_le(const std::uint8_t* p) {
  std::array<std::uint8_t, sizeof(T)> buf;
  std::memcpy(buf.data(), p, sizeof(T));
  if constexpr (std::endian::native == std::endian::big) std::reverse(buf.begin(), buf.end());
  return std::bit_cast<T>(buf);
}

template <typename T>
void store_le(T value, std::uint8_t* p) {
  auto buf = std::bit_cast<std::array<std::uint8_t, sizeof(T)>>(value);
  if constexpr (std::endian::native == std::endian::big) std::reverse(buf.begin(), buf.end());
  std::memcpy(p, buf.data(), sizeof(T));
}

void convert_f32(const std::uint8_t* src, std::vector<float>& out) {
  if constexpr (std::endian::native == std::endian::little) {
    if (!out.empty()) std::memcpy(out.data(), src, out.size() * sizeof(float));
  } else {
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = load_le<float>(src + 4 * i);
  }
}

std::vector<int> convert_timesteps(const NpyHeader& header, const std::uint8_t* data, const std::string& name) {
  if (header.shape.size() > 1) {
    fail(name, "timesteps must be a scalar or a vector, not shape " + shape_to_string(header.shape));
  }
  std::vector<int> out(static_cast<std::size_t>(header.count));
  for (std::size_t i = 0; i < out.size(); ++i) {
    double value = 0;
    switch (header.dtype) {
      case NpyDtype::I32: value = load_le<std::int32_t>(data + 4 * i); break;
      case NpyDtype::I64: {
        const std::int64_t v = load_le<std::int64_t>(data + 8 * i);
        if (v < std::numeric_limits<int>::min() || v > std::numeric_limits<int>::max()) {
          fail(name, "timestep " + std::to_string(v) + " at index " + std::to_string(i) + " is out of range");
        }
        value = static_cast<double>(v);
        break;
      }
      case NpyDtype::F32: value = load_le<float>(data + 4 * i); break;
      case NpyDtype::F64: value = load_le<double>(data + 8 * i); break;
    }
    if (!std::isfinite(value) || value != std::floor(value) || value < std::numeric_limits<int>::min() ||
        value > std::numeric_limits<int>::max()) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "%.17g", value);
      fail(name, std::string("timestep ") + buf + " at index " + std::to_string(i) + " is not an integer in range");
    }
    out[i] = static_cast<int>(value);
  }
  return out;
}

// Reads and checks the header of an open file.
NpyHeader read_header(const format::InputFile& file, const std::string& name, std::span<const NpyDtype> accepted,
                      const char* hint) {
  const std::uint64_t size = file.size();
  std::vector<std::uint8_t> head(static_cast<std::size_t>(std::min<std::uint64_t>(size, 12)));
  file.read_at(0, head);
  int major = 0;
  const std::uint64_t end = npy_header_end(head, size, name, &major);  // end <= 12 + 2^16
  head.resize(static_cast<std::size_t>(end));
  if (end > 12) file.read_at(12, std::span(head).subspan(12));
  return parse_checked(head, size, name, accepted, hint);
}


}  // namespace

std::string shape_to_string(std::span<const std::int64_t> shape) {
  std::string out = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(shape[i]);
  }
  if (shape.size() == 1) out += ",";
  return out + ")";
}

NpyHeader parse_npy_header(std::span<const std::uint8_t> bytes, std::uint64_t total_size, const std::string& name) {
  return parse_checked(bytes, total_size, name, kTimestepDtypes, "supported dtypes are '<f4', '<f8', '<i4', '<i8'");
}

NpyArray parse_npy_f32(std::span<const std::uint8_t> bytes, const std::string& name) {
  const NpyHeader header = parse_checked(bytes, bytes.size(), name, kF32Only, kF32Hint);
  NpyArray array;
  array.shape = header.shape;
  array.data.resize(static_cast<std::size_t>(header.count));
  convert_f32(bytes.data() + header.data_offset, array.data);
  return array;
}

NpyArray read_npy_f32(const std::filesystem::path& path, const NpyShapeCheck& check) {
  const format::InputFile file(path);
  const NpyHeader header = read_header(file, path.string(), kF32Only, kF32Hint);
  if (check) check(header.shape);  // before the data is allocated or read
  NpyArray array;
  array.shape = header.shape;
  array.data.resize(static_cast<std::size_t>(header.count));
  file.read_at(header.data_offset, std::span(reinterpret_cast<std::uint8_t*>(array.data.data()), header.data_bytes));
  if constexpr (std::endian::native != std::endian::little) {
    std::vector<float> raw = array.data;
    convert_f32(reinterpret_cast<const std::uint8_t*>(raw.data()), array.data);
  }
  return array;
}

std::vector<int> parse_npy_timesteps(std::span<const std::uint8_t> bytes, const std::string& name) {
  const NpyHeader header = parse_checked(bytes, bytes.size(), name, kTimestepDtypes, kTimestepHint);
  return convert_timesteps(header, bytes.data() + header.data_offset, name);
}

std::vector<int> read_npy_timesteps(const std::filesystem::path& path, std::uint64_t max_count) {
  const format::InputFile file(path);
  const NpyHeader header = read_header(file, path.string(), kTimestepDtypes, kTimestepHint);
  if (header.count > max_count) {
    fail(path.string(), "shape " + shape_to_string(header.shape) + " holds " + std::to_string(header.count) +
                            " timesteps; at most " + std::to_string(max_count) + " are used");
  }
  std::vector<std::uint8_t> raw(static_cast<std::size_t>(header.data_bytes));
  file.read_at(header.data_offset, raw);
  return convert_timesteps(header, raw.data(), path.string());
}

std::vector<std::uint8_t> encode_npy_f32(std::span<const std::int64_t> shape, std::span<const float> data) {
  std::uint64_t count = 1;
  for (std::int64_t d : shape) {
    if (d < 0 || !checked_mul(count, static_cast<std::uint64_t>(d), &count)) {
      throw Error(ErrorCode::InvalidArgument, "encode_npy_f32: invalid shape " + shape_to_string(shape));
    }
  }
  if (count != data.size()) {
    throw Error(ErrorCode::InvalidArgument, "encode_npy_f32: shape " + shape_to_string(shape) + " has " +
                                                std::to_string(count) + " elements but the data has " +
                                                std::to_string(data.size()));
  }
  std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape_to_string(shape) + ", }";
  // Version 1.0 stores the header length in 16 bits; 2.0 in 32.
  int major = 1;
  std::size_t preamble = 10;
  std::size_t total_header = (preamble + dict.size() + 1 + 63) / 64 * 64;
  if (total_header - preamble > 0xffff) {
    major = 2;
    preamble = 12;
    total_header = (preamble + dict.size() + 1 + 63) / 64 * 64;
  }
  const std::size_t header_len = total_header - preamble;
  dict.resize(header_len - 1, ' ');
  dict += '\n';

  std::vector<std::uint8_t> out(total_header + data.size() * sizeof(float));
  std::memcpy(out.data(), kMagic, sizeof kMagic);
  out[6] = static_cast<std::uint8_t>(major);
  out[7] = 0;
  if (major == 1) {
    store_le(static_cast<std::uint16_t>(header_len), out.data() + 8);
  } else {
    store_le(static_cast<std::uint32_t>(header_len), out.data() + 8);
  }
  std::memcpy(out.data() + preamble, dict.data(), dict.size());
  std::uint8_t* dst = out.data() + total_header;
  if constexpr (std::endian::native == std::endian::little) {
    if (!data.empty()) std::memcpy(dst, data.data(), data.size() * sizeof(float));
  } else {
    for (std::size_t i = 0; i < data.size(); ++i) store_le(data[i], dst + 4 * i);
  }
  return out;
}

void write_npy_f32(const std::filesystem::path& path, std::span<const std::int64_t> shape, std::span<const float> data) {
  write_file_atomic(path, encode_npy_f32(shape, data), "output");
}

}  // namespace ddim::tools
