#pragma once
// PNG for the ddim tool: 8-bit grayscale or RGB images, written with zlib (filter type 0 on every
// row, tEXt chunks for metadata, iTXt for non-ASCII values), and a reader of non-interlaced
// 8-bit grayscale, RGB and RGBA files with any of the five row filters (None, Sub, Up, Average,
// Paeth), used by `ddim invert` and the tests. Palette, gray+alpha, 16-bit and interlaced files
// are rejected with a message saying so.
//
// Float to byte: v = (x + 1) / 2 clamped to [0, 1], byte = floor(v * 255 + 0.5) (round half up,
// as torchvision's save_image does): x = -1 -> 0, x = 0 -> 128, x = 1 -> 255; NaN -> 0.
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace ddim::tools {

struct Image {
  int width = 0;
  int height = 0;
  int channels = 0;                  // 1: grayscale, 3: RGB, 4: RGBA (read only)
  std::vector<std::uint8_t> pixels;  // row-major, channels interleaved: (H, W, C)
};

using TextChunks = std::vector<std::pair<std::string, std::string>>;  // (keyword, text)

// One float in [-1, 1] to a byte, as described above.
std::uint8_t float_to_byte(float x);

// A batch (N, C, H, W) of floats in [-1, 1] as one grid image: nrow = ceil(sqrt(N)) images per
// row (or `columns` when > 0: columns = N gives one strip), `padding` black pixels between images
// and around the border (torchvision's make_grid). C == 1 gives grayscale, C == 3 RGB; anything
// else is ddim::Error(InvalidArgument).
Image batch_to_grid(std::span<const float> batch, int n, int c, int h, int w, int padding = 2, int columns = 0);
// One image (C, H, W), no padding.
Image tensor_to_image(std::span<const float> chw, int c, int h, int w);

// CRC-32 (ISO-HDLC, as PNG and zlib use it), optionally continuing from a previous value.
std::uint32_t crc32(std::span<const std::uint8_t> bytes, std::uint32_t crc = 0);

// Encodes / writes (atomically: temp file + rename) a PNG. Keywords must be 1-79 printable
// ASCII characters without leading or trailing spaces; texts must not contain NUL.
std::vector<std::uint8_t> encode_png(const Image& image, const TextChunks& text = {});
void write_png(const std::filesystem::path& path, const Image& image, const TextChunks& text = {});

struct DecodedPng {
  Image image;
  TextChunks text;  // tEXt and uncompressed iTXt chunks, in file order
};

// Checks the signature, every chunk's CRC, IHDR (8-bit gray, RGB or RGBA, not interlaced), inflates
// the IDAT stream and undoes the row filters. ddim::Error(InvalidFile) on anything else.
DecodedPng decode_png(std::span<const std::uint8_t> bytes, const std::string& name = "<memory>");
DecodedPng read_png(const std::filesystem::path& path);

// An image as a (C, H, W) float tensor for a model of `channels` channels: byte b -> b / 127.5 - 1
// (0 -> -1, 255 -> 1; float_to_byte maps it back to b). RGBA drops the alpha channel for an RGB
// model; any other channel mismatch (grayscale vs RGB) is ddim::Error(InvalidArgument) naming
// `name` and what to convert the image to.
std::vector<float> image_to_tensor(const Image& image, int channels, const std::string& name);

}  // namespace ddim::tools
