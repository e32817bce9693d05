// The ddim tool's file codecs: .npy (read/write, hostile headers) and PNG (grid, write, decode).
#include <doctest/doctest.h>
#include <unistd.h>
#include <zlib.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "ddim/error.hpp"
#include "npy.hpp"
#include "png.hpp"

namespace fs = std::filesystem;
using namespace ddim::tools;

namespace {

// A fresh directory under the system temp dir, removed at the end of the test.
struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() /
           ("ddim_test_npy_png_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
};

std::vector<std::uint8_t> bytes_of(const std::string& s) { return {s.begin(), s.end()}; }

// A .npy file from a header dict and raw data; version (1, 2 or 3) picks the length field.
std::vector<std::uint8_t> make_npy(const std::string& dict, const std::vector<std::uint8_t>& data, int major = 1,
                                   int minor = 0) {
  std::string header = dict;
  const std::size_t preamble = major == 1 ? 10 : 12;
  while ((preamble + header.size() + 1) % 64 != 0) header += ' ';
  header += '\n';
  std::vector<std::uint8_t> out = {0x93, 'N', 'U', 'M', 'P', 'Y', static_cast<std::uint8_t>(major),
                                   static_cast<std::uint8_t>(minor)};
  const std::uint32_t len = static_cast<std::uint32_t>(header.size());
  out.push_back(static_cast<std::uint8_t>(len));
  out.push_back(static_cast<std::uint8_t>(len >> 8));
  if (major != 1) {
    out.push_back(static_cast<std::uint8_t>(len >> 16));
    out.push_back(static_cast<std::uint8_t>(len >> 24));
  }
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

template <typename T>
std::vector<std::uint8_t> raw_of(const std::vector<T>& values) {
  std::vector<std::uint8_t> out(values.size() * sizeof(T));
  if (!values.empty()) std::memcpy(out.data(), values.data(), out.size());
  return out;  // little-endian host (x86-64, aarch64)
}

// The message of the ddim::Error that f throws (fails the test if it throws nothing).
template <typename F>
std::string error_of(F&& f, ddim::ErrorCode expected_code = ddim::ErrorCode::InvalidFile) {
  try {
    f();
  } catch (const ddim::Error& e) {
    CHECK(e.code() == expected_code);
    return e.what();
  }
  FAIL("no ddim::Error thrown");
  return {};
}

std::vector<std::uint8_t> pixel(const Image& image, int x, int y) {
  const std::size_t at = (static_cast<std::size_t>(y) * image.width + x) * image.channels;
  return {image.pixels.begin() + static_cast<std::ptrdiff_t>(at),
          image.pixels.begin() + static_cast<std::ptrdiff_t>(at + image.channels)};
}

bool no_temp_files(const fs::path& dir) {
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.path().filename().string().find(".tmp") != std::string::npos) return false;
  }
  return true;
}

}  // namespace

TEST_CASE("npy: float32 round trip through a file, shapes from 0-D to 5-D") {
  TempDir dir;
  const std::vector<std::vector<std::int64_t>> shapes = {{}, {5}, {2, 3}, {0, 4}, {2, 1, 3, 4, 5}, {3, 2, 1, 2, 2}};
  for (const auto& shape : shapes) {
    std::size_t count = 1;
    for (auto d : shape) count *= static_cast<std::size_t>(d);
    std::vector<float> data(count);
    for (std::size_t i = 0; i < count; ++i) data[i] = static_cast<float>(i) * 0.25f - 3.0f;
    if (count > 2) data[1] = -0.0f, data[2] = std::numeric_limits<float>::denorm_min();
    const fs::path file = dir.path / "a.npy";
    write_npy_f32(file, shape, data);

    const std::vector<std::uint8_t> bytes = read_file(file);
    CAPTURE(shape_to_string(shape));
    REQUIRE(bytes.size() >= 64);
    CHECK(std::memcmp(bytes.data(), "\x93NUMPY\x01\x00", 8) == 0);
    const std::size_t header_len = bytes[8] | bytes[9] << 8;
    CHECK((10 + header_len) % 64 == 0);  // data 64-byte aligned
    CHECK(bytes[10 + header_len - 1] == '\n');
    const std::string header(bytes.begin() + 10, bytes.begin() + 10 + static_cast<std::ptrdiff_t>(header_len));
    CHECK(header.find("'descr': '<f4'") != std::string::npos);
    CHECK(header.find("'fortran_order': False") != std::string::npos);
    CHECK(header.find("'shape': " + shape_to_string(shape)) != std::string::npos);

    const NpyArray back = read_npy_f32(file);
    CHECK(back.shape == shape);
    REQUIRE(back.data.size() == data.size());
    CHECK((data.empty() || std::memcmp(back.data.data(), data.data(), data.size() * sizeof(float)) == 0));  // bitwise
    const NpyArray from_memory = parse_npy_f32(bytes, "a.npy");
    CHECK(from_memory.shape == shape);
    CHECK(from_memory.data == back.data);
    CHECK(no_temp_files(dir.path));
  }
  CHECK(shape_to_string(std::vector<std::int64_t>{5}) == "(5,)");
  CHECK(shape_to_string(std::vector<std::int64_t>{}) == "()");
}

