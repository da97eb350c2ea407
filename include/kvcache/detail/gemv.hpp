// kvcache/detail/gemv.hpp — the matrix-vector products of a decode step:
// y_i = W_i · x for a range of rows of a row-major W, as T or bfloat16.
// Not API.
//
// A decode step reads every weight once and does one multiply-add with it,
// so these loops are bound by memory bandwidth, not arithmetic. They stream
// through W one row at a time (one contiguous run of memory per thread) with
// several independent accumulators. Each y_i is computed the same way
// whatever range it falls in, so splitting rows across threads changes no
// bit of the result.
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

namespace kvcache {
namespace detail {

// y_k[i] = W[i, :] · x_k for K tokens k = 0 … K−1 and i in [begin, end); W
// is row-major with n columns. Eigen's packets (SSE, AVX, AVX-512, NEON:
// whatever the build targets), four accumulators per token, then one packet
// at a time, then scalars. Each packet of W is loaded once for all K tokens
// (a batch of sessions decoding together), and every token's sum is formed
// in the same order as for K = 1: a token's result does not depend on the
// tokens it is batched with. W is read one row at a time, front to back,
// which the hardware prefetchers follow best (interleaving four rows, to
// load each packet of x once for several rows, made decode 3× slower).
template <int K, typename T>
void gemv_rows_k(const T* W, Eigen::Index n, const T* const* x, T* const* y, Eigen::Index begin, Eigen::Index end) {
  namespace ei = Eigen::internal;
  using Packet = typename ei::packet_traits<T>::type;
  constexpr Eigen::Index P = ei::packet_traits<T>::size;
  for (Eigen::Index i = begin; i < end; ++i) {
    const T* w = W + i * n;
    Packet a[K][4];
    for (int k = 0; k < K; ++k) a[k][0] = a[k][1] = a[k][2] = a[k][3] = ei::pset1<Packet>(T(0));
    Eigen::Index j = 0;
    for (; j + 4 * P <= n; j += 4 * P) {
      for (int u = 0; u < 4; ++u) {
        const Packet w_u = ei::ploadu<Packet>(w + j + u * P);
        for (int k = 0; k < K; ++k) a[k][u] = ei::pmadd(w_u, ei::ploadu<Packet>(x[k] + j + u * P), a[k][u]);
      }
    }
    for (; j + P <= n; j += P) {
      const Packet w_j = ei::ploadu<Packet>(w + j);
      for (int k = 0; k < K; ++k) a[k][0] = ei::pmadd(w_j, ei::ploadu<Packet>(x[k] + j), a[k][0]);
    }
    for (int k = 0; k < K; ++k) {
      T sum = ei::predux(ei::padd(ei::padd(a[k][0], a[k][1]), ei::padd(a[k][2], a[k][3])));
      for (Eigen::Index r = j; r < n; ++r) sum += w[r] * x[k][r];
      y[k][i] = sum;
    }
  }
}

// Tokens gemv_rows_k takes at once: its 4·K accumulators and a packet of W
// and of x must fit in the vector registers (32 with AVX-512, 16 with AVX2).
constexpr int kGemvTokens = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 4 : 2;

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

}  // namespace detail
}  // namespace kvcache
