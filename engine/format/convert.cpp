// Tensor data conversions: little-endian F32/F16/BF16/F64 bytes to float/double and back, and the
// IEEE binary16 / bfloat16 <-> binary32 conversions (exact widening; narrowing rounds to nearest,
// ties to even, with subnormals, infinities and NaN handled). Bytes are assembled with shifts, so
// the code is correct whatever the host byte order, and values reach floats through bit_cast.
#include <bit>
#include <cstdint>
#include <string>

#include "ddim/error.hpp"
#include "format/container.hpp"

namespace ddim::format {
namespace {

template <typename U>
U load_le(const std::uint8_t* p) noexcept {
  U v = 0;
  for (std::size_t i = 0; i < sizeof(U); ++i) v = static_cast<U>(v | (static_cast<U>(p[i]) << (8 * i)));
  return v;
}

template <typename U>
void store_le(U v, std::uint8_t* p) noexcept {
  for (std::size_t i = 0; i < sizeof(U); ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}

// Checks that raw and out match the tensor's shape and dtype (a caller error, not a file error).
std::size_t checked_count(const TensorInfo& info, std::size_t raw_bytes, std::size_t out_count) {
  const auto n = static_cast<std::uint64_t>(info.numel());
  const std::uint64_t size = dtype_size(info.dtype);
  if (size == 0)
    throw Error(ErrorCode::InvalidArgument, "converting tensor " + detail::quote_name(info.name) + ": unknown dtype");
  if (n != out_count || n > raw_bytes / size || n * size != raw_bytes) {
    throw Error(ErrorCode::InvalidArgument,
                "converting tensor " + detail::quote_name(info.name) + ": expected " + std::to_string(n) +
                    " elements of " + to_string(info.dtype) + " (" + std::to_string(size) + " bytes each), got " +
                    std::to_string(raw_bytes) + " bytes and room for " + std::to_string(out_count) + " values");
  }
  return static_cast<std::size_t>(n);
}

// Widens every element; F16/BF16/F32 -> double is exact, F64 -> float rounds to nearest.
template <typename Out>
void convert(const TensorInfo& info, std::span<const std::uint8_t> raw, std::span<Out> out) {
  const std::size_t n = checked_count(info, raw.size(), out.size());
  const std::uint8_t* p = raw.data();
  switch (info.dtype) {
    case DType::F32:
      for (std::size_t i = 0; i < n; ++i)
        out[i] = static_cast<Out>(std::bit_cast<float>(load_le<std::uint32_t>(p + 4 * i)));
      return;
    case DType::F64:
      for (std::size_t i = 0; i < n; ++i)
        out[i] = static_cast<Out>(std::bit_cast<double>(load_le<std::uint64_t>(p + 8 * i)));
      return;
    case DType::F16:
      for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<Out>(half_to_float(load_le<std::uint16_t>(p + 2 * i)));
      return;
    case DType::BF16:
      for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<Out>(bf16_to_float(load_le<std::uint16_t>(p + 2 * i)));
      return;
  }
  throw Error(ErrorCode::Internal, "converting tensor " + detail::quote_name(info.name) + ": unknown dtype");
}

// Rounds the unsigned value v / 2^shift to the nearest integer, ties to even (1 <= shift < 32).
std::uint32_t shift_round_even(std::uint32_t v, unsigned shift) noexcept {
  const std::uint32_t q = v >> shift;
  const std::uint32_t rem = v & ((1u << shift) - 1u);
  const std::uint32_t half = 1u << (shift - 1);
  return q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
}

}  // namespace

float half_to_float(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1Fu;
  const std::uint32_t mant = h & 0x3FFu;
  if (exp == 0x1F) return std::bit_cast<float>(sign | 0x7F800000u | (mant << 13));  // inf, NaN (payload kept)
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24, exact in binary32.
    const float magnitude = static_cast<float>(mant) * 0x1p-24f;
    return std::bit_cast<float>(sign | std::bit_cast<std::uint32_t>(magnitude));
  }
  return std::bit_cast<float>(sign | ((exp + (127 - 15)) << 23) | (mant << 13));
}

float bf16_to_float(std::uint16_t b) noexcept { return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16); }