TEST_CASE("npy: hand-built version 1.0, 2.0 and 3.0 headers") {
  const std::vector<float> values = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f, -8.5f};
  SUBCASE("1.0, numpy's own spelling") {
    const auto file = make_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", raw_of(values));
    const NpyArray a = parse_npy_f32(file, "v1.npy");
    CHECK(a.shape == std::vector<std::int64_t>{2, 3});
    CHECK(a.data == values);
  }
  SUBCASE("1.0, double quotes, other key order, no trailing commas, odd spacing") {
    const auto file = make_npy("{ \"shape\" :(6,) ,\"fortran_order\":False,'descr':\"<f4\"}", raw_of(values));
    const NpyArray a = parse_npy_f32(file, "v1b.npy");
    CHECK(a.shape == std::vector<std::int64_t>{6});
    CHECK(a.data == values);
  }
  SUBCASE("2.0") {
    const auto file = make_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 3), }", raw_of(values), 2);
    const NpyArray a = parse_npy_f32(file, "v2.npy");
    CHECK(a.shape == std::vector<std::int64_t>{1, 2, 3});
    CHECK(a.data == values);
  }
  SUBCASE("3.0") {
    const auto file = make_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }", raw_of(values), 3);
    CHECK(parse_npy_f32(file, "v3.npy").shape == std::vector<std::int64_t>{3, 2});
  }
  SUBCASE("fortran_order True is accepted when the layouts agree (one long dimension)") {
    const auto file = make_npy("{'descr': '<f4', 'fortran_order': True, 'shape': (1, 6), }", raw_of(values));
    CHECK(parse_npy_f32(file, "f.npy").data == values);
  }
}

