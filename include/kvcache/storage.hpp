// kvcache/storage.hpp — what a number is stored as: one vocabulary for weight
// matrices and for cached keys and values, and one codec per type.
//
//   type   bytes per row of n values         used by
//   ------------------------------------------------------------------------
//   f32    n × sizeof(T): T itself             weights, caches (the default)
//   bf16   n × 2: float32's top 16 bits        weights, caches
//   int8   n + 1: int8 values, a 1-byte scale  caches (one scale per row)
//   f16    n × 2: IEEE binary16                weights
//   q8_0   n / 32 × 34: per block of 32 values weights (ggml's block_q8_0;
//          an f16 scale d, then 32 int8 q;      n a multiple of 32)
//          value = d · q
//   q4_0   n / 32 × 18: per block of 32 values weights (ggml's block_q4_0;
//          an f16 scale d, then 16 bytes of     n a multiple of 32)
//          4-bit q; value = d · (q − 8)
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
  f16,   // weights only
  q8_0,  // weights only
  q4_0,  // weights only
};

// The names each use of the vocabulary had before it was one.
using KVType = StorageType;
using WeightType = StorageType;

struct StorageInfo {
  const char* name;
  std::size_t value_bytes;  // bytes per block of values; 0 for f32: sizeof(T)
  std::size_t row_extra;    // bytes per row beyond the values (int8's scale)
  std::size_t block;        // values per block (q8_0, q4_0: 32; others 1)
};

inline const StorageInfo* find_storage_info(StorageType type) {
  static constexpr std::array<StorageInfo, 6> table{{{"f32", 0, 0, 1},
                                                     {"bf16", 2, 0, 1},
                                                     {"int8", 1, 1, 1},
                                                     {"f16", 2, 0, 1},
                                                     {"q8_0", 34, 0, 32},
                                                     {"q4_0", 18, 0, 32}}};
  const auto i = static_cast<std::size_t>(type);
  return i < table.size() ? &table[i] : nullptr;
}

// Throws std::invalid_argument naming `what` when `type` is not one of the
// enumerators (a cast from a bad integer).
inline const StorageInfo& storage_info(StorageType type, const char* what = "storage type") {
  if (const StorageInfo* info = find_storage_info(type)) return *info;
  throw std::invalid_argument(std::string("kvcache: unknown ") + what + " " +
                              std::to_string(static_cast<int>(type)) + " (0 f32, 1 bf16, 2 int8, 3 f16, 4 q8_0, 5 q4_0)");
}

// "f32" (also for KVType::full), "bf16", "int8", "f16", "q8_0", "q4_0"; "unknown" for
// a bad value.
inline const char* to_string(StorageType type) {
  const StorageInfo* info = find_storage_info(type);
  return info != nullptr ? info->name : "unknown";
}

// Bytes a row of n values of T takes when stored as `type`. Throws
// std::invalid_argument when n is not a whole number of blocks (q8_0, q4_0: 32).
template <typename T>
std::size_t row_bytes(StorageType type, std::size_t n) {
  const StorageInfo& info = storage_info(type);
  if (n % info.block != 0)
    throw std::invalid_argument(std::string("kvcache: a ") + info.name + " row holds whole blocks of " +
                                std::to_string(info.block) + " values; " + std::to_string(n) + " values are not");
  return n / info.block * (info.value_bytes == 0 ? sizeof(T) : info.value_bytes) + info.row_extra;
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

// v as float, rounded to odd (truncate, and set the last bit when anything
// was cut) when T is wider: float keeps at least 13 more bits than bfloat16
// and f16, so a second rounding from it lands where rounding v directly
// would have.
template <typename T>
float to_float_rounded_to_odd(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    if (std::isnan(v)) return std::numeric_limits<float>::quiet_NaN();
    float f = static_cast<float>(v);
    if (std::isinf(f) && !std::isinf(v)) f = std::copysign(std::numeric_limits<float>::max(), f);
    if (static_cast<T>(f) != v) {
      if (std::fabs(static_cast<T>(f)) > std::fabs(v)) f = std::nextafter(f, 0.0f);
      f = bits_float(float_bits(f) | 1u);
    }
    return f;
  }
}

// Any T (through to_float_rounded_to_odd).
template <typename T>
std::uint16_t to_bf16(T v) {
  return float_to_bf16(to_float_rounded_to_odd(v));
}

// ---- f16: IEEE binary16 (1 sign, 5 exponent, 10 fraction bits) ------------

// Exact: every binary16 value is a float.
inline float from_f16(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1Fu, fraction = h & 0x3FFu;
  if (exponent == 0) {  // zero or subnormal: fraction · 2^-24
    const float v = static_cast<float>(fraction) * 0x1p-24f;
    return sign != 0 ? -v : v;
  }
  if (exponent == 31) return bits_float(sign | 0x7F800000u | fraction << 13);  // inf, NaN (payload kept)
  return bits_float(sign | (exponent + 112) << 23 | fraction << 13);
}

