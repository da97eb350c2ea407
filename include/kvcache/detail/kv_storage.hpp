// kvcache/detail/kv_storage.hpp — the compact number formats a KVCache can
// store keys and values in, and their conversions. Not API.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace kvcache {
namespace detail {

// ---- bfloat16: the top 16 bits of a float32 ---------------------------------

// Rounds to nearest, ties to even; NaN stays NaN (quiet), infinities stay.
inline std::uint16_t to_bf16(float x) {
  std::uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x0040u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>(bits >> 16);
}

inline float from_bf16(std::uint16_t h) {
  const std::uint32_t bits = static_cast<std::uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// ---- int8 with one scale per token and head --------------------------------
//
// A row of d_k values x is stored as q = round(x / s), |q| ≤ 127, with the
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
