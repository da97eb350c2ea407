// kvcache/detail/quant.hpp — linear layers over f16, q8_0 and q4_0 weights,
// computed from their stored bytes as llama.cpp's CPU backend (ggml)
// computes them. Not API.
//
// ggml first converts a product's input x to the weight type's "vec_dot"
// type, then multiplies in that type:
//   f16 weights:  x rounded to f16; the f16 · f16 products (exact in float)
//                 summed in float by 4 × 16 lanes with fused multiply-adds,
//                 then reduced as ggml_vec_dot_f16 does on AVX-512 (the
//                 zen4 build llama.cpp picks on this machine); a tail of
//                 n % 64 values is added in double.
//   q8_0 weights: x quantized to q8_0 blocks (quantize_q8_0_block_act), then
//                 per block an exact int8 · int8 sum in 8 lanes of 4
//                 products, each lane converted to float and accumulated as
//                 acc = fma(d_w · d_x, lane, acc) block after block, and the
//                 8 lanes reduced as ggml_vec_dot_q8_0_q8_0 (AVX2) does.
//   q4_0 weights: x quantized to q8_0 blocks as for q8_0; then, as ggml on
//                 an AVX2 CPU: a matrix of a multiple of 8 rows (which ggml
//                 repacks: q4_0_8x8_q8_0) per block an exact int32 sum of
//                 the 32 products (q − 8) · x and per row acc = fma(sum,
//                 d_w · d_x, acc), block after block; any other (which ggml
//                 leaves as it is: ggml_vec_dot_q4_0_q8_0) q8_0's 8 lanes
//                 and order, q − 8 for the weights' int8 values.
// Decode (m < kFewTokens) reproduces those sums bit for bit, with AVX-512 /
// F16C / AVX-VNNI / AVX2 where the build has them and a portable loop
// otherwise (same bits: the same lanes, the same fused multiply-adds).
// Prefill (m >= kFewTokens) rounds or quantizes x the same way and forms the
// same products, summed in another order:
//   q4_0: rows a multiple of 8 on AMX (16 rows at a time unpacked once to
//     int8 q − 8 and reused by every tile of tokens), whose per-block sums
//     and order are decode's: decode's bits; else decode's kernel for every
//     token.
//   AMX (a CPU with the tile unit, on Linux): q8_0 per block an exact int32
//     sum over 16 rows × 16 tokens, then acc = fma(d_w · d_x, sum, acc);
//     bf16 and f16 (each split exactly into two bfloat16s) on the unit's
//     bfloat16 dot product. Each Y[t, i] depends only on row i and token t.
//   else q8_0 with AVX-512 VNNI: 4 rows × 4 tokens at once in int8, in
//     decode's lanes and order: decode's bits.
//   else tiles of W widened to T (vector conversions), multiplied by Eigen.
//
// bfloat16 weights stay on gemv.hpp's kernel, which differs from llama.cpp
// on purpose: ggml rounds x to bfloat16 (8 bits), kvcache keeps x as float
// (x = x_hi + x_lo, two bfloat16 products per weight), so its bf16 results
// are closer to the float32 model's. Except bf16 weights in a GGUF file's
// memory (WeightMatrix::external()): those compute here as llama.cpp does,
// x rounded to bfloat16, the products (exact in float) summed as
// ggml_vec_dot_bf16 sums them with AVX512-BF16's dot instruction (bf16_row).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "../config.hpp"
#include "../storage.hpp"
#include "../weights.hpp"
#include "ggml_math.hpp"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__F16C__) && defined(__FMA__))
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
#define KVCACHE_QUANT_F16_AVX512 1
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define KVCACHE_QUANT_F16_AVX2 1
#endif
// AMX (Sapphire Rapids' tile unit): used where the build has it and Linux
// lends the process its registers (amx_usable).
#if defined(__linux__) && defined(__AVX512F__) && (defined(__AMX_INT8__) || defined(__AMXINT8__)) && \
    (defined(__AMX_TILE__) || defined(__AMXTILE__)) && (defined(__AMX_BF16__) || defined(__AMXBF16__))
#define KVCACHE_QUANT_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define KVCACHE_QUANT_Q8_AVX2 1
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define KVCACHE_QUANT_DPBUSD(a, u, w) _mm256_dpbusd_epi32(a, u, w)
#elif defined(__AVXVNNI__)
#define KVCACHE_QUANT_DPBUSD(a, u, w) _mm256_dpbusd_avx_epi32(a, u, w)
#endif
#endif
#if defined(KVCACHE_QUANT_Q8_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512VNNI__) && defined(__F16C__)
#define KVCACHE_QUANT_Q8_AVX512 1
#endif

namespace kvcache {
namespace detail {

// ============================================================================
// f16: one row · K tokens
// ============================================================================

// The 64 lanes of ggml_vec_dot_f16's four AVX-512 accumulators, reduced:
// lanes (l) + (l + 32), (l + 16) + (l + 48), then those two; 16 → 8 → 4 → 2
// → 1 by halves (fold_lanes, as _mm512_reduce_add_ps); then the tail, in
// double.
inline float f16_reduce(const float* lanes, const std::uint16_t* w, const float* x, Eigen::Index j, Eigen::Index n) {
  float a[64];
  std::copy(lanes, lanes + 64, a);
  fold_lanes(a, 64, 1);
  double sum = a[0];
  for (; j < n; ++j) sum += static_cast<double>(from_f16(w[j]) * x[j]);  // exact: two 11-bit significands
  return static_cast<float>(sum);
}

// y_k = w · x_k for K tokens: w one row of n f16 values, x_k already f16
// values (as float). Portable: the same lanes and fused multiply-adds.
template <int K>
void f16_row_portable(const std::uint16_t* w, Eigen::Index n, const float* const* x, float* y) {
  float lanes[K][64] = {};
  Eigen::Index j = 0;
  for (; j + 64 <= n; j += 64)
    for (int l = 0; l < 64; ++l) {
      const float w_l = from_f16(w[j + l]);
      for (int k = 0; k < K; ++k) lanes[k][l] = std::fma(w_l, x[k][j + l], lanes[k][l]);
    }
  for (int k = 0; k < K; ++k) y[k] = f16_reduce(lanes[k], w, x[k], j, n);
}

template <int K>
void f16_row(const std::uint16_t* w, Eigen::Index n, const float* const* x, float* y) {
#if defined(KVCACHE_QUANT_F16_AVX512)
  __m512 acc[K][4];
  for (int k = 0; k < K; ++k) acc[k][0] = acc[k][1] = acc[k][2] = acc[k][3] = _mm512_setzero_ps();
  Eigen::Index j = 0;
  for (; j + 64 <= n; j += 64)
    for (int u = 0; u < 4; ++u) {
      const __m512 w_u = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j + 16 * u)));
      for (int k = 0; k < K; ++k) acc[k][u] = _mm512_fmadd_ps(w_u, _mm512_loadu_ps(x[k] + j + 16 * u), acc[k][u]);
    }
  for (int k = 0; k < K; ++k) {
    alignas(64) float lanes[64];
    for (int u = 0; u < 4; ++u) _mm512_store_ps(lanes + 16 * u, acc[k][u]);
    y[k] = f16_reduce(lanes, w, x[k], j, n);
  }
#elif defined(KVCACHE_QUANT_F16_AVX2)
  __m256 acc[K][8];
  for (int k = 0; k < K; ++k)
    for (int u = 0; u < 8; ++u) acc[k][u] = _mm256_setzero_ps();
  Eigen::Index j = 0;
  for (; j + 64 <= n; j += 64)
    for (int u = 0; u < 8; ++u) {
      const __m256 w_u = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j + 8 * u)));
      for (int k = 0; k < K; ++k) acc[k][u] = _mm256_fmadd_ps(w_u, _mm256_loadu_ps(x[k] + j + 8 * u), acc[k][u]);
    }
  for (int k = 0; k < K; ++k) {
    alignas(32) float lanes[64];
    for (int u = 0; u < 8; ++u) _mm256_store_ps(lanes + 8 * u, acc[k][u]);
    y[k] = f16_reduce(lanes, w, x[k], j, n);
  }
#else
  f16_row_portable<K>(w, n, x, y);
#endif
}

// bf16 weights, x rounded to bf16 (as float), as ggml_vec_dot_bf16 on a CPU
// with AVX512-BF16 (its zen4 and Sapphire Rapids builds): per 64 values two
// accumulators of 16 lanes, the first taking values 0-31, the second 32-63,
// lane l values 2l + 1 then 2l of its 32 through VDPBF16PS's two fused
// multiply-adds (subnormal inputs and results flushed to zero); each
// accumulator summed by halves, the two added in double, then the tail's
// products (exact in float) one at a time in double.
inline float flush_subnormal(float v) { return std::fabs(v) < 0x1p-126f ? std::copysign(0.0f, v) : v; }

// One of VDPBF16PS's steps: acc + w · x, rounded once, subnormals flushed.
inline float dpbf16_step(float acc, float w, float x) {
  return flush_subnormal(std::fma(flush_subnormal(w), flush_subnormal(x), acc));
}

inline float bf16_finish(float c0, float c1, const std::uint16_t* w, const float* x, Eigen::Index j, Eigen::Index n) {
  double sum = 0.0;
  sum += static_cast<double>(c0);
  sum += static_cast<double>(c1);
  for (; j < n; ++j) sum += static_cast<double>(from_bf16(w[j]) * x[j]);  // exact: two 8-bit significands
  return static_cast<float>(sum);
}

