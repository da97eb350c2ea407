// The weight types f16, q8_0 and q4_0: their codecs against independent
// computations (and the CPU's own F16C conversions where it has them), the
// WeightMatrix support, and the kernels against the same quantized
// arithmetic written out plainly: in double (every m, row ranges, threads),
// and in ggml's lane order (bit for bit).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>
#include <kvcache/kvcache.hpp>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "fixtures.hpp"
#include "gguf_writer.hpp"
#include "reference.hpp"

namespace {

using kvcache::Matrix;
using kvcache::Vector;
using kvcache::WeightMatrix;
using kvcache::WeightType;
namespace kd = kvcache::detail;

std::uint32_t bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float from_bits(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// binary16 by its definition, in double.
double f16_value(std::uint16_t h) {
  const int sign = h >> 15, e = (h >> 10) & 31, f = h & 1023;
  const double s = sign ? -1.0 : 1.0;
  if (e == 0) return s * std::ldexp(f, -24);
  if (e == 31) return f == 0 ? s * INFINITY : NAN;
  return s * std::ldexp(1024 + f, e - 25);
}

// ---- f16 codec ---------------------------------------------------------------

TEST(F16, DecodesEveryHalfAsItsDefinition) {
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const float f = kd::from_f16(static_cast<std::uint16_t>(h));
    const double want = f16_value(static_cast<std::uint16_t>(h));
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(f)) << h;
    } else {
      ASSERT_EQ(static_cast<double>(f), want) << h;
      ASSERT_EQ(std::signbit(f), (h & 0x8000) != 0) << h;
    }
#if defined(__F16C__) || defined(__AVX512F__)
    ASSERT_EQ(bits(f) | (std::isnan(f) ? 0x00400000u : 0u), bits(_cvtsh_ss(static_cast<unsigned short>(h)))) << h;
#endif
  }
}

TEST(F16, RoundsToNearestEvenAtTheEdges) {
  const auto h = [](float f) { return kd::float_to_f16(f); };
  EXPECT_EQ(h(1.0f), 0x3C00);
  EXPECT_EQ(h(1.0f + 0x1p-11f), 0x3C00);        // tie: to even
  EXPECT_EQ(h(1.0f + 3 * 0x1p-11f), 0x3C02);    // tie: to even, upwards
  EXPECT_EQ(h(65504.0f), 0x7BFF);               // the largest
  EXPECT_EQ(h(65519.99f), 0x7BFF);
  EXPECT_EQ(h(65520.0f), 0x7C00);               // tie past the largest: inf
  EXPECT_EQ(h(-1e30f), 0xFC00);
  EXPECT_EQ(h(INFINITY), 0x7C00);
  EXPECT_EQ(h(0x1p-24f), 0x0001);               // the smallest subnormal
  EXPECT_EQ(h(0x1p-25f), 0x0000);               // tie: to even (0)
  EXPECT_EQ(h(0x1.8p-25f), 0x0001);
  EXPECT_EQ(h(3 * 0x1p-25f), 0x0002);           // tie between 1 and 2: 2
  EXPECT_EQ(h(0x1p-14f - 0x1p-30f), 0x0400);    // rounds up to the smallest normal
  EXPECT_EQ(h(-0.0f), 0x8000);
  EXPECT_EQ(h(1e-30f), 0x0000);
  const std::uint16_t nan = h(std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(nan & 0x7C00, 0x7C00);
  EXPECT_NE(nan & 0x03FF, 0);
  EXPECT_NE(h(from_bits(0x7F800001u)) & 0x03FF, 0);  // a signalling NaN stays a NaN
  // A double just past a tie rounds up, though its float rounding is the tie.
  EXPECT_EQ(kd::to_f16(1.0 + 0x1p-11 + 0x1p-40), 0x3C01);
  EXPECT_EQ(kd::to_f16(1.0 + 0x1p-11), 0x3C00);
}

// Every half's value, the midpoints between neighbours and one float either
// side of them, and random floats: nearest, ties to even, checked in double
// (and against the CPU's conversion where it has one).
TEST(F16, RoundsEveryNeighbourhoodToNearestEven) {
  std::vector<float> cases;
  for (std::uint32_t h = 0; h < 0x7C00; ++h) {
    const double lo = f16_value(static_cast<std::uint16_t>(h)), hi = f16_value(static_cast<std::uint16_t>(h + 1));
    const auto mid = static_cast<float>((lo + hi) / 2);  // exact in float
    for (float f : {static_cast<float>(lo), mid, std::nextafter(mid, 0.0f), std::nextafter(mid, INFINITY)})
      cases.insert(cases.end(), {f, -f});
  }
  std::mt19937 rng(7);
  for (int i = 0; i < 1000000; ++i) cases.push_back(from_bits(static_cast<std::uint32_t>(rng())));
  for (const float f : cases) {
    const std::uint16_t got = kd::float_to_f16(f);
#if defined(__F16C__) || defined(__AVX512F__)
    // (Not _cvtss_sh: clang's macro is a compound literal, which -Wpedantic refuses.)
    const auto cpu = static_cast<std::uint16_t>(_mm_cvtsi128_si32(_mm_cvtps_ph(_mm_set_ss(f), 0)) & 0xFFFF);
    ASSERT_EQ(got, cpu) << f;
#endif
    if (std::isnan(f) || std::fabs(f) >= 65520.0f) continue;
    const double err = std::fabs(f16_value(got) - f);
    const double step = std::ldexp(1.0, std::max(-24, std::ilogb(std::max(std::fabs(f), 0x1p-14f)) - 10));
    ASSERT_LE(err, step / 2) << f;
    if (err == step / 2) {
      ASSERT_EQ(got & 1, 0) << f;  // a tie: even
    }
  }
}

// ---- q8_0 codec ---------------------------------------------------------------

struct Block {
  std::uint16_t d;
  std::int8_t q[32];
};

Block weights_block(const float* x) {
  Block b;
  b.d = kd::quantize_q8_0_block(x, b.q);
  return b;
}
Block activation_block(const float* x) {
  Block b;
  b.d = kd::quantize_q8_0_block_act(x, b.q);
  return b;
}

TEST(Q8_0, TiesRoundAwayFromZeroForWeightsAndToEvenForActivations) {
  float x[32] = {127.0f, 0.5f, -0.5f, 1.5f, 2.5f, -2.5f, -63.5f, 126.5f};  // d = 1 exactly
  const Block w = weights_block(x), a = activation_block(x);
  EXPECT_EQ(w.d, 0x3C00);
  EXPECT_EQ(a.d, 0x3C00);
  const int want_w[] = {127, 1, -1, 2, 3, -3, -64, 127}, want_a[] = {127, 0, 0, 2, 2, -2, -64, 126};
  for (int j = 0; j < 8; ++j) {
    EXPECT_EQ(w.q[j], want_w[j]) << j;
    EXPECT_EQ(a.q[j], want_a[j]) << j;
  }
  for (int j = 8; j < 32; ++j) EXPECT_EQ(w.q[j], 0);
}

TEST(Q8_0, ZeroBlocksHugeScalesAndNaN) {
  float zeros[32] = {};
  zeros[3] = -0.0f;
  const Block z = weights_block(zeros);
  EXPECT_EQ(z.d, 0);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(z.q[j], 0);
  float huge[32] = {};
  huge[0] = 1e7f * 127;  // d = 1e7: past f16's largest, stored as inf
  huge[1] = -5e6f * 127;
  const Block h = weights_block(huge);
  EXPECT_EQ(h.d, 0x7C00);
  EXPECT_EQ(h.q[0], 127);
  EXPECT_EQ(h.q[1], -64);  // -63.5 away from zero
  float tiny[32] = {};
  tiny[0] = 1e-9f;  // d below f16's smallest subnormal: stored as 0
  EXPECT_EQ(weights_block(tiny).d, 0);
  EXPECT_EQ(weights_block(tiny).q[0], 127);
  float nan[32] = {2.0f, std::numeric_limits<float>::quiet_NaN()};
  const Block n = weights_block(nan);
  EXPECT_EQ(n.q[0], 127);
  EXPECT_EQ(n.q[1], 0);
}

// Random rows: q = round(x / d) (with d the float scale) in double, and the
// round trip within half a step (plus the scale's f16 rounding).
TEST(Q8_0, RowsRoundTripWithinHalfAStep) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(32 * 50);
  for (float& v : x) v = normal(rng) * std::exp2(static_cast<float>(static_cast<int>(rng() % 20) - 10));
  std::vector<unsigned char> q(50 * 34);
  kd::quantize_q8_0(x.data(), x.size(), q.data());
  std::vector<float> back(x.size());
  kd::dequantize_q8_0(q.data(), 0, x.size(), back.data());
  for (std::size_t b = 0; b < 50; ++b) {
    double max_abs = 0;
    for (std::size_t j = 0; j < 32; ++j) max_abs = std::max(max_abs, std::fabs(double{x[b * 32 + j]}));
    const float d = static_cast<float>(max_abs) / 127.0f;
    const double stored_d = f16_value(static_cast<std::uint16_t>(q[b * 34] | q[b * 34 + 1] << 8));
    EXPECT_NEAR(stored_d, d, d * 0x1p-11) << b;
    for (std::size_t j = 0; j < 32; ++j) {
      const double exact = x[b * 32 + j] / static_cast<double>(d);
      const auto qj = static_cast<std::int8_t>(q[b * 34 + 2 + j]);
      EXPECT_LE(std::fabs(qj - exact), 0.5 + 1e-5) << b << " " << j;
      EXPECT_EQ(back[b * 32 + j], static_cast<float>(stored_d) * qj);
    }
  }
  std::vector<float> part(5);
  kd::dequantize_q8_0(q.data(), 30, 5, part.data());  // across a block boundary
  for (int j = 0; j < 5; ++j) EXPECT_EQ(part[static_cast<std::size_t>(j)], back[30 + static_cast<std::size_t>(j)]);
}

