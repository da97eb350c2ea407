// kvcache/detail/gemv.hpp — the matrix-vector products of a decode step:
// y_i = W_i · x for a range of rows of a row-major W, as T or bfloat16.
// Not API.
//
// A decode step reads every weight once and does one multiply-add with it
// per token. With one token these loops are bound by memory bandwidth; with
// a batch of tokens (sessions decoding together) each weight is loaded into
// a register once and multiplied with every token's input there (register
// blocking: gemv_block), so the batch is bound by reading W and by the
// multiply rate, not by loads. Each y_i is computed the same way whatever
// range it falls in and whatever tokens it is batched with, so splitting
// rows across threads or batching sessions changes no bit of the result.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include <Eigen/Core>

#include "../storage.hpp"

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define KVCACHE_GEMV_AVX512BF16 1
#endif

#if defined(EIGEN_VECTORIZE_AVX512)
#include <immintrin.h>
#define KVCACHE_GEMV_AVX512 1
#endif

namespace kvcache {
namespace detail {

#ifdef KVCACHE_GEMV_AVX512
// The sum of a's 16 lanes by halves: s8[l] = a[l] + a[l+8], s4[l] = s8[l] +
// s8[l+4], s2[l] = s4[l] + s4[l+2], s2[0] + s2[1]. hsum16 forms exactly
// these sums (float addition is commutative), so both give the same bits.
inline __m256 half_of(__m512 a, int hi) {  // masked: see shuffle_chunks
  return _mm256_castpd_ps(hi ? _mm512_mask_extractf64x4_pd(_mm256_setzero_pd(), 0xF, _mm512_castps_pd(a), 1)
                             : _mm512_mask_extractf64x4_pd(_mm256_setzero_pd(), 0xF, _mm512_castps_pd(a), 0));
}
inline float hsum(__m512 a) {
  const __m256 s8 = _mm256_add_ps(half_of(a, 0), half_of(a, 1));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

// A shuffle of 128-bit chunks (g++ 12 warns of an uninitialised operand
// inside _mm512_shuffle_f32x4, GCC bug 105593: its masked form has none).
template <int Imm>
__m512 shuffle_chunks(__m512 a, __m512 b) {
  return _mm512_mask_shuffle_f32x4(a, 0xFFFF, a, b, Imm);
}

// out[i] = hsum(v[i]) for 16 vectors, the four halvings done for all of
// them at once (15 additions instead of 60, and fewer shuffles).
inline void hsum16(const __m512* v, float* out) {
  __m512 c[8], e[4], g[2];
  for (int p = 0; p < 8; ++p)  // c[p]: s8 of v[2p] (128-bit chunks 0, 1), of v[2p+1] (2, 3)
    c[p] = _mm512_add_ps(shuffle_chunks<0x44>(v[2 * p], v[2 * p + 1]),
                         shuffle_chunks<0xEE>(v[2 * p], v[2 * p + 1]));
  for (int q = 0; q < 4; ++q)  // e[q]: s4 of v[4q + m] in chunk m
    e[q] = _mm512_add_ps(shuffle_chunks<0x88>(c[2 * q], c[2 * q + 1]),
                         shuffle_chunks<0xDD>(c[2 * q], c[2 * q + 1]));
  for (int r = 0; r < 2; ++r)  // g[r] chunk m: s2 of v[8r + m] (lanes 0, 1), of v[8r + 4 + m] (2, 3)
    g[r] = _mm512_add_ps(_mm512_shuffle_ps(e[2 * r], e[2 * r + 1], 0x44),
                         _mm512_shuffle_ps(e[2 * r], e[2 * r + 1], 0xEE));
  // Lane 4m + j: the sum of v[4j + m].
  alignas(64) float h[16];
  _mm512_store_ps(h, _mm512_add_ps(_mm512_shuffle_ps(g[0], g[1], 0x88), _mm512_shuffle_ps(g[0], g[1], 0xDD)));
  for (int i = 0; i < 16; ++i) out[i] = h[4 * (i % 4) + i / 4];
}
#endif

// out[i] = the sum of the lanes of a[i] for i < N, in an order that depends
// on neither N nor i (a token's result must not depend on its batch).
template <int N, typename T, typename Packet>
void hsum_n(const Packet* a, T* out) {
#ifdef KVCACHE_GEMV_AVX512
  if constexpr (std::is_same_v<T, float> && Eigen::internal::packet_traits<T>::size == 16) {
    int i = 0;
    for (; N >= 8 && i + 8 <= N; i += 16) {  // groups of 16, the last padded with zeros
      __m512 v[16];
      for (int k = 0; k < 16; ++k) v[k] = i + k < N ? a[i + k] : _mm512_setzero_ps();
      float s[16];
      hsum16(v, s);
      for (int k = 0; k < 16 && i + k < N; ++k) out[i + k] = s[k];
    }
    for (; i < N; ++i) out[i] = hsum(a[i]);
    return;
  } else {  // double: Eigen's predux trips GCC bug 105593 here; halvings in scalars
    constexpr int P = Eigen::internal::unpacket_traits<Packet>::size;
    for (int i = 0; i < N; ++i) {
      alignas(64) T t[P];
      Eigen::internal::pstore(t, a[i]);
      for (int w = P / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; ++l) t[l] += t[l + w];
      out[i] = t[0];
    }
    return;
  }
#endif
  for (int i = 0; i < N; ++i) out[i] = Eigen::internal::predux(a[i]);
}

// Vector registers of the build's target (32 with AVX-512 or NEON, 16 with
// AVX2 or SSE).
constexpr int kGemvRegisters = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS;

// Rows of W that gemv_block multiplies at once with K tokens: its R·K
// accumulators, R packets of W and one of x in the registers, one spare.
constexpr int gemv_block_rows(int K) {
  const int R = (kGemvRegisters - 2) / (K + 1);
  return R < 1 ? 1 : (R > 4 ? 4 : R);
}

// y_k[i + r] = W[i + r, :] · x_k for R rows r = 0 … R−1 and K tokens
// k = 0 … K−1; W is row-major with n columns. Register blocking: each packet
// of W is loaded once for all K tokens and each packet of x_k once for all
// R rows, so R·K multiply-adds cost R + K loads (a batch of sessions
// decoding together is then bound by the multiply rate and by reading W,
// not by loads). Eigen's packets (SSE, AVX, AVX-512, NEON: whatever the
// build targets). Every sum has one accumulator, fed the packets of its row
// front to back, then hsum_n, then the columns left over one by one:
// a fixed order whatever R and K are, so a token's result does not depend
// on how many tokens it is batched with nor on where its row falls.
template <int R, int K, typename T>
void gemv_block(const T* W, Eigen::Index n, const T* const* x, T* const* y, Eigen::Index i) {
  namespace ei = Eigen::internal;
  using Packet = typename ei::packet_traits<T>::type;
  constexpr Eigen::Index P = ei::packet_traits<T>::size;
  const T* w[R];
  for (int r = 0; r < R; ++r) w[r] = W + (i + r) * n;
  Packet a[R][K];
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < K; ++k) a[r][k] = ei::pset1<Packet>(T(0));
  // With several tokens the loop is too slow for the hardware prefetchers
  // to stay ahead of it (measured: 2-4x faster with W in memory); one token
  // streams W fast enough without.
  const auto ahead = static_cast<std::uintptr_t>(2 * R * n) * sizeof(T);
  Eigen::Index j = 0;
  for (; j + P <= n; j += P) {
    Packet w_j[R];
    for (int r = 0; r < R; ++r) w_j[r] = ei::ploadu<Packet>(w[r] + j);
    if (K > 1)  // the same columns 2R rows on (an address: may be past W's end)
      for (int r = 0; r < R; ++r)
        ei::prefetch(reinterpret_cast<const T*>(reinterpret_cast<std::uintptr_t>(w[r] + j) + ahead));
    for (int k = 0; k < K; ++k) {
      const Packet x_j = ei::ploadu<Packet>(x[k] + j);
      for (int r = 0; r < R; ++r) a[r][k] = ei::pmadd(w_j[r], x_j, a[r][k]);
    }
  }
  T sums[R * K];
  hsum_n<R * K, T>(&a[0][0], sums);
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < K; ++k) {
      T sum = sums[r * K + k];
      for (Eigen::Index q = j; q < n; ++q) sum += w[r][q] * x[k][q];
      y[k][i + r] = sum;
    }
}

// y_k[i] = W[i, :] · x_k for K tokens and i in [begin, end): gemv_block over
// the rows, gemv_block_rows(K) at a time, then one by one.
template <int K, typename T>
void gemv_rows_k(const T* W, Eigen::Index n, const T* const* x, T* const* y, Eigen::Index begin, Eigen::Index end) {
  constexpr int R = gemv_block_rows(K);
  Eigen::Index i = begin;
  for (; i + R <= end; i += R) gemv_block<R, K>(W, n, x, y, i);
  for (; i < end; ++i) gemv_block<1, K>(W, n, x, y, i);
}

// Tokens quant.hpp's few-token kernels take at once.
constexpr int kGemvTokens = kGemvRegisters >= 32 ? 4 : 2;

// y[i] = W[i, :] · x for i in [begin, end): one token.
template <typename T>
void gemv_rows(const T* W, Eigen::Index n, const T* x, T* y, Eigen::Index begin, Eigen::Index end) {
  gemv_rows_k<1>(W, n, &x, &y, begin, end);
}

#ifdef KVCACHE_GEMV_AVX512BF16
// AVX-512 BF16: _mm512_dpbf16_ps multiplies pairs of bfloat16 and adds both
// products to a float lane, so x must be bfloat16 too. Rounding x to
// bfloat16 would keep 8 of its 24 bits; instead x = x_hi + x_lo, two
// bfloat16 (x_lo the rounding error of x_hi), which keeps 16, and
// W·x = W·x_hi + W·x_lo, two instructions per 32 weights. The products are
// exact in float; the sums are float, as in the portable loop.
inline void gemv_rows_bf16_avx512(const std::uint16_t* W, Eigen::Index n, const float* x, float* y,
                                  Eigen::Index begin, Eigen::Index end) {
  // x is split in chunks of C columns, on the stack (no allocation in a
  // decode step): all of x for every model up to d_ff = C.
  constexpr Eigen::Index C = 8192;
  alignas(64) std::uint16_t x_hi[C], x_lo[C];
  for (Eigen::Index c0 = 0; c0 < n; c0 += C) {
    const Eigen::Index nc = std::min(C, n - c0), n32 = nc / 32 * 32;
    // 16 at a time with the instruction that rounds to bfloat16 (to nearest
    // even, as float_to_bf16): a prefill calls this once per token and tile
    // of rows, where a scalar loop would cost as much as the products.
    Eigen::Index k = 0;
    for (; k + 16 <= nc; k += 16) {
      const __m512 v = _mm512_loadu_ps(x + c0 + k);
      const __m256i hi = (__m256i)_mm512_cvtneps_pbh(v);
      const __m512 hi_f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
      _mm256_store_si256((__m256i*)(x_hi + k), hi);
      _mm256_store_si256((__m256i*)(x_lo + k), (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, hi_f)));
    }
    for (; k < nc; ++k) {
      x_hi[k] = float_to_bf16(x[c0 + k]);
      x_lo[k] = float_to_bf16(x[c0 + k] - from_bf16(x_hi[k]));
    }
    for (Eigen::Index i = begin; i < end; ++i) {
      const std::uint16_t* w = W + i * n + c0;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
      Eigen::Index j = 0;
      for (; j + 64 <= n32; j += 64) {
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + j), w1 = (__m512bh)_mm512_loadu_si512(w + j + 32);
        a0 = _mm512_dpbf16_ps(a0, w0, (__m512bh)_mm512_load_si512(x_hi + j));
        a1 = _mm512_dpbf16_ps(a1, w0, (__m512bh)_mm512_load_si512(x_lo + j));
        a2 = _mm512_dpbf16_ps(a2, w1, (__m512bh)_mm512_load_si512(x_hi + j + 32));
        a3 = _mm512_dpbf16_ps(a3, w1, (__m512bh)_mm512_load_si512(x_lo + j + 32));
      }
      if (j < n32) {
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + j);
        a0 = _mm512_dpbf16_ps(a0, w0, (__m512bh)_mm512_load_si512(x_hi + j));
        a1 = _mm512_dpbf16_ps(a1, w0, (__m512bh)_mm512_load_si512(x_lo + j));
        j += 32;
      }
      float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
      for (; j < nc; ++j) sum += from_bf16(w[j]) * x[c0 + j];
      y[i] = c0 == 0 ? sum : y[i] + sum;
    }
  }
}
#endif