template <int K>
void bf16_row_portable(const std::uint16_t* w, Eigen::Index n, const float* const* x, float* y) {
  float c[K][2][16] = {};
  Eigen::Index j = 0;
  for (; j + 64 <= n; j += 64)
    for (Eigen::Index h = 0; h < 2; ++h)
      for (Eigen::Index l = 0; l < 16; ++l) {
        const Eigen::Index i = j + 32 * h + 2 * l;
        const float w_odd = from_bf16(w[i + 1]), w_even = from_bf16(w[i]);
        for (int k = 0; k < K; ++k)
          c[k][h][l] = dpbf16_step(dpbf16_step(c[k][h][l], w_odd, x[k][i + 1]), w_even, x[k][i]);
      }
  for (int k = 0; k < K; ++k) {
    fold_lanes(c[k][0], 16, 1);
    fold_lanes(c[k][1], 16, 1);
    y[k] = bf16_finish(c[k][0][0], c[k][1][0], w, x[k], j, n);
  }
}

template <int K>
void bf16_row(const std::uint16_t* w, Eigen::Index n, const float* const* x, float* y) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  __m512 c[K][2];
  for (int k = 0; k < K; ++k) c[k][0] = c[k][1] = _mm512_setzero_ps();
  Eigen::Index j = 0;
  for (; j + 64 <= n; j += 64)
    for (int h = 0; h < 2; ++h) {
      const auto w_h = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w + j + 32 * h));
      for (int k = 0; k < K; ++k) {
        const float* x_h = x[k] + j + 32 * h;  // already bf16 values: converting is exact
        const __m512bh x_bh = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x_h + 16), _mm512_loadu_ps(x_h));
        c[k][h] = _mm512_dpbf16_ps(c[k][h], w_h, x_bh);
      }
    }
  for (int k = 0; k < K; ++k) y[k] = bf16_finish(fold16(c[k][0]), fold16(c[k][1]), w, x[k], j, n);
#else
  bf16_row_portable<K>(w, n, x, y);
#endif
}

// ============================================================================
// q8_0: one row · K tokens
// ============================================================================

// x quantized: n int8 values and a scale (the f16 scale, widened) per block.
struct Q8Input {
  const std::int8_t* q;
  const float* d;
};

// ggml's hsum_float_8: (l) + (l + 4), then (0 + 2) + (1 + 3).
inline float q8_reduce(const float* a) {
  const float s0 = a[0] + a[4], s1 = a[1] + a[5], s2 = a[2] + a[6], s3 = a[3] + a[7];
  return (s0 + s2) + (s1 + s3);
}

#if defined(KVCACHE_QUANT_Q8_AVX2)
// q8_reduce's adds, in registers (as hsum_float_8).
inline float q8_reduce(__m256 a) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));  // s_l = a_l + a_l+4
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));                                   // s0 + s2, s1 + s3
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}
#endif

template <int K>
void q8_0_row_portable(const unsigned char* w, Eigen::Index n, const Q8Input* x, float* y) {
  float lanes[K][8] = {};
  for (Eigen::Index b = 0; b < n / 32; ++b) {
    const unsigned char* block = w + b * 34;
    const auto* q = reinterpret_cast<const std::int8_t*>(block + 2);
    const float d_w = q8_0_scale(block);
    for (int k = 0; k < K; ++k) {
      const std::int8_t* q_x = x[k].q + b * 32;
      const float d = d_w * x[k].d[b];
      for (int l = 0; l < 8; ++l) {
        std::int32_t s = 0;
        for (int i = 4 * l; i < 4 * l + 4; ++i) s += std::int32_t{q[i]} * std::int32_t{q_x[i]};
        lanes[k][l] = std::fma(d, static_cast<float>(s), lanes[k][l]);
      }
    }
  }
  for (int k = 0; k < K; ++k) y[k] = q8_reduce(lanes[k]);
}

// R rows (`stride` bytes apart) · K tokens: y[r · K + k]. Each row keeps its
// own accumulators, so R rows at once give R·K independent chains of fused
// multiply-adds (one row's chain waits on the previous block's) and R
// streams of loads in flight; every chain still runs block after block.
// The int8 · int8 sums, as ggml: |w| (unsigned; |−128| = 128 too) times x
// with w's sign (|x| <= 127, so exact), four products per lane.
//
// Decode reads the weights once from memory, and the reads, not the
// arithmetic, bound it: each row's block b + ahead is prefetched (a whole
// number of groups ahead, at least 16 KB: one thread then reads ~1.5 times
// faster than with the hardware prefetchers alone). Into L2, not L1: a
// prefetch into L1 holds one of the core's few L1 miss buffers until its
// line arrives, which caps the lines in flight; into L2 it reads ~5-10%
// faster (measured on the Sapphire Rapids machine, 1 thread, the 110M
// model's q8_0 matrices). Prefetching never faults, so it may run past the
// matrix.
inline std::uintptr_t q8_ahead(std::ptrdiff_t group) {
  constexpr std::ptrdiff_t kAhead = 16 << 10;
  return static_cast<std::uintptr_t>(group > 0 ? (kAhead + group - 1) / group * group : kAhead);
}

inline void q8_prefetch(const unsigned char* block, std::uintptr_t ahead) {
#if defined(KVCACHE_QUANT_Q8_AVX2)
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<std::uintptr_t>(block) + ahead), _MM_HINT_T1);
#else
  static_cast<void>(block), static_cast<void>(ahead);
#endif
}

template <int R, int K>
void q8_0_rows(const unsigned char* w, std::ptrdiff_t stride, Eigen::Index n, const Q8Input* x, float* y) {
#if defined(KVCACHE_QUANT_Q8_AVX2)
  const std::uintptr_t ahead = q8_ahead(R * stride);
  __m256 acc[R][K];
  // do … while: with a loop that may run zero times, g++ 12 stores the
  // accumulators to the stack at every block.
  if (n < 32) {
    std::fill(y, y + R * K, 0.0f);
    return;
  }
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < K; ++k) acc[r][k] = _mm256_setzero_ps();
  Eigen::Index b = 0;
  do {
    __m256i q_x[K];
    __m256 d_x[K];
    for (int k = 0; k < K; ++k) {
      q_x[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[k].q + b * 32));
      d_x[k] = _mm256_broadcast_ss(x[k].d + b);
    }
    for (int r = 0; r < R; ++r) {
      const unsigned char* block = w + r * stride + b * 34;
      q8_prefetch(block, ahead);
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 2));
      const __m256 d_w = _mm256_cvtph_ps(_mm_set1_epi16(static_cast<short>(block[0] | block[1] << 8)));
      const __m256i q_abs = _mm256_sign_epi8(q, q);
      for (int k = 0; k < K; ++k) {
#if defined(KVCACHE_QUANT_DPBUSD)
        const __m256i s = KVCACHE_QUANT_DPBUSD(_mm256_setzero_si256(), q_abs, _mm256_sign_epi8(q_x[k], q));
#else
        const __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(q_abs, _mm256_sign_epi8(q_x[k], q)), _mm256_set1_epi16(1));
#endif
        acc[r][k] = _mm256_fmadd_ps(_mm256_mul_ps(d_w, d_x[k]), _mm256_cvtepi32_ps(s), acc[r][k]);
      }
    }
  } while (++b < n / 32);
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < K; ++k) y[r * K + k] = q8_reduce(acc[r][k]);
#else
  for (int r = 0; r < R; ++r) q8_0_row_portable<K>(w + r * stride, n, x, y + r * K);
#endif
}

#if defined(KVCACHE_QUANT_Q8_AVX512)
// Rows in pairs of 32-value blocks of an f16 scale and 32 values, with
// AVX-512: rows 2p and 2p + 1 share one 512-bit register (row 2p in the
// low 256 bits), so one instruction does both rows' integer sums,
// conversions and fused multiply-adds, each row's 8 lanes in the order of
// the portable loop, so the bits are the same. Blocks gives the block's
// bytes (kBytes) and its values as unsigned bytes q + kOffset
// (unsigned_q(b0, b1): b0's 32 low, b1's high), as vpdpbusd needs: the
// sums are (q + kOffset) · x − kOffset · Σx per lane of four, exact in
// int32, and kOffset · Σx depends on x alone, once per block for all rows.
template <int R, int K, typename Blocks>
void block_row_pairs(const unsigned char* w, std::ptrdiff_t stride, Eigen::Index n, const Q8Input* x, float* y) {
  static_assert(R % 2 == 0, "rows in pairs");
  constexpr int P = R / 2;
  if (n < 32) {
    std::fill(y, y + R * K, 0.0f);
    return;
  }
  const std::uintptr_t ahead = q8_ahead(R * stride);
  const __m512i offset = _mm512_set1_epi8(Blocks::kOffset), zero = _mm512_setzero_si512();
  __m512 acc[P][K];
  for (int p = 0; p < P; ++p)
    for (int k = 0; k < K; ++k) acc[p][k] = _mm512_setzero_ps();
  Eigen::Index b = 0;
  do {  // as in q8_0_rows: keeps acc in registers
    __m512i q_x[K], minus_sum[K];  // x; −kOffset · Σx per lane
    __m512 d_x[K];
    for (int k = 0; k < K; ++k) {
      q_x[k] = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[k].q + b * 32)));
      minus_sum[k] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, offset, q_x[k]));
      d_x[k] = _mm512_set1_ps(x[k].d[b]);
    }
    for (int p = 0; p < P; ++p) {
      const unsigned char* b0 = w + 2 * p * stride + b * Blocks::kBytes;
      const unsigned char* b1 = b0 + stride;
      q8_prefetch(b0, ahead);
      q8_prefetch(b1, ahead);
      const __m512i q = Blocks::unsigned_q(b0, b1);
      // The two f16 scales, each in 8 lanes (row 2p's low), widened.
      const auto d0 = static_cast<short>(b0[0] | b0[1] << 8), d1 = static_cast<short>(b1[0] | b1[1] << 8);
      const __m512 d_w = _mm512_cvtph_ps(_mm256_mask_set1_epi16(_mm256_set1_epi16(d0), 0xFF00, d1));
      for (int k = 0; k < K; ++k) {
        const __m512i s = _mm512_dpbusd_epi32(minus_sum[k], q, q_x[k]);
        acc[p][k] = _mm512_fmadd_ps(_mm512_mul_ps(d_w, d_x[k]), _mm512_cvtepi32_ps(s), acc[p][k]);
      }
    }
  } while (++b < n / 32);
  for (int p = 0; p < P; ++p)
    for (int k = 0; k < K; ++k) {
      y[2 * p * K + k] = q8_reduce(_mm512_castps512_ps256(acc[p][k]));
      y[(2 * p + 1) * K + k] = q8_reduce(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[p][k]), 1)));
    }
}