TEST(Q8_0, RowBytesAreWholeBlocks) {
  EXPECT_EQ(kvcache::row_bytes<float>(WeightType::q8_0, 64), 68u);
  EXPECT_EQ(kvcache::row_bytes<float>(WeightType::f16, 5), 10u);
  fixtures::expect_throw_naming<std::invalid_argument>([] { (void)kvcache::row_bytes<float>(WeightType::q8_0, 48); },
                                                       "48");
  EXPECT_STREQ(kvcache::to_string(WeightType::q8_0), "q8_0");
  EXPECT_STREQ(kvcache::to_string(WeightType::f16), "f16");
}

// ---- q4_0 codec ---------------------------------------------------------------

std::uint16_t q4_0_d(const unsigned char* block) { return static_cast<std::uint16_t>(block[0] | block[1] << 8); }
// Nibble j of a q4_0 block. (Not `j < 16 ? block[2 + j] & 15 : block[2 + j
// - 16] >> 4`: g++ 12 with -march=native vectorizes a 32-step loop of that
// into wrong sums.)
int q4_0_q(const unsigned char* block, int j) {
  const unsigned char byte = block[2 + j % 16];
  return j < 16 ? byte & 15 : byte >> 4;
}

std::vector<unsigned char> q4_0_of(const std::vector<float>& x) {
  std::vector<unsigned char> q(x.size() / 32 * 18);
  kd::quantize_q4_0(x.data(), x.size(), q.data());
  return q;
}

// m = 8 (the largest magnitude, positive): d = -1, so 8 is q = 0 and -8
// would be q = 16, clamped to 15 (-7); x · (1/d) + 8.5 truncated: 3 → 5
// (5.5), 2.5 → 6, -2.5 → 11, 0 → 8. Value j in byte j's low nibble, value
// j + 16 in its high one.
TEST(Q4_0, QuantizesAsGgmlsReferenceByHand) {
  std::vector<float> x(32, 0.0f);
  x[0] = 8.0f, x[1] = -8.0f, x[2] = 3.0f, x[3] = 2.5f, x[4] = -2.5f, x[16] = -3.0f, x[17] = 7.9f;
  const std::vector<unsigned char> q = q4_0_of(x);
  EXPECT_EQ(q4_0_d(q.data()), 0xBC00);  // -1
  const int want[] = {0, 15, 5, 6, 11};
  for (int j = 0; j < 5; ++j) EXPECT_EQ(q4_0_q(q.data(), j), want[j]) << j;
  EXPECT_EQ(q4_0_q(q.data(), 16), 11);
  EXPECT_EQ(q4_0_q(q.data(), 17), 0);  // -7.9 + 8.5 = 0.6
  for (int j = 5; j < 16; ++j) EXPECT_EQ(q4_0_q(q.data(), j), 8) << j;
  EXPECT_EQ(q[2], 0xB0);  // value 0 low, value 16 high
  float back[32];
  kd::dequantize_q4_0(q.data(), 0, 32, back);
  EXPECT_EQ(back[0], 8.0f);
  EXPECT_EQ(back[1], -7.0f);
  EXPECT_EQ(back[2], 3.0f);
  EXPECT_EQ(back[3], 2.0f);
  EXPECT_EQ(back[16], -3.0f);
  // A negative m: d > 0, and m is q = 0 again.
  for (float& v : x) v = -v;
  const std::vector<unsigned char> n = q4_0_of(x);
  EXPECT_EQ(q4_0_d(n.data()), 0x3C00);
  EXPECT_EQ(q4_0_q(n.data(), 0), 0);
}

TEST(Q4_0, ZeroBlocksHugeScalesAndNaN) {
  std::vector<float> zeros(32, 0.0f);
  zeros[3] = -0.0f;
  const std::vector<unsigned char> z = q4_0_of(zeros);
  EXPECT_EQ(q4_0_d(z.data()) & 0x7FFF, 0);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(q4_0_q(z.data(), j), 8) << j;
  std::vector<float> huge(32, 1.0f);
  huge[5] = 1e6f;  // d = -125000: past f16's largest, stored as -inf
  const std::vector<unsigned char> h = q4_0_of(huge);
  EXPECT_EQ(q4_0_d(h.data()), 0xFC00);
  EXPECT_EQ(q4_0_q(h.data(), 5), 0);
  EXPECT_EQ(q4_0_q(h.data(), 6), 8);  // 1 / -125000 · 1 + 8.5
  std::vector<float> nan(32, 0.25f);
  nan[0] = 2.0f;
  nan[9] = std::numeric_limits<float>::quiet_NaN();
  const std::vector<unsigned char> n = q4_0_of(nan);
  EXPECT_EQ(q4_0_d(n.data()), kd::float_to_f16(-0.25f));
  EXPECT_EQ(q4_0_q(n.data(), 0), 0);
  EXPECT_EQ(q4_0_q(n.data(), 9), 8);  // NaN counts as 0
  EXPECT_EQ(q4_0_q(n.data(), 10), 7);  // 0.25 / -0.25 + 8.5 = 7.5
  // The test writer's encoder agrees (NaN: undefined in ggml, 8 in both).
  EXPECT_EQ(kvcache_test::q4_0_bytes(zeros), std::string(z.begin(), z.end()));
  EXPECT_EQ(kvcache_test::q4_0_bytes(huge), std::string(h.begin(), h.end()));
  EXPECT_EQ(kvcache_test::q4_0_bytes(nan), std::string(n.begin(), n.end()));
}

