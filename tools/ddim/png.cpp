// PNG writer (8-bit grayscale / RGB) and reader (8-bit grayscale / RGB / RGBA, non-interlaced,
// all five row filters).
//
// File: 8-byte signature, then chunks of (u32 BE length, 4-byte type, data, u32 BE CRC-32 of
// type + data): IHDR, tEXt/iTXt, IDAT (zlib stream of rows, each prefixed by a filter byte), IEND.
#include "png.hpp"

#include <zlib.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <limits>

#include "ddim/error.hpp"
#include "npy.hpp"

namespace ddim::tools {
namespace {

constexpr std::array<std::uint8_t, 8> kSignature = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
constexpr std::size_t kIdatChunk = 1u << 18;           // split IDAT into 256 KiB chunks
constexpr std::uint64_t kMaxPixelBytes = 1ull << 32;  // 4 GiB of pixels: far beyond any grid
constexpr std::uint32_t kMaxChunkLength = 0x7fffffffu;
constexpr std::uint32_t kMaxReadSide = 65536;          // a decoded image's width and height (ddim's sample limit)
constexpr std::uint64_t kMaxReadFileBytes = 1ull << 30;  // a PNG file read from disk
// deflate expands at most 1032:1 (258 bytes from one 2-bit code, beyond the stream's overhead):
// compressed data shorter than this fraction of the rows it declares cannot hold them.
constexpr std::uint64_t kMaxDeflateRatio = 1032;

constexpr std::array<std::uint32_t, 256> make_crc_table() {
  std::array<std::uint32_t, 256> table{};
  for (std::uint32_t n = 0; n < 256; ++n) {
    std::uint32_t c = n;
    for (int k = 0; k < 8; ++k) c = (c & 1u) ? 0xedb88320u ^ (c >> 1) : c >> 1;
    table[n] = c;
  }
  return table;
}
constexpr std::array<std::uint32_t, 256> kCrcTable = make_crc_table();

void put_be32(std::vector<std::uint8_t>& out, std::uint32_t v) {
  out.push_back(static_cast<std::uint8_t>(v >> 24));
  out.push_back(static_cast<std::uint8_t>(v >> 16));
  out.push_back(static_cast<std::uint8_t>(v >> 8));
  out.push_back(static_cast<std::uint8_t>(v));
}

std::uint32_t get_be32(const std::uint8_t* p) {
  return static_cast<std::uint32_t>(p[0]) << 24 | static_cast<std::uint32_t>(p[1]) << 16 |
         static_cast<std::uint32_t>(p[2]) << 8 | static_cast<std::uint32_t>(p[3]);
}

void put_chunk(std::vector<std::uint8_t>& out, const char (&type)[5], std::span<const std::uint8_t> data) {
  put_be32(out, static_cast<std::uint32_t>(data.size()));
  const std::size_t start = out.size();
  out.insert(out.end(), type, type + 4);
  out.insert(out.end(), data.begin(), data.end());
  put_be32(out, crc32(std::span(out).subspan(start)));
}

void check_keyword(const std::string& key) {
  bool ok = !key.empty() && key.size() <= 79 && key.front() != ' ' && key.back() != ' ';
  for (char ch : key) ok = ok && ch >= 32 && ch <= 126;
  if (!ok) {
    throw Error(ErrorCode::InvalidArgument,
                "PNG text keyword '" + key + "' is invalid (1-79 printable ASCII characters, no leading/trailing space)");
  }
}

// Sizes of an image, checked: row bytes (without the filter byte) and the whole pixel array.
std::uint64_t checked_pixel_bytes(std::uint64_t width, std::uint64_t height, std::uint64_t channels) {
  if (width == 0 || height == 0 || width > kMaxChunkLength || height > kMaxChunkLength) return 0;
  const std::uint64_t row = width * channels;  // < 2^33
  if (row != 0 && height > kMaxPixelBytes / row) return 0;
  return row * height;
}

[[noreturn]] void bad_png(const std::string& name, const std::string& what) {
  throw Error(ErrorCode::InvalidFile, name + ": " + what);
}

int paeth(int a, int b, int c) {
  const int p = a + b - c;
  const int pa = std::abs(p - a), pb = std::abs(p - b), pc = std::abs(p - c);
  if (pa <= pb && pa <= pc) return a;
  return pb <= pc ? b : c;
}

// Undoes the row filters of `raw` ((1 + row) * height bytes) into `pixels` (row * height).
void unfilter(const std::vector<std::uint8_t>& raw, std::size_t row, std::size_t height, std::size_t bpp,
              std::vector<std::uint8_t>& pixels, const std::string& name) {
  for (std::size_t y = 0; y < height; ++y) {
    const std::uint8_t filter = raw[y * (row + 1)];
    const std::uint8_t* in = raw.data() + y * (row + 1) + 1;
    std::uint8_t* out = pixels.data() + y * row;
    const std::uint8_t* up = y > 0 ? out - row : nullptr;
    for (std::size_t i = 0; i < row; ++i) {
      const int a = i >= bpp ? out[i - bpp] : 0;
      const int b = up ? up[i] : 0;
      const int c = (up && i >= bpp) ? up[i - bpp] : 0;
      int predictor = 0;
      switch (filter) {
        case 0: predictor = 0; break;
        case 1: predictor = a; break;
        case 2: predictor = b; break;
        case 3: predictor = (a + b) / 2; break;
        case 4: predictor = paeth(a, b, c); break;
        default: bad_png(name, "row " + std::to_string(y) + " has unknown filter type " + std::to_string(filter));
      }
      out[i] = static_cast<std::uint8_t>(in[i] + predictor);
    }
  }
}

}  // namespace

std::uint32_t crc32(std::span<const std::uint8_t> bytes, std::uint32_t crc) {
  crc = ~crc;
  for (std::uint8_t b : bytes) crc = kCrcTable[(crc ^ b) & 0xffu] ^ (crc >> 8);
  return ~crc;
}

std::uint8_t float_to_byte(float x) {
  if (!(x > -1.0f)) return 0;  // also NaN
  if (x >= 1.0f) return 255;
  const double v = (static_cast<double>(x) + 1.0) * 0.5;
  return static_cast<std::uint8_t>(std::floor(v * 255.0 + 0.5));
}

Image batch_to_grid(std::span<const float> batch, int n, int c, int h, int w, int padding, int columns) {
  if (c != 1 && c != 3) {
    throw Error(ErrorCode::InvalidArgument,
                "cannot make an image of " + std::to_string(c) + " channels (1: grayscale, 3: RGB); save .npy instead");
  }
  if (n < 1 || h < 1 || w < 1 || padding < 0 || columns < 0) {
    throw Error(ErrorCode::InvalidArgument, "batch_to_grid: invalid batch shape (" + std::to_string(n) + ", " +
                                                std::to_string(c) + ", " + std::to_string(h) + ", " +
                                                std::to_string(w) + ")");
  }
  const std::uint64_t plane = static_cast<std::uint64_t>(h) * static_cast<std::uint64_t>(w);
  const std::uint64_t expected = static_cast<std::uint64_t>(n) * static_cast<std::uint64_t>(c) * plane;
  if (batch.size() != expected) {
    throw Error(ErrorCode::InvalidArgument, "batch_to_grid: " + std::to_string(batch.size()) +
                                                " values for a batch of " + std::to_string(expected));
  }
  int nrow = static_cast<int>(std::ceil(std::sqrt(static_cast<double>(n))));
  while (static_cast<std::int64_t>(nrow) * nrow < n) ++nrow;  // guard against sqrt rounding
  while (nrow > 1 && static_cast<std::int64_t>(nrow - 1) * (nrow - 1) >= n) --nrow;
  const int cols = columns > 0 ? std::min(columns, n) : std::min(nrow, n);
  const int rows = (n + cols - 1) / cols;
  const std::int64_t grid_w = static_cast<std::int64_t>(cols) * (w + padding) + padding;
  const std::int64_t grid_h = static_cast<std::int64_t>(rows) * (h + padding) + padding;
  if (grid_w > std::numeric_limits<int>::max() || grid_h > std::numeric_limits<int>::max() ||
      checked_pixel_bytes(static_cast<std::uint64_t>(grid_w), static_cast<std::uint64_t>(grid_h),
                          static_cast<std::uint64_t>(c)) == 0) {
    throw Error(ErrorCode::InvalidArgument, "batch_to_grid: the grid image would be too large");
  }
  Image image;
  image.width = static_cast<int>(grid_w);
  image.height = static_cast<int>(grid_h);
  image.channels = c;
  image.pixels.assign(static_cast<std::size_t>(grid_w * grid_h * c), 0);
  for (int k = 0; k < n; ++k) {
    const std::int64_t x0 = static_cast<std::int64_t>(k % cols) * (w + padding) + padding;
    const std::int64_t y0 = static_cast<std::int64_t>(k / cols) * (h + padding) + padding;
    const float* src = batch.data() + static_cast<std::size_t>(k) * c * plane;
    for (int y = 0; y < h; ++y) {
      std::uint8_t* dst = image.pixels.data() + static_cast<std::size_t>(((y0 + y) * grid_w + x0) * c);
      for (int x = 0; x < w; ++x) {
        for (int ch = 0; ch < c; ++ch) {
          dst[static_cast<std::size_t>(x) * c + ch] =
              float_to_byte(src[static_cast<std::size_t>(ch) * plane + static_cast<std::size_t>(y) * w + x]);
        }
      }
    }
  }
  return image;
}

Image tensor_to_image(std::span<const float> chw, int c, int h, int w) {
  return batch_to_grid(chw, 1, c, h, w, 0);
}

std::vector<std::uint8_t> encode_png(const Image& image, const TextChunks& text) {
  if (image.channels != 1 && image.channels != 3) {
    throw Error(ErrorCode::InvalidArgument, "PNG: " + std::to_string(image.channels) + " channels (1 or 3 supported)");
  }
  const std::uint64_t pixel_bytes =
      image.width > 0 && image.height > 0
          ? checked_pixel_bytes(static_cast<std::uint64_t>(image.width), static_cast<std::uint64_t>(image.height),
                                static_cast<std::uint64_t>(image.channels))
          : 0;
  if (pixel_bytes == 0 || pixel_bytes != image.pixels.size()) {
    throw Error(ErrorCode::InvalidArgument, "PNG: invalid image (" + std::to_string(image.width) + "x" +
                                                std::to_string(image.height) + "x" + std::to_string(image.channels) +
                                                ", " + std::to_string(image.pixels.size()) + " bytes)");
  }
  const std::size_t row = static_cast<std::size_t>(image.width) * static_cast<std::size_t>(image.channels);
  const std::size_t height = static_cast<std::size_t>(image.height);

  std::vector<std::uint8_t> out(kSignature.begin(), kSignature.end());
  std::vector<std::uint8_t> ihdr;
  put_be32(ihdr, static_cast<std::uint32_t>(image.width));
  put_be32(ihdr, static_cast<std::uint32_t>(image.height));
  ihdr.push_back(8);                                  // bit depth
  ihdr.push_back(image.channels == 1 ? 0 : 2);        // color type: gray / RGB
  ihdr.insert(ihdr.end(), {0, 0, 0});                 // deflate, adaptive filtering, no interlace
  put_chunk(out, "IHDR", ihdr);

  for (const auto& [key, value] : text) {
    check_keyword(key);
    if (value.find('\0') != std::string::npos) {
      throw Error(ErrorCode::InvalidArgument, "PNG text '" + key + "' contains a NUL byte");
    }
    const bool ascii = std::all_of(value.begin(), value.end(), [](char ch) { return static_cast<unsigned char>(ch) < 0x80; });
    std::vector<std::uint8_t> data(key.begin(), key.end());
    data.push_back(0);
    if (!ascii) data.insert(data.end(), {0, 0, 0, 0});  // iTXt: uncompressed, no language, no translation
    data.insert(data.end(), value.begin(), value.end());
    put_chunk(out, ascii ? "tEXt" : "iTXt", data);
  }

  std::vector<std::uint8_t> raw((row + 1) * height);
  for (std::size_t y = 0; y < height; ++y) {
    raw[y * (row + 1)] = 0;  // filter type 0 (None)
    std::copy_n(image.pixels.begin() + static_cast<std::ptrdiff_t>(y * row), row,
                raw.begin() + static_cast<std::ptrdiff_t>(y * (row + 1) + 1));
  }
  if (raw.size() > std::numeric_limits<uLong>::max()) throw Error(ErrorCode::InvalidArgument, "PNG: image too large");
  uLongf compressed_size = compressBound(static_cast<uLong>(raw.size()));
  std::vector<std::uint8_t> compressed(compressed_size);
  const int rc = compress2(compressed.data(), &compressed_size, raw.data(), static_cast<uLong>(raw.size()),
                           Z_DEFAULT_COMPRESSION);
  if (rc != Z_OK) throw Error(ErrorCode::Internal, "PNG: zlib compress2 failed (" + std::to_string(rc) + ")");
  compressed.resize(compressed_size);
  for (std::size_t offset = 0; offset < compressed.size(); offset += kIdatChunk) {
    put_chunk(out, "IDAT", std::span(compressed).subspan(offset, std::min(kIdatChunk, compressed.size() - offset)));
  }
  put_chunk(out, "IEND", {});
  return out;
}

void write_png(const std::filesystem::path& path, const Image& image, const TextChunks& text) {
  write_file_atomic(path, encode_png(image, text), "output");
}

DecodedPng decode_png(std::span<const std::uint8_t> bytes, const std::string& name) {
  if (bytes.size() < kSignature.size() || !std::equal(kSignature.begin(), kSignature.end(), bytes.begin())) {
    bad_png(name, "not a PNG file (bad signature)");
  }
  DecodedPng result;
  std::vector<std::uint8_t> idat;
  bool have_header = false, have_end = false;
  int bit_depth = 0;
  std::size_t pos = kSignature.size();
  while (pos < bytes.size()) {
    if (have_end) bad_png(name, "data after IEND");
    if (bytes.size() - pos < 12) bad_png(name, "truncated chunk at offset " + std::to_string(pos));
    const std::uint32_t length = get_be32(bytes.data() + pos);
    const std::string type(reinterpret_cast<const char*>(bytes.data()) + pos + 4, 4);
    if (length > kMaxChunkLength || length > bytes.size() - pos - 12) {
      bad_png(name, "chunk '" + type + "' at offset " + std::to_string(pos) + " runs past the end of the file");
    }
    for (char ch : type) {
      if (!((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z'))) bad_png(name, "invalid chunk type");
    }
    const std::span<const std::uint8_t> data = bytes.subspan(pos + 8, length);
    const std::uint32_t stored_crc = get_be32(bytes.data() + pos + 8 + length);
    if (crc32(bytes.subspan(pos + 4, length + 4)) != stored_crc) bad_png(name, "CRC mismatch in chunk '" + type + "'");
    pos += 12 + static_cast<std::size_t>(length);

    if (!have_header && type != "IHDR") bad_png(name, "the first chunk is '" + type + "', not IHDR");
    if (type == "IHDR") {
      if (have_header) bad_png(name, "duplicate IHDR");
      if (length != 13) bad_png(name, "IHDR has length " + std::to_string(length));
      have_header = true;
      const std::uint32_t width = get_be32(data.data()), height = get_be32(data.data() + 4);
      bit_depth = data[8];
      const int color = data[9];
      if (color == 3) {
        bad_png(name, "palette (indexed-color) PNGs are not supported; convert the image to 8-bit RGB or grayscale");
      }
      if (color == 4) {
        bad_png(name, "grayscale+alpha PNGs are not supported; convert the image to 8-bit grayscale, RGB or RGBA");
      }
      if (color != 0 && color != 2 && color != 6) bad_png(name, "invalid color type " + std::to_string(color));
      if (bit_depth != 8) {
        bad_png(name, "bit depth " + std::to_string(bit_depth) +
                          " is not supported; only 8-bit grayscale, RGB or RGBA images are read");
      }
      if (data[10] != 0 || data[11] != 0) bad_png(name, "unknown compression or filter method");
      if (data[12] != 0) bad_png(name, "interlaced (Adam7) PNGs are not supported; save the image without interlacing");
      result.image.channels = color == 0 ? 1 : color == 2 ? 3 : 4;
      if (width > kMaxReadSide || height > kMaxReadSide) {
        bad_png(name, "image size " + std::to_string(width) + "x" + std::to_string(height) + " is larger than " +
                          std::to_string(kMaxReadSide) + " pixels per side, ddim's limit");
      }
      if (checked_pixel_bytes(width, height, static_cast<std::uint64_t>(result.image.channels)) == 0) {
        bad_png(name, "invalid image size " + std::to_string(width) + "x" + std::to_string(height));
      }
      result.image.width = static_cast<int>(width);
      result.image.height = static_cast<int>(height);
    } else if (type == "IDAT") {
      idat.insert(idat.end(), data.begin(), data.end());
    } else if (type == "IEND") {
      have_end = true;
    } else if (type == "tEXt" || type == "iTXt") {
      const auto nul = std::find(data.begin(), data.end(), 0);
      if (nul == data.end()) bad_png(name, type + " chunk without a keyword terminator");
      std::string key(data.begin(), nul);
      auto it = nul + 1;
      if (type == "iTXt") {
        if (data.end() - it < 2) bad_png(name, "truncated iTXt chunk");
        const bool compressed = *it != 0;
        it += 2;
        for (int skip = 0; skip < 2; ++skip) {  // language tag, translated keyword
          it = std::find(it, data.end(), 0);
          if (it == data.end()) bad_png(name, "truncated iTXt chunk");
          ++it;
        }
        if (compressed) continue;  // not needed for our own files
      }
      result.text.emplace_back(std::move(key), std::string(it, data.end()));
    } else if (type[0] >= 'A' && type[0] <= 'Z' && type != "PLTE") {
      bad_png(name, "unknown critical chunk '" + type + "'");
    }
  }
  if (!have_header) bad_png(name, "no IHDR chunk");
  if (!have_end) bad_png(name, "no IEND chunk (truncated file?)");
  if (idat.empty()) bad_png(name, "no IDAT chunk");

  const std::size_t row = static_cast<std::size_t>(result.image.width) * static_cast<std::size_t>(result.image.channels);
  const std::size_t height = static_cast<std::size_t>(result.image.height);
  // The declared size is checked against the data before it is allocated: a few bytes declaring
  // 65535x65535 pixels are refused without taking 4 GB.
  if ((row + 1) * height / kMaxDeflateRatio > idat.size() + 64) {
    bad_png(name, "it declares a " + std::to_string(result.image.width) + "x" + std::to_string(result.image.height) +
                      " image (" + std::to_string((row + 1) * height) + " bytes of rows), which its " +
                      std::to_string(idat.size()) + " bytes of compressed image data cannot hold (truncated or corrupt)");
  }
  std::vector<std::uint8_t> raw((row + 1) * height);
  uLongf raw_size = static_cast<uLongf>(raw.size());
  const int rc = uncompress(raw.data(), &raw_size, idat.data(), static_cast<uLong>(idat.size()));
  if (rc == Z_BUF_ERROR) bad_png(name, "the image data is longer than the image");
  if (rc != Z_OK) bad_png(name, "corrupt image data (zlib error " + std::to_string(rc) + ")");
  if (raw_size != raw.size()) bad_png(name, "the image data is shorter than the image");
  result.image.pixels.resize(row * height);
  unfilter(raw, row, height, static_cast<std::size_t>(result.image.channels), result.image.pixels, name);
  return result;
}

DecodedPng read_png(const std::filesystem::path& path) {
  return decode_png(read_file(path, kMaxReadFileBytes), path.string());
}

std::vector<float> image_to_tensor(const Image& image, int channels, const std::string& name) {
  const auto kind = [](int c) -> std::string {
    return c == 1 ? "grayscale" : c == 3 ? "RGB" : c == 4 ? "RGBA" : std::to_string(c) + "-channel";
  };
  const bool rgb_like = image.channels == 3 || image.channels == 4;
  if (!(image.channels == channels || (channels == 3 && image.channels == 4))) {
    throw Error(ErrorCode::InvalidArgument,
                name + ": the image is " + kind(image.channels) + " but the model takes " + std::to_string(channels) +
                    (channels == 1 ? " channel (grayscale)" : channels == 3 ? " channels (RGB)" : " channels") +
                    (channels == 1 && rgb_like   ? "; convert the image to grayscale"
                     : channels == 3 && !rgb_like ? "; convert the image to RGB"
                                                  : ""));
  }
  const std::size_t plane = static_cast<std::size_t>(image.width) * static_cast<std::size_t>(image.height);
  const std::size_t stride = static_cast<std::size_t>(image.channels);
  if (image.width < 1 || image.height < 1 || image.pixels.size() != plane * stride) {
    throw Error(ErrorCode::InvalidArgument, name + ": invalid image");
  }
  std::vector<float> out(plane * static_cast<std::size_t>(channels));
  for (int ch = 0; ch < channels; ++ch) {
    float* dst = out.data() + static_cast<std::size_t>(ch) * plane;
    for (std::size_t i = 0; i < plane; ++i) {
      dst[i] = static_cast<float>(static_cast<double>(image.pixels[i * stride + static_cast<std::size_t>(ch)]) / 127.5 - 1.0);
    }
  }
  return out;
}

}  // namespace ddim::tools