// q8_0_rows with AVX-512, rows in pairs: w + 128 is one xor, where
// |w| · sign(x, w) took three instructions.
struct Q8PairBlocks {
  static constexpr int kBytes = 34;
  static constexpr char kOffset = static_cast<char>(0x80);
  static __m512i unsigned_q(const unsigned char* b0, const unsigned char* b1) {
    const __m512i q = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0 + 2))),
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b1 + 2)), 1);
    return _mm512_xor_si512(q, _mm512_set1_epi8(kOffset));
  }
};
template <int R, int K>
void q8_0_row_pairs(const unsigned char* w, std::ptrdiff_t stride, Eigen::Index n, const Q8Input* x, float* y) {
  block_row_pairs<R, K, Q8PairBlocks>(w, stride, n, x, y);
}
#endif

// The row groups quant_rows_k hands to q8_0_rows_fast.
template <int K>
constexpr int kQ8Rows = K == 1 ? 8 : 4;

template <int R, int K>
void q8_0_rows_fast(const unsigned char* w, std::ptrdiff_t stride, Eigen::Index n, const Q8Input* x, float* y) {
#if defined(KVCACHE_QUANT_Q8_AVX512)
  if constexpr (R % 2 == 0) {
    q8_0_row_pairs<R, K>(w, stride, n, x, y);
    return;
  }
#endif
  q8_0_rows<R, K>(w, stride, n, x, y);
}

template <int K>
void q8_0_row(const unsigned char* w, Eigen::Index n, const Q8Input* x, float* y) {
  q8_0_rows<1, K>(w, 0, n, x, y);
}

// ============================================================================
// q4_0: one row · K tokens
// ============================================================================

// The 32 values q − 8 of a q4_0 block, in order.
inline void q4_0_unpack(const unsigned char* block, std::int8_t* q) {
#if defined(KVCACHE_QUANT_Q8_AVX2)
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2));
  const __m128i low = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm_sub_epi8(_mm_and_si128(v, low), eight));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), low), eight));
#else
  for (std::size_t j = 0; j < 16; ++j) {
    q[j] = static_cast<std::int8_t>((block[2 + j] & 0x0F) - 8);
    q[j + 16] = static_cast<std::int8_t>((block[2 + j] >> 4) - 8);
  }
#endif
}

// Whether ggml repacks a q4_0 matrix of `rows` rows (on AVX2: 8 rows
// interleaved), which decides the order of its sums.
inline bool q4_0_repacked(Eigen::Index rows) { return rows % 8 == 0; }

// Matrices ggml does not repack: q8_0_row_portable's lanes and order, with
// q − 8 as the weights' values (ggml_vec_dot_q4_0_q8_0, AVX2).
// f(b, q, d_w) for each block b of a q4_0 row of n values: its 32 values
// q − 8 and its scale.
template <typename F>
void for_each_q4_0_block(const unsigned char* w, Eigen::Index n, F&& f) {
  std::int8_t q[32];
  for (Eigen::Index b = 0; b < n / 32; ++b) {
    const unsigned char* block = w + b * 18;
    q4_0_unpack(block, q);
    f(b, q, q8_0_scale(block));
  }
}

template <int K>
void q4_0_lanes_portable(const unsigned char* w, Eigen::Index n, const Q8Input* x, float* y) {
  float lanes[K][8] = {};
  for_each_q4_0_block(w, n, [&](Eigen::Index b, const std::int8_t* q, float d_w) {
    for (int k = 0; k < K; ++k) {
      const float d = d_w * x[k].d[b];
      for (int l = 0; l < 8; ++l) {
        std::int32_t s = 0;
        for (int i = 4 * l; i < 4 * l + 4; ++i) s += std::int32_t{q[i]} * std::int32_t{x[k].q[b * 32 + i]};
        lanes[k][l] = std::fma(d, static_cast<float>(s), lanes[k][l]);
      }
    }
  });
  for (int k = 0; k < K; ++k) y[k] = q8_reduce(lanes[k]);
}

// ggml on a CPU with AVX2 repacks q4_0 matrices (rows a multiple of 8) 8
// rows at a time (ggml_gemv_q4_0_8x8_q8_0, ggml_gemm_q4_0_8x8_q8_0) and sums
// each row as acc = fma(s, d_w · d_x, acc), block after block, s the exact
// int32 sum of the block's 32 products (q − 8) · x: one chain per row and
// token, no lanes. kvcache computes those matrices' products so, in decode
// and prefill alike.
template <int K>
void q4_0_row_portable(const unsigned char* w, Eigen::Index n, const Q8Input* x, float* y) {
  float acc[K] = {};
  for_each_q4_0_block(w, n, [&](Eigen::Index b, const std::int8_t* q, float d_w) {
    for (int k = 0; k < K; ++k) {
      std::int32_t s = 0;
      for (int i = 0; i < 32; ++i) s += std::int32_t{q[i]} * std::int32_t{x[k].q[b * 32 + i]};
      acc[k] = std::fma(d_w * x[k].d[b], static_cast<float>(s), acc[k]);
    }
  });
  for (int k = 0; k < K; ++k) y[k] = acc[k];
}

#if defined(KVCACHE_QUANT_Q8_AVX512)
// Two q4_0 blocks' 4-bit q (0 … 15) as bytes: b0's 32 in value order in the
// low 256 bits (its bytes' low nibbles, then their high ones), b1's above.
inline __m512i q4_0_pair_nibbles(const unsigned char* b0, const unsigned char* b1) {
  const __m128i v0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b0 + 2));
  const __m128i v1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b1 + 2));
  const __m512i v = _mm512_mask_broadcast_i32x4(_mm512_broadcast_i32x4(v0), 0xFF00, v1);  // v0 v0 v1 v1
  return _mm512_and_si512(_mm512_mask_blend_epi64(0xCC, v, _mm512_srli_epi16(v, 4)), _mm512_set1_epi8(0x0F));
}

// q4_0_lanes_portable for rows in pairs, as q8_0_row_pairs: each row's 8
// lanes see its operations in its order. The int8 sums as q · x − 8 · Σx
// per lane of four (q unsigned, as vpdpbusd needs; exact in int32, so the
// same sums as (q − 8) · x).
struct Q4PairBlocks {
  static constexpr int kBytes = 18;
  static constexpr char kOffset = 8;
  static __m512i unsigned_q(const unsigned char* b0, const unsigned char* b1) { return q4_0_pair_nibbles(b0, b1); }
};
template <int R, int K>
void q4_0_lane_pairs(const unsigned char* w, std::ptrdiff_t stride, Eigen::Index n, const Q8Input* x, float* y) {
  block_row_pairs<R, K, Q4PairBlocks>(w, stride, n, x, y);
}