std::uint16_t float_to_half(float f) noexcept {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(f);
  const auto sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  const std::uint32_t abs = bits & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) {  // NaN: keep the top payload bits, force the quiet bit so it stays a NaN
    return static_cast<std::uint16_t>(sign | 0x7E00u | ((abs >> 13) & 0x3FFu));
  }
  // 0x477FF000 = 65520, halfway between the largest half 65504 (odd mantissa) and 65536: ties go up.
  if (abs >= 0x477FF000u) return static_cast<std::uint16_t>(sign | 0x7C00u);
  const std::uint32_t exp = abs >> 23;
  if (exp < 127 - 14) {               // below 2^-14: a half subnormal (or zero) = round(|f| / 2^-24)
    if (exp < 127 - 25) return sign;  // |f| < 2^-25: rounds to zero (2^-25 itself is handled below)
    const std::uint32_t mant = (abs & 0x7FFFFFu) | 0x800000u;  // |f| = mant * 2^(exp - 150)
    // |f| / 2^-24 = mant / 2^(126 - exp); 126 - exp lies in [14, 24]. A result of 0x400 is the
    // smallest normal half, which is the right encoding.
    return static_cast<std::uint16_t>(sign | shift_round_even(mant, 126 - exp));
  }
  // Normal: rebias the exponent, round the 23-bit mantissa to 10 bits. A carry out of the mantissa
  // correctly increments the exponent.
  const std::uint32_t rebased = ((exp - (127 - 15)) << 23) | (abs & 0x7FFFFFu);
  return static_cast<std::uint16_t>(sign | shift_round_even(rebased, 13));
}

std::uint16_t float_to_bf16(float f) noexcept {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(f);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) {  // NaN: truncate, force the quiet bit
    return static_cast<std::uint16_t>((bits >> 16) | 0x0040u);
  }
  // Round to nearest even on the low 16 bits; overflow carries into the exponent, up to infinity.
  const std::uint32_t rounded = bits + 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>(rounded >> 16);
}

void convert_to_f32(const TensorInfo& info, std::span<const std::uint8_t> raw, std::span<float> out) {
  convert(info, raw, out);
}

void convert_to_f64(const TensorInfo& info, std::span<const std::uint8_t> raw, std::span<double> out) {
  convert(info, raw, out);
}

TensorData make_tensor_f32(std::string name, std::vector<std::int64_t> shape, std::span<const float> values,
                           DType store_as) {
  std::uint64_t n = 0;
  if (!detail::checked_numel(shape, n) || n != values.size()) {
    throw Error(ErrorCode::InvalidArgument, "make_tensor_f32: tensor " + detail::quote_name(name) + " has " +
                                                std::to_string(values.size()) +
                                                " values, which does not match its shape");
  }
  TensorData t;
  t.dtype = store_as;
  const std::size_t size = dtype_size(store_as);
  if (size == 0)
    throw Error(ErrorCode::InvalidArgument, "make_tensor_f32: unknown dtype for " + detail::quote_name(name));
  t.bytes.resize(values.size() * size);
  std::uint8_t* p = t.bytes.data();
  for (std::size_t i = 0; i < values.size(); ++i) {
    switch (store_as) {
      case DType::F32:
        store_le(std::bit_cast<std::uint32_t>(values[i]), p + 4 * i);
        break;
      case DType::F64:
        store_le(std::bit_cast<std::uint64_t>(static_cast<double>(values[i])), p + 8 * i);
        break;
      case DType::F16:
        store_le(float_to_half(values[i]), p + 2 * i);
        break;
      case DType::BF16:
        store_le(float_to_bf16(values[i]), p + 2 * i);
        break;
    }
  }
  t.name = std::move(name);
  t.shape = std::move(shape);
  return t;
}

}  // namespace ddim::format