// Random rows of every scale: the bytes of the test writer's encoder
// (written apart from kvcache's), and the round trip d · (q − 8) exact in
// float and within one step of x (half a step but for the clamped end).
TEST(Q4_0, RowsMatchTheReferenceEncoderAndRoundTrip) {
  std::mt19937 rng(4);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(32 * 200);
  for (float& v : x) v = normal(rng) * std::exp2(static_cast<float>(static_cast<int>(rng() % 20) - 10));
  for (std::size_t b = 0; b < 200; b += 7) x[b * 32 + rng() % 32] *= -1000.0f;  // one large value per block
  const std::vector<unsigned char> q = q4_0_of(x);
  EXPECT_EQ(std::string(q.begin(), q.end()), kvcache_test::q4_0_bytes(x));
  std::vector<float> back(x.size());
  kd::dequantize_q4_0(q.data(), 0, x.size(), back.data());
  for (std::size_t b = 0; b < 200; ++b) {
    const unsigned char* block = q.data() + b * 18;
    const double d = f16_value(q4_0_d(block));
    for (std::size_t j = 0; j < 32; ++j) {
      const int qj = q4_0_q(block, static_cast<int>(j));
      ASSERT_EQ(back[b * 32 + j], static_cast<float>(d) * static_cast<float>(qj - 8)) << b << " " << j;
      const double step = std::fabs(d) * (1 + 0x1p-10), err = std::fabs(x[b * 32 + j] - d * (qj - 8));
      ASSERT_LE(err, qj == 15 ? step : step / 2 + std::fabs(x[b * 32 + j]) * 0x1p-10) << b << " " << j;
    }
  }
  std::vector<float> part(5);
  kd::dequantize_q4_0(q.data(), 30, 5, part.data());  // across a block boundary
  for (int j = 0; j < 5; ++j) EXPECT_EQ(part[static_cast<std::size_t>(j)], back[30 + static_cast<std::size_t>(j)]);
}

TEST(Q4_0, RowBytesAreWholeBlocks) {
  EXPECT_EQ(kvcache::row_bytes<float>(WeightType::q4_0, 64), 36u);
  fixtures::expect_throw_naming<std::invalid_argument>([] { (void)kvcache::row_bytes<float>(WeightType::q4_0, 48); },
                                                       "a q4_0 row holds whole blocks of 32 values; 48");
  EXPECT_STREQ(kvcache::to_string(WeightType::q4_0), "q4_0");
  EXPECT_EQ(kvcache::gguf_weight_type(2), WeightType::q4_0);
}

// ---- WeightMatrix -----------------------------------------------------------

Matrix<float> random_matrix(Eigen::Index rows, Eigen::Index cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  Matrix<float> M(rows, cols);
  for (Eigen::Index i = 0; i < M.size(); ++i) M.data()[i] = u(rng);
  return M;
}

TEST(WeightMatrix, ConvertsToF16AndQ8_0) {
  const Matrix<float> M = random_matrix(3, 64, 1);
  WeightMatrix<float> h = M, q = M;
  h.convert_to(WeightType::f16);
  q.convert_to(WeightType::q8_0);
  EXPECT_EQ(h.bytes(), 3u * 64 * 2);
  EXPECT_EQ(q.bytes(), 3u * 2 * 34);
  std::vector<unsigned char> row(68);
  std::vector<float> dense(64), values(64);
  for (Eigen::Index i = 0; i < 3; ++i) {
    kd::quantize_q8_0(M.row(i).data(), 64, row.data());
    EXPECT_EQ(std::memcmp(row.data(), q.q8_0() + i * 68, 68), 0);
    kd::dequantize_q8_0(row.data(), 0, 64, dense.data());
    q.row_to(i, values.data());
    for (Eigen::Index j = 0; j < 64; ++j) {
      EXPECT_EQ(values[static_cast<std::size_t>(j)], dense[static_cast<std::size_t>(j)]);
      EXPECT_EQ(q(i, j), dense[static_cast<std::size_t>(j)]);
      EXPECT_EQ(q.to_dense()(i, j), dense[static_cast<std::size_t>(j)]);
      EXPECT_EQ(h(i, j), kd::from_f16(kd::float_to_f16(M(i, j))));
      EXPECT_EQ(h.f16()(i, j), kd::float_to_f16(M(i, j)));
    }
  }
  WeightMatrix<float> q2 = M;
  q2.convert_to(WeightType::q8_0);
  EXPECT_EQ(q2, q);
  EXPECT_NE(q, h);
  WeightMatrix<float> via_bf16 = M;  // a compact type to another: through T
  via_bf16.convert_to(WeightType::bf16);
  via_bf16.convert_to(WeightType::f16);
  EXPECT_EQ(via_bf16(1, 2), kd::from_f16(kd::float_to_f16(kd::from_bf16(kd::float_to_bf16(M(1, 2))))));
  q.convert_to(WeightType::f32);
  EXPECT_EQ(q.f32(), q2.to_dense());
}

TEST(WeightMatrix, ConvertsToQ4_0) {
  const Matrix<float> M = random_matrix(3, 64, 1);
  WeightMatrix<float> q = M;
  q.convert_to(WeightType::q4_0);
  EXPECT_EQ(q.type(), WeightType::q4_0);
  EXPECT_EQ(q.bytes(), 3u * 2 * 18);
  EXPECT_THROW((void)q.q8_0(), std::logic_error);
  std::vector<unsigned char> row(36);
  std::vector<float> dense(64), values(64);
  for (Eigen::Index i = 0; i < 3; ++i) {
    kd::quantize_q4_0(M.row(i).data(), 64, row.data());
    EXPECT_EQ(std::memcmp(row.data(), q.q4_0() + i * 36, 36), 0);
    kd::dequantize_q4_0(row.data(), 0, 64, dense.data());
    q.row_to(i, values.data());
    for (Eigen::Index j = 0; j < 64; ++j) {
      EXPECT_EQ(values[static_cast<std::size_t>(j)], dense[static_cast<std::size_t>(j)]);
      EXPECT_EQ(q(i, j), dense[static_cast<std::size_t>(j)]);
      EXPECT_EQ(q.to_dense()(i, j), dense[static_cast<std::size_t>(j)]);
    }
  }
  WeightMatrix<float> via_q8 = M;  // a compact type to another: through T
  via_q8.convert_to(WeightType::q8_0);
  via_q8.convert_to(WeightType::q4_0);
  WeightMatrix<float> direct = via_q8.to_dense();
  direct.convert_to(WeightType::q4_0);
  EXPECT_EQ(via_q8, direct);
  const Matrix<float> dense_q = q.to_dense();
  q.convert_to(WeightType::f32);
  EXPECT_EQ(q.f32(), dense_q);
  WeightMatrix<float> W = random_matrix(2, 48, 2);
  const WeightMatrix<float> before = W;
  fixtures::expect_throw_naming<std::invalid_argument>([&] { W.convert_to(WeightType::q4_0); },
                                                       "convert_to(q4_0): rows of 48 values; q4_0 needs a multiple of 32");
  EXPECT_EQ(W, before);
}