TEST_CASE("npy: rejected files name the file and what was wrong") {
  const std::vector<float> six(6, 1.0f);
  const std::string ok_dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
  const auto reject = [](const std::vector<std::uint8_t>& file) {
    return error_of([&] { parse_npy_f32(file, "x.npy"); });
  };
  SUBCASE("float64") {
    const std::string m = reject(make_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }", raw_of(std::vector<double>(3))));
    CHECK(m.find("x.npy") == 0);
    CHECK(m.find("dtype '<f8' is not supported") != std::string::npos);
    CHECK(m.find("float32") != std::string::npos);
  }
  SUBCASE("big-endian float32") {
    const std::string m = reject(make_npy("{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }", raw_of(six)));
    CHECK(m.find("'>f4' is big-endian") != std::string::npos);
  }
  SUBCASE("int32 where float32 is needed") {
    CHECK(reject(make_npy("{'descr': '<i4', 'fortran_order': False, 'shape': (6,), }", raw_of(std::vector<int>(6))))
              .find("dtype '<i4' is not supported") != std::string::npos);
  }
  SUBCASE("structured dtype") {
    CHECK(reject(make_npy("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (6,), }", raw_of(six)))
              .find("structured") != std::string::npos);
  }
  SUBCASE("fortran_order True") {
    const std::string m = reject(make_npy("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", raw_of(six)));
    CHECK(m.find("fortran_order True is not supported") != std::string::npos);
  }
  SUBCASE("truncated data") {
    auto file = make_npy(ok_dict, raw_of(six));
    file.resize(file.size() - 3);
    const std::string m = reject(file);
    CHECK(m.find("truncated") != std::string::npos);
    CHECK(m.find("needs 24 data bytes, the file has 21") != std::string::npos);
  }
  SUBCASE("trailing data") {
    auto file = make_npy(ok_dict, raw_of(six));
    file.push_back(0);
    file.push_back(0);
    CHECK(reject(file).find("2 trailing bytes") != std::string::npos);
  }
  SUBCASE("bad magic") {
    auto file = make_npy(ok_dict, raw_of(six));
    file[1] = 'X';
    CHECK(reject(file).find("not a .npy file") != std::string::npos);
    CHECK(reject(bytes_of("")).find("not a .npy file") != std::string::npos);
    CHECK(reject(bytes_of("PK\x03\x04 zip")).find("not a .npy file") != std::string::npos);
  }
  SUBCASE("unknown version") {
    CHECK(reject(make_npy(ok_dict, raw_of(six), 4)).find("version 4.0 is not supported") != std::string::npos);
    CHECK(reject(make_npy(ok_dict, raw_of(six), 1, 1)).find("version 1.1") != std::string::npos);
  }
  SUBCASE("header length past the end of the file") {
    auto file = make_npy(ok_dict, {});
    file[8] = 0xff;
    file[9] = 0x7f;  // 32767 bytes of header in a file of ~128
    CHECK(reject(file).find("runs past the end of the file") != std::string::npos);
    // Version 2.0: a 4 GiB header length is refused before anything is read or allocated.
    auto v2 = make_npy(ok_dict, raw_of(six), 2);
    v2[8] = v2[9] = v2[10] = v2[11] = 0xff;
    CHECK(reject(v2).find("exceeds the limit") != std::string::npos);
    // The file ends inside the preamble.
    CHECK(reject(bytes_of(std::string("\x93NUMPY\x02\x00\x10", 9))).find("preamble") != std::string::npos);
  }
  SUBCASE("absurd shapes overflow checked arithmetic") {
    const std::string m = reject(
        make_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776, 1099511627776, 16), }", {}));
    CHECK(m.find("too large") != std::string::npos);
    // Fits 64 bits as a count but not as a byte size.
    CHECK(reject(make_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 2), }", {}))
              .find("too large") != std::string::npos);
    CHECK(reject(make_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }", {}))
              .find("out of range") != std::string::npos);
    // Huge but not overflowing: the size check catches it (nothing is allocated).
    CHECK(reject(make_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }", {}))
              .find("truncated") != std::string::npos);
  }
  SUBCASE("malformed dicts") {
    const auto dict = [&](const std::string& d) { return reject(make_npy(d, raw_of(six))); };
    CHECK(dict("{'descr': '<f4', 'fortran_order': False, 'shape': (-2, 3), }").find("negative") != std::string::npos);
    CHECK(dict("{'descr': '<f4', 'fortran_order': False, 'shape': (6), }").find("trailing comma") != std::string::npos);
    CHECK(dict("{'descr': '<f4', 'fortran_order': False}").find("missing key 'shape'") != std::string::npos);
    CHECK(dict("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (6,)}").find("duplicate") !=
          std::string::npos);
    CHECK(dict("{'descr': '<f4', 'fortran_order': False, 'shape': (6,), 'extra': 1}").find("unexpected key") !=
          std::string::npos);
    CHECK(dict("{'descr': '<f4', 'fortran_order': Maybe, 'shape': (6,)}").find("True or False") != std::string::npos);
    CHECK(dict("{'descr': '<f4', 'fortran_order': False, 'shape': (6,)} junk").find("after the closing") !=
          std::string::npos);
    CHECK(dict("{'descr': '<f4', 'fortran_order': False, 'shape': (6,").find("malformed .npy header") !=
          std::string::npos);
    CHECK(dict("[1, 2]").find("expected '{'") != std::string::npos);
  }
  SUBCASE("files: missing file is an I/O error naming it; bad file names the path") {
    TempDir dir;
    const std::string m = error_of([&] { read_npy_f32(dir.path / "missing.npy"); }, ddim::ErrorCode::Io);
    CHECK(m.find("missing.npy") != std::string::npos);
    auto file = make_npy(ok_dict, raw_of(six));
    file.resize(file.size() - 1);
    const fs::path path = dir.path / "short.npy";
    std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(file.data()), static_cast<std::streamsize>(file.size()));
    const std::string m2 = error_of([&] { read_npy_f32(path); });
    CHECK(m2.find(path.string()) == 0);
    CHECK(m2.find("truncated") != std::string::npos);
  }
}