// y[i] = W[i, :] · x for i in [begin, end), W stored as bfloat16 (row-major,
// n columns); the products and sums are in T (for float, with the weights
// exact: a bfloat16 widens to float without loss). Portable: a plain loop
// over 16 lanes, which compilers vectorise (the widening is a shift into the
// high half of a 32-bit lane).
template <typename T>
void gemv_rows_bf16(const std::uint16_t* W, Eigen::Index n, const T* x, T* y, Eigen::Index begin, Eigen::Index end) {
#ifdef KVCACHE_GEMV_AVX512BF16
  if constexpr (std::is_same_v<T, float>) return gemv_rows_bf16_avx512(W, n, x, y, begin, end);
#endif
  constexpr int L = 16;
  for (Eigen::Index i = begin; i < end; ++i) {
    const std::uint16_t* w = W + i * n;
    T acc[L] = {};
    Eigen::Index j = 0;
    for (; j + L <= n; j += L)
      for (int k = 0; k < L; ++k) acc[k] += static_cast<T>(from_bf16(w[j + k])) * x[j + k];
    T sum = 0;
    for (int k = 0; k < L; ++k) sum += acc[k];
    for (; j < n; ++j) sum += static_cast<T>(from_bf16(w[j])) * x[j];
    y[i] = sum;
  }
}

// gemv_rows_k with W stored as bfloat16: one token after the other.
template <int K, typename T>
void gemv_rows_k(const std::uint16_t* W, Eigen::Index n, const T* const* x, T* const* y, Eigen::Index begin,
                 Eigen::Index end) {
  for (int k = 0; k < K; ++k) gemv_rows_bf16(W, n, x[k], y[k], begin, end);
}

// Tokens gemv_rows_k takes at once in a batch (gemv_rows_upto).
constexpr int kGemvBatch = kGemvRegisters >= 32 ? 8 : 4;

// gemv_rows_k for `count` tokens, 1 <= count <= K (at most kGemvBatch).
template <int K = kGemvBatch, typename W_t, typename T>
void gemv_rows_upto(int count, const W_t* W, Eigen::Index n, const T* const* x, T* const* y, Eigen::Index begin,
                    Eigen::Index end) {
  if constexpr (K > 1) {
    if (count < K) {
      gemv_rows_upto<K - 1>(count, W, n, x, y, begin, end);
      return;
    }
  }
  gemv_rows_k<K>(W, n, x, y, begin, end);
}

}  // namespace detail
}  // namespace kvcache