TEST(WeightMatrix, RefusesQ8_0RowsOfPartialBlocksAndInt8) {
  WeightMatrix<float> W = random_matrix(2, 48, 2);
  const WeightMatrix<float> before = W;
  fixtures::expect_throw_naming<std::invalid_argument>([&] { W.convert_to(WeightType::q8_0); },
                                                       "rows of 48 values; q8_0 needs a multiple of 32");
  EXPECT_EQ(W, before);
  fixtures::expect_throw_naming<std::invalid_argument>([&] { W.convert_to(WeightType::int8); }, "not int8");
  EXPECT_THROW(W.resize(2, 48, WeightType::q8_0), std::invalid_argument);
  EXPECT_THROW((void)W.q8_0(), std::logic_error);
}

TEST(KVType, WeightTypesAreNotCacheTypes) {
  for (const auto type : {kvcache::KVType::f16, kvcache::KVType::q8_0, kvcache::KVType::q4_0})
    fixtures::expect_throw_naming<std::invalid_argument>([&] { kvcache::KVCache<float>(1, 8, 0, type); },
                                                         std::string("KVType ") + kvcache::to_string(type));
}

// ---- Kernels ------------------------------------------------------------------

// X converted as llama.cpp converts it, times the weights, in double.
Matrix<double> reference_product(const Matrix<float>& X, const WeightMatrix<float>& W) {
  const Eigen::Index m = X.rows(), n = X.cols();
  Matrix<double> Y(m, W.rows());
  for (Eigen::Index t = 0; t < m; ++t) {
    std::vector<double> x(static_cast<std::size_t>(n));
    if (W.type() == WeightType::f16) {
      for (Eigen::Index j = 0; j < n; ++j) x[static_cast<std::size_t>(j)] = f16_value(kd::float_to_f16(X(t, j)));
    } else {  // ggml's activation quantizer, written out: 127 / max, nearest even
      for (Eigen::Index b = 0; b < n / 32; ++b) {
        float max_abs = 0;
        for (int j = 0; j < 32; ++j) max_abs = std::max(max_abs, std::fabs(X(t, b * 32 + j)));
        const float scale = max_abs == 0 ? 0.0f : 127.0f / max_abs;
        const double d = f16_value(kd::float_to_f16(max_abs / 127.0f));
        for (int j = 0; j < 32; ++j)
          x[static_cast<std::size_t>(b * 32 + j)] = d * std::nearbyint(X(t, b * 32 + j) * scale);
      }
    }
    for (Eigen::Index i = 0; i < W.rows(); ++i) {
      double s = 0;
      for (Eigen::Index j = 0; j < n; ++j) s += static_cast<double>(W(i, j)) * x[static_cast<std::size_t>(j)];
      Y(t, i) = s;
    }
  }
  return Y;
}

WeightMatrix<float> weights_of(WeightType type, Eigen::Index rows, Eigen::Index cols, unsigned seed) {
  WeightMatrix<float> W = random_matrix(rows, cols, seed);
  W.convert_to(type);
  return W;
}

// Every m from 1 to 40 (decode kernel below kFewTokens, prefill above), 1 and
// 2 threads (the same bits when decoding), and a bias.
TEST(QuantKernels, MatchTheQuantizedArithmeticInDouble) {
  for (const auto type : {WeightType::f16, WeightType::q8_0, WeightType::q4_0}) {
    const WeightMatrix<float> W = weights_of(type, 67, 96, 5);
    Vector<float> b = random_matrix(67, 1, 6).col(0);
    for (Eigen::Index m = 1; m <= 40; ++m) {
      const Matrix<float> X = random_matrix(m, 96, static_cast<unsigned>(m)) * 3.0f;
      Matrix<float> Y1(m, 67), Y2(m, 67);
      kd::linear<float>(X, {{W, b, Y1}}, 1);
      kd::linear<float>(X, {{W, b, Y2}}, 2);
      Matrix<double> want = reference_product(X, W);
      want.rowwise() += b.cast<double>().transpose();
      EXPECT_LT(reference::max_abs_diff(Y1, want), 2e-5) << kvcache::to_string(type) << " m = " << m;
      EXPECT_LT(reference::max_abs_diff(Y2, want), 2e-5) << kvcache::to_string(type) << " m = " << m;
      if (m >= kd::kFewTokens) continue;  // Eigen's sums depend on the tile a row falls in
      EXPECT_EQ(Y1, Y2) << kvcache::to_string(type) << " m = " << m;
      // Rows [10, 40) alone: the same bits as in the whole product.
      Matrix<float> Y3 = Matrix<float>::Zero(m, 67);
      kd::linear_rows<float>(X, W, b, Y3, 10, 40);
      EXPECT_EQ(Y3.middleCols(10, 30), Y1.middleCols(10, 30)) << kvcache::to_string(type) << " m = " << m;
    }
  }
}

// ggml's order of summation, written out with scalars: q8_0 in 8 lanes of
// 4 products, fma per block; f16 in 64 lanes, reduced by halves, tail in double.
float ggml_q8_0_dot(const unsigned char* w, const std::int8_t* q_x, const float* d_x, int n) {
  float lane[8] = {};
  for (int b = 0; b < n / 32; ++b) {
    const float d = kd::from_f16(static_cast<std::uint16_t>(w[b * 34] | w[b * 34 + 1] << 8)) * d_x[b];
    for (int l = 0; l < 8; ++l) {
      int s = 0;
      for (int j = 4 * l; j < 4 * l + 4; ++j) s += static_cast<std::int8_t>(w[b * 34 + 2 + j]) * q_x[b * 32 + j];
      lane[l] = std::fma(d, static_cast<float>(s), lane[l]);
    }
  }
  return ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
}

float ggml_f16_dot(const std::uint16_t* w, const float* x, int n) {
  float s[4][16] = {};
  int j = 0;
  for (; j + 64 <= n; j += 64)
    for (int u = 0; u < 4; ++u)
      for (int l = 0; l < 16; ++l) s[u][l] = std::fma(kd::from_f16(w[j + 16 * u + l]), x[j + 16 * u + l], s[u][l]);
  float v[16];
  for (int l = 0; l < 16; ++l) v[l] = (s[0][l] + s[2][l]) + (s[1][l] + s[3][l]);
  float h8[8], h4[4];
  for (int l = 0; l < 8; ++l) h8[l] = v[l] + v[l + 8];
  for (int l = 0; l < 4; ++l) h4[l] = h8[l] + h8[l + 4];
  double sum = (h4[0] + h4[2]) + (h4[1] + h4[3]);
  for (; j < n; ++j) sum += static_cast<double>(kd::from_f16(w[j]) * x[j]);
  return static_cast<float>(sum);
}

TEST(QuantKernels, DecodeSumsInGgmlsOrderBitForBit) {
  for (const int n : {32, 96, 160, 768}) {
    const WeightMatrix<float> Wq = weights_of(WeightType::q8_0, 9, n, 8), Wh = weights_of(WeightType::f16, 9, n, 8);
    const Matrix<float> X = random_matrix(kvcache::detail::kFewTokens - 1, n, 9) * 5.0f;
    Matrix<float> Yq(X.rows(), 9), Yh(X.rows(), 9);
    const Vector<float> none;
    kd::linear<float>(X, {{Wq, none, Yq}}, 1);
    kd::linear<float>(X, {{Wh, none, Yh}}, 1);
    std::vector<std::int8_t> q(static_cast<std::size_t>(n));
    std::vector<float> d(static_cast<std::size_t>(n / 32)), xh(static_cast<std::size_t>(n));
    for (Eigen::Index t = 0; t < X.rows(); ++t) {
      for (int b = 0; b < n / 32; ++b)
        d[static_cast<std::size_t>(b)] = kd::from_f16(kd::quantize_q8_0_block_act(X.row(t).data() + b * 32, q.data() + b * 32));
      for (int j = 0; j < n; ++j) xh[static_cast<std::size_t>(j)] = kd::from_f16(kd::float_to_f16(X(t, j)));
      for (Eigen::Index i = 0; i < 9; ++i) {
        ASSERT_EQ(Yq(t, i), ggml_q8_0_dot(Wq.q8_0() + i * (n / 32 * 34), q.data(), d.data(), n)) << n << " " << t;
        ASSERT_EQ(Yh(t, i), ggml_f16_dot(Wh.f16().data() + i * n, xh.data(), n)) << n << " " << t;
      }
    }
  }
}

