// tests/test_ggml_math.cpp — detail/ggml_math.hpp, the steps between the
// matrix products as llama.cpp's CPU backend computes them (Numerics::ggml):
// each function against llama.cpp's own results for llama.cpp's own inputs
// (ggml_math_fixture.hpp), bit for bit, and against the plain math.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include <gtest/gtest.h>
#include <kvcache/detail/ggml_math.hpp>
#include <kvcache/detail/rope.hpp>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "ggml_math_fixture.hpp"

namespace {

namespace kd = kvcache::detail;
namespace fx = ggml_fixture;

std::uint32_t bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

template <std::size_t N>
std::vector<float> floats(const std::uint32_t (&b)[N]) {
  std::vector<float> v(N);
  std::memcpy(v.data(), b, sizeof b);
  return v;
}

// got == want bit for bit, value by value (NaN never equals: bits differ or
// both are NaN and the check below fails).
template <std::size_t N>
void expect_bits(const std::vector<float>& got, const std::uint32_t (&want)[N], const char* what) {
  ASSERT_EQ(got.size(), N) << what;
  for (std::size_t i = 0; i < N; ++i) {
    ASSERT_FALSE(std::isnan(got[i])) << what << " [" << i << "]";
    EXPECT_EQ(bits(got[i]), want[i]) << what << " [" << i << "]: " << got[i];
  }
}

TEST(GgmlMath, RmsNormGivesLlamaCppsBits) {
  const std::vector<float> x = floats(fx::kNormX), ones(64, 1.0f);
  std::vector<float> y(x.size());
  for (std::size_t r = 0; r < x.size() / 64; ++r)
    kd::rms_norm_like_ggml(x.data() + 64 * r, ones.data(), y.data() + 64 * r, 64, 1e-5f);
  expect_bits(y, fx::kNormY, "rms_norm");
}

TEST(GgmlMath, RopeGivesLlamaCppsBits) {
  std::vector<float> q = floats(fx::kRopeIn);
  Eigen::Map<kvcache::Matrix<float>> Q(q.data(), 1, static_cast<Eigen::Index>(q.size()));
  kd::Rope<float>(8, 10000.0, kvcache::Numerics::ggml).apply(Q, 70);
  expect_bits(q, fx::kRopeOut, "rope");
  // kvcache's own angles (llama2.c's): the same rotation to a few ulps.
  std::vector<float> own = floats(fx::kRopeIn);
  Eigen::Map<kvcache::Matrix<float>> O(own.data(), 1, static_cast<Eigen::Index>(own.size()));
  kd::Rope<float>(8, 10000.0).apply(O, 70);
  for (std::size_t i = 0; i < own.size(); ++i) EXPECT_NEAR(own[i], q[i], 1e-4f * (1.0f + std::fabs(q[i])));
}

// K · q for every cached slot: d_k 8 (no lanes: the products added in
// order) and d_k 64 (ggml_vec_dot_f32's 64 lanes).
TEST(GgmlMath, KeyProductsGiveLlamaCppsBits) {
  const std::vector<float> K = floats(fx::kDecodeK);
  const std::vector<float> heads = floats(fx::kRopeOut);
  const std::vector<float> q(heads.begin() + 3 * 8, heads.begin() + 4 * 8);  // head 3
  std::vector<float> kq(K.size() / 8);
  for (std::size_t j = 0; j < kq.size(); ++j) kq[j] = kd::dot_like_ggml(K.data() + 8 * j, q.data(), 8);
  expect_bits(kq, fx::kDecodeKQ, "K · q, d_k 8");

  const std::vector<float> Kw = floats(fx::kWideK), qw = floats(fx::kWideQ);
  std::vector<float> kqw(Kw.size() / 64);
  for (std::size_t j = 0; j < kqw.size(); ++j) kqw[j] = kd::dot_like_ggml(Kw.data() + 64 * j, qw.data(), 64);
  expect_bits(kqw, fx::kWideKQ, "K · q, d_k 64");
}

TEST(GgmlMath, SoftmaxGivesLlamaCppsBits) {
  std::vector<float> p = floats(fx::kDecodeKQ);
  kd::softmax_like_ggml(p.data(), p.size(), p.size(), 1.0f / std::sqrt(8.0f));
  expect_bits(p, fx::kDecodeP, "softmax, decode");
  // A prefill row: 10 of its 13 scores valid, the rest masked to 0.
  std::vector<float> r = floats(fx::kPrefillKQ);
  kd::softmax_like_ggml(r.data(), 10, r.size(), 1.0f / std::sqrt(8.0f));
  expect_bits(r, fx::kPrefillP, "softmax, prefill");
  double sum = 0.0;
  for (float v : r) sum += v;
  EXPECT_NEAR(sum, 1.0, 1e-6);
}

// P · V: one token's row in 64 lanes; a prompt's rows in tinyBLAS's 16
// (its 13 slots, fewer than 16, take a lane each either way). Summed in
// the other count of lanes, the decode row's 71 slots differ in the last
// bits: the fixture tells the two apart.
TEST(GgmlMath, ValueSumsGiveLlamaCppsBits) {
  const auto sums = [](const std::vector<float>& P, std::size_t rows, const std::vector<float>& V, std::size_t L) {
    const std::size_t n = P.size() / rows, d = 8;
    std::vector<float> lanes(kd::kValueLaneRows * d), out(rows * d);
    kd::ValueLanes acc(lanes.data(), L, d);
    EXPECT_GE(acc.rows_at_once(), rows);
    acc.clear(rows);
    for (std::size_t j = 0; j < n; ++j)
      for (std::size_t r = 0; r < rows; ++r) acc.add(r, j, P[r * n + j], V.data() + j * d);
    for (std::size_t r = 0; r < rows; ++r) acc.fold_into(r, out.data() + r * d);
    return out;
  };
  expect_bits(sums(floats(fx::kDecodeP), 1, floats(fx::kDecodeV), 64), fx::kDecodeO, "P · V, decode");
  expect_bits(sums(floats(fx::kPrefillAllP), 13, floats(fx::kPrefillV), 16), fx::kPrefillO, "P · V, prefill");
  // The decode step's 71 slots summed in a prompt's 16 lanes.
  const std::vector<float> other = sums(floats(fx::kDecodeP), 1, floats(fx::kDecodeV), 16);
  std::size_t differ = 0;
  for (std::size_t e = 0; e < other.size(); ++e) differ += bits(other[e]) != fx::kDecodeO[e];
  EXPECT_GT(differ, 0u);
}

// rounded() keeps a product out of a fused multiply-add: x·y + z with x·y
// rounded first differs from fma(x, y, z) where the product's low bits
// matter.
TEST(GgmlMath, RoundedProductIsNotFused) {
  const float x = 1.0f + std::ldexp(1.0f, -12), z = -1.0f - std::ldexp(1.0f, -11);
  const float fused = std::fma(x, x, z), separate = kd::rounded(x * x) + z;
  EXPECT_EQ(fused, std::ldexp(1.0f, -24));
  EXPECT_EQ(separate, 0.0f);
}

// ggml's exp, as detail::ggml_expf computes it one float at a time: within
// 3 ulps of e^x (its authors give 1.95), infinite past 88.7 and zero below
// about −104, as ggml's.
TEST(GgmlMath, ExpIsWithinThreeUlpsAndKeepsItsEdges) {
  for (float x = -103.0f; x < 88.0f; x += 0.0137f) {
    const double want = std::exp(static_cast<double>(x));
    const float got = kd::ggml_expf(x);
    ASSERT_FALSE(std::isnan(got)) << x;
    const double ulp = std::ldexp(1.0, std::ilogb(static_cast<float>(want)) - 23);
    ASSERT_LE(std::fabs(got - want), 3 * std::max(ulp, std::ldexp(1.0, -149))) << "x = " << x;
  }
  EXPECT_EQ(kd::ggml_expf(0.0f), 1.0f);
  EXPECT_EQ(kd::ggml_expf(200.0f), std::numeric_limits<float>::infinity());
  EXPECT_EQ(kd::ggml_expf(-200.0f), 0.0f);
}

#if defined(__AVX512F__)
// The scalar exp gives the bits of the vector one (the same fused
// multiply-adds, then AVX-512's scalef), including results that are
// subnormal and exponents past a normal float's.
TEST(GgmlMath, ScalarExpEqualsTheVectorExpBitForBit) {
  for (float x = -103.9f; x < 88.7f; x = std::nextafter(x, 100.0f) + std::fabs(x) * 1e-4f + 1e-4f) {
    float lanes[16];
    _mm512_storeu_ps(lanes, kd::ggml_expf16(_mm512_set1_ps(x)));
    ASSERT_EQ(bits(lanes[0]), bits(kd::ggml_expf(x))) << "x = " << x;
  }
}
#endif

// silu(a) · g with the vector exp below n − n % 16 and expf in the tail,
// whatever slice of the row a call gets.
TEST(GgmlMath, SwigluUsesTheVectorExpBelowTheLastWholeSixteen) {
  const Eigen::Index n = 53;  // 48 values in three vectors of 16, then 5 one at a time
  const Eigen::ArrayXf a = Eigen::ArrayXf::LinSpaced(n, -6.0f, 5.0f), g = Eigen::ArrayXf::LinSpaced(n, 0.5f, -1.5f);
  for (const auto& [begin, count] : {std::pair<Eigen::Index, Eigen::Index>{0, n}, {16, n - 16}, {3, 40}, {40, 13}}) {
    Eigen::ArrayXf y = a;
    kd::swiglu_like_ggml(y.data() + begin, g.data() + begin, begin, count, n);
    for (Eigen::Index i = 0; i < n; ++i) {
      const bool in = i >= begin && i < begin + count;
      const float e = i < 48 ? kd::ggml_expf(-a(i)) : std::exp(-a(i));
      EXPECT_EQ(bits(y(i)), bits(in ? a(i) / (1.0f + e) * g(i) : a(i))) << begin << " " << i;
      EXPECT_NEAR(y(i), in ? a(i) / (1.0f + std::exp(-a(i))) * g(i) : a(i), 1e-5f) << begin << " " << i;
    }
  }
}

}  // namespace
