// kvcache/detail/ggml_math.hpp — the steps between the matrix products
// computed as llama.cpp's CPU backend (ggml) computes them, for models read
// from GGUF files (Numerics::ggml). Not API.
//
// Greedy decoding with q8_0 weights quantizes every product's input, so a
// last-bit difference anywhere can move a value across a rounding boundary
// and, hundreds of steps later, change an id. Each function here gives
// ggml's bits: checked op by op against llama.cpp's own intermediate tensors
// (its AVX-512 build, node-llama-cpp 3.21.1's libggml-cpu-zen4.so, read
// through its eval callback) on stories260K, 200 decode steps:
//   rms_norm_like_ggml   the sum of squares in double (ggml_compute_forward_rms_norm_f32)
//   rotate_like_ggml     RoPE (detail/rope.hpp: ggml's angles)
//   dot_like_ggml        K · q: ggml_vec_dot_f32's 64 lanes, then the tail in order
//   softmax_like_ggml    scaled scores, ggml's vector exp in blocks of 16, the sum in double
//   ValueLanes           P · V: ggml_vec_dot_f32's 64 lanes over the slots
//                        (decode), tinyBLAS's 16 (a prompt of several tokens)
//   swiglu_like_ggml     silu(a) · g with ggml's vector exp
//
// ggml's exp is the polynomial of Arm's optimized routines (error about 1.5
// ulp): e^x = 2^k · p(x − k·ln 2), k = round(x / ln 2), ln 2 split in two
// parts, p of degree 5. Where ggml's compiler fused a multiply and an add
// (RoPE's rotation) kvcache calls std::fma; where it did not (the dot
// product's tail), rounded() keeps this compiler from fusing them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>
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


// out[l] = e^(x[l] − max) for l < count, as ggml_v_expf.
inline void exp_block(const float* x, std::size_t count, float max, float* out) {
#if defined(__AVX512F__)
  const __m512 v = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1), x);
  const __m512 e = ggml_expf16(_mm512_sub_ps(v, _mm512_set1_ps(max)));
  _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << count) - 1), e);
#else
  for (std::size_t l = 0; l < count; ++l) out[l] = ggml_expf(x[l] - max);
#endif
}

// x as computed, kept from being fused into a following add or subtract (a
// compiler that contracts, such as g++ by default, would make x·y + z one
// fused multiply-add where ggml rounds x·y first).
template <typename T>
T rounded(T x) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+x"(x));
#elif defined(__GNUC__)
  __asm__("" : "+m"(x));
#endif
  return x;
}

// a[0] = the sum of a[0, n) by halves: a[l] += a[l + n/2], n a power of two:
// the lanes of ggml's reductions (64 → 32 → 16 as GGML_F32_VEC_REDUCE, then
// 16 → 8 → 4 → 2 → 1 as _mm512_reduce_add_ps), each "lane" d values wide.
inline void fold_lanes(float* a, std::size_t n, std::size_t d) {
  for (std::size_t half = n / 2; half >= 1; half /= 2)
    for (std::size_t l = 0; l < half * d; ++l) a[l] = a[l] + a[l + half * d];
}

// y = x / √(mean(x²) + eps) · gamma for one row of n.
inline void rms_norm_like_ggml(const float* x, const float* gamma, float* y, std::size_t n, float eps) {
  double sum = 0.0;
  for (std::size_t i = 0; i < n; ++i) sum += static_cast<double>(x[i] * x[i]);
  const auto mean = static_cast<float>(sum / static_cast<double>(n));
  const float scale = 1.0f / std::sqrt(mean + eps);
  for (std::size_t i = 0; i < n; ++i) y[i] = x[i] * scale * gamma[i];
}

#if defined(__AVX512F__)
// The 16 lanes of v summed by halves, as fold_lanes(…, 16, 1) (and g++'s
// _mm512_reduce_add_ps) adds them.
inline float fold16(__m512 v) {
  alignas(64) float a[16];  // (through memory: g++ 12 warns on the extract intrinsics' undefined operands)
  _mm512_store_ps(a, v);
  fold_lanes(a, 16, 1);
  return a[0];
}
#endif