// The portable loops give the SIMD kernels' bits (tails included for f16).
TEST(QuantKernels, PortableLoopsMatchTheVectorKernels) {
  for (const int n : {32, 100, 800}) {
    const Matrix<float> X = random_matrix(2, n, 11) * 4.0f;
    const WeightMatrix<float> Wh = weights_of(WeightType::f16, 1, n, 12);
    std::vector<float> xh(static_cast<std::size_t>(2 * n));
    for (int j = 0; j < 2 * n; ++j) xh[static_cast<std::size_t>(j)] = kd::from_f16(kd::float_to_f16(X.data()[j]));
    const float* x[2] = {xh.data(), xh.data() + n};
    float a[2], b[2];
    kd::f16_row<2>(Wh.f16().data(), n, x, a);
    kd::f16_row_portable<2>(Wh.f16().data(), n, x, b);
    EXPECT_EQ(a[0], b[0]);
    EXPECT_EQ(a[1], b[1]);
    if (n % 32 != 0) continue;
    const WeightMatrix<float> Wq = weights_of(WeightType::q8_0, 1, n, 13);
    std::vector<std::int8_t> q(static_cast<std::size_t>(2 * n));
    std::vector<float> d(static_cast<std::size_t>(2 * n / 32));
    for (int blk = 0; blk < 2 * n / 32; ++blk)
      d[static_cast<std::size_t>(blk)] = kd::from_f16(kd::quantize_q8_0_block_act(X.data() + blk * 32, q.data() + blk * 32));
    const kd::Q8Input in[2] = {{q.data(), d.data()}, {q.data() + n, d.data() + n / 32}};
    kd::q8_0_row<2>(Wq.q8_0(), n, in, a);
    kd::q8_0_row_portable<2>(Wq.q8_0(), n, in, b);
    EXPECT_EQ(a[0], b[0]);
    EXPECT_EQ(a[1], b[1]);
  }
}

WeightMatrix<float> external_copy(const WeightMatrix<float>& W);  // below

// ggml_vec_dot_bf16 with AVX512-BF16, written out with scalars: per 64
// values, lane l of the first accumulator takes values 2l + 1 then 2l of
// the first 32, of the second of the next 32, each a fused multiply-add
// with subnormal inputs and results flushed to zero (VDPBF16PS); each
// accumulator summed by halves, both added in double, then the tail.
float ggml_bf16_dot(const std::uint16_t* w, const float* x, int n) {
  const auto flush = [](float v) { return std::fabs(v) < std::numeric_limits<float>::min() ? std::copysign(0.0f, v) : v; };
  float c[2][16] = {};
  int j = 0;
  for (; j + 64 <= n; j += 64)
    for (int h = 0; h < 2; ++h)
      for (int l = 0; l < 16; ++l)
        for (const int i : {j + 32 * h + 2 * l + 1, j + 32 * h + 2 * l})
          c[h][l] = flush(std::fma(flush(kd::from_bf16(w[i])), flush(x[i]), c[h][l]));
  double sum = 0.0;
  for (auto& a : c) {
    for (int half = 8; half >= 1; half /= 2)
      for (int l = 0; l < half; ++l) a[l] = a[l] + a[l + half];
    sum += static_cast<double>(a[0]);
  }
  for (; j < n; ++j) sum += static_cast<double>(kd::from_bf16(w[j]) * x[j]);
  return static_cast<float>(sum);
}

// bf16 weights in a file's memory, x rounded to bf16: ggml_bf16_dot's bits,
// whole chunks of 64 and tails, with the vector kernel (AVX512-BF16) or the
// portable loop; subnormal weights and inputs among them.
TEST(QuantKernels, Bf16DecodeSumsAsGgmlsDotInstruction) {
  for (const int n : {32, 64, 100, 768}) {
    Matrix<float> M = random_matrix(5, n, 31);
    M(1, 3) = 1e-39f;  // subnormal: flushed by VDPBF16PS
    M(2, 0) = -3e-39f;
    M.row(3) *= 1e-19f;  // with token 2's x, products near and below the smallest normal float
    M.row(4) *= 1e-39f;  // every weight subnormal
    WeightMatrix<float> W = M;
    W.convert_to(WeightType::bf16);
    const WeightMatrix<float> We = external_copy(W);
    Matrix<float> X = random_matrix(3, n, 32) * 2.0f;
    X(0, 5) = 2e-39f;
    X(1, 1) = 1e-20f;
    X.row(2) *= 1e-19f;
    Matrix<float> Y(3, 5);
    const Vector<float> none;
    kd::linear<float>(X, {{We, none, Y}}, 1);
    std::vector<float> xb(static_cast<std::size_t>(n));
    for (Eigen::Index t = 0; t < 3; ++t) {
      for (int j = 0; j < n; ++j) xb[static_cast<std::size_t>(j)] = kd::from_bf16(kd::float_to_bf16(X(t, j)));
      const float* x[1] = {xb.data()};
      for (Eigen::Index i = 0; i < 5; ++i) {
        const float want = ggml_bf16_dot(We.bf16().data() + i * n, xb.data(), n);
        ASSERT_EQ(bits(Y(t, i)), bits(want)) << n << " " << t << " " << i;
        float portable;
        kd::bf16_row_portable<1>(We.bf16().data() + i * n, n, x, &portable);
        ASSERT_EQ(bits(portable), bits(want)) << n << " " << t << " " << i;
      }
    }
  }
}

// ggml's repacked q4_0 product (ggml_gemv_q4_0_8x8_q8_0, what llama.cpp
// runs on an AVX2 CPU for matrices of a multiple of 8 rows), written out
// with scalars: per block the exact sum of (nibble − 8) · x, then
// acc = fma(sum, d_w · d_x, acc).
float ggml_q4_0_dot(const unsigned char* w, const std::int8_t* q_x, const float* d_x, int n) {
  float acc = 0.0f;
  for (int b = 0; b < n / 32; ++b) {
    const unsigned char* block = w + b * 18;
    int s = 0;
    for (int j = 0; j < 32; ++j) s += (q4_0_q(block, j) - 8) * q_x[b * 32 + j];
    acc = std::fma(static_cast<float>(s), kd::from_f16(q4_0_d(block)) * d_x[b], acc);
  }
  return acc;
}

// ggml_vec_dot_q4_0_q8_0 (AVX2), for matrices ggml does not repack (rows
// not a multiple of 8): the nibbles minus 8 times x in 8 lanes of 4
// products, fma per block, the lanes reduced as hsum_float_8.
float ggml_q4_0_lanes_dot(const unsigned char* w, const std::int8_t* q_x, const float* d_x, int n) {
  float lane[8] = {};
  for (int b = 0; b < n / 32; ++b) {
    const unsigned char* block = w + b * 18;
    const float d = kd::from_f16(q4_0_d(block)) * d_x[b];
    for (int l = 0; l < 8; ++l) {
      int s = 0;
      for (int j = 4 * l; j < 4 * l + 4; ++j) s += (q4_0_q(block, j) - 8) * q_x[b * 32 + j];
      lane[l] = std::fma(d, static_cast<float>(s), lane[l]);
    }
  }
  return ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
}