// Four registers of two rows' 8 int32 lanes each (s[p]: row 2p low, 2p + 1
// high) to the 8 rows' sums, in the order 0 2 4 6 1 3 5 7 (kQ4Lanes).
// Exact: int32 adds.
inline __m256i q4_0_row_sums(const __m512i* s) {
  const __m512i a = _mm512_add_epi32(_mm512_unpacklo_epi32(s[0], s[1]), _mm512_unpackhi_epi32(s[0], s[1]));
  const __m512i b = _mm512_add_epi32(_mm512_unpacklo_epi32(s[2], s[3]), _mm512_unpackhi_epi32(s[2], s[3]));
  // Per 128-bit chunk c: the sums of s[0 … 3]'s chunk c.
  const __m512i t = _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
  // Chunks 0 + 1 (rows 0 2 4 6) and 2 + 3 (rows 1 3 5 7).
  const __m512i u = _mm512_add_epi32(t, _mm512_shuffle_i32x4(t, t, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_castsi512_si256(_mm512_shuffle_i32x4(u, u, _MM_SHUFFLE(2, 0, 2, 0)));
}
constexpr int kQ4Lanes[8] = {0, 2, 4, 6, 1, 3, 5, 7};

// 8 rows (`stride` bytes apart) · K tokens, q4_0_row_portable's bits: per
// block, the rows in pairs through vpdpbusd (q · x − 8 · Σx per lane of
// four, q unsigned as it needs; exact), the lanes summed to one int32 per
// row (q4_0_row_sums), then one fused multiply-add per row and token, 8
// rows in one register.
template <int K>
void q4_0_rows8(const unsigned char* w, std::ptrdiff_t stride, Eigen::Index n, const Q8Input* x, float* y) {
  if (n < 32) {
    std::fill(y, y + 8 * K, 0.0f);
    return;
  }
  const std::uintptr_t ahead = q8_ahead(8 * stride);
  const __m512i eight = _mm512_set1_epi8(8), zero = _mm512_setzero_si512();
  __m256 acc[K];
  for (int k = 0; k < K; ++k) acc[k] = _mm256_setzero_ps();
  Eigen::Index b = 0;
  do {  // as in q8_0_rows: keeps acc in registers
    __m512i q[4];
    for (int p = 0; p < 4; ++p) {
      const unsigned char* b0 = w + 2 * p * stride + b * 18;
      q8_prefetch(b0, ahead);
      q8_prefetch(b0 + stride, ahead);
      q[p] = q4_0_pair_nibbles(b0, b0 + stride);
    }
    const unsigned char* r0 = w + b * 18;
    const auto d = [&](int r) { return static_cast<short>(r0[r * stride] | r0[r * stride + 1] << 8); };
    const __m256 d_w = _mm256_cvtph_ps(_mm_setr_epi16(d(0), d(2), d(4), d(6), d(1), d(3), d(5), d(7)));
    for (int k = 0; k < K; ++k) {
      const __m512i q_x = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[k].q + b * 32)));
      const __m512i minus_sum = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, eight, q_x));  // −8 · Σx per lane
      __m512i s[4];
      for (int p = 0; p < 4; ++p) s[p] = _mm512_dpbusd_epi32(minus_sum, q[p], q_x);
      const __m256 scale = _mm256_mul_ps(d_w, _mm256_set1_ps(x[k].d[b]));
      acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q4_0_row_sums(s)), scale, acc[k]);
    }
  } while (++b < n / 32);
  for (int k = 0; k < K; ++k) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc[k]);
    for (int l = 0; l < 8; ++l) y[kQ4Lanes[l] * K + k] = lanes[l];
  }
}
#endif

// R rows (`stride` bytes apart) · K tokens: y[r · K + k], the bits of
// q4_0_row_portable (Repacked) or q4_0_lanes_portable (AVX-512: 8 rows at
// once, or rows in pairs).
template <bool Repacked, int R, int K>
void q4_0_rows_fast(const unsigned char* w, std::ptrdiff_t stride, Eigen::Index n, const Q8Input* x, float* y) {
#if defined(KVCACHE_QUANT_Q8_AVX512)
  if constexpr (Repacked && R == 8) {
    q4_0_rows8<K>(w, stride, n, x, y);
    return;
  } else if constexpr (!Repacked && R % 2 == 0) {
    q4_0_lane_pairs<R, K>(w, stride, n, x, y);
    return;
  }
#endif
  for (int r = 0; r < R; ++r) {
    if constexpr (Repacked)
      q4_0_row_portable<K>(w + r * stride, n, x, y + r * K);
    else
      q4_0_lanes_portable<K>(w + r * stride, n, x, y + r * K);
  }
}

// ============================================================================
// Inputs converted once per call, into per-thread buffers
// ============================================================================

// Grown, never shrunk: after the first calls, a decode step allocates
// nothing. One per thread, so that threads never share them.
struct QuantScratch {
  std::vector<float> x;     // f16 (bf16): x rounded to f16 (bf16), as float
  std::vector<std::int8_t> q;  // q8_0: the quantized x
  std::vector<float> d;     // q8_0: its scales, widened
  static QuantScratch& mine() {
    thread_local QuantScratch scratch;
    return scratch;
  }
};

template <typename V>
V* grown(std::vector<V>& v, std::size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// quantize_q8_0_block_act, the same bits; with AVX-512 16 values at a time:
// the largest |x| over the lanes that are not NaN (max is exact, so any
// order), then x · (127 / max) rounded to nearest even, clamped to ±127, NaN
// to 0, as the scalar loop does.
inline std::uint16_t q8_quantize_act(const float* x, std::int8_t* q) {
#if defined(KVCACHE_QUANT_Q8_AVX512)
  const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
  const __m512 a0 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x0, x0, _CMP_ORD_Q), _mm512_abs_ps(x0));
  const __m512 a1 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x1, x1, _CMP_ORD_Q), _mm512_abs_ps(x1));
  const float max_abs = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
  const __m512 scale = _mm512_set1_ps(max_abs != 0.0f ? 127.0f / max_abs : 0.0f);
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  for (int h = 0; h < 2; ++h) {
    const __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(h == 0 ? x0 : x1, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 c = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), _mm512_min_ps(_mm512_max_ps(v, lo), hi));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16 * h), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(c)));
  }
  return float_to_f16(max_abs / 127.0f);
#else
  return quantize_q8_0_block_act(x, q);
#endif
}

// Whether W's type multiplies x quantized to q8_0 (else x rounded to f16 or
// bf16).
inline bool q8_input(WeightType type) { return type == WeightType::q8_0 || type == WeightType::q4_0; }

// Token t's input, prepared for W's type, into s.
template <typename T>
void prepare_input(const T* x, Eigen::Index n, WeightType type, QuantScratch& s, Eigen::Index t) {
  if (!q8_input(type)) {
    float* out = s.x.data() + t * n;
    for (Eigen::Index j = 0; j < n; ++j)
      out[j] = type == WeightType::f16 ? from_f16(to_f16(x[j])) : from_bf16(to_bf16(x[j]));
    return;
  }
  float block[kQ8Block];
  for (Eigen::Index b = 0; b < n / 32; ++b) {
    const float* in = block;
    if constexpr (std::is_same_v<T, float>)
      in = x + b * 32;
    else
      for (int j = 0; j < 32; ++j) block[j] = static_cast<float>(x[b * 32 + j]);
    s.d[static_cast<std::size_t>(t * (n / 32) + b)] = from_f16(q8_quantize_act(in, s.q.data() + t * n + b * 32));
  }
}

template <typename T>
void prepare_inputs(const Eigen::Ref<const Matrix<T>>& X, WeightType type, QuantScratch& s) {
  const Eigen::Index m = X.rows(), n = X.cols();
  const auto values = static_cast<std::size_t>(m * n);
  if (!q8_input(type)) {
    grown(s.x, values);
  } else {
    grown(s.q, values);
    grown(s.d, values / 32);
  }
  for (Eigen::Index t = 0; t < m; ++t) prepare_input(X.row(t).data(), n, type, s, t);
}

// ============================================================================
// The linear layer
// ============================================================================

// y_k[i] = W[i, :] · x_k for rows [begin, end) and K tokens t0 … t0+K−1,
// W q8_0 or q4_0 (Q4: 1 repacked, 2 not; see q4_0_repacked): rows in groups
// of kRows (q8_0: see q8_0_rows; q4_0: 8), then one at a time.
template <int K, int Q4, typename T>
void q_rows_k(const WeightMatrix<T>& W, const QuantScratch& s, Matrix<T>& Y, Eigen::Index t0, Eigen::Index begin,
              Eigen::Index end) {
  const Eigen::Index n = W.cols();
  Q8Input x[K];
  for (int k = 0; k < K; ++k) x[k] = {s.q.data() + (t0 + k) * n, s.d.data() + (t0 + k) * (n / 32)};
  const unsigned char* w = Q4 ? W.q4_0() : W.q8_0();
  const auto row = static_cast<Eigen::Index>(row_bytes<T>(W.type(), static_cast<std::size_t>(n)));
  constexpr int kRows = Q4 == 1 ? 8 : kQ8Rows<K>;
  float y[kRows * K];
  Eigen::Index i = begin;
  for (; i + kRows <= end; i += kRows) {
    if constexpr (Q4 != 0)
      q4_0_rows_fast<Q4 == 1, kRows, K>(w + i * row, row, n, x, y);
    else
      q8_0_rows_fast<kRows, K>(w + i * row, row, n, x, y);
    for (int r = 0; r < kRows; ++r)
      for (int k = 0; k < K; ++k) Y(t0 + k, i + r) = static_cast<T>(y[r * K + k]);
  }
  for (; i < end; ++i) {
    if constexpr (Q4 != 0)
      q4_0_rows_fast<Q4 == 1, 1, K>(w + i * row, row, n, x, y);
    else
      q8_0_row<K>(w + i * row, n, x, y);
    for (int k = 0; k < K; ++k) Y(t0 + k, i) = static_cast<T>(y[k]);
  }
}

