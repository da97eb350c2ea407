// kvcache/storage.hpp — what a number is stored as: one vocabulary for weight
// matrices and for cached keys and values, and one codec per type.
//
//   type   bytes per row of n values         used by
//   ------------------------------------------------------------------------
//   f32    n × sizeof(T): T itself             weights, caches (the default)
//   bf16   n × 2: float32's top 16 bits        weights, caches
//   int8   n + 1: int8 values, a 1-byte scale  caches (one scale per row)
//
// Computation always runs in T; a compact type is decoded a row or a tile at
// a time where it is read. Adding a type is one enumerator, one row in
// storage_info() and its codec below, plus the kernels that read it.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace kvcache {

enum class StorageType {
  f32,       // T itself (float32 for the usual Decoder<float>)
  full = f32,  // the name caches used for it first; the same type
  bf16,
  int8,
};

// The names each use of the vocabulary had before it was one.
using KVType = StorageType;
using WeightType = StorageType;

struct StorageInfo {
  const char* name;
  std::size_t value_bytes;  // 0 for f32: sizeof(T)
  std::size_t row_extra;    // bytes per row beyond the values (int8's scale)
};

inline const StorageInfo* find_storage_info(StorageType type) {
  static constexpr std::array<StorageInfo, 3> table{{{"f32", 0, 0}, {"bf16", 2, 0}, {"int8", 1, 1}}};
  const auto i = static_cast<std::size_t>(type);
  return i < table.size() ? &table[i] : nullptr;
}

// Throws std::invalid_argument naming `what` when `type` is not one of the
// enumerators (a cast from a bad integer).
inline const StorageInfo& storage_info(StorageType type, const char* what = "storage type") {
  if (const StorageInfo* info = find_storage_info(type)) return *info;
  throw std::invalid_argument(std::string("kvcache: unknown ") + what + " " +
                              std::to_string(static_cast<int>(type)) + " (0 f32, 1 bf16, 2 int8)");
}

// "f32" (also for KVType::full), "bf16", "int8"; "unknown" for a bad value.
inline const char* to_string(StorageType type) {
  const StorageInfo* info = find_storage_info(type);
  return info != nullptr ? info->name : "unknown";
}

// Bytes a row of n values of T takes when stored as `type`.
template <typename T>
std::size_t row_bytes(StorageType type, std::size_t n) {
  const StorageInfo& info = storage_info(type);
  return n * (info.value_bytes == 0 ? sizeof(T) : info.value_bytes) + info.row_extra;
}

namespace detail {

// ---- bf16: the top 16 bits of a float32 --------------------------------------

inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Exact: a bfloat16 is a float32 whose low 16 bits are zero.
inline float from_bf16(std::uint16_t h) { return bits_float(static_cast<std::uint32_t>(h) << 16); }

// Round to nearest, ties to even. A NaN stays a (quiet) NaN, whose top bits
// could otherwise read as infinity; values past the largest bfloat16 become
// ±inf.
inline std::uint16_t float_to_bf16(float f) {
  const std::uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((u >> 16) | 0x0040u);
  const std::uint32_t round = 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>((u + round) >> 16);
}

// Any T. A wider T goes through float rounded to odd (truncate, and set the
// last bit when anything was cut): float keeps 16 more bits than bfloat16, so
// the second rounding then lands where rounding v directly would have.
template <typename T>
std::uint16_t to_bf16(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return float_to_bf16(v);
  } else {
    if (std::isnan(v)) return float_to_bf16(std::numeric_limits<float>::quiet_NaN());
    float f = static_cast<float>(v);
    if (std::isinf(f) && !std::isinf(v)) f = std::copysign(std::numeric_limits<float>::max(), f);
    if (static_cast<T>(f) != v) {
      if (std::fabs(static_cast<T>(f)) > std::fabs(v)) f = std::nextafter(f, 0.0f);
      f = bits_float(float_bits(f) | 1u);
    }
    return float_to_bf16(f);
  }
}

// ---- int8 with one scale per row ------------------------------------------
//
// A row of n values x is stored as q = round(x / s), |q| ≤ 127, with the
// scale s = max|x| / 127 rounded up to the next of 256 logarithmically spaced
// values 2^((c − 200) / 8), c in [0, 255]. The scale then costs one byte
// instead of four: a row of d_k = 8 values takes 9 bytes (28% of float32's
// 32), and rounding the scale up wastes at most 2^(1/8) − 1 = 9% of the
// int8 range. Scales span 2^-25 … 2^6.9, so rows with max|x| up to ~15,000
// are represented without clipping.
constexpr int kInt8ScaleBias = 200;

inline const std::array<float, 256>& int8_scales() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int c = 0; c < 256; ++c) t[static_cast<std::size_t>(c)] = std::exp2(static_cast<float>(c - kInt8ScaleBias) / 8.0f);
    return t;
  }();
  return table;
}

// The smallest scale code whose scale covers max_abs with 127 steps.
inline std::uint8_t int8_scale_code(float max_abs) {
  if (!(max_abs > 0.0f)) return 0;  // all zeros (or NaN: stored as 0)
  const auto& s = int8_scales();
  if (!(max_abs <= s[255] * 127.0f)) return 255;  // clip (or infinity)
  int c = static_cast<int>(std::ceil(8.0f * std::log2(max_abs / 127.0f))) + kInt8ScaleBias;
  c = std::clamp(c, 0, 255);
  while (c < 255 && s[static_cast<std::size_t>(c)] * 127.0f < max_abs) ++c;  // log2's rounding
  while (c > 0 && s[static_cast<std::size_t>(c - 1)] * 127.0f >= max_abs) --c;
  return static_cast<std::uint8_t>(c);
}

// Quantizes n values; returns the scale code.
template <typename T>
std::uint8_t quantize_int8(const T* x, std::size_t n, std::int8_t* q) {
  float max_abs = 0.0f;
  for (std::size_t i = 0; i < n; ++i) {
    const float a = std::fabs(static_cast<float>(x[i]));
    if (a == a) max_abs = std::max(max_abs, a);  // skip NaN
  }
  const std::uint8_t code = int8_scale_code(max_abs);
  const float inv_scale = 1.0f / int8_scales()[code];
  for (std::size_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(x[i]) * inv_scale;
    q[i] = v == v ? static_cast<std::int8_t>(std::clamp(std::nearbyint(v), -127.0f, 127.0f)) : std::int8_t{0};
  }
  return code;
}

}  // namespace detail
}  // namespace kvcache
