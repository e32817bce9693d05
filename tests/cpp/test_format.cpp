// The model-file container: round trips, dtype conversions checked against independently computed
// values, and one test per validation rule of the reader, each on a hand-written malformed file.
#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "ddim/error.hpp"
#include "format/container.hpp"
#include "fuzz_capture.hpp"

namespace df = ddim::format;
using ddim::ErrorCode;

namespace {

using Bytes = std::vector<std::uint8_t>;

// 8-byte little-endian prefix declaring `declared` header bytes, the header text, `data` bytes.
Bytes make_file(std::string_view header, std::size_t data_bytes, std::uint64_t declared) {
  Bytes out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<std::uint8_t>(declared >> (8 * i)));
  out.insert(out.end(), header.begin(), header.end());
  for (std::size_t i = 0; i < data_bytes; ++i) out.push_back(static_cast<std::uint8_t>(i * 7 + 1));
  return out;
}

Bytes make_file(std::string_view header, std::size_t data_bytes = 0) {
  return make_file(header, data_bytes, header.size());
}

// What a loader does: read the prefix, then validate the header against the file size.
df::Container parse_file(const Bytes& bytes) {
  ddim::test::fuzz_capture_file(bytes);
  const std::span<const std::uint8_t> all(bytes);
  const std::uint64_t n = df::read_header_length(all.first(std::min<std::size_t>(8, all.size())), all.size());
  return df::parse_header(all.subspan(8, static_cast<std::size_t>(n)), all.size());
}

bool contains(const std::string& haystack, std::string_view needle) {
  return haystack.find(needle) != std::string::npos;
}

// Runs `f`, which must throw ddim::Error(InvalidFile) whose message holds every needle and the hint.
template <typename F>
void expect_invalid_from(F&& f, std::initializer_list<std::string_view> needles) {
  try {
    f();
    FAIL_CHECK("accepted, expected an InvalidFile error mentioning " << *needles.begin());
  } catch (const ddim::Error& e) {
    const std::string message = e.what();
    INFO("message: " << message);
    CHECK(std::string(ddim::to_string(e.code())) == ddim::to_string(ErrorCode::InvalidFile));
    for (const std::string_view needle : needles) {
      INFO("needle: " << needle);
      CHECK(contains(message, needle));
    }
    CHECK(contains(message, "re-export the model with tools/export"));
  }
}

void expect_invalid(const Bytes& bytes, std::initializer_list<std::string_view> needles) {
  expect_invalid_from([&] { parse_file(bytes); }, needles);
}

void expect_invalid(const Bytes& bytes, std::string_view needle) { expect_invalid(bytes, {needle}); }

void expect_invalid_header(std::string_view header, std::size_t data_bytes,
                           std::initializer_list<std::string_view> needles) {
  INFO("header: " << header);
  expect_invalid(make_file(header, data_bytes), needles);
}

void expect_invalid_json(std::string_view text, std::initializer_list<std::string_view> needles) {
  INFO("json: " << text);
  {
    std::string input(8, '\0');  // the header harness's input: a data size of 0, then the JSON
    input.append(text);
    ddim::test::fuzz_capture("header", std::span<const std::uint8_t>(reinterpret_cast<const std::uint8_t*>(input.data()), input.size()));
  }
  expect_invalid_from([&] { (void)df::parse_json_strict(text, "graph"); }, needles);
}

// One well-formed F32 tensor entry.
std::string entry(std::string_view name, std::string_view shape, std::uint64_t begin, std::uint64_t end) {
  return "\"" + std::string(name) + "\":{\"dtype\":\"F32\",\"shape\":" + std::string(shape) + ",\"data_offsets\":[" +
         std::to_string(begin) + "," + std::to_string(end) + "]}";
}

// Value of a finite half computed from the definition, independently of half_to_float.
double half_reference(std::uint16_t h) {
  const int sign = (h >> 15) ? -1 : 1;
  const int exp = (h >> 10) & 0x1F;
  const int mant = h & 0x3FF;
  if (exp == 0) return sign * std::ldexp(static_cast<double>(mant), -24);
  return sign * std::ldexp(1.0 + mant / 1024.0, exp - 15);
}

double bf16_reference(std::uint16_t b) {
  const int sign = (b >> 15) ? -1 : 1;
  const int exp = (b >> 7) & 0xFF;
  const int mant = b & 0x7F;
  if (exp == 0) return sign * std::ldexp(static_cast<double>(mant), -133);
  return sign * std::ldexp(1.0 + mant / 128.0, exp - 127);
}

std::string hex(std::uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%04X", static_cast<unsigned>(v));
  return buf;
}

float next_up(float f) { return std::nextafter(f, std::numeric_limits<float>::infinity()); }
float next_down(float f) { return std::nextafter(f, -std::numeric_limits<float>::infinity()); }

}  // namespace