// x quantized as the decode path does (q8_0 blocks), for rows of X.
struct QuantizedX {
  std::vector<std::int8_t> q;
  std::vector<float> d;
  std::vector<kd::Q8Input> in;
  explicit QuantizedX(const Matrix<float>& X) {
    const auto n = static_cast<int>(X.cols());
    q.resize(static_cast<std::size_t>(X.size()));
    d.resize(static_cast<std::size_t>(X.size() / 32));
    for (Eigen::Index k = 0; k < X.rows(); ++k) {
      for (int b = 0; b < n / 32; ++b)
        d[static_cast<std::size_t>(k * n / 32 + b)] =
            kd::from_f16(kd::quantize_q8_0_block_act(X.row(k).data() + b * 32, q.data() + k * n + b * 32));
      in.push_back({q.data() + k * n, d.data() + k * (n / 32)});
    }
  }
};

// 24 rows: ggml repacks the matrix, and sums each block whole; 9 or 20: it
// does not, and sums in lanes.
TEST(QuantKernels, Q4_0DecodeSumsInGgmlsOrderBitForBit) {
  for (const Eigen::Index rows : {24, 9, 20})
    for (const int n : {32, 96, 160, 768}) {
      const WeightMatrix<float> W = weights_of(WeightType::q4_0, rows, n, 8);
      for (const Eigen::Index m : {Eigen::Index{1}, Eigen::Index{3}, kd::kFewTokens - 1}) {
        const Matrix<float> X = random_matrix(m, n, 9) * 5.0f;
        Matrix<float> Y(m, rows);
        kd::linear<float>(X, {{W, Vector<float>(), Y}}, 1);
        const QuantizedX x(X);
        for (Eigen::Index t = 0; t < m; ++t)
          for (Eigen::Index i = 0; i < rows; ++i) {
            const auto& in = x.in[static_cast<std::size_t>(t)];
            const unsigned char* w = W.q4_0() + i * (n / 32 * 18);
            const float want = rows % 8 == 0 ? ggml_q4_0_dot(w, in.q, in.d, n) : ggml_q4_0_lanes_dot(w, in.q, in.d, n);
            ASSERT_EQ(bits(Y(t, i)), bits(want)) << rows << " " << n << " " << t << " " << i;
          }
      }
    }
}

// q4_0 rows in groups (AVX-512: 8 at once) give the portable loop's bits, for
// weight bytes that take every value 0 … 255 (every pair of nibbles) and
// scales of both signs.
template <int R, int K>
void expect_q4_0_rows_match_portable(const std::vector<unsigned char>& w, int n, const kd::Q8Input* x) {
  const std::ptrdiff_t stride = n / 32 * 18;
  float fast[R * K], lanes[R * K], want[K], want_lanes[K];
  kd::q4_0_rows_fast<true, R, K>(w.data(), stride, n, x, fast);
  kd::q4_0_rows_fast<false, R, K>(w.data(), stride, n, x, lanes);
  for (int r = 0; r < R; ++r) {
    kd::q4_0_row_portable<K>(w.data() + r * stride, n, x, want);
    kd::q4_0_lanes_portable<K>(w.data() + r * stride, n, x, want_lanes);
    for (int k = 0; k < K; ++k) {
      EXPECT_EQ(bits(fast[r * K + k]), bits(want[k])) << "R " << R << " K " << K << " n " << n;
      EXPECT_EQ(bits(want[k]), bits(ggml_q4_0_dot(w.data() + r * stride, x[k].q, x[k].d, n))) << R << " " << K << " " << n;
      EXPECT_EQ(bits(lanes[r * K + k]), bits(want_lanes[k])) << "lanes R " << R << " K " << K << " n " << n;
      EXPECT_EQ(bits(want_lanes[k]), bits(ggml_q4_0_lanes_dot(w.data() + r * stride, x[k].q, x[k].d, n))) << R << " " << K;
    }
  }
}

TEST(QuantKernels, Q4_0RowGroupsMatchThePortableLoopForEveryNibble) {
  std::mt19937 rng(22);
  for (const int n : {32, 64, 512, 800}) {
    std::vector<unsigned char> w(static_cast<std::size_t>(8 * (n / 32) * 18));
    for (std::size_t blk = 0, byte = 0; blk < w.size() / 18; ++blk) {
      for (std::size_t j = 2; j < 18; ++j) w[blk * 18 + j] = static_cast<unsigned char>(byte++ * 7);  // every byte
      const float d = std::ldexp(static_cast<float>(rng() % 1000 + 1), -14) * (blk % 3 == 0 ? -1.0f : 1.0f);
      const std::uint16_t h = kd::float_to_f16(d);
      w[blk * 18] = static_cast<unsigned char>(h & 0xFF);
      w[blk * 18 + 1] = static_cast<unsigned char>(h >> 8);
    }
    const QuantizedX x(random_matrix(4, n, static_cast<unsigned>(n)) * 4.0f);
    expect_q4_0_rows_match_portable<1, 1>(w, n, x.in.data());
    expect_q4_0_rows_match_portable<1, 4>(w, n, x.in.data());
    expect_q4_0_rows_match_portable<2, 2>(w, n, x.in.data());
    expect_q4_0_rows_match_portable<4, 4>(w, n, x.in.data());
    expect_q4_0_rows_match_portable<8, 1>(w, n, x.in.data());
    expect_q4_0_rows_match_portable<8, 2>(w, n, x.in.data());
    expect_q4_0_rows_match_portable<8, 3>(w, n, x.in.data());
    expect_q4_0_rows_match_portable<8, 4>(w, n, x.in.data());
  }
}

// q8_0 decode takes rows in groups (kernels for R rows · K tokens; with
// AVX-512, rows in pairs): every group size, token count, block count (one
// block up) and weight byte, -128 included (a GGUF file may hold it), gives
// the portable loop's bits.
template <int R, int K>
void expect_q8_0_rows_match_portable(const std::vector<unsigned char>& w, int n, const kd::Q8Input* x) {
  const std::ptrdiff_t stride = n / 32 * 34;
  float got[R * K], fast[R * K], want[K];
  kd::q8_0_rows<R, K>(w.data(), stride, n, x, got);
  kd::q8_0_rows_fast<R, K>(w.data(), stride, n, x, fast);  // AVX-512: rows in pairs
  for (int r = 0; r < R; ++r) {
    kd::q8_0_row_portable<K>(w.data() + r * stride, n, x, want);
    for (int k = 0; k < K; ++k) {
      EXPECT_EQ(bits(got[r * K + k]), bits(want[k])) << "R " << R << " K " << K << " n " << n;
      EXPECT_EQ(bits(fast[r * K + k]), bits(want[k])) << "fast R " << R << " K " << K << " n " << n;
    }
  }
}