TEST_CASE("npy: timestep vectors from int32, int64, float32 and float64") {
  CHECK(parse_npy_timesteps(make_npy("{'descr': '<i4', 'fortran_order': False, 'shape': (3,), }",
                                     raw_of(std::vector<std::int32_t>{999, 500, 0})),
                            "t.npy") == std::vector<int>{999, 500, 0});
  CHECK(parse_npy_timesteps(make_npy("{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }",
                                     raw_of(std::vector<std::int64_t>{981, 1})),
                            "t.npy") == std::vector<int>{981, 1});
  CHECK(parse_npy_timesteps(make_npy("{'descr': '<i8', 'fortran_order': False, 'shape': (), }",
                                     raw_of(std::vector<std::int64_t>{42})),
                            "t.npy") == std::vector<int>{42});
  CHECK(parse_npy_timesteps(make_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }",
                                     raw_of(std::vector<float>{10.0f, 20.0f})),
                            "t.npy") == std::vector<int>{10, 20});
  CHECK(parse_npy_timesteps(make_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }",
                                     raw_of(std::vector<double>{7.0})),
                            "t.npy") == std::vector<int>{7});

  const auto reject = [](const std::vector<std::uint8_t>& file) {
    return error_of([&] { parse_npy_timesteps(file, "t.npy"); });
  };
  CHECK(reject(make_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", raw_of(std::vector<float>{2.5f})))
            .find("not an integer") != std::string::npos);
  CHECK(reject(make_npy("{'descr': '<i8', 'fortran_order': False, 'shape': (1,), }",
                        raw_of(std::vector<std::int64_t>{std::int64_t{1} << 40})))
            .find("out of range") != std::string::npos);
  CHECK(reject(make_npy("{'descr': '<i4', 'fortran_order': False, 'shape': (1, 2), }", raw_of(std::vector<int>{1, 2})))
            .find("scalar or a vector") != std::string::npos);
  CHECK(reject(make_npy("{'descr': '<u2', 'fortran_order': False, 'shape': (1,), }", {0, 0}))
            .find("dtype '<u2' is not supported") != std::string::npos);

  TempDir dir;
  const fs::path path = dir.path / "t.npy";
  write_file_atomic(path, make_npy("{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }",
                                   raw_of(std::vector<std::int32_t>{5, 3})));
  CHECK(read_npy_timesteps(path, 2) == std::vector<int>{5, 3});
}

TEST_CASE("npy: encode checks the data size, and an atomic write leaves nothing on failure") {
  const std::vector<float> data(5);
  CHECK(error_of([&] { encode_npy_f32(std::vector<std::int64_t>{2, 3}, data); }, ddim::ErrorCode::InvalidArgument)
            .find("6 elements but the data has 5") != std::string::npos);
  TempDir dir;
  const fs::path target = dir.path / "no_such_dir" / "x.npy";
  CHECK(error_of([&] { write_npy_f32(target, std::vector<std::int64_t>{5}, data); }, ddim::ErrorCode::Io)
            .find("x.npy") != std::string::npos);
  CHECK(!fs::exists(target));
  // Overwriting an existing file replaces it whole.
  const fs::path file = dir.path / "x.npy";
  write_npy_f32(file, std::vector<std::int64_t>{5}, data);
  write_npy_f32(file, std::vector<std::int64_t>{1, 1}, std::vector<float>{4.0f});
  CHECK(read_npy_f32(file).data == std::vector<float>{4.0f});
  CHECK(no_temp_files(dir.path));
}

TEST_CASE("png: float to byte (round half up of (x+1)/2*255, clamped)") {
  CHECK(float_to_byte(-1.0f) == 0);
  CHECK(float_to_byte(0.0f) == 128);  // 127.5 rounds up
  CHECK(float_to_byte(1.0f) == 255);
  CHECK(float_to_byte(0.5f) == 191);  // 191.25
  CHECK(float_to_byte(-0.5f) == 64);  // 63.75
  CHECK(float_to_byte(-7.0f) == 0);
  CHECK(float_to_byte(3.0f) == 255);
  CHECK(float_to_byte(std::numeric_limits<float>::quiet_NaN()) == 0);
  CHECK(float_to_byte(std::numeric_limits<float>::infinity()) == 255);
}