// Round to nearest, ties to even, as F16C's vcvtps2ph: values from 65520
// (half-way past the largest, 65504) become ±inf; below 2^-14 the result is
// subnormal; a NaN stays a NaN, made quiet, its payload's top bits kept.
inline std::uint16_t float_to_f16(float f) {
  const std::uint32_t u = float_bits(f);
  const auto sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return static_cast<std::uint16_t>(sign | 0x7E00u | ((a >> 13) & 0x3FFu));
  if (a >= 0x477FF000u) return static_cast<std::uint16_t>(sign | 0x7C00u);
  if (a < 0x38800000u) {  // |f| < 2^-14: a multiple of 2^-24
    const std::uint32_t exponent = a >> 23;
    if (exponent < 102) return sign;  // below 2^-25: rounds to 0
    const std::uint32_t mantissa = (a & 0x7FFFFFu) | 0x800000u, shift = 126 - exponent;  // 14 … 24
    std::uint32_t r = mantissa >> shift;
    const std::uint32_t rest = mantissa & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (r & 1u) != 0)) ++r;
    return static_cast<std::uint16_t>(sign | r);
  }
  const std::uint32_t rebased = a - (112u << 23);
  return static_cast<std::uint16_t>(sign | ((rebased + 0xFFFu + ((rebased >> 13) & 1u)) >> 13));
}