// ggml_vec_dot_f32: x · y, its first n − n % 64 products in 64 lanes of fused
// multiply-adds (lane i % 64), folded; the rest added one at a time. With
// AVX-512 the lanes are ggml's four registers (the same bits).
inline float dot_like_ggml(const float* x, const float* y, std::size_t n) {
  const std::size_t lanes_end = n - n % 64;
  float sum = 0.0f;
  if (lanes_end > 0) {
#if defined(__AVX512F__)
    __m512 s[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (std::size_t i = 0; i < lanes_end; i += 64)
      for (std::size_t k = 0; k < 4; ++k)
        s[k] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16 * k), _mm512_loadu_ps(y + i + 16 * k), s[k]);
    sum = fold16(_mm512_add_ps(_mm512_add_ps(s[0], s[2]), _mm512_add_ps(s[1], s[3])));
#else
    float a[64] = {};
    for (std::size_t i = 0; i < lanes_end; ++i) a[i % 64] = std::fma(x[i], y[i], a[i % 64]);
    fold_lanes(a, 64, 1);
    sum = a[0];
#endif
  }
  for (std::size_t i = lanes_end; i < n; ++i) sum = sum + rounded(x[i] * y[i]);
  return sum;
}

// One pair (x0, x1) of RoPE rotated by the angle whose cos and sin are c
// and s, as ggml's rotate_pairs (its compiler fused one product into each).
template <typename T>
void rotate_like_ggml(T* pair, T c, T s) {
  const T x0 = pair[0], x1 = pair[1];
  pair[0] = std::fma(x0, c, -rounded(x1 * s));
  pair[1] = std::fma(x0, s, rounded(x1 * c));
}

// Softmax of row[0, n_valid) · scale in place (ggml_soft_max_ext): the
// scaled row's maximum subtracted, ggml's vector exp 16 values at a time
// (ggml pads the row to a multiple of 256 with −∞, so every value takes the
// vector exp, never the C library's), each block of 16 summed by halves and
// added in double, then every value times the float of 1 / sum. row[n_valid,
// n) (the masked future) becomes 0.
inline void softmax_like_ggml(float* row, std::size_t n_valid, std::size_t n, float scale) {
  float max = -INFINITY;
  for (std::size_t j = 0; j < n_valid; ++j) {
    row[j] *= scale;
    max = std::max(max, row[j]);
  }
  double sum = 0.0;
  for (std::size_t j = 0; j < n_valid; j += 16) {
    float block[16] = {};  // past n_valid: e^−∞ = 0
    const std::size_t count = std::min<std::size_t>(16, n_valid - j);
    exp_block(row + j, count, max, block);
    for (std::size_t l = 0; l < count; ++l) row[j + l] = block[l];
    fold_lanes(block, 16, 1);
    sum += static_cast<double>(block[0]);
  }
  const auto inverse = static_cast<float>(1.0 / sum);
  for (std::size_t j = 0; j < n_valid; ++j) row[j] *= inverse;
  for (std::size_t j = n_valid; j < n; ++j) row[j] = 0.0f;
}

// out = Σ_j p_j · v_j (v_j rows of d values) as ggml sums it: each output
// value in L lanes of fused multiply-adds, slot j into lane j % L, then
// folded. ggml's decode (one query token) takes ggml_vec_dot_f32's 64 lanes;
// a prompt of several tokens tinyBLAS's 16 (its f32 product, used from two
// tokens on). Up to kValueLaneRows / L rows at once, over L × d floats each
// in `lanes`.
constexpr std::size_t kValueLaneRows = 256;

class ValueLanes {
 public:
  ValueLanes(float* lanes, std::size_t L, std::size_t d) : a_(lanes), L_(L), d_(d) {}
  std::size_t rows_at_once() const { return kValueLaneRows / L_; }
  void clear(std::size_t rows) { std::fill(a_, a_ + rows * L_ * d_, 0.0f); }
  void add(std::size_t r, std::size_t j, float p, const float* v) {
    float* a = a_ + (r * L_ + j % L_) * d_;
    for (std::size_t e = 0; e < d_; ++e) a[e] = std::fma(p, v[e], a[e]);
  }
  void fold_into(std::size_t r, float* out) {
    float* a = a_ + r * L_ * d_;
    fold_lanes(a, L_, d_);
    std::copy(a, a + d_, out);
  }

 private:
  float* a_;
  std::size_t L_, d_;
};

}  // namespace detail
}  // namespace kvcache