TEST_CASE("png: crc32 matches the reference and zlib") {
  const std::string check = "123456789";
  const std::vector<std::uint8_t> bytes(check.begin(), check.end());
  CHECK(crc32(bytes) == 0xcbf43926u);
  CHECK(crc32(bytes) == ::crc32(0, bytes.data(), static_cast<uInt>(bytes.size())));
  CHECK(crc32(std::span(bytes).subspan(4), crc32(std::span(bytes).first(4))) == 0xcbf43926u);
  CHECK(crc32({}) == 0u);
}

TEST_CASE("png: RGB grid of 5 images written, decoded and checked pixel by pixel") {
  // 5 images (3, 4, 3): nrow = ceil(sqrt(5)) = 3 columns, 2 rows, 2-pixel padding.
  const int n = 5, c = 3, h = 4, w = 3;
  std::vector<float> batch(static_cast<std::size_t>(n * c * h * w));
  const auto at = [&](int k, int ch, int y, int x) -> float& {
    return batch[static_cast<std::size_t>(((k * c + ch) * h + y) * w + x)];
  };
  for (int k = 0; k < n; ++k)
    for (int ch = 0; ch < c; ++ch)
      for (int y = 0; y < h; ++y)
        for (int x = 0; x < w; ++x) at(k, ch, y, x) = ch == 0 ? -1.0f : (ch == 1 ? 0.0f : 1.0f);
  at(4, 0, 3, 2) = 1.0f;   // last image, bottom-right pixel: red channel to white
  at(1, 1, 0, 0) = -0.5f;  // second image, top-left: green 64

  const Image grid = batch_to_grid(batch, n, c, h, w);
  CHECK(grid.width == 3 * (w + 2) + 2);   // 17
  CHECK(grid.height == 2 * (h + 2) + 2);  // 14
  CHECK(grid.channels == 3);

  TempDir dir;
  const fs::path file = dir.path / "grid.png";
  const TextChunks text = {{"seed", "42"}, {"steps", "50"}, {"model", "models/cifar10.ddim"}, {"note", "caf\xc3\xa9"}};
  write_png(file, grid, text);
  CHECK(no_temp_files(dir.path));
  const DecodedPng png = read_png(file);
  CHECK(png.image.width == 17);
  CHECK(png.image.height == 14);
  CHECK(png.image.channels == 3);
  CHECK(png.image.pixels == grid.pixels);
  CHECK(png.text == text);  // tEXt for ASCII, iTXt for the UTF-8 value

  using P = std::vector<std::uint8_t>;
  CHECK(pixel(png.image, 0, 0) == P{0, 0, 0});                    // border padding
  CHECK(pixel(png.image, 2, 2) == P{0, 128, 255});                // image 0, (0, 0): -1, 0, 1
  CHECK(pixel(png.image, 5, 2) == P{0, 0, 0});                    // padding between columns
  CHECK(pixel(png.image, 7, 2) == P{0, 64, 255});                 // image 1, (0, 0): green -0.5
  CHECK(pixel(png.image, 12 + 2, 2 + 3) == P{0, 128, 255});       // image 2, (2, 3)
  CHECK(pixel(png.image, 7 + 2, 8 + 3) == P{255, 128, 255});      // image 4, (2, 3): red 1
  CHECK(pixel(png.image, 12, 8) == P{0, 0, 0});                   // empty 6th cell
  CHECK(pixel(png.image, 16, 13) == P{0, 0, 0});

  // The file's structure: signature, IHDR first with the right fields, CRCs valid (the decoder
  // checks them; a flipped byte is caught).
  std::vector<std::uint8_t> bytes = read_file(file);
  CHECK(std::memcmp(bytes.data(), "\x89PNG\r\n\x1a\n", 8) == 0);
  CHECK(std::memcmp(bytes.data() + 12, "IHDR", 4) == 0);
  CHECK(bytes[24] == 8);  // bit depth
  CHECK(bytes[25] == 2);  // RGB
  const std::size_t ihdr_crc_at = 8 + 8 + 13;
  const std::uint32_t stored = static_cast<std::uint32_t>(bytes[ihdr_crc_at]) << 24 | bytes[ihdr_crc_at + 1] << 16 |
                               bytes[ihdr_crc_at + 2] << 8 | bytes[ihdr_crc_at + 3];
  CHECK(stored == ::crc32(0, bytes.data() + 12, 17));
  bytes[40] ^= 0x01;
  CHECK(error_of([&] { decode_png(bytes, "bad.png"); }).find("CRC mismatch") != std::string::npos);
}