// y_k[i] = W[i, :] · x_k for rows [begin, end) and K tokens t0 … t0+K−1.
template <int K, typename T>
void quant_rows_k(const WeightMatrix<T>& W, const QuantScratch& s, Matrix<T>& Y, Eigen::Index t0, Eigen::Index begin,
                  Eigen::Index end) {
  if (W.type() == WeightType::q8_0) return q_rows_k<K, 0>(W, s, Y, t0, begin, end);
  if (W.type() == WeightType::q4_0)
    return q4_0_repacked(W.rows()) ? q_rows_k<K, 1>(W, s, Y, t0, begin, end) : q_rows_k<K, 2>(W, s, Y, t0, begin, end);
  const Eigen::Index n = W.cols();
  float y[K];
  const float* x[K];
  for (int k = 0; k < K; ++k) x[k] = s.x.data() + (t0 + k) * n;
  for (Eigen::Index i = begin; i < end; ++i) {
    if (W.type() == WeightType::f16)
      f16_row<K>(W.f16().data() + i * n, n, x, y);
    else
      bf16_row<K>(W.bf16().data() + i * n, n, x, y);
    for (int k = 0; k < K; ++k) Y(t0 + k, i) = static_cast<T>(y[k]);
  }
}

// Few tokens: tiles of rows that stay in L1 while every token passes over
// them (as linear_rows does for T), kGemvTokens tokens per pass over a tile.
template <int Tokens, typename T>
void quant_decode(const WeightMatrix<T>& W, const QuantScratch& s, Matrix<T>& Y, Eigen::Index m, Eigen::Index begin,
                  Eigen::Index end) {
  const auto row_size = static_cast<Eigen::Index>(row_bytes<T>(W.type(), static_cast<std::size_t>(W.cols())));
  const Eigen::Index tile = m == 1 ? end - begin : std::max<Eigen::Index>(1, (16 << 10) / std::max<Eigen::Index>(1, row_size));
  for (Eigen::Index r = begin; r < end; r += tile) {
    const Eigen::Index r_end = std::min(end, r + tile);
    Eigen::Index t = 0;
    for (; t + Tokens <= m; t += Tokens) quant_rows_k<Tokens>(W, s, Y, t, r, r_end);
    for (; t < m; ++t) quant_rows_k<1>(W, s, Y, t, r, r_end);
  }
}

// ============================================================================
// Prefill
// ============================================================================

// count values of f16 (bf16) as float, exactly (vector conversions).
inline void f16_to_float(const std::uint16_t* h, std::size_t count, float* out) {
  std::size_t i = 0;
#if defined(KVCACHE_QUANT_F16_AVX512)
  for (; i + 16 <= count; i += 16)
    _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i))));
#elif defined(KVCACHE_QUANT_F16_AVX2)
  for (; i + 8 <= count; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
#endif
  for (; i < count; ++i) out[i] = from_f16(h[i]);
}

inline void bf16_to_float(const std::uint16_t* h, std::size_t count, float* out) {
  std::size_t i = 0;
#if defined(KVCACHE_QUANT_F16_AVX512)
  for (; i + 16 <= count; i += 16) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i)));
    _mm512_storeu_ps(out + i, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
  }
#endif
  for (; i < count; ++i) out[i] = from_bf16(h[i]);
}

// blocks q8_0 blocks as float: d · q, rounded as read_q8_0 rounds it.
inline void q8_0_to_float(const unsigned char* w, std::size_t blocks, float* out) {
  for (std::size_t b = 0; b < blocks; ++b, w += kQ8BlockBytes, out += kQ8Block) {
    const float d = q8_0_scale(w);
#if defined(KVCACHE_QUANT_F16_AVX512)
    for (int h = 0; h < 2; ++h) {
      const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 2 + 16 * h));
      _mm512_storeu_ps(out + 16 * h, _mm512_mul_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q))));
    }
#else
    for (std::size_t j = 0; j < kQ8Block; ++j) out[j] = d * static_cast<float>(static_cast<std::int8_t>(w[2 + j]));
#endif
  }
}

// Rows [r, r + rows) of W (f16, bf16, q8_0 or q4_0) as T, row after row into
// out.
template <typename T>
void widen_rows(const WeightMatrix<T>& W, Eigen::Index r, Eigen::Index rows, T* out) {
  const Eigen::Index n = W.cols();
  if constexpr (std::is_same<T, float>::value) {
    const auto count = static_cast<std::size_t>(rows * n);
    if (W.type() == WeightType::f16) return f16_to_float(W.f16().data() + r * n, count, out);
    if (W.type() == WeightType::bf16) return bf16_to_float(W.bf16().data() + r * n, count, out);
    const auto row = static_cast<Eigen::Index>(row_bytes<T>(W.type(), static_cast<std::size_t>(n)));
    if (W.type() == WeightType::q4_0) return dequantize_q4_0(W.q4_0() + r * row, 0, count, out);
    return q8_0_to_float(W.q8_0() + r * row, count / kQ8Block, out);
  }
  for (Eigen::Index i = 0; i < rows; ++i) W.row_to(r + i, out + i * n);
}

// ---- q8_0: R rows × K tokens in int8 ---------------------------------------
//
// y[r][k] = W[r, :] · x_k as q8_0_row computes it (ggml's lanes and order,
// so prefill gives decode's bits), for R rows at once: each block of the R
// rows and K tokens is loaded once per R·K products. scale[(r·K + k)·nb + b]
// is d_w[r][b] · d_x[k][b], as q8_0_row multiplies them.
#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define KVCACHE_QUANT_Q8_TILE 1
#endif

template <int R, int K>
void q8_0_tile_portable(const unsigned char* w, Eigen::Index row, Eigen::Index nb, const std::int8_t* const* x,
                        const float* scale, float (*y)[K]) {
  float lanes[R][K][8] = {};
  for (Eigen::Index b = 0; b < nb; ++b)
    for (int r = 0; r < R; ++r) {
      const auto* q = reinterpret_cast<const std::int8_t*>(w + r * row + b * 34 + 2);
      for (int k = 0; k < K; ++k)
        for (int l = 0; l < 8; ++l) {
          std::int32_t s = 0;
          for (int i = 4 * l; i < 4 * l + 4; ++i) s += std::int32_t{q[i]} * std::int32_t{x[k][b * 32 + i]};
          lanes[r][k][l] = std::fma(scale[(r * K + k) * nb + b], static_cast<float>(s), lanes[r][k][l]);
        }
    }
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < K; ++k) y[r][k] = q8_reduce(lanes[r][k]);
}

template <int R, int K>
void q8_0_tile(const unsigned char* w, Eigen::Index row, Eigen::Index nb, const std::int8_t* const* x,
               const float* scale, float (*y)[K]) {
#if defined(KVCACHE_QUANT_Q8_TILE)
  __m256 acc[R][K];
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < K; ++k) acc[r][k] = _mm256_setzero_ps();
  // (x + 128) · q − 128 · Σq: x + 128 is unsigned, as vpdpbusd needs.
  const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80)), zero = _mm256_setzero_si256();
  for (Eigen::Index b = 0; b < nb; ++b) {
    __m256i q[R], minus_sum[R];
    for (int r = 0; r < R; ++r) {
      q[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * row + b * 34 + 2));
      minus_sum[r] = _mm256_sub_epi32(zero, _mm256_dpbusd_epi32(zero, bias, q[r]));
    }
    for (int k = 0; k < K; ++k) {
      const __m256i u = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[k] + b * 32)), bias);
      for (int r = 0; r < R; ++r) {
        const __m256i s = _mm256_dpbusd_epi32(minus_sum[r], u, q[r]);
        acc[r][k] = _mm256_fmadd_ps(_mm256_set1_ps(scale[(r * K + k) * nb + b]), _mm256_cvtepi32_ps(s), acc[r][k]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < K; ++k) {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, acc[r][k]);
      y[r][k] = q8_reduce(lanes);
    }
#else
  q8_0_tile_portable<R, K>(w, row, nb, x, scale, y);
#endif
}

// Per-thread buffers of the q8_0 prefill: W's scales and their products.
struct Q8TileScratch {
  std::vector<float> d_w, scale;
  static Q8TileScratch& mine() {
    thread_local Q8TileScratch scratch;
    return scratch;
  }
};

// Rows [i, i + R) (at w) times tokens [t, t + K) into Y, d_w holding the R
// rows' scales (R × nb).
template <int R, int K, typename T>
void q8_0_tile_into(const unsigned char* w, Eigen::Index row, Eigen::Index nb, const QuantScratch& s, const float* d_w,
                    float* scale, Matrix<T>& Y, Eigen::Index t, Eigen::Index i) {
  const Eigen::Index n = nb * 32;
  const std::int8_t* x[K];
  for (int k = 0; k < K; ++k) {
    x[k] = s.q.data() + (t + k) * n;
    const float* d_x = s.d.data() + (t + k) * nb;
    for (int r = 0; r < R; ++r)  // (Eigen's arrays: vectorized, as they alias nothing)
      Eigen::Map<Eigen::ArrayXf>(scale + (r * K + k) * nb, nb) =
          Eigen::Map<const Eigen::ArrayXf>(d_w + r * nb, nb) * Eigen::Map<const Eigen::ArrayXf>(d_x, nb);
  }
  float y[R][K];
  q8_0_tile<R, K>(w, row, nb, x, scale, y);
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < K; ++k) Y(t + k, i + r) = static_cast<T>(y[r][k]);
}

// R rows [i, i + R) (at w) times every token, kQ8TileTokens at a time.
constexpr int kQ8TileRows = 4, kQ8TileTokens = 4;