// Any T (through to_float_rounded_to_odd).
template <typename T>
std::uint16_t to_f16(T v) {
  return float_to_f16(to_float_rounded_to_odd(v));
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


// ---- q8_0: ggml's block of 32 int8 values with one f16 scale --------------
//
// A block is 34 bytes: the scale d as f16 (little-endian), then q[0 … 31];
// value j is d · q[j]. Two quantizers, as in ggml:
//   weights (quantize_q8_0, as ggml's quantize_row_q8_0_ref and the GGUF
//     files): d = max|x| / 127 in float; q = round(x · (1/d)) with 1/d of
//     the float d (not of its f16 rounding), ties away from zero;
//   activations (quantize_q8_0_block_act, as ggml's AVX quantize_row_q8_0,
//     which llama.cpp runs on the inputs of a q8_0 product): the same d, but
//     q = x · (127 / max|x|) rounded to nearest even.
// All q are 0 when max|x| = 0. NaN inputs count as 0 (ggml leaves them
// undefined); a scale past f16's range is stored as inf, as ggml stores it.
constexpr std::size_t kQ8Block = 32, kQ8BlockBytes = 34;

inline float q8_0_max_abs(const float* x) {
  float max_abs = 0.0f;
  for (std::size_t j = 0; j < kQ8Block; ++j) {
    const float a = std::fabs(x[j]);
    if (a > max_abs) max_abs = a;  // skips NaN
  }
  return max_abs;
}

inline std::int8_t q8_0_clamped(float v) {  // v already an integer, or NaN
  return v == v ? static_cast<std::int8_t>(std::clamp(v, -127.0f, 127.0f)) : std::int8_t{0};
}

// One block of weights: returns d as f16 and writes q.
inline std::uint16_t quantize_q8_0_block(const float* x, std::int8_t* q) {
  const float d = q8_0_max_abs(x) / 127.0f;
  const float inv_d = d != 0.0f ? 1.0f / d : 0.0f;
  for (std::size_t j = 0; j < kQ8Block; ++j) q[j] = q8_0_clamped(std::round(x[j] * inv_d));
  return float_to_f16(d);
}

// One block of activations (requires the default rounding mode, to nearest
// even, as the SIMD instruction ggml uses).
inline std::uint16_t quantize_q8_0_block_act(const float* x, std::int8_t* q) {
  const float max_abs = q8_0_max_abs(x);
  const float scale = max_abs != 0.0f ? 127.0f / max_abs : 0.0f;
  for (std::size_t j = 0; j < kQ8Block; ++j) q[j] = q8_0_clamped(std::nearbyint(x[j] * scale));
  return float_to_f16(max_abs / 127.0f);
}

// A row of n values of T (n a multiple of 32) into n / 32 blocks at `out`;
// a wider T is rounded to float first (to odd: see to_float_rounded_to_odd).
template <typename T>
void quantize_q8_0(const T* x, std::size_t n, unsigned char* out) {
  float block[kQ8Block];
  for (std::size_t b = 0; b < n / kQ8Block; ++b, out += kQ8BlockBytes) {
    for (std::size_t j = 0; j < kQ8Block; ++j) block[j] = to_float_rounded_to_odd(x[b * kQ8Block + j]);
    const std::uint16_t d = quantize_q8_0_block(block, reinterpret_cast<std::int8_t*>(out + 2));
    out[0] = static_cast<unsigned char>(d & 0xFFu);
    out[1] = static_cast<unsigned char>(d >> 8);
  }
}

inline float q8_0_scale(const unsigned char* block) {
  return from_f16(static_cast<std::uint16_t>(block[0] | block[1] << 8));
}

// Values [first, first + count) of a row of 32-value blocks of
// block_bytes, each an f16 scale d then its values, as T: d · value(block,
// j) in float (exact to float's rounding, as ggml's dequantize_row_q8_0
// and dequantize_row_q4_0).
template <typename T, typename Value>
void dequantize_blocks(const unsigned char* row, std::size_t block_bytes, std::size_t first, std::size_t count,
                       T* out, Value value) {
  for (std::size_t i = first; i < first + count;) {
    const unsigned char* block = row + i / kQ8Block * block_bytes;
    const float d = q8_0_scale(block);
    const std::size_t end = std::min(first + count, (i / kQ8Block + 1) * kQ8Block);
    for (; i < end; ++i) *out++ = static_cast<T>(d * static_cast<float>(value(block, i % kQ8Block)));
  }
}

// Values [first, first + count) of a q8_0 row as T: d · q.
template <typename T>
void dequantize_q8_0(const unsigned char* row, std::size_t first, std::size_t count, T* out) {
  dequantize_blocks(row, kQ8BlockBytes, first, count, out, [](const unsigned char* block, std::size_t j) {
    return static_cast<int>(static_cast<std::int8_t>(block[2 + j]));
  });
}

// ---- q4_0: ggml's block of 32 4-bit values with one f16 scale -------------
//
// A block is 18 bytes: the scale d as f16 (little-endian), then 16 bytes;
// byte j holds q[j] in its low nibble and q[j + 16] in its high one; value
// j is d · (q[j] − 8). The quantizer is ggml's quantize_row_q4_0_ref: m,
// the value of largest magnitude with its sign (the first of equals), gives
// d = m / −8 in float, so m itself becomes q = 0 (−8 · d); with 1/d of the
// float d, q = min(15, trunc(x · (1/d) + 8.5)). All q are 8 when m = 0.
// NaN inputs count as 0 (ggml leaves them undefined); a scale past f16's
// range is stored as inf, as ggml stores it.
constexpr std::size_t kQ4BlockBytes = 18;

inline std::uint8_t q4_0_nibble(float v) {  // v = x · (1/d) + 8.5, or NaN
  return v == v ? static_cast<std::uint8_t>(std::min(15.0f, std::max(0.0f, v))) : std::uint8_t{8};
}

// One block of weights: returns d as f16 and writes the 16 bytes of q.
inline std::uint16_t quantize_q4_0_block(const float* x, unsigned char* qs) {
  float max_abs = 0.0f, max = 0.0f;
  for (std::size_t j = 0; j < kQ8Block; ++j)
    if (std::fabs(x[j]) > max_abs) max_abs = std::fabs(x[j]), max = x[j];  // skips NaN
  const float d = max / -8.0f;
  const float inv_d = d != 0.0f ? 1.0f / d : 0.0f;
  for (std::size_t j = 0; j < kQ8Block / 2; ++j)
    qs[j] = static_cast<unsigned char>(q4_0_nibble(x[j] * inv_d + 8.5f) |
                                       q4_0_nibble(x[j + kQ8Block / 2] * inv_d + 8.5f) << 4);
  return float_to_f16(d);
}

// A row of n values of T (n a multiple of 32) into n / 32 blocks at `out`;
// a wider T is rounded to float first (to odd: see to_float_rounded_to_odd).
template <typename T>
void quantize_q4_0(const T* x, std::size_t n, unsigned char* out) {
  float block[kQ8Block];
  for (std::size_t b = 0; b < n / kQ8Block; ++b, out += kQ4BlockBytes) {
    for (std::size_t j = 0; j < kQ8Block; ++j) block[j] = to_float_rounded_to_odd(x[b * kQ8Block + j]);
    const std::uint16_t d = quantize_q4_0_block(block, out + 2);
    out[0] = static_cast<unsigned char>(d & 0xFFu);
    out[1] = static_cast<unsigned char>(d >> 8);
  }
}

// Value j (0 … 31) of a q4_0 block, q − 8 (−8 … 7).
inline int q4_0_value(const unsigned char* block, std::size_t j) {
  const unsigned char byte = block[2 + j % (kQ8Block / 2)];
  return (j < kQ8Block / 2 ? byte & 0x0F : byte >> 4) - 8;
}

// Values [first, first + count) of a q4_0 row as T: d · (q − 8).
template <typename T>
void dequantize_q4_0(const unsigned char* row, std::size_t first, std::size_t count, T* out) {
  dequantize_blocks(row, kQ4BlockBytes, first, count, out, q4_0_value);
}

}  // namespace detail
}  // namespace kvcache