TEST_CASE("png: grayscale grid and single images") {
  // 4 images (1, 2, 2): 2 x 2 grid.
  const std::vector<float> batch = {-1, 0, 1, 0.5f,  1, 1, 1, 1,  -1, -1, -1, -1,  0, 0, 0, 0};
  const Image grid = batch_to_grid(batch, 4, 1, 2, 2);
  CHECK(grid.width == 2 * 4 + 2);
  CHECK(grid.height == 2 * 4 + 2);
  const DecodedPng png = decode_png(encode_png(grid));
  CHECK(png.image.channels == 1);
  CHECK(png.text.empty());
  CHECK(png.image.pixels == grid.pixels);
  CHECK(pixel(png.image, 2, 2) == std::vector<std::uint8_t>{0});
  CHECK(pixel(png.image, 3, 2) == std::vector<std::uint8_t>{128});
  CHECK(pixel(png.image, 2, 3) == std::vector<std::uint8_t>{255});
  CHECK(pixel(png.image, 3, 3) == std::vector<std::uint8_t>{191});
  CHECK(pixel(png.image, 6, 2) == std::vector<std::uint8_t>{255});  // image 1
  CHECK(pixel(png.image, 2, 6) == std::vector<std::uint8_t>{0});    // image 2
  CHECK(pixel(png.image, 7, 7) == std::vector<std::uint8_t>{128});  // image 3
  CHECK(pixel(png.image, 1, 1) == std::vector<std::uint8_t>{0});    // padding
  const std::vector<std::uint8_t> bytes = encode_png(grid);
  CHECK(bytes[25] == 0);  // color type: grayscale

  // One image: no padding; a batch of one through the grid has a 2-pixel border.
  const Image single = tensor_to_image(std::span(batch).first(4), 1, 2, 2);
  CHECK(single.width == 2);
  CHECK(single.height == 2);
  CHECK(single.pixels == std::vector<std::uint8_t>{0, 128, 255, 191});
  CHECK(batch_to_grid(std::span(batch).first(4), 1, 1, 2, 2).width == 6);

  // A larger image round-trips (several rows, IDAT of real size).
  Image big{300, 200, 3, {}};
  big.pixels.resize(300 * 200 * 3);
  for (std::size_t i = 0; i < big.pixels.size(); ++i) big.pixels[i] = static_cast<std::uint8_t>(i * 7 + i / 900);
  CHECK(decode_png(encode_png(big)).image.pixels == big.pixels);
}

TEST_CASE("png: invalid inputs are rejected") {
  const std::vector<float> two_channels(2 * 4 * 4, 0.0f);
  CHECK(error_of([&] { batch_to_grid(two_channels, 1, 2, 4, 4); }, ddim::ErrorCode::InvalidArgument)
            .find("2 channels") != std::string::npos);
  CHECK(error_of([&] { batch_to_grid(two_channels, 2, 3, 4, 4); }, ddim::ErrorCode::InvalidArgument)
            .find("values for a batch of") != std::string::npos);
  const Image image{2, 2, 1, {0, 1, 2, 3}};
  CHECK(error_of([&] { encode_png(image, {{"", "x"}}); }, ddim::ErrorCode::InvalidArgument).find("keyword") !=
        std::string::npos);
  CHECK(error_of([&] { encode_png(image, {{"k", std::string("a\0b", 3)}}); }, ddim::ErrorCode::InvalidArgument)
            .find("NUL") != std::string::npos);
  CHECK(error_of([&] { encode_png(Image{2, 2, 1, {0, 1, 2}}); }, ddim::ErrorCode::InvalidArgument)
            .find("invalid image") != std::string::npos);

  const std::vector<std::uint8_t> good = encode_png(image);
  CHECK(error_of([&] { decode_png(std::span(good).first(good.size() - 12)); }).find("IEND") != std::string::npos);
  CHECK(error_of([&] { decode_png(std::span(good).first(30)); }).find("runs past the end") != std::string::npos);
  CHECK(error_of([&] { decode_png(bytes_of("GIF89a")); }).find("not a PNG") != std::string::npos);
  TempDir dir;
  const fs::path target = dir.path / "missing_dir" / "x.png";
  CHECK(error_of([&] { write_png(target, image); }, ddim::ErrorCode::Io).find("x.png") != std::string::npos);
  CHECK(!fs::exists(target));
}