TEST(QuantKernels, RowGroupsMatchThePortableLoopForEveryByte) {
  std::mt19937 rng(21);
  for (const int n : {32, 64, 96, 800}) {
    std::vector<unsigned char> w(static_cast<std::size_t>(8 * (n / 32) * 34));
    for (std::size_t blk = 0; blk < w.size() / 34; ++blk) {
      for (std::size_t j = 2; j < 34; ++j) w[blk * 34 + j] = static_cast<unsigned char>(rng());
      w[blk * 34 + 2 + blk % 32] = 0x80;  // -128
      const std::uint16_t d = kd::float_to_f16(std::ldexp(static_cast<float>(rng() % 1000 + 1), -16));
      w[blk * 34] = static_cast<unsigned char>(d & 0xFF);
      w[blk * 34 + 1] = static_cast<unsigned char>(d >> 8);
    }
    const Matrix<float> X = random_matrix(4, n, static_cast<unsigned>(n)) * 4.0f;
    std::vector<std::int8_t> q(static_cast<std::size_t>(4 * n));
    std::vector<float> d(static_cast<std::size_t>(4 * n / 32));
    kd::Q8Input x[4];
    for (int k = 0; k < 4; ++k) {
      for (int b = 0; b < n / 32; ++b)
        d[static_cast<std::size_t>(k * n / 32 + b)] =
            kd::from_f16(kd::quantize_q8_0_block_act(X.row(k).data() + b * 32, q.data() + k * n + b * 32));
      x[k] = {q.data() + k * n, d.data() + k * (n / 32)};
    }
    expect_q8_0_rows_match_portable<1, 1>(w, n, x);
    expect_q8_0_rows_match_portable<2, 2>(w, n, x);
    expect_q8_0_rows_match_portable<4, 1>(w, n, x);
    expect_q8_0_rows_match_portable<2, 4>(w, n, x);
    expect_q8_0_rows_match_portable<8, 1>(w, n, x);
    expect_q8_0_rows_match_portable<4, 2>(w, n, x);
    expect_q8_0_rows_match_portable<4, 4>(w, n, x);
  }
}

// Through quant_decode: row ranges whose length is no multiple of the group
// (and start anywhere), token counts with a tail after the groups of tokens.
TEST(QuantKernels, DecodeRowTailsMatchThePortableLoop) {
  for (const int n : {32, 64, 96, 800}) {
    const WeightMatrix<float> W = weights_of(WeightType::q8_0, 11, n, 23);
    const std::ptrdiff_t stride = n / 32 * 34;
    for (const Eigen::Index m : {1, 2, 3, 5}) {
      const Matrix<float> X = random_matrix(m, n, static_cast<unsigned>(m + n)) * 2.0f;
      kd::QuantScratch s;
      kd::prepare_inputs<float>(X, WeightType::q8_0, s);
      for (const auto& range : {std::pair<Eigen::Index, Eigen::Index>{0, 11}, {1, 8}, {3, 6}, {2, 3}}) {
        Matrix<float> Y2 = Matrix<float>::Zero(m, 11), Y4 = Matrix<float>::Zero(m, 11);
        kd::quant_decode<2>(W, s, Y2, m, range.first, range.second);
        kd::quant_decode<4>(W, s, Y4, m, range.first, range.second);
        for (Eigen::Index t = 0; t < m; ++t)
          for (Eigen::Index i = range.first; i < range.second; ++i) {
            const kd::Q8Input x{s.q.data() + t * n, s.d.data() + t * (n / 32)};
            float want;
            kd::q8_0_row_portable<1>(W.q8_0() + i * stride, n, &x, &want);
            ASSERT_EQ(bits(Y2(t, i)), bits(want)) << "n " << n << " m " << m << " t " << t << " i " << i;
            ASSERT_EQ(bits(Y4(t, i)), bits(want)) << "n " << n << " m " << m << " t " << t << " i " << i;
          }
      }
    }
  }
}

// The input quantizer of the decode path gives quantize_q8_0_block_act's
// bits: random blocks of every scale, ties, NaN, ±inf, -0, subnormals.
TEST(QuantKernels, InputQuantizerMatchesTheScalarOne) {
  std::mt19937 rng(31);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const float specials[] = {NAN, INFINITY, -INFINITY, -0.0f, 0.0f, 1e-45f, -3e-39f, 3e38f, 0.5f, -1.5f, 127.0f, 2.5f};
  for (int trial = 0; trial < 4000; ++trial) {
    float x[32];
    const float scale = std::ldexp(1.0f, static_cast<int>(rng() % 80) - 40);
    for (float& v : x) v = u(rng) * scale;
    if (trial % 3 == 0) x[rng() % 32] = specials[rng() % 12];
    if (trial % 5 == 0) x[rng() % 32] = specials[rng() % 12];
    if (trial % 7 == 0)  // ties: halves of max / 127
      for (int j = 0; j < 32; ++j) x[j] = (static_cast<float>(rng() % 255) - 127.0f) * 0.5f;
    if (trial == 1) std::fill(x, x + 32, 0.0f);
    std::int8_t q_fast[32], q_want[32];
    const std::uint16_t d_fast = kd::q8_quantize_act(x, q_fast), d_want = kd::quantize_q8_0_block_act(x, q_want);
    ASSERT_EQ(d_fast, d_want) << trial;
    ASSERT_EQ(std::memcmp(q_fast, q_want, 32), 0) << trial;
  }
}

// ---- Prefill kernels ----------------------------------------------------------

// W (f16, q8_0 or bf16) over memory kvcache does not own, as a GGUF file's:
// bf16 then computes as llama.cpp does (x rounded to bf16).
WeightMatrix<float> external_copy(const WeightMatrix<float>& W) {
  const std::size_t bytes = W.bytes();
  std::shared_ptr<void> values(new unsigned char[bytes], [](void* p) { delete[] static_cast<unsigned char*>(p); });
  const void* from = W.type() == WeightType::q8_0   ? static_cast<const void*>(W.q8_0())
                     : W.type() == WeightType::q4_0 ? static_cast<const void*>(W.q4_0())
                     : W.type() == WeightType::f16 ? static_cast<const void*>(W.f16().data())
                                                   : static_cast<const void*>(W.bf16().data());
  std::memcpy(values.get(), from, bytes);
  return WeightMatrix<float>(W.rows(), W.cols(), W.type(), values);
}

// reference_product, with bf16's rounding of x as well.
Matrix<double> reference_any(const Matrix<float>& X, const WeightMatrix<float>& W) {
  if (W.type() != WeightType::bf16) return reference_product(X, W);
  Matrix<double> Y(X.rows(), W.rows());
  for (Eigen::Index t = 0; t < X.rows(); ++t)
    for (Eigen::Index i = 0; i < W.rows(); ++i) {
      double s = 0;
      for (Eigen::Index j = 0; j < X.cols(); ++j)
        s += static_cast<double>(W(i, j)) * static_cast<double>(kd::from_bf16(kd::float_to_bf16(X(t, j))));
      Y(t, i) = s;
    }
  return Y;
}

// The q8_0 prefill kernel (R rows × K tokens in int8; VNNI or its portable
// loop) gives every token exactly the bits of decoding it alone, with rows
// and tokens left over from the blocks (67 rows, m = 16 … 23, 37).
TEST(QuantPrefill, Q8_0RowsTimesTokensGiveDecodesBits) {
  for (const auto type : {WeightType::q8_0})
  for (const int n : {32, 96, 160}) {
    const WeightMatrix<float> W = weights_of(type, 67, n, 21);
    for (const Eigen::Index m : {16, 17, 18, 19, 23, 37}) {
      const Matrix<float> X = random_matrix(m, n, static_cast<unsigned>(m + n)) * 3.0f;
      kd::QuantScratch s;
      kd::prepare_inputs<float>(X, type, s);
      Matrix<float> Y = Matrix<float>::Constant(m, 67, std::nanf(""));
      kd::q8_0_prefill<float>(W, s, Y, m, 0, 67);
      const Vector<float> none;
      for (Eigen::Index t = 0; t < m; ++t) {
        Matrix<float> one(1, 67);
        kd::linear<float>(X.row(t), {{W, none, one}}, 1);
        ASSERT_EQ(Y.row(t), one) << kvcache::to_string(type) << " n = " << n << " m = " << m << " t = " << t;
      }
    }
  }
}