TEST_SUITE("format") {
  // ------------------------------------------------------------------ writing and reading back

  TEST_CASE("round trip: serialize then parse gives the same tensors and metadata") {
    const std::vector<float> w = {0.5f, -1.25f, 3.0f, 65504.0f, -0.0f, 1e-3f};
    const std::vector<float> halfs = {1.0f, -2.0f, 0.5f, 65504.0f};
    const std::vector<float> b16 = {1.0f, -3.0f, 0.15625f, 1e30f};
    const std::vector<float> d = {0.1f, -1e-30f, 12345.678f};
    const std::vector<float> scalar = {42.0f};
    const std::vector<df::TensorData> tensors = {
        df::make_tensor_f32("down_blocks.0.conv.weight", {2, 3}, w),
        df::make_tensor_f32("empty", {0, 5}, {}),
        df::make_tensor_f32("half", {2, 2}, halfs, df::DType::F16),
        df::make_tensor_f32("bf16", {4}, b16, df::DType::BF16),
        df::make_tensor_f32("f64", {3}, d, df::DType::F64),
        df::make_tensor_f32("scalar", {}, scalar),
    };
    const std::map<std::string, std::string> metadata = {{"ddim.format_version", "1"},
                                                         {"ddim.graph", R"({"nodes": [], "x": "\"quoted\""})"},
                                                         {"note", "h\xC3\xA9llo \xE2\x9C\x93"}};
    const Bytes bytes = df::serialize(tensors, metadata);
    const df::Container c = parse_file(bytes);

    CHECK(c.header_bytes % 8 == 0);
    CHECK(c.data_begin == 8 + c.header_bytes);
    CHECK(c.metadata == metadata);
    REQUIRE(c.tensors.size() == tensors.size());
    std::uint64_t offset = 0;
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      const df::TensorInfo& t = c.tensors[i];  // data-offset order = the order written
      CAPTURE(tensors[i].name);
      CHECK(t.name == tensors[i].name);
      CHECK(t.dtype == tensors[i].dtype);
      CHECK(t.shape == tensors[i].shape);
      CHECK(t.begin == offset);
      CHECK(t.end - t.begin == tensors[i].bytes.size());
      CHECK(Bytes(bytes.begin() + static_cast<std::ptrdiff_t>(c.data_begin + t.begin),
                  bytes.begin() + static_cast<std::ptrdiff_t>(c.data_begin + t.end)) == tensors[i].bytes);
      CHECK(c.find(t.name) == &t);
      offset = t.end;
    }
    CHECK(c.data_begin + offset == bytes.size());
    CHECK(c.find("missing") == nullptr);
    CHECK(c.find("scalar")->numel() == 1);
    CHECK(c.find("empty")->numel() == 0);

    const auto values = [&](const std::string& name) {
      const df::TensorInfo* t = c.find(name);
      REQUIRE(t != nullptr);
      std::vector<float> out(static_cast<std::size_t>(t->numel()));
      df::convert_to_f32(*t, std::span(bytes).subspan(c.data_begin + t->begin, t->end - t->begin), out);
      return out;
    };
    CHECK(values("down_blocks.0.conv.weight") == w);
    CHECK(std::signbit(values("down_blocks.0.conv.weight")[4]));
    CHECK(values("half") == halfs);  // all exactly representable in half
    const std::vector<float> b16_back = values("bf16");
    CHECK(b16_back[0] == 1.0f);
    CHECK(b16_back[1] == -3.0f);
    CHECK(b16_back[2] == 0.15625f);
    CHECK(b16_back[3] == df::bf16_to_float(df::float_to_bf16(1e30f)));
    CHECK(values("f64") == d);  // float -> double -> float is exact
    CHECK(values("scalar") == scalar);
    CHECK(values("empty").empty());
  }

  TEST_CASE("round trip: the output of serialize is byte-for-byte what the spec describes") {
    const std::vector<float> v = {1.0f, 2.0f};
    const Bytes bytes = df::serialize({df::make_tensor_f32("a", {2}, v)}, {{"k", "v"}});
    const std::string expected_json =
        R"({"__metadata__":{"k":"v"},"a":{"data_offsets":[0,8],"dtype":"F32","shape":[2]}})";
    const std::size_t padded = (expected_json.size() + 7) / 8 * 8;
    REQUIRE(bytes.size() == 8 + padded + 8);
    CHECK(bytes[0] == padded);
    for (int i = 1; i < 8; ++i) CHECK(bytes[static_cast<std::size_t>(i)] == 0);
    const std::string header(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(padded));
    CHECK(header == expected_json + std::string(padded - expected_json.size(), ' '));
    const Bytes data(bytes.end() - 8, bytes.end());
    CHECK(data == Bytes{0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x00, 0x40});  // 1.0f, 2.0f little-endian
  }

  TEST_CASE("round trip: hand-written headers with whitespace padding and no tensors are accepted") {
    const std::string json = "{" + entry("x", "[2]", 0, 8) + "}";
    SUBCASE("trailing spaces") {
      const df::Container c = parse_file(make_file(json + "       ", 8));
      REQUIRE(c.tensors.size() == 1);
      CHECK(c.tensors[0].name == "x");
      CHECK(c.header_bytes == json.size() + 7);
    }
    SUBCASE("surrounding JSON whitespace") {
      CHECK(parse_file(make_file(" \n" + json + "\t\r\n ", 8)).tensors.size() == 1);
    }
    SUBCASE("no tensors at all") {
      const df::Container c = parse_file(make_file("{}"));
      CHECK(c.tensors.empty());
      CHECK(c.metadata.empty());
    }
    SUBCASE("only metadata") { CHECK(parse_file(make_file(R"({"__metadata__":{}})")).metadata.empty()); }
    SUBCASE("zero-size tensors share an offset with their neighbour") {
      const df::Container c =
          parse_file(make_file("{" + entry("z1", "[0]", 8, 8) + "," + entry("b", "[2]", 8, 16) + "," +
                                   entry("a", "[2]", 0, 8) + "," + entry("z0", "[3,0]", 0, 0) + "}",
                               16));
      REQUIRE(c.tensors.size() == 4);
      CHECK(c.tensors[0].name == "z0");
      CHECK(c.tensors[1].name == "a");
      CHECK(c.tensors[2].name == "z1");
      CHECK(c.tensors[3].name == "b");
    }
    SUBCASE("valid multi-byte UTF-8 names and metadata") {
      const std::string name = "\xC3\xA9\xE2\x9C\x93\xF0\x9D\x84\x9E\xF4\x8F\xBF\xBF";  // é ✓ 𝄞 U+10FFFF
      const df::Container c =
          parse_file(make_file("{" + entry(name, "[1]", 0, 4) + R"(,"__metadata__":{"k":")" + name + "\"}}", 4));
      CHECK(c.find(name) != nullptr);
      CHECK(c.metadata.at("k") == name);
    }
  }

  TEST_CASE("write_file: writes the bytes and reports Io with the path on failure") {
    const std::vector<float> v = {1.0f, 2.0f, 3.0f};
    const Bytes bytes = df::serialize({df::make_tensor_f32("t", {3}, v)}, {});
    const std::filesystem::path path = std::filesystem::temp_directory_path() / "ddim_test_format_write.safetensors";
    df::write_file(path.string(), bytes);
    std::ifstream in(path, std::ios::binary);
    const Bytes back((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    in.close();
    std::filesystem::remove(path);
    CHECK(back == bytes);

    const std::string bad = "/nonexistent-ddim-dir/sub/model.safetensors";
    try {
      df::write_file(bad, bytes);
      FAIL_CHECK("write_file to a missing directory succeeded");
    } catch (const ddim::Error& e) {
      CHECK(e.code() == ErrorCode::Io);
      CHECK(contains(e.what(), bad));
      CHECK(contains(e.what(), "No such file or directory"));
    }
  }

  TEST_CASE("writer: rejects inconsistent tensors with InvalidArgument") {
    const std::vector<float> v = {1.0f, 2.0f};
    const auto expect_bad = [](auto&& f, std::string_view needle) {
      try {
        f();
        FAIL_CHECK("accepted");
      } catch (const ddim::Error& e) {
        INFO(e.what());
        CHECK(e.code() == ErrorCode::InvalidArgument);
        CHECK(contains(e.what(), needle));
      }
    };
    expect_bad([&] { (void)df::make_tensor_f32("wrong", {3}, v); }, "\"wrong\"");
    expect_bad(
        [&] {
          (void)df::serialize({df::make_tensor_f32("a", {2}, v), df::make_tensor_f32("a", {2}, v)}, {});
        },
        "duplicate tensor name");
    expect_bad([&] { (void)df::serialize({df::make_tensor_f32("", {2}, v)}, {}); }, "empty name");
    expect_bad([&] { (void)df::serialize({df::make_tensor_f32("__metadata__", {2}, v)}, {}); }, "reserved");
    df::TensorData short_data = df::make_tensor_f32("short", {2}, v);
    short_data.bytes.pop_back();
    expect_bad([&] { (void)df::serialize({short_data}, {}); }, "\"short\"");
    expect_bad([&] { (void)df::serialize({}, {{"k", "\xFF"}}); }, "UTF-8");
  }

  TEST_CASE("dtype names and sizes") {
    CHECK(std::string(df::to_string(df::DType::F32)) == "F32");
    CHECK(std::string(df::to_string(df::DType::F16)) == "F16");
    CHECK(std::string(df::to_string(df::DType::BF16)) == "BF16");
    CHECK(std::string(df::to_string(df::DType::F64)) == "F64");
    CHECK(df::dtype_size(df::DType::F32) == 4);
    CHECK(df::dtype_size(df::DType::F16) == 2);
    CHECK(df::dtype_size(df::DType::BF16) == 2);
    CHECK(df::dtype_size(df::DType::F64) == 8);
  }

  // ------------------------------------------------------------------ conversions

  TEST_CASE("half to float: known values") {
    CHECK(df::half_to_float(0x3C00) == 1.0f);
    CHECK(df::half_to_float(0xC000) == -2.0f);
    CHECK(df::half_to_float(0x3800) == 0.5f);
    CHECK(df::half_to_float(0x7BFF) == 65504.0f);
    CHECK(df::half_to_float(0x3555) == 0.333251953125f);
    CHECK(df::half_to_float(0x0001) == std::ldexp(1.0f, -24));         // smallest subnormal
    CHECK(df::half_to_float(0x03FF) == 1023 * std::ldexp(1.0f, -24));  // largest subnormal
    CHECK(df::half_to_float(0x0400) == std::ldexp(1.0f, -14));         // smallest normal
    CHECK(df::half_to_float(0x8001) == -std::ldexp(1.0f, -24));
    CHECK(df::half_to_float(0x0000) == 0.0f);
    CHECK_FALSE(std::signbit(df::half_to_float(0x0000)));
    CHECK(std::signbit(df::half_to_float(0x8000)));
    CHECK(df::half_to_float(0x7C00) == std::numeric_limits<float>::infinity());
    CHECK(df::half_to_float(0xFC00) == -std::numeric_limits<float>::infinity());
    CHECK(std::isnan(df::half_to_float(0x7E00)));
    CHECK(std::isnan(df::half_to_float(0x7C01)));  // signalling NaN stays a NaN, not infinity
    CHECK(std::signbit(df::half_to_float(0xFE00)));
  }

  TEST_CASE("float to half: ties to even with subnormals and overflow and NaN") {
    CHECK(df::float_to_half(1.0f) == 0x3C00);
    CHECK(df::float_to_half(-2.0f) == 0xC000);
    CHECK(df::float_to_half(65504.0f) == 0x7BFF);
    CHECK(df::float_to_half(0.1f) == 0x2E66);
    CHECK(df::float_to_half(-0.0f) == 0x8000);
    CHECK(df::float_to_half(0.0f) == 0x0000);
    // Ties between 1.0 (0x3C00) and the next half 1 + 2^-10: even wins; just above goes up.
    CHECK(df::float_to_half(1.0f + std::ldexp(1.0f, -11)) == 0x3C00);
    CHECK(df::float_to_half(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3C02);
    CHECK(df::float_to_half(next_up(1.0f + std::ldexp(1.0f, -11))) == 0x3C01);
    CHECK(df::float_to_half(next_down(1.0f + 3 * std::ldexp(1.0f, -11))) == 0x3C01);
    // Overflow: 65520 is halfway between 65504 (odd mantissa) and 65536, so it rounds to infinity.
    CHECK(df::float_to_half(next_down(65520.0f)) == 0x7BFF);
    CHECK(df::float_to_half(65520.0f) == 0x7C00);
    CHECK(df::float_to_half(-1e6f) == 0xFC00);
    CHECK(df::float_to_half(std::numeric_limits<float>::infinity()) == 0x7C00);
    // Subnormals: multiples of 2^-24.
    CHECK(df::float_to_half(std::ldexp(1.0f, -24)) == 0x0001);
    CHECK(df::float_to_half(std::ldexp(1.0f, -25)) == 0x0000);  // tie to even (0)
    CHECK(df::float_to_half(next_up(std::ldexp(1.0f, -25))) == 0x0001);
    CHECK(df::float_to_half(3 * std::ldexp(1.0f, -25)) == 0x0002);  // 1.5 ulp: tie to even (2)
    CHECK(df::float_to_half(5 * std::ldexp(1.0f, -25)) == 0x0002);  // 2.5 ulp: tie to even (2)
    CHECK(df::float_to_half(-std::ldexp(1.0f, -24)) == 0x8001);
    CHECK(df::float_to_half(std::ldexp(1.0f, -26)) == 0x0000);
    CHECK(df::float_to_half(std::numeric_limits<float>::denorm_min()) == 0x0000);
    CHECK(df::float_to_half(-std::numeric_limits<float>::denorm_min()) == 0x8000);
    // Halfway between the largest subnormal 0x03FF and the smallest normal 0x0400: rounds up to even.
    CHECK(df::float_to_half(std::ldexp(1.0f, -14) - std::ldexp(1.0f, -25)) == 0x0400);
    // NaN stays NaN, including a signalling NaN whose payload sits in the bits a half drops.
    const auto is_half_nan = [](std::uint16_t h) { return (h & 0x7C00) == 0x7C00 && (h & 0x03FF) != 0; };
    CHECK(is_half_nan(df::float_to_half(std::numeric_limits<float>::quiet_NaN())));
    CHECK(is_half_nan(df::float_to_half(std::bit_cast<float>(0x7F800001u))));
    CHECK((df::float_to_half(std::bit_cast<float>(0xFFC00000u)) & 0x8000) != 0);
  }

  TEST_CASE("float to half: every tie between adjacent finite halves rounds to even") {
    int failures = 0;
    for (std::uint16_t h = 0; h < 0x7BFF; ++h) {
      const auto lo = static_cast<float>(half_reference(h));
      const auto hi = static_cast<float>(half_reference(static_cast<std::uint16_t>(h + 1)));
      const float mid = (lo + hi) / 2;  // at most 12 significant bits: exact
      const std::uint16_t even = (h & 1) ? static_cast<std::uint16_t>(h + 1) : h;
      for (const float sign : {1.0f, -1.0f}) {
        const auto s = static_cast<std::uint16_t>(sign < 0 ? 0x8000 : 0);
        const bool ok =
            df::float_to_half(sign * mid) == (even | s) && df::float_to_half(sign * next_down(mid)) == (h | s) &&
            df::float_to_half(sign * next_up(mid)) == ((h + 1) | s) && df::float_to_half(sign * lo) == (h | s);
        if (!ok && failures++ < 5) FAIL_CHECK("rounding wrong around half " << hex(h));
      }
    }
    CHECK(failures == 0);
  }

  TEST_CASE("half: all 65536 bit patterns widen exactly and round-trip (NaN stays NaN)") {
    int failures = 0;
    for (std::uint32_t i = 0; i < 0x10000; ++i) {
      const auto h = static_cast<std::uint16_t>(i);
      const float f = df::half_to_float(h);
      const std::uint16_t back = df::float_to_half(f);
      bool ok = true;
      if ((h & 0x7C00) == 0x7C00 && (h & 0x3FF) != 0) {
        ok = std::isnan(f) && std::isnan(df::half_to_float(back)) && (back & 0x8000) == (h & 0x8000);
      } else if ((h & 0x7FFF) == 0x7C00) {
        ok = std::isinf(f) && back == h;
      } else {
        ok = static_cast<double>(f) == half_reference(h) && std::signbit(f) == ((h & 0x8000) != 0) && back == h;
      }
      if (!ok && failures++ < 5) FAIL_CHECK("half " << hex(i) << " -> " << f << " -> " << hex(back));
    }
    CHECK(failures == 0);
  }

  TEST_CASE("bf16: known values and ties to even and all bit patterns round-trip") {
    CHECK(df::bf16_to_float(0x3F80) == 1.0f);
    CHECK(df::bf16_to_float(0xC000) == -2.0f);
    CHECK(df::bf16_to_float(0x7F80) == std::numeric_limits<float>::infinity());
    CHECK(df::bf16_to_float(0x0001) == std::ldexp(1.0f, -133));  // smallest bf16 subnormal
    CHECK(std::isnan(df::bf16_to_float(0x7FC0)));
    CHECK(df::float_to_bf16(1.0f) == 0x3F80);
    CHECK(df::float_to_bf16(-2.0f) == 0xC000);
    CHECK(df::float_to_bf16(1.0f + std::ldexp(1.0f, -8)) == 0x3F80);      // tie: even
    CHECK(df::float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3F82);  // tie: even
    CHECK(df::float_to_bf16(next_up(1.0f + std::ldexp(1.0f, -8))) == 0x3F81);
    CHECK(df::float_to_bf16(std::numeric_limits<float>::max()) == 0x7F80);  // rounds up to infinity
    CHECK(df::float_to_bf16(std::numeric_limits<float>::denorm_min()) == 0x0000);
    CHECK(df::float_to_bf16(-0.0f) == 0x8000);
    CHECK(std::isnan(df::bf16_to_float(df::float_to_bf16(std::bit_cast<float>(0x7F800001u)))));  // not inf

    int failures = 0;
    for (std::uint32_t i = 0; i < 0x10000; ++i) {
      const auto b = static_cast<std::uint16_t>(i);
      const float f = df::bf16_to_float(b);
      const std::uint16_t back = df::float_to_bf16(f);
      bool ok = true;
      if ((b & 0x7F80) == 0x7F80 && (b & 0x7F) != 0) {
        ok = std::isnan(f) && std::isnan(df::bf16_to_float(back)) && (back & 0x8000) == (b & 0x8000);
      } else if ((b & 0x7FFF) == 0x7F80) {
        ok = std::isinf(f) && back == b;
      } else {
        ok = static_cast<double>(f) == bf16_reference(b) && back == b;
        if (ok && (b & 0x7FFF) < 0x7F7F) {  // the tie above b rounds to even
          const float mid = f + (df::bf16_to_float(static_cast<std::uint16_t>(b + 1)) - f) / 2;  // no overflow
          const std::uint16_t even = (b & 1) ? static_cast<std::uint16_t>(b + 1) : b;
          ok = df::float_to_bf16(mid) == even;
        }
      }
      if (!ok && failures++ < 5) FAIL_CHECK("bf16 " << hex(i) << " -> " << f << " -> " << hex(back));
    }
    CHECK(failures == 0);
  }

  TEST_CASE("convert_to_f32 and convert_to_f64: little-endian bytes of every dtype") {
    const auto info = [](df::DType d, std::int64_t n) {
      df::TensorInfo t;
      t.name = "t";
      t.dtype = d;
      t.shape = {n};
      return t;
    };
    // 1.0 and -2.5 in each encoding, little-endian.
    const Bytes f32 = {0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x20, 0xC0};
    const Bytes f16 = {0x00, 0x3C, 0x00, 0xC1};
    const Bytes bf16 = {0x80, 0x3F, 0x20, 0xC0};
    const Bytes f64 = {0, 0, 0, 0, 0, 0, 0xF0, 0x3F, 0, 0, 0, 0, 0, 0, 0x04, 0xC0};
    for (const auto& encoded : {std::pair{df::DType::F32, f32}, std::pair{df::DType::F16, f16},
                                std::pair{df::DType::BF16, bf16}, std::pair{df::DType::F64, f64}}) {
      const df::DType dtype = encoded.first;
      const Bytes& raw = encoded.second;
      INFO("dtype " << df::to_string(dtype));
      std::vector<float> out32(2);
      std::vector<double> out64(2);
      df::convert_to_f32(info(dtype, 2), raw, out32);
      df::convert_to_f64(info(dtype, 2), raw, out64);
      CHECK(out32 == std::vector<float>{1.0f, -2.5f});
      CHECK(out64 == std::vector<double>{1.0, -2.5});
    }
    // F64 keeps full precision in convert_to_f64 and rounds to nearest in convert_to_f32.
    const Bytes tenth = {0x9A, 0x99, 0x99, 0x99, 0x99, 0x99, 0xB9, 0x3F};  // 0.1 as a double
    std::vector<double> d(1);
    std::vector<float> f(1);
    df::convert_to_f64(info(df::DType::F64, 1), tenth, d);
    df::convert_to_f32(info(df::DType::F64, 1), tenth, f);
    CHECK(d[0] == 0.1);
    CHECK(f[0] == 0.1f);
    // Wrong sizes are a caller error, not a file error.
    std::vector<float> small(1);
    CHECK_THROWS_AS(df::convert_to_f32(info(df::DType::F32, 2), f32, small), ddim::Error);
    std::vector<float> two(2);
    try {
      df::convert_to_f32(info(df::DType::F32, 2), std::span(f32).first(7), two);
      FAIL_CHECK("a short buffer was accepted");
    } catch (const ddim::Error& e) {
      CHECK(e.code() == ErrorCode::InvalidArgument);
      CHECK(contains(e.what(), "\"t\""));
    }
  }

  // ------------------------------------------------------------------ strict JSON

  TEST_CASE("parse_json_strict: accepts equal keys in different objects and escaped text") {
    const nlohmann::json j = df::parse_json_strict(
        R"({"a": {"x": 1}, "b": {"x": 2}, "list": [{"k": 1}, {"k": 2}], "s": "\u00e9\ud834\udd1e"})", "graph");
    CHECK(j["a"]["x"] == 1);
    CHECK(j["b"]["x"] == 2);
    CHECK(j["list"][1]["k"] == 2);
    CHECK(j["s"] == "\xC3\xA9\xF0\x9D\x84\x9E");
  }

  TEST_CASE("invalid file: duplicate key nested deep in a strict JSON document") {
    expect_invalid_json(R"({"nodes": [{"op": "conv"}, {"op": "add", "attrs": {"k": 1, "k": 2}}]})",
                        {"graph", "duplicate key \"k\"", "/nodes/1/attrs"});
    expect_invalid_json(R"({"a": [[{"b": {"c": {"d": 1, "e": 2, "d": 3}}}]]})", {"duplicate key \"d\"", "/a/0/0/b/c"});
    expect_invalid_json(R"({"top": 1, "top": 2})", {"duplicate key \"top\""});
    expect_invalid_json(R"({"a": 1, "\u0061": 2})", {"duplicate key \"a\""});  // equal after unescaping
    expect_invalid_json(R"({"a/b~c": {"x": 1, "x": 1}})", {"/a~1b~0c"});
    expect_invalid_json(R"({"a": "\ud800"})", {"not valid JSON"});  // lone surrogate escape
  }

  TEST_CASE("invalid file: JSON nested too deep") {
    expect_invalid_json(std::string(1000, '[') + std::string(1000, ']'), {"nested deeper"});
    expect_invalid_header(R"({"__metadata__":)" + std::string(200, '[') + std::string(200, ']') + "}", 0,
                          {"nested deeper", "/__metadata__"});
  }

  // ------------------------------------------------------------------ the malformed-file matrix

  TEST_CASE("invalid file: header length above the cap") {
    expect_invalid(make_file("{}", 0, df::kMaxHeaderBytes + 1), {"header length 100000001", "exceeds the limit"});
    expect_invalid(make_file("{}", 0, std::numeric_limits<std::uint64_t>::max()), "exceeds the limit");
  }

  TEST_CASE("invalid file: header length beyond the end of the file") {
    expect_invalid(make_file("{}", 0, 3), {"header length 3", "runs past the end of the file"});
    expect_invalid(make_file("{}", 10, 100), {"header length 100", "runs past the end of the file"});
    expect_invalid_from([] { (void)df::parse_header(Bytes(10, ' '), 12); }, {"does not fit"});
  }

  TEST_CASE("invalid file: shorter than the 8-byte prefix") {
    expect_invalid(Bytes{}, "too short");
    expect_invalid(Bytes{2, 0, 0, 0}, "too short");
  }

  TEST_CASE("invalid file: invalid UTF-8 in the header") {
    const auto with_name = [](std::string_view bytes) {
      return "{" + entry(std::string("t") + std::string(bytes), "[1]", 0, 4) + "}";
    };
    SUBCASE("overlong two-byte") { expect_invalid_header(with_name("\xC0\xAF"), 4, {"UTF-8", "overlong"}); }
    SUBCASE("overlong three-byte") { expect_invalid_header(with_name("\xE0\x80\xAF"), 4, {"UTF-8", "overlong"}); }
    SUBCASE("overlong four-byte") { expect_invalid_header(with_name("\xF0\x8F\xBF\xBF"), 4, {"UTF-8", "overlong"}); }
    SUBCASE("surrogate") { expect_invalid_header(with_name("\xED\xA0\x80"), 4, {"UTF-8", "surrogate"}); }
    SUBCASE("above U+10FFFF") { expect_invalid_header(with_name("\xF4\x90\x80\x80"), 4, {"UTF-8", "U+10FFFF"}); }
    SUBCASE("lead byte F5") { expect_invalid_header(with_name("\xF5\x80\x80\x80"), 4, {"UTF-8", "U+10FFFF"}); }
    SUBCASE("byte FF") { expect_invalid_header(with_name("\xFF"), 4, {"UTF-8"}); }
    SUBCASE("stray continuation byte") { expect_invalid_header(with_name("\x80"), 4, {"UTF-8", "continuation"}); }
    SUBCASE("truncated sequence") { expect_invalid_header(with_name("\xE2\x82"), 4, {"UTF-8", "truncated"}); }
    SUBCASE("truncated at the end of the header") {
      expect_invalid_header("{}\xF0\x9F\x98", 0, {"UTF-8", "truncated"});
    }
    SUBCASE("in a metadata value") {
      expect_invalid_header(R"({"__metadata__":{"k":"a)"
                            "\xC1\xBF"
                            R"("}})",
                            0, {"UTF-8 at byte 23"});
    }
  }

  TEST_CASE("invalid file: header is not valid JSON") {
    for (const std::string_view bad :
         std::initializer_list<std::string_view>{"", "{", R"({"w":{)", "{} x", "{'a':1}", R"({"a":1,})", "/* c */{}",
                                                 "{\"a\":NaN}", "{\"a\":\"\x01\"}", std::string_view("\0{}", 3)}) {
      expect_invalid_header(bad, 0, {"not valid JSON", "model file header"});
    }
  }

  TEST_CASE("invalid file: top level is not an object") {
    expect_invalid_header("[]", 0, {"must be a JSON object", "array"});
    expect_invalid_header(R"("w")", 0, {"must be a JSON object", "string"});
    expect_invalid_header("3", 0, {"must be a JSON object", "number"});
    expect_invalid_header("null", 0, {"must be a JSON object", "null"});
  }

  TEST_CASE("invalid file: duplicate key inside a tensor entry") {
    expect_invalid_header(R"({"w":{"dtype":"F32","dtype":"F16","shape":[1],"data_offsets":[0,4]}})", 4,
                          {"duplicate key \"dtype\"", "/w"});
    expect_invalid_header(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"shape":[1]}})", 4,
                          {"duplicate key \"shape\"", "/w"});
  }

  TEST_CASE("invalid file: duplicate tensor name") {
    expect_invalid_header("{" + entry("w", "[1]", 0, 4) + "," + entry("w", "[1]", 4, 8) + "}", 8,
                          {"duplicate tensor name \"w\""});
    expect_invalid_header(R"({"__metadata__":{},"__metadata__":{}})", 0, {"duplicate tensor name \"__metadata__\""});
  }

  TEST_CASE("invalid file: duplicate key inside __metadata__") {
    expect_invalid_header(R"({"__metadata__":{"ddim.graph":"a","other":"x","ddim.graph":"b"}})", 0,
                          {"duplicate key \"ddim.graph\"", "/__metadata__"});
  }

  TEST_CASE("invalid file: tensor entry is not an object") {
    expect_invalid_header(R"({"w":[1,2]})", 0, {"tensor \"w\"", "must be an object"});
    expect_invalid_header(R"({"w":"F32"})", 0, {"tensor \"w\"", "must be an object"});
  }

  TEST_CASE("invalid file: unknown dtype") {
    expect_invalid_header(R"({"w":{"dtype":"I8","shape":[4],"data_offsets":[0,4]}})", 4,
                          {"tensor \"w\"", "unsupported dtype \"I8\""});
    expect_invalid_header(R"({"w":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}})", 4,
                          {"tensor \"w\"", "unsupported dtype \"f32\""});
    expect_invalid_header(R"({"w":{"dtype":4,"shape":[1],"data_offsets":[0,4]}})", 4,
                          {"tensor \"w\"", "\"dtype\" must be a string"});
  }

  TEST_CASE("invalid file: missing dtype or shape or data_offsets") {
    SUBCASE("dtype") {
      expect_invalid_header(R"({"w":{"shape":[1],"data_offsets":[0,4]}})", 4, {"tensor \"w\"", "missing \"dtype\""});
    }
    SUBCASE("shape") {
      expect_invalid_header(R"({"w":{"dtype":"F32","data_offsets":[0,4]}})", 4, {"tensor \"w\"", "missing \"shape\""});
    }
    SUBCASE("data_offsets") {
      expect_invalid_header(R"({"w":{"dtype":"F32","shape":[1]}})", 4, {"tensor \"w\"", "missing \"data_offsets\""});
    }
  }

  TEST_CASE("invalid file: extra key in a tensor entry") {
    expect_invalid_header(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":1}})", 4,
                          {"tensor \"w\"", "unknown key \"extra\""});
  }

  TEST_CASE("invalid file: negative shape entry") {
    expect_invalid_header("{" + entry("w", "[2,-1]", 0, 8) + "}", 8,
                          {"tensor \"w\"", "shape[1]", "non-negative", "-1"});
  }

  TEST_CASE("invalid file: non-integer shape entry or shape not an array") {
    for (const std::string_view shape : {"[1.5]", "[2.0]", "[\"2\"]", "[true]", "[null]", "[[2]]", "[1e1]"}) {
      expect_invalid_header("{" + entry("w", shape, 0, 8) + "}", 8,
                            {"tensor \"w\"", "shape[0]", "non-negative integer"});
    }
    expect_invalid_header("{" + entry("w", "2", 0, 8) + "}", 8, {"tensor \"w\"", "\"shape\" must be an array"});
  }

  TEST_CASE("invalid file: rank above the maximum") {
    expect_invalid_header("{" + entry("w", "[1,1,1,1,1,1,1,1,1]", 0, 4) + "}", 4, {"tensor \"w\"", "rank 9"});
    CHECK(parse_file(make_file("{" + entry("w", "[1,1,1,1,1,1,1,1]", 0, 4) + "}", 4)).tensors[0].shape.size() == 8);
  }

  TEST_CASE("invalid file: size overflow from a huge shape") {
    expect_invalid_header("{" + entry("w", "[4294967296,4294967296]", 0, 4) + "}", 4, {"tensor \"w\"", "overflows"});
    expect_invalid_header("{" + entry("w", "[2305843009213693952,2]", 0, 4) + "}", 4, {"tensor \"w\"", "overflows"});
    expect_invalid_header("{" + entry("w", "[65536,65536,65536,65536,0]", 0, 0) + "}", 0,
                          {"tensor \"w\"", "overflows"});
    expect_invalid_header("{" + entry("w", "[18446744073709551615]", 0, 4) + "}", 4, {"tensor \"w\"", "too large"});
  }

  TEST_CASE("invalid file: data_offsets of the wrong length for the dtype and shape") {
    expect_invalid_header("{" + entry("w", "[2]", 0, 4) + "}", 4, {"tensor \"w\"", "needs 8 bytes"});
    expect_invalid_header("{" + entry("w", "[2]", 0, 12) + "}", 12, {"tensor \"w\"", "needs 8 bytes"});
    expect_invalid_header("{" + entry("w", "[2]", 8, 0) + "}", 8, {"tensor \"w\"", "[8, 0)"});
  }

  TEST_CASE("invalid file: data_offsets that are not two non-negative integers") {
    for (const std::string_view offsets : {"[0]", "[0,4,8]", "[-4,4]", "[0,4.0]", "[\"0\",4]", "{}", "4"}) {
      expect_invalid_header(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":)" + std::string(offsets) + "}}", 4,
                            {"tensor \"w\"", "data_offsets"});
    }
  }

  TEST_CASE("invalid file: gap between tensors") {
    expect_invalid_header("{" + entry("a", "[2]", 0, 8) + "," + entry("b", "[2]", 12, 20) + "}", 20,
                          {"gap of 4 unused bytes", "\"a\"", "\"b\""});
    expect_invalid_header("{" + entry("a", "[2]", 4, 12) + "}", 12, {"tensor \"a\"", "not 0"});
  }

  TEST_CASE("invalid file: overlapping tensors") {
    expect_invalid_header("{" + entry("a", "[2]", 0, 8) + "," + entry("b", "[2]", 4, 12) + "}", 12,
                          {"tensor \"b\" [4, 12) overlaps tensor \"a\" [0, 8)"});
    expect_invalid_header("{" + entry("a", "[2]", 0, 8) + "," + entry("b", "[2]", 0, 8) + "}", 8,
                          {"overlaps", "\"a\"", "\"b\""});
    expect_invalid_header("{" + entry("a", "[2]", 0, 8) + "," + entry("z", "[0]", 4, 4) + "}", 8,
                          {"overlaps", "\"z\""});
  }

  TEST_CASE("invalid file: tensor data beyond the end of the file") {
    expect_invalid_header("{" + entry("w", "[2]", 0, 8) + "}", 4,
                          {"tensor \"w\"", "run past the end of the data section"});
    expect_invalid_header("{" + entry("a", "[1]", 0, 4) + "," + entry("w", "[2]", 4, 12) + "}", 8,
                          {"tensor \"w\"", "truncated"});
  }

  TEST_CASE("invalid file: trailing bytes after the data") {
    expect_invalid_header("{" + entry("w", "[2]", 0, 8) + "}", 12, {"4 trailing bytes", "\"w\""});
    expect_invalid_header("{}", 3, {"3 trailing bytes", "no tensors"});
  }

  TEST_CASE("invalid file: metadata value is not a string") {
    expect_invalid_header(R"({"__metadata__":{"ok":"1","ddim.format_version":1}})", 0,
                          {"\"ddim.format_version\"", "must have a string value"});
    expect_invalid_header(R"({"__metadata__":{"k":{"x":"y"}}})", 0, {"\"k\"", "string value"});
    expect_invalid_header(R"({"__metadata__":{"k":null}})", 0, {"\"k\"", "string value"});
  }

  TEST_CASE("invalid file: __metadata__ is not an object") {
    expect_invalid_header(R"({"__metadata__":["a"]})", 0, {"\"__metadata__\" must be an object"});
    expect_invalid_header(R"({"__metadata__":"a"})", 0, {"\"__metadata__\" must be an object"});
  }

  TEST_CASE("invalid file: too many tensors") {
    const auto header_with = [](std::size_t n) {
      std::string h = "{";
      for (std::size_t i = 0; i < n; ++i) h += (i ? "," : "") + entry("t" + std::to_string(i), "[0]", 0, 0);
      return h + "}";
    };
    expect_invalid_header(header_with(df::kMaxTensors + 1), 0, {"65537 tensors", "limit of 65536"});
    CHECK(parse_file(make_file(header_with(df::kMaxTensors))).tensors.size() == df::kMaxTensors);
  }

  TEST_CASE("invalid file: empty tensor name") {
    expect_invalid_header("{" + entry("", "[1]", 0, 4) + "}", 4, {"empty name"});
  }

}  // TEST_SUITE
