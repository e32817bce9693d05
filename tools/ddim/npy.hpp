#pragma once
// NumPy .npy files for the ddim tool: float32 arrays in and out, integer (or integral float)
// timestep vectors in. Readers trust nothing: magic, version, header length, the header dict
// (a Python literal), dtype, order, shape arithmetic and the data size are all checked, and every
// failure is a ddim::Error naming the file. Writers are atomic (temp file + rename).
//
// Files are read with files.hpp's rules (regular files only) and written with its OutputFiles.
#include <cstdint>
#include <filesystem>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "files.hpp"

namespace ddim::tools {

// The element types the readers understand (all little-endian).
enum class NpyDtype { F32, F64, I32, I64 };

struct NpyHeader {
  NpyDtype dtype = NpyDtype::F32;
  std::vector<std::int64_t> shape;  // () for a scalar
  std::uint64_t count = 0;          // product of shape (checked)
  std::uint64_t data_offset = 0;    // bytes before the data
  std::uint64_t data_bytes = 0;     // count * item size (checked)
  int major_version = 1;
};

struct NpyArray {
  std::vector<std::int64_t> shape;
  std::vector<float> data;
};

// Parses and validates the preamble and the header dict from the start of a file of total_size
// bytes (`bytes` may be only a prefix of it, up to the end of the header). Accepts any of the
// NpyDtype types; checks that the data has exactly the size the shape says. Throws
// ddim::Error(InvalidFile) naming `name`.
NpyHeader parse_npy_header(std::span<const std::uint8_t> bytes, std::uint64_t total_size, const std::string& name);

// A float32 array ('<f4', C order). Anything else is an error with a hint at the fix.
NpyArray parse_npy_f32(std::span<const std::uint8_t> bytes, const std::string& name);
// Checks a declared shape (throws to refuse it). read_npy_f32 calls it once the header is valid
// and before any data is allocated or read, so that a file declaring a huge array is refused
// without reading it.
using NpyShapeCheck = std::function<void(std::span<const std::int64_t> shape)>;
NpyArray read_npy_f32(const std::filesystem::path& path, const NpyShapeCheck& check = {});

// A vector of timesteps: shape () or (N,), dtype '<i4', '<i8', '<f4' or '<f8'; float values
// must be integral; every value must fit an int.
std::vector<int> parse_npy_timesteps(std::span<const std::uint8_t> bytes, const std::string& name);
// At most max_count timesteps (checked before the data is read).
std::vector<int> read_npy_timesteps(const std::filesystem::path& path, std::uint64_t max_count);

// Format version 1.0 (2.0 if the header would not fit), header padded with spaces and ended by
// '\n' so the data starts at a multiple of 64 bytes. data.size() must equal the shape product.
std::vector<std::uint8_t> encode_npy_f32(std::span<const std::int64_t> shape, std::span<const float> data);
void write_npy_f32(const std::filesystem::path& path, std::span<const std::int64_t> shape,
                   std::span<const float> data);

// "(2, 3)", "(5,)", "()": the Python spelling of a shape.
std::string shape_to_string(std::span<const std::int64_t> shape);

}  // namespace ddim::tools
