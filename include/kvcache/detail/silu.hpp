// kvcache/detail/silu.hpp — SwiGLU's silu(a) · g computed as llama.cpp's CPU
// backend (ggml) computes it, for models read from GGUF files. Not API.
//
// ggml's fused SwiGLU takes a row 16 values at a time (its AVX-512 build,
// the one llama.cpp picks on an AVX-512 machine), silu(a) = a / (1 + e^−a)
// with its own vector exp, and the last n % 16 values one at a time with
// the C library's expf. Its exp is the polynomial of Arm's optimized
// routines (error about 1.5 ulp): e^x = 2^k · p(x − k·ln 2), k = round(x /
// ln 2), ln 2 split in two parts, p of degree 5. kvcache's own SiLU (Eigen's
// exp) differs from it in the last bits, and one such bit can round the
// f16 input of ffn_down the other way; computing the same operations in the
// same order gives the same bits.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <Eigen/Core>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace kvcache {
namespace detail {

// ggml's vector exp of one float: the same fused multiply-adds, in order.
inline float ggml_expf(float x) {
  const float shift = 0x1.8p23f;  // adding it rounds x / ln 2 to an integer
  const float z = std::fma(x, 0x1.715476p+0f, shift);
  const float k = z - shift;
  const float b = std::fma(-k, 0x1.7f7d1cp-20f, std::fma(-k, 0x1.62e4p-1f, x));  // x − k·ln 2
  const float u = b * b;
  const float p = std::fma(std::fma(std::fma(0x1.0e4020p-7f, b, 0x1.573e2ep-5f), u, std::fma(0x1.555e66p-3f, b, 0x1.fffdb6p-2f)),
                           u, std::fma(0x1.ffffecp-1f, b, 1.0f));
  if (std::fabs(k) > 192) return k > 0 ? INFINITY : 0.0f;
  if (k >= -126 && k <= 127) {  // 2^k is a normal float: one rounding, as AVX-512's scalef
    const std::uint32_t bits = static_cast<std::uint32_t>(static_cast<int>(k) + 127) << 23;
    float two_k;
    std::memcpy(&two_k, &bits, sizeof two_k);
    return p * two_k;
  }
  return std::ldexp(p, static_cast<int>(k));  // exact or one rounding, as scalef
}

#if defined(__AVX512F__)
// The same operations on 16 floats at once (as ggml's AVX-512 build does
// them; the scalar ggml_expf stands for each lane).
inline __m512 ggml_expf16(__m512 x) {
  const __m512 shift = _mm512_set1_ps(0x1.8p23f);
  const __m512 z = _mm512_fmadd_ps(x, _mm512_set1_ps(0x1.715476p+0f), shift);
  const __m512 k = _mm512_sub_ps(z, shift);
  const __m512 b =
      _mm512_fnmadd_ps(k, _mm512_set1_ps(0x1.7f7d1cp-20f), _mm512_fnmadd_ps(k, _mm512_set1_ps(0x1.62e4p-1f), x));
  const __m512 u = _mm512_mul_ps(b, b);
  const __m512 p = _mm512_fmadd_ps(
      _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_set1_ps(0x1.0e4020p-7f), b, _mm512_set1_ps(0x1.573e2ep-5f)), u,
                      _mm512_fmadd_ps(_mm512_set1_ps(0x1.555e66p-3f), b, _mm512_set1_ps(0x1.fffdb6p-2f))),
      u, _mm512_fmadd_ps(_mm512_set1_ps(0x1.ffffecp-1f), b, _mm512_set1_ps(1.0f)));
  const __m512 e = _mm512_maskz_scalef_ps(0xFFFF, p, k);  // (maskz: g++ 12 warns on the unmasked form)
  const __mmask16 huge = _mm512_cmp_ps_mask(_mm512_abs_ps(k), _mm512_set1_ps(192), _CMP_GT_OQ);
  const __m512 edge = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(k, _mm512_setzero_ps(), _CMP_LE_OQ),
                                           _mm512_set1_ps(INFINITY), _mm512_setzero_ps());
  return _mm512_mask_blend_ps(huge, e, edge);
}
#endif

// a[i] = silu(a[i]) · g[i] for the `count` values of a row of n that start
// at column `begin` (a and g point at that column), as ggml_vec_swiglu_f32
// computes them: the vector exp below n − n % 16, expf in the tail.
template <typename T>
void swiglu_like_ggml(T* a, const T* g, Eigen::Index begin, Eigen::Index count, Eigen::Index n) {
  const Eigen::Index vector_end = n - n % 16;
  Eigen::Index i = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>)
    for (; i + 16 <= count && begin + i + 16 <= vector_end; i += 16) {
      const __m512 x = _mm512_loadu_ps(a + i);
      const __m512 silu = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), ggml_expf16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
      _mm512_storeu_ps(a + i, _mm512_mul_ps(silu, _mm512_loadu_ps(g + i)));
    }
#endif
  for (; i < count; ++i) {
    const float x = static_cast<float>(a[i]);
    const float e = begin + i < vector_end ? ggml_expf(0.0f - x) : std::exp(-x);
    a[i] = static_cast<T>(x / (1.0f + e) * static_cast<float>(g[i]));
  }
}

}  // namespace detail
}  // namespace kvcache