template <int R, typename T>
void q8_0_rows_tokens(const unsigned char* w, Eigen::Index row, Eigen::Index nb, const QuantScratch& s, Matrix<T>& Y,
                      Eigen::Index m, Eigen::Index i) {
  Q8TileScratch& ts = Q8TileScratch::mine();
  float* d_w = grown(ts.d_w, static_cast<std::size_t>(R * nb));
  float* scale = grown(ts.scale, static_cast<std::size_t>(R * kQ8TileTokens * nb));
  for (int r = 0; r < R; ++r)
    for (Eigen::Index b = 0; b < nb; ++b) d_w[r * nb + b] = q8_0_scale(w + r * row + b * 34);
  Eigen::Index t = 0;
  for (; t + kQ8TileTokens <= m; t += kQ8TileTokens) q8_0_tile_into<R, kQ8TileTokens>(w, row, nb, s, d_w, scale, Y, t, i);
  switch (m - t) {
    case 3: return q8_0_tile_into<R, 3>(w, row, nb, s, d_w, scale, Y, t, i);
    case 2: return q8_0_tile_into<R, 2>(w, row, nb, s, d_w, scale, Y, t, i);
    case 1: return q8_0_tile_into<R, 1>(w, row, nb, s, d_w, scale, Y, t, i);
    default: return;
  }
}

// Many tokens, q8_0: the int8 products of decode, R rows × K tokens at a time.
template <typename T>
void q8_0_prefill(const WeightMatrix<T>& W, const QuantScratch& s, Matrix<T>& Y, Eigen::Index m, Eigen::Index begin,
                  Eigen::Index end) {
  const Eigen::Index nb = W.cols() / 32;
  const auto row = static_cast<Eigen::Index>(row_bytes<T>(WeightType::q8_0, static_cast<std::size_t>(W.cols())));
  Eigen::Index i = begin;
  for (; i + kQ8TileRows <= end; i += kQ8TileRows) q8_0_rows_tokens<kQ8TileRows>(W.q8_0() + i * row, row, nb, s, Y, m, i);
  for (; i < end; ++i) q8_0_rows_tokens<1>(W.q8_0() + i * row, row, nb, s, Y, m, i);
}

// ---- AMX: Sapphire Rapids' tile unit, where the build and Linux allow it ----
//
// q8_0: per block of 32, a 16-row × 16-token tile of exact int32 sums (one
// tile multiply), then per row and token acc = fma(d_w · d_x, sum, acc),
// block after block. The same products as ggml, each block's sum exact in
// int32 (ggml sums 8 lanes of 4 in float): not decode's bits, but at least
// as close to the exact product.
// bf16: 16 × 16 float tiles accumulated over the whole row by the tile
// unit's bfloat16 dot product (exact products; the order of the sums is the
// unit's).
#if defined(KVCACHE_QUANT_AMX)

// Linux lends a process the tile registers only when asked, once.
inline bool amx_usable() {
  static const bool usable = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return usable;
}

// Tiles 0–3: C, 16 × 16 int32 or float; 4, 5: A, 16 rows of W × a_bytes;
// 6, 7: B, the tokens' values in pairs (bf16) or quadruples (int8),
// b_rows × 64 bytes.
inline void amx_configure(int a_bytes, int b_rows) {
  struct alignas(64) {
    std::uint8_t palette = 1, start_row = 0, reserved[14] = {};
    std::uint16_t bytes[16] = {};
    std::uint8_t rows[16] = {};
  } config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = static_cast<std::uint8_t>(t < 6 ? 16 : b_rows);
    config.bytes[t] = static_cast<std::uint16_t>(t < 4 || t >= 6 ? 64 : a_bytes);
  }
  _tile_loadconfig(&config);
}

// Per-thread buffers: the tokens in tile order, scales, a padded last tile of W.
struct AmxScratch {
  std::vector<unsigned char> x, w;
  std::vector<float> d_x, d_w;
  static AmxScratch& mine() {
    thread_local AmxScratch scratch;
    return scratch;
  }
};

// The tokens' q8_0 values as B tiles: group g of 16 tokens, block b at
// x[(g·nb + b)·512], x[4·jj + c] of token tt at byte 64·jj + 4·tt + c;
// their scales at d_x[(g·nb + b)·16 + tt]. Tokens past m: zeros.
inline void amx_pack_q8_0_x(const QuantScratch& s, Eigen::Index m, Eigen::Index nb, AmxScratch& a) {
  const Eigen::Index groups = (m + 15) / 16, n = nb * 32;
  unsigned char* x = grown(a.x, static_cast<std::size_t>(groups * nb * 512));
  float* d_x = grown(a.d_x, static_cast<std::size_t>(groups * nb * 16));
  for (Eigen::Index g = 0; g < groups; ++g)
    for (Eigen::Index b = 0; b < nb; ++b) {
      unsigned char* tile = x + (g * nb + b) * 512;
      for (Eigen::Index tt = 0; tt < 16; ++tt) {
        const Eigen::Index t = 16 * g + tt;
        d_x[(g * nb + b) * 16 + tt] = t < m ? s.d[static_cast<std::size_t>(t * nb + b)] : 0.0f;
        for (int jj = 0; jj < 8; ++jj) {
          if (t < m)
            std::memcpy(tile + 64 * jj + 4 * tt, s.q.data() + t * n + b * 32 + 4 * jj, 4);
          else
            std::memset(tile + 64 * jj + 4 * tt, 0, 4);
        }
      }
    }
}

// acc[r] (lanes: tokens) += d_w[r][b] · d_x[b] · c[r] for one block's tile c.
inline void amx_q8_0_accumulate(const std::int32_t* c, const float* d_w, Eigen::Index nb, const float* d_x,
                                __m512* acc) {
  const __m512 dx = _mm512_loadu_ps(d_x);
  for (int r = 0; r < 16; ++r) {
    const __m512 sums = _mm512_cvtepi32_ps(_mm512_load_si512(c + 16 * r));
    acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(d_w[r * nb]), dx), sums, acc[r]);
  }
}