// q4_0 prefill (AMX's tiles for 72 rows, or else decode's kernel) gives
// every token the bits of decoding it alone: 72 and 67 rows (8 rows at a
// time, pairs and a tail), tokens past a tile of 16, 1 and 2 threads, and a
// row range alone.
TEST(QuantPrefill, Q4_0GivesDecodesBits) {
  for (const Eigen::Index rows : {72, 67})
  for (const int n : {32, 96, 800}) {
    const WeightMatrix<float> W = external_copy(weights_of(WeightType::q4_0, rows, n, 24));
    for (const Eigen::Index m : {16, 17, 33, 40}) {
      const Matrix<float> X = random_matrix(m, n, static_cast<unsigned>(3 * m + n)) * 3.0f;
      const Vector<float> none;
      Matrix<float> Y1(m, rows), Y2(m, rows), Y3 = Matrix<float>::Zero(m, rows);
      kd::linear<float>(X, {{W, none, Y1}}, 1);
      kd::linear<float>(X, {{W, none, Y2}}, 2);
      kd::linear_rows<float>(X, W, none, Y3, 10, 40);
      EXPECT_EQ(Y1, Y2) << "n = " << n << " m = " << m;
      EXPECT_EQ(Y3.middleCols(10, 30), Y1.middleCols(10, 30)) << "n = " << n << " m = " << m;
      for (Eigen::Index t = 0; t < m; ++t) {
        Matrix<float> one(1, rows);
        kd::linear<float>(X.row(t), {{W, none, one}}, 1);
        ASSERT_EQ(Y1.row(t), one) << rows << " n = " << n << " m = " << m << " t = " << t;
      }
    }
  }
}

TEST(QuantPrefill, Q8_0PortableTileMatchesTheVectorTile) {
  for (const int n : {32, 96, 800}) {
    const WeightMatrix<float> W = weights_of(WeightType::q8_0, 4, n, 22);
    const Eigen::Index nb = n / 32, row = nb * 34;
    const Matrix<float> X = random_matrix(3, n, 23) * 4.0f;
    std::vector<std::int8_t> q(static_cast<std::size_t>(3 * n));
    std::vector<float> scale(static_cast<std::size_t>(4 * 3 * nb));
    for (Eigen::Index b = 0; b < 3 * nb; ++b) {
      const float d_x = kd::from_f16(kd::quantize_q8_0_block_act(X.data() + b * 32, q.data() + b * 32));
      for (Eigen::Index r = 0; r < 4; ++r)  // (r·K + k)·nb + b for token k = b / nb
        scale[static_cast<std::size_t>((r * 3 + b / nb) * nb + b % nb)] = kd::q8_0_scale(W.q8_0() + r * row + (b % nb) * 34) * d_x;
    }
    const std::int8_t* x[3] = {q.data(), q.data() + n, q.data() + 2 * n};
    float a[4][3], b[4][3];
    kd::q8_0_tile<4, 3>(W.q8_0(), row, nb, x, scale.data(), a);
    kd::q8_0_tile_portable<4, 3>(W.q8_0(), row, nb, x, scale.data(), b);
    for (int r = 0; r < 4; ++r)
      for (int k = 0; k < 3; ++k) EXPECT_EQ(a[r][k], b[r][k]) << n << " " << r << " " << k;
  }
}

// The prefill path of every type that has one (AMX's tiles on a CPU and
// kernel that lend them), against the same quantized arithmetic in double;
// tokens past a tile of 16, rows past a tile of 16, n = 32, 40, 96, 160
// (bf16 and q8_0: multiples of 32). A row range alone gives the bits of the
// whole product, and 2 threads those of 1.
TEST(QuantPrefill, MatchesTheQuantizedArithmeticInDouble) {
  for (const auto type : {WeightType::f16, WeightType::bf16, WeightType::q8_0, WeightType::q4_0})
    for (const int n : {32, 40, 96, 160}) {
      if (type != WeightType::f16 && n % 32 != 0) continue;
      const WeightMatrix<float> W = external_copy(weights_of(type, 67, n, 31));
      for (const Eigen::Index m : {16, 17, 31, 33, 64, 70}) {
        const Matrix<float> X = random_matrix(m, n, static_cast<unsigned>(7 * m + n)) * 3.0f;
        Matrix<float> Y1(m, 67), Y2(m, 67);
        const Vector<float> none;
        kd::linear<float>(X, {{W, none, Y1}}, 1);
        kd::linear<float>(X, {{W, none, Y2}}, 2);
        const Matrix<double> want = reference_any(X, W);
        const std::string what = std::string(kvcache::to_string(type)) + " n = " + std::to_string(n) + " m = " + std::to_string(m);
        // float's rounding of sums of n products of up to 3 (Eigen's on SSE2: 2.6e-5 at n = 160)
        const double tolerance = 3e-7 * n;
        EXPECT_LT(reference::max_abs_diff(Y1, want), tolerance) << what;
        EXPECT_LT(reference::max_abs_diff(Y2, want), tolerance) << what;
#if defined(KVCACHE_QUANT_AMX)
        if (!kd::amx_usable()) continue;
        EXPECT_EQ(Y1, Y2) << what;
        Matrix<float> Y3 = Matrix<float>::Zero(m, 67);
        kd::linear_rows<float>(X, W, none, Y3, 10, 40);
        EXPECT_EQ(Y3.middleCols(10, 30), Y1.middleCols(10, 30)) << what;
#endif
      }
    }
}

// ---- A decoder with f16, q8_0 and q4_0 weights ------------------------------

// Decoding token by token with the cache gives the logits of running each
// prefix afresh (all below kFewTokens tokens: the decode kernel throughout).
TEST(QuantDecoder, CachedStepsEqualUncachedForwards) {
  for (const auto type : {WeightType::f16, WeightType::q8_0, WeightType::q4_0})
    for (const auto& v : fixtures::variants()) {
      kvcache::ModelConfig c = fixtures::model(v);
      c.d_ff = 64;
      const kvcache::Decoder<float> d(c, kvcache::random_weights<float>(c, 4), type);
      EXPECT_EQ(d.weight_type(), type);
      const std::vector<int> tokens = fixtures::random_tokens(12, c.vocab_size, 5);
      kvcache::Session<float> cached = d.new_session(0, 16);
      for (std::size_t n = 1; n <= tokens.size(); ++n) {
        const Matrix<float> step = d.forward({tokens[n - 1]}, cached, kvcache::Logits::last);
        kvcache::Session<float> fresh = d.new_session(0, 16);
        const Matrix<float> all =
            d.forward(std::vector<int>(tokens.begin(), tokens.begin() + static_cast<std::ptrdiff_t>(n)), fresh, kvcache::Logits::last);
        ASSERT_TRUE(reference::all_finite(step));
        // Not bit for bit: attention sums the cache in another order for one
        // new row than for n, and rounding the next product's input to f16
        // (or quantizing it to q8_0) can turn such a last-bit difference
        // into one step of that type. A stale or misplaced cache entry moves
        // logits by far more than one step.
        const double tolerance = type == WeightType::f16 ? 4e-3 : 4e-2;
        EXPECT_LT(reference::relative_error(step, all), tolerance)
            << v.name << " " << kvcache::to_string(type) << " " << n;
      }
    }
}

}  // namespace
