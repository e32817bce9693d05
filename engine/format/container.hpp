#pragma once
// The safetensors-compatible container: 8-byte little-endian header length N, N bytes of JSON
// header {tensor name: {dtype, shape, data_offsets}, "__metadata__": {string: string}}, then
// the raw little-endian tensor data. This layer knows nothing of graphs or schedules; it
// validates the container and converts tensor data. See weights/FORMAT.md.
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace ddim::format {

inline constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;  // 100 MB, the safetensors package's own limit
inline constexpr std::size_t kMaxTensors = 65536;
inline constexpr int kMaxRank = 8;

enum class DType { F32, F16, BF16, F64 };
const char* to_string(DType) noexcept;
std::size_t dtype_size(DType) noexcept;

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;  // offsets relative to the start of the data section
  std::uint64_t end = 0;
  std::int64_t numel() const;  // product of shape (already checked not to overflow)
};

struct Container {
  std::uint64_t header_bytes = 0;  // N
  std::uint64_t data_begin = 0;    // 8 + N: absolute offset of the data section
  std::vector<TensorInfo> tensors;  // in data-offset order
  std::map<std::string, std::string> metadata;
  const TensorInfo* find(const std::string& name) const;  // nullptr when absent
};

// Reads the 8-byte prefix; checks N against kMaxHeaderBytes and against the file size.
// Throws ddim::Error(InvalidFile) with the reason.
std::uint64_t read_header_length(std::span<const std::uint8_t> first8, std::uint64_t file_size);

// Parses and validates the header JSON (the N bytes after the prefix) for a file of file_size
// bytes: valid UTF-8, valid JSON, no duplicate keys at any depth, only the keys dtype, shape,
// data_offsets per tensor, known dtypes, shape x dtype size with checked arithmetic, offsets
// contiguous from 0 in some order, non-overlapping, exactly covering the data section (no
// trailing bytes), metadata values strings, tensor count <= kMaxTensors.
// Each failure throws ddim::Error(InvalidFile) naming the tensor or key and hinting at the fix.
Container parse_header(std::span<const std::uint8_t> header_json, std::uint64_t file_size);

// Parses JSON text rejecting duplicate object keys at any depth (nlohmann keeps the last one
// silently) and invalid UTF-8. `what` names the document in error messages ("header",
// "__metadata__.ddim.graph"). Throws ddim::Error(InvalidFile).
nlohmann::json parse_json_strict(std::string_view text, const std::string& what);
// The same, calling a repeated top-level key a duplicate `top_level_key_noun` ("tensor name").
nlohmann::json parse_json_strict(std::string_view text, const std::string& what,
                                 const std::string& top_level_key_noun);

// Converts one tensor's raw little-endian bytes (exactly numel * dtype_size) to float / double.
void convert_to_f32(const TensorInfo& info, std::span<const std::uint8_t> raw, std::span<float> out);
void convert_to_f64(const TensorInfo& info, std::span<const std::uint8_t> raw, std::span<double> out);

// fp16 / bf16 <-> fp32 conversions (round to nearest even), exact on the host.
float half_to_float(std::uint16_t h) noexcept;
float bf16_to_float(std::uint16_t b) noexcept;
std::uint16_t float_to_half(float f) noexcept;
std::uint16_t float_to_bf16(float f) noexcept;

// Writing (for tests, tools and the C++ model builder). Tensors are written in the order given,
// data contiguous; metadata strings are stored verbatim under __metadata__.
struct TensorData {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::vector<std::uint8_t> bytes;  // raw little-endian
};
TensorData make_tensor_f32(std::string name, std::vector<std::int64_t> shape, std::span<const float> values,
                           DType store_as = DType::F32);
std::vector<std::uint8_t> serialize(const std::vector<TensorData>& tensors,
                                    const std::map<std::string, std::string>& metadata);
void write_file(const std::string& path, const std::vector<std::uint8_t>& bytes);  // throws Io

namespace detail {
// A name for an error message: quoted, control characters escaped, cut short when very long.
std::string quote_name(std::string_view s);
// A JSON value for an error message: compact, cut short (at a UTF-8 boundary) past 60 bytes.
std::string short_json(const nlohmann::json& v);
// A whole error message made one bounded line: control characters escaped (\n, \xNN), cut
// short past `max` bytes ("... (N more bytes)"). Every message about a hostile file goes through
// it, so no file content can make a message multi-line or megabytes long.
std::string bounded_message(std::string_view message, std::size_t max = 2000);
// Product of a shape; false when an entry is negative or the product exceeds INT64_MAX.
bool checked_numel(const std::vector<std::int64_t>& shape, std::uint64_t& numel) noexcept;
}  // namespace detail

}  // namespace ddim::format