// The 16 × 16 floats v[r] lane c, transposed in place: v[c] lane r.
inline void amx_transpose(__m512* v) {
  __m512 t[16];
  for (int r = 0; r < 16; r += 2) {  // pairs of rows: 2 × 2 blocks of floats
    t[r] = _mm512_unpacklo_ps(v[r], v[r + 1]);
    t[r + 1] = _mm512_unpackhi_ps(v[r], v[r + 1]);
  }
  for (int r = 0; r < 16; r += 4)  // 4 × 4 blocks: 64-bit pairs
    for (int h = 0; h < 2; ++h) {
      const __m512d a = _mm512_castps_pd(t[r + h]), b = _mm512_castps_pd(t[r + h + 2]);
      v[r + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      v[r + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  for (int r = 0; r < 16; r += 8)  // 8 × 8 blocks: 128-bit lanes 0 2 | 1 3
    for (int h = 0; h < 4; ++h) {
      t[r + h] = _mm512_shuffle_f32x4(v[r + h], v[r + h + 4], 0x88);
      t[r + h + 4] = _mm512_shuffle_f32x4(v[r + h], v[r + h + 4], 0xDD);
    }
  for (int h = 0; h < 8; ++h) {  // 16 × 16: lanes 0 2 | 1 3 again
    v[h] = _mm512_shuffle_f32x4(t[h], t[h + 8], 0x88);
    v[h + 8] = _mm512_shuffle_f32x4(t[h], t[h + 8], 0xDD);
  }
}

// acc[r] lane tt into Y(16·g + tt, i + r), rows < `rows`, tokens < m:
// transposed, a row of Y (16 columns) at a time.
template <typename T>
void amx_store(__m512* acc, Matrix<T>& Y, Eigen::Index g, Eigen::Index m, Eigen::Index i, Eigen::Index rows) {
  amx_transpose(acc);
  const auto mask = static_cast<__mmask16>((1u << rows) - 1);
  for (Eigen::Index tt = 0; tt < 16 && 16 * g + tt < m; ++tt) {
    if constexpr (std::is_same_v<T, float>) {
      _mm512_mask_storeu_ps(&Y(16 * g + tt, i), mask, acc[tt]);
    } else {
      alignas(64) float lanes[16];
      _mm512_store_ps(lanes, acc[tt]);
      for (Eigen::Index r = 0; r < rows; ++r) Y(16 * g + tt, i + r) = static_cast<T>(lanes[r]);
    }
  }
}

// Blocks b … b + count − 1 (count <= 4) of 16 rows of W at w_b (32 int8
// values each, `block` bytes apart in a row, rows `row` bytes apart) times
// their B tiles at x: tiles 0 … count − 1.
// Written out four times: the tile instructions take their registers as
// literal numbers (g++ pastes them into the assembly text), so neither a loop
// nor a template can.
inline void amx_q8_0_dots(const unsigned char* w_b, Eigen::Index row, Eigen::Index block, const unsigned char* x,
                          Eigen::Index count) {
  _tile_loadd(4, w_b, row);
  _tile_loadd(6, x, 64);
  _tile_zero(0);
  _tile_dpbssd(0, 4, 6);
  if (count > 1) {
    _tile_loadd(5, w_b + block, row);
    _tile_loadd(7, x + 512, 64);
    _tile_zero(1);
    _tile_dpbssd(1, 5, 7);
  }
  if (count > 2) {
    _tile_loadd(4, w_b + 2 * block, row);
    _tile_loadd(6, x + 1024, 64);
    _tile_zero(2);
    _tile_dpbssd(2, 4, 6);
  }
  if (count > 3) {
    _tile_loadd(5, w_b + 3 * block, row);
    _tile_loadd(7, x + 1536, 64);
    _tile_zero(3);
    _tile_dpbssd(3, 5, 7);
  }
}

// Tiles 0 … count − 1 into c[0] … c[count − 1].
inline void amx_store_sums(std::int32_t (*c)[256], Eigen::Index count) {
  _tile_stored(0, c[0], 64);
  if (count > 1) _tile_stored(1, c[1], 64);
  if (count > 2) _tile_stored(2, c[2], 64);
  if (count > 3) _tile_stored(3, c[3], 64);
}

// 16 rows of W's int8 values at w (block b of row r at w + r·row + b·block;
// their scales d_w, 16 × nb) times every token: Y's columns [i, i + rows). Four blocks at a time; the
// tile unit multiplies the next four while the vector unit scales and adds
// the sums of the last four (two buffers c).
template <typename T>
void amx_q8_0_rows(const unsigned char* w, Eigen::Index row, Eigen::Index block, Eigen::Index nb, const AmxScratch& a,
                   const float* d_w, Matrix<T>& Y, Eigen::Index m, Eigen::Index i, Eigen::Index rows) {
  alignas(64) std::int32_t c[2][4][256];
  for (Eigen::Index g = 0; g < (m + 15) / 16; ++g) {
    __m512 acc[16];
    for (auto& v : acc) v = _mm512_setzero_ps();
    const unsigned char* x = a.x.data() + g * nb * 512;
    const float* d_x = a.d_x.data() + g * nb * 16;
    for (Eigen::Index b = 0; b < nb + 4; b += 4) {
      if (b < nb) amx_q8_0_dots(w + b * block, row, block, x + b * 512, std::min<Eigen::Index>(4, nb - b));
      if (b > 0)
        for (Eigen::Index u = b - 4; u < std::min(b, nb); ++u)
          amx_q8_0_accumulate(c[(b / 4 - 1) & 1][u - (b - 4)], d_w + u, nb, d_x + u * 16, acc);
      if (b < nb) amx_store_sums(c[(b / 4) & 1], std::min<Eigen::Index>(4, nb - b));
    }
    amx_store(acc, Y, g, m, i, rows);
  }
}

// Rows [0, rows) of a q4_0 matrix at w (`stride` bytes apart) as 16 rows of
// nb·32 int8 values q − 8 at out, their scales at d_w (16 × nb); rows past
// `rows`: zeros. With AVX-512 two blocks at a time.
inline void amx_unpack_q4_0(const unsigned char* w, Eigen::Index stride, Eigen::Index rows, Eigen::Index nb,
                            std::int8_t* out, float* d_w) {
  for (Eigen::Index r = 0; r < 16; ++r, out += nb * 32, d_w += nb, w += stride) {
    if (r >= rows) {
      std::memset(out, 0, static_cast<std::size_t>(nb * 32));
      std::fill(d_w, d_w + nb, 0.0f);
      continue;
    }
    Eigen::Index b = 0;
#if defined(KVCACHE_QUANT_Q8_AVX512)
    for (; b + 2 <= nb; b += 2)
      _mm512_storeu_si512(out + b * 32, _mm512_sub_epi8(q4_0_pair_nibbles(w + b * 18, w + b * 18 + 18), _mm512_set1_epi8(8)));
#endif
    for (; b < nb; ++b) q4_0_unpack(w + b * 18, out + b * 32);
    for (b = 0; b < nb; ++b) d_w[b] = q8_0_scale(w + b * 18);
  }
}

// Many tokens, q8_0 or q4_0, on the tile unit: rows [begin, end), 16 at a
// time (the last ones copied into a zero-padded tile; q4_0 rows unpacked to
// int8 q − 8 first, whose per-block sums and fused multiply-adds are then
// those of q4_0's decode: its bits).
template <typename T>
void amx_q8_0_prefill(const WeightMatrix<T>& W, const QuantScratch& s, Matrix<T>& Y, Eigen::Index m,
                      Eigen::Index begin, Eigen::Index end) {
  AmxScratch& a = AmxScratch::mine();
  const Eigen::Index nb = W.cols() / 32, row = nb * 34;
  const bool q4 = W.type() == WeightType::q4_0;
  const auto stored = static_cast<Eigen::Index>(row_bytes<T>(W.type(), static_cast<std::size_t>(W.cols())));
  amx_pack_q8_0_x(s, m, nb, a);
  float* d_w = grown(a.d_w, static_cast<std::size_t>(16 * nb));
  unsigned char* pad = grown(a.w, static_cast<std::size_t>(16 * row));
  amx_configure(32, 8);
  const unsigned char* stored_w = q4 ? W.q4_0() : W.q8_0();
  for (Eigen::Index i = begin; i < end; i += 16) {
    const Eigen::Index rows = std::min<Eigen::Index>(16, end - i);
    // The next 16 rows into L2 while these multiply (one pass over W, whose
    // short runs of rows the hardware's prefetchers do not foresee).
    for (Eigen::Index o = 0; o < std::min<Eigen::Index>(16, end - i - 16) * stored; o += 64)
      _mm_prefetch(reinterpret_cast<const char*>(stored_w + (i + 16) * stored + o), _MM_HINT_T1);
    if (q4) {
      amx_unpack_q4_0(W.q4_0() + i * stored, stored, rows, nb, reinterpret_cast<std::int8_t*>(pad), d_w);
      amx_q8_0_rows(pad, nb * 32, 32, nb, a, d_w, Y, m, i, rows);
      continue;
    }
    const unsigned char* w = W.q8_0() + i * row;
    if (rows < 16) {
      std::memcpy(pad, w, static_cast<std::size_t>(rows * row));
      std::memset(pad + rows * row, 0, static_cast<std::size_t>((16 - rows) * row));
      w = pad;
    }
    for (Eigen::Index r = 0; r < 16; ++r)
      for (Eigen::Index b = 0; b < nb; ++b) d_w[r * nb + b] = r < rows ? q8_0_scale(w + r * row + b * 34) : 0.0f;
    amx_q8_0_rows(w + 2, row, 34, nb, a, d_w, Y, m, i, rows);
  }
  _tile_release();
}

// The tokens' values (already bfloat16 values, as float) as B tiles: group g
// of 16 tokens, values [32·c, 32·c + 32) at x[(g·chunks + c)·1024 bytes],
// value 2·kk + e of token tt at bfloat16 16·2·kk… : row kk, pair tt.
inline void amx_pack_bf16_x(const QuantScratch& s, Eigen::Index m, Eigen::Index n, AmxScratch& a) {
  const Eigen::Index groups = (m + 15) / 16, chunks = n / 32;
  auto* x = reinterpret_cast<std::uint16_t*>(grown(a.x, static_cast<std::size_t>(groups * chunks * 1024)));
  for (Eigen::Index g = 0; g < groups; ++g)
    for (Eigen::Index tt = 0; tt < 16; ++tt) {
      const Eigen::Index t = 16 * g + tt;
      for (Eigen::Index j = 0; j < n; ++j) {
        std::uint16_t* tile = x + (g * chunks + j / 32) * 512;
        tile[(j % 32) / 2 * 32 + 2 * tt + j % 2] =
            t < m ? static_cast<std::uint16_t>(float_bits(s.x[static_cast<std::size_t>(t * n + j)]) >> 16) : 0;
      }
    }
}

// 16 rows of bfloat16 values at w (k each: W's values, or f16's split)
// times the tokens of groups [g, g + count), count <= 4, packed by
// amx_pack_bf16_x (amx_pack_f16_x): Y's columns [i, i + rows).
template <typename T>
void amx_bf16_rows(const std::uint16_t* w, Eigen::Index k, const AmxScratch& a, Matrix<T>& Y, Eigen::Index m,
                   Eigen::Index g, Eigen::Index count, Eigen::Index i, Eigen::Index rows) {
  const Eigen::Index chunks = k / 32, stride = k * 2;
  const unsigned char* x = a.x.data() + g * chunks * 1024;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (Eigen::Index c = 0; c < chunks; ++c) {
    _tile_loadd(4, w + 32 * c, stride);
    _tile_loadd(6, x + c * 1024, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (count > 1) {
      _tile_loadd(7, x + (chunks + c) * 1024, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if (count > 2) {
      _tile_loadd(6, x + (2 * chunks + c) * 1024, 64);
      _tile_dpbf16ps(2, 4, 6);
    }
    if (count > 3) {
      _tile_loadd(7, x + (3 * chunks + c) * 1024, 64);
      _tile_dpbf16ps(3, 4, 7);
    }
  }
  alignas(64) float c[4][256];
  _tile_stored(0, c[0], 64);
  _tile_stored(1, c[1], 64);
  _tile_stored(2, c[2], 64);
  _tile_stored(3, c[3], 64);
  for (Eigen::Index u = 0; u < count; ++u)
    for (Eigen::Index r = 0; r < rows; ++r)
      for (Eigen::Index tt = 0; tt < 16 && 16 * (g + u) + tt < m; ++tt)
        Y(16 * (g + u) + tt, i + r) = static_cast<T>(c[u][16 * r + tt]);
}

// f16 on the bfloat16 tile unit, exactly: an f16 value (11 significant
// bits) is hi + lo, hi its top 8 bits and lo the other 3, both bfloat16;
// so are the tokens' values (rounded to f16). Each value becomes 4
// bfloat16 entries, (hi, hi, lo, lo) for W and (x_hi, x_lo, x_hi, x_lo) for
// x, whose products sum to w · x, each exact in float.
inline void amx_split_f16(const std::uint16_t* w, Eigen::Index count, std::uint16_t* out) {
  const __m512i top = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  Eigen::Index j = 0;
  for (; j + 16 <= count; j += 16) {
    const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j)));
    const __m512i hi = _mm512_and_si512(_mm512_castps_si512(f), top);
    const __m512i lo = _mm512_castps_si512(_mm512_sub_ps(f, _mm512_castsi512_ps(hi)));  // exact, low 16 bits 0
    const __m512i hi2 = _mm512_or_si512(hi, _mm512_srli_epi32(hi, 16)), lo2 = _mm512_or_si512(lo, _mm512_srli_epi32(lo, 16));
    _mm512_storeu_si512(out + 4 * j, _mm512_permutex2var_epi32(hi2, first, lo2));
    _mm512_storeu_si512(out + 4 * j + 32, _mm512_permutex2var_epi32(hi2, second, lo2));
  }
  for (; j < count; ++j) {
    const float f = from_f16(w[j]);
    const std::uint32_t hi = float_bits(f) & 0xFFFF0000u;
    const auto lo = static_cast<std::uint16_t>(float_bits(f - bits_float(hi)) >> 16);
    out[4 * j] = out[4 * j + 1] = static_cast<std::uint16_t>(hi >> 16);
    out[4 * j + 2] = out[4 * j + 3] = lo;
  }
}

// The tokens' split values as B tiles (amx_pack_bf16_x's layout, 4 entries
// per value).
inline void amx_pack_f16_x(const QuantScratch& s, Eigen::Index m, Eigen::Index n, AmxScratch& a) {
  const Eigen::Index groups = (m + 15) / 16, chunks = n / 8;
  unsigned char* x = grown(a.x, static_cast<std::size_t>(groups * chunks * 1024));
  std::memset(x, 0, static_cast<std::size_t>(groups * chunks * 1024));
  const __m512i top = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (Eigen::Index t = 0; t < m; ++t) {
    unsigned char* tokens = x + (t / 16) * chunks * 1024 + 4 * (t % 16);
    for (Eigen::Index j = 0; j < n; j += 8) {  // value j + v: (hi, lo) in rows 2v and 2v + 1
      const __m256 f = _mm256_loadu_ps(s.x.data() + t * n + j);
      const __m256i hi = _mm256_and_si256(_mm256_castps_si256(f), _mm512_castsi512_si256(top));
      const __m256i lo = _mm256_castps_si256(_mm256_sub_ps(f, _mm256_castsi256_ps(hi)));
      alignas(32) std::uint32_t pair[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(pair), _mm256_or_si256(_mm256_srli_epi32(hi, 16), lo));
      unsigned char* tile = tokens + (j / 8) * 1024;
      for (int v = 0; v < 8; ++v) {
        std::memcpy(tile + 128 * v, pair + v, 4);
        std::memcpy(tile + 128 * v + 64, pair + v, 4);
      }
    }
  }
}

// Many tokens, f16 (n a multiple of 8), on the tile unit: 16 rows of W at a
// time split into a per-thread buffer.
template <typename T>
void amx_f16_prefill(const WeightMatrix<T>& W, const QuantScratch& s, Matrix<T>& Y, Eigen::Index m,
                     Eigen::Index begin, Eigen::Index end) {
  AmxScratch& a = AmxScratch::mine();
  const Eigen::Index n = W.cols();
  amx_pack_f16_x(s, m, n, a);
  auto* split = reinterpret_cast<std::uint16_t*>(grown(a.w, static_cast<std::size_t>(16 * 8 * n)));
  amx_configure(64, 16);
  for (Eigen::Index i = begin; i < end; i += 16) {
    const Eigen::Index rows = std::min<Eigen::Index>(16, end - i);
    amx_split_f16(W.f16().data() + i * n, rows * n, split);
    std::memset(split + rows * 4 * n, 0, static_cast<std::size_t>((16 - rows) * 8 * n));
    for (Eigen::Index g = 0; g < (m + 15) / 16; g += 4)
      amx_bf16_rows(split, 4 * n, a, Y, m, g, std::min<Eigen::Index>(4, (m + 15) / 16 - g), i, rows);
  }
  _tile_release();
}

// Many tokens, bf16 (n a multiple of 32), on the tile unit.
template <typename T>
void amx_bf16_prefill(const WeightMatrix<T>& W, const QuantScratch& s, Matrix<T>& Y, Eigen::Index m,
                      Eigen::Index begin, Eigen::Index end) {
  AmxScratch& a = AmxScratch::mine();
  const Eigen::Index n = W.cols();
  amx_pack_bf16_x(s, m, n, a);
  amx_configure(64, 16);
  for (Eigen::Index i = begin; i < end; i += 16) {
    const Eigen::Index rows = std::min<Eigen::Index>(16, end - i);
    const std::uint16_t* w = W.bf16().data() + i * n;
    if (rows < 16) {
      auto* pad = reinterpret_cast<std::uint16_t*>(grown(a.w, static_cast<std::size_t>(16 * n * 2)));
      std::memcpy(pad, w, static_cast<std::size_t>(rows * n * 2));
      std::memset(pad + rows * n, 0, static_cast<std::size_t>((16 - rows) * n * 2));
      w = pad;
    }
    for (Eigen::Index g = 0; g < (m + 15) / 16; g += 4)
      amx_bf16_rows(w, n, a, Y, m, g, std::min<Eigen::Index>(4, (m + 15) / 16 - g), i, rows);
  }
  _tile_release();
}
#endif

// Many tokens: X rounded or quantized as above, back in T, times tiles of W
// widened to T (kPrefillTileBytes each, in L2), by Eigen.
constexpr Eigen::Index kPrefillTileBytes = 512 << 10;

template <typename T>
void quant_prefill(const Eigen::Ref<const Matrix<T>>& X, const WeightMatrix<T>& W, const QuantScratch& s,
                   Matrix<T>& Y, Eigen::Index begin, Eigen::Index end) {
  const Eigen::Index m = X.rows(), in = X.cols(), n = end - begin;
  Matrix<T> X_as_w(m, in);
  for (Eigen::Index t = 0; t < m; ++t)
    for (Eigen::Index j = 0; j < in; ++j)
      X_as_w(t, j) = static_cast<T>(!q8_input(W.type()) ? s.x[static_cast<std::size_t>(t * in + j)]
                                                                 : s.d[static_cast<std::size_t>((t * in + j) / 32)] *
                                                                       static_cast<float>(s.q[static_cast<std::size_t>(t * in + j)]));
  const Eigen::Index tile = std::min(n, std::max<Eigen::Index>(16, kPrefillTileBytes / std::max<Eigen::Index>(1, in * Eigen::Index{sizeof(T)})));
  Matrix<T> widened(tile, in);
  for (Eigen::Index r = begin; r < end; r += tile) {
    const Eigen::Index rows = std::min(tile, end - r);
    widen_rows(W, r, rows, widened.data());
    Y.middleCols(r, rows).noalias() = X_as_w * widened.topRows(rows).transpose();
  }
}

// Y[:, begin:end] = X · W[begin:end, :]ᵀ for W stored as f16, q8_0, q4_0 or, over
// a GGUF file, bf16 (see
// linear_rows in parallel.hpp; the bias is its business).
template <int Tokens, typename T>
void quant_linear_rows(const Eigen::Ref<const Matrix<T>>& X, const WeightMatrix<T>& W, Matrix<T>& Y,
                       Eigen::Index begin, Eigen::Index end, Eigen::Index few_tokens) {
  QuantScratch& s = QuantScratch::mine();
  prepare_inputs<T>(X, W.type(), s);
  if (X.rows() < few_tokens)
    quant_decode<Tokens>(W, s, Y, X.rows(), begin, end);
#if defined(KVCACHE_QUANT_AMX)
  else if ((W.type() == WeightType::q8_0 || (W.type() == WeightType::q4_0 && q4_0_repacked(W.rows()))) && amx_usable())
    amx_q8_0_prefill<T>(W, s, Y, X.rows(), begin, end);
#endif
#if defined(KVCACHE_QUANT_AMX)
  else if (W.type() == WeightType::f16 && W.cols() % 8 == 0 && amx_usable())
    amx_f16_prefill<T>(W, s, Y, X.rows(), begin, end);
  else if (W.type() == WeightType::bf16 && W.cols() % 32 == 0 && amx_usable())
    amx_bf16_prefill<T>(W, s, Y, X.rows(), begin, end);
#endif
#if defined(KVCACHE_QUANT_Q8_TILE)
  else if (W.type() == WeightType::q8_0)
    q8_0_prefill<T>(W, s, Y, X.rows(), begin, end);
#endif
  else if (W.type() == WeightType::q4_0)
    quant_decode<Tokens>(W, s, Y, X.rows(), begin, end);
  else
    quant_prefill<T>(X, W, s, Y, begin, end);
}

}  // namespace detail
}  // namespace kvcache
