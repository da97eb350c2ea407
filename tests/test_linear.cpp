// WeightMatrix and the bfloat16 conversions, and the kernels of a linear
// layer (the decode GEMV as T and as bfloat16, the prefill path, the split
// across threads), each against a reference computed in double.
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include <gtest/gtest.h>
#include <kvcache/detail/parallel.hpp>
#include <kvcache/weights.hpp>

#include "fixtures.hpp"
#include "reference.hpp"

using kvcache::Matrix;
using kvcache::Vector;
using kvcache::WeightMatrix;
using kvcache::WeightType;
using kvcache::detail::from_bf16;
using kvcache::detail::bits_float;
using kvcache::detail::float_bits;
using kvcache::detail::to_bf16;

namespace {

// Seeded values in [-1, 1).
template <typename T>
Matrix<T> random(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed) {
  kvcache::detail::SplitMix64 rng(seed);
  Matrix<T> m(rows, cols);
  for (Eigen::Index k = 0; k < m.size(); ++k) m.data()[k] = static_cast<T>(rng.symmetric());
  return m;
}

std::uint16_t bf16_of_bits(std::uint32_t bits) { return to_bf16(bits_float(bits)); }

}  // namespace

// ---- bfloat16 ----------------------------------------------------------------

TEST(Bfloat16, KeepsTheTopSixteenBitsOfExactValues) {
  for (const float f : {0.0f, -0.0f, 1.0f, -2.5f, 0.15625f, 65536.0f, std::numeric_limits<float>::infinity()}) {
    EXPECT_EQ(to_bf16(f), float_bits(f) >> 16) << f;
    EXPECT_EQ(from_bf16(to_bf16(f)), f) << f;
  }
}

TEST(Bfloat16, RoundsToNearestWithTiesToEven) {
  EXPECT_EQ(bf16_of_bits(0x3F807FFFu), 0x3F80u);  // below half an ulp: down
  EXPECT_EQ(bf16_of_bits(0x3F808001u), 0x3F81u);  // above: up
  EXPECT_EQ(bf16_of_bits(0x3F808000u), 0x3F80u);  // tie, 0x3F80 is even: down
  EXPECT_EQ(bf16_of_bits(0x3F818000u), 0x3F82u);  // tie, 0x3F81 is odd: up
  EXPECT_EQ(bf16_of_bits(0xBF818000u), 0xBF82u);  // the same for negatives
  EXPECT_EQ(bf16_of_bits(0x007F8000u), 0x0080u);  // a subnormal rounds up into the normals
}

TEST(Bfloat16, OverflowsToInfinityAndKeepsNaN) {
  EXPECT_EQ(to_bf16(std::numeric_limits<float>::max()), 0x7F80u);  // past the largest bfloat16
  EXPECT_EQ(to_bf16(-std::numeric_limits<float>::max()), 0xFF80u);
  EXPECT_EQ(bf16_of_bits(0x7F7F7FFFu), 0x7F7Fu);  // the largest bfloat16 itself
  // A NaN whose payload sits only in the low bits would truncate to infinity.
  EXPECT_TRUE(std::isnan(from_bf16(bf16_of_bits(0x7F800001u))));
  EXPECT_TRUE(std::isnan(from_bf16(to_bf16(std::numeric_limits<double>::quiet_NaN()))));
}

// A double first rounded to float and then to bfloat16 could land on a tie
// and round the wrong way; rounding to odd in between prevents it.
TEST(Bfloat16, DoublesRoundOnceNotTwice) {
  const double above_tie = 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40);  // just above 1 + ½ ulp
  EXPECT_EQ(static_cast<float>(above_tie), 1.0f + std::ldexp(1.0f, -8));       // float lands on the tie
  EXPECT_EQ(to_bf16(above_tie), 0x3F81u);                                       // but it is above: up
  const double below_tie = 1.0 + std::ldexp(1.0, -8) - std::ldexp(1.0, -40);
  EXPECT_EQ(to_bf16(below_tie), 0x3F80u);
  EXPECT_EQ(to_bf16(1.0 + std::ldexp(1.0, -8)), 0x3F80u);  // an exact tie: to even
  EXPECT_EQ(to_bf16(1e300), 0x7F80u);
  EXPECT_EQ(to_bf16(-1e300), 0xFF80u);
  for (const float f : {0.3f, -7.1f, 1e-30f, 3e38f}) EXPECT_EQ(to_bf16(static_cast<double>(f)), to_bf16(f)) << f;
}

// ---- WeightMatrix ------------------------------------------------------------

TEST(WeightMatrix, HoldsAnEigenMatrixRowByRow) {
  const Matrix<float> M = random<float>(5, 7, 1);
  const WeightMatrix<float> W = M;
  EXPECT_EQ(W.rows(), 5);
  EXPECT_EQ(W.cols(), 7);
  EXPECT_EQ(W.size(), 35);
  EXPECT_EQ(W.type(), WeightType::f32);
  EXPECT_EQ(W.bytes(), 35u * sizeof(float));
  EXPECT_EQ(W.f32(), M);
  EXPECT_EQ(W.f32().data()[7], M(1, 0));  // row 1 follows row 0
  EXPECT_EQ(W(3, 4), M(3, 4));
  EXPECT_EQ(W.to_dense(), M);
  std::vector<float> row(7);
  W.row_to(2, row.data());
  for (Eigen::Index j = 0; j < 7; ++j) EXPECT_EQ(row[static_cast<std::size_t>(j)], M(2, j));
  // Column-major sources and expressions are converted.
  const Eigen::MatrixXf C = M;
  EXPECT_EQ(WeightMatrix<float>(C), W);
  EXPECT_EQ(WeightMatrix<float>(2 * M).f32(), 2 * M);
}

TEST(WeightMatrix, ConvertsToBfloat16AndBack) {
  const Matrix<float> M = random<float>(4, 9, 2);
  WeightMatrix<float> W = M;
  W.convert_to(WeightType::bf16);
  EXPECT_EQ(W.type(), WeightType::bf16);
  EXPECT_EQ(W.rows(), 4);
  EXPECT_EQ(W.cols(), 9);
  EXPECT_EQ(W.bytes(), 36u * 2u);
  for (Eigen::Index i = 0; i < 4; ++i)
    for (Eigen::Index j = 0; j < 9; ++j) {
      EXPECT_EQ(W.bf16()(i, j), to_bf16(M(i, j)));
      EXPECT_EQ(W(i, j), from_bf16(to_bf16(M(i, j))));
    }
  const Matrix<float> rounded = W.to_dense();
  EXPECT_LE(reference::max_abs_diff(rounded, M), std::ldexp(1.0, -8));  // half an ulp of values below 1
  std::vector<float> row(9);
  W.row_to(3, row.data());
  for (Eigen::Index j = 0; j < 9; ++j) EXPECT_EQ(row[static_cast<std::size_t>(j)], rounded(3, j));
  W.convert_to(WeightType::bf16);  // already: nothing changes
  EXPECT_EQ(W.to_dense(), rounded);
  W.convert_to(WeightType::f32);  // back: exact
  EXPECT_EQ(W.type(), WeightType::f32);
  EXPECT_EQ(W.f32(), rounded);
}

TEST(WeightMatrix, TheOtherTypesValuesAreNotThere) {
  WeightMatrix<float> W = random<float>(2, 3, 3);
  EXPECT_THROW((void)W.bf16(), std::logic_error);
  W.convert_to(WeightType::bf16);
  EXPECT_THROW((void)W.f32(), std::logic_error);
  try {
    (void)W.f32();
  } catch (const std::logic_error& e) {
    EXPECT_NE(std::string(e.what()).find("holds bf16 values, not f32"), std::string::npos) << e.what();
  }
}

TEST(WeightMatrix, ResizeAssignAndCompare) {
  WeightMatrix<double> W;
  EXPECT_EQ(W.size(), 0);
  W.resize(3, 2, WeightType::bf16);
  EXPECT_EQ(W.type(), WeightType::bf16);
  EXPECT_EQ(W.bf16().rows(), 3);
  W.resize(2, 5);
  EXPECT_EQ(W.type(), WeightType::f32);
  EXPECT_EQ(W.f32().cols(), 5);
  W = Matrix<double>::Ones(2, 2);
  EXPECT_EQ(W(1, 1), 1.0);
  WeightMatrix<double> V = W;
  EXPECT_EQ(V, W);
  V.convert_to(WeightType::bf16);
  EXPECT_NE(V, W);  // same values, stored differently
  V.convert_to(WeightType::f32);
  EXPECT_EQ(V, W);
  V = Matrix<double>::Ones(2, 3);
  EXPECT_NE(V, W);
}

// A decode step streams every weight: matrices of 2 MB and more start on a
// 2 MB boundary (where Linux can back them with huge pages), smaller ones on
// a cache line; copies are deep.
TEST(WeightMatrix, MemoryIsAlignedForStreaming) {
  const auto address = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p); };
  WeightMatrix<float> big(1024, 600);  // 2.4 MB
  EXPECT_EQ(address(big.f32().data()) % (std::uintptr_t{2} << 20), 0u);
  big.f32().setConstant(0.5f);
  const WeightMatrix<float> copy = big;
  EXPECT_NE(copy.f32().data(), big.f32().data());
  EXPECT_EQ(copy, big);
  big.convert_to(WeightType::bf16);  // 1.2 MB: a cache line is enough
  EXPECT_EQ(address(big.bf16().data()) % 64, 0u);
  EXPECT_EQ(big(1023, 599), 0.5f);
  const WeightMatrix<float> small(3, 5);
  EXPECT_EQ(address(small.f32().data()) % 64, 0u);
  WeightMatrix<float> empty(0, 7);
  EXPECT_EQ(empty.size(), 0);
  EXPECT_EQ(empty.to_dense().rows(), 0);
  EXPECT_THROW(empty.resize(-1, 2), std::invalid_argument);
}

// Small matrices side by side in one block: 64-byte aligned slices, the
// values moved over intact, the block kept alive by the matrices.
TEST(WeightMatrix, MovesIntoAnArena) {
  const Matrix<float> A = random<float>(3, 5, 31), B = random<float>(7, 2, 32);
  WeightMatrix<float> a = A, b = B;
  b.convert_to(WeightType::bf16);
  const WeightMatrix<float> b_before = b;
  {
    kvcache::detail::WeightArena arena(kvcache::detail::WeightArena::slice_bytes(15 * 4) +
                                       kvcache::detail::WeightArena::slice_bytes(14 * 2));
    a.move_into(arena);
    b.move_into(arena);
    EXPECT_EQ(arena.used(), 64u + 64u);
    const auto* first = reinterpret_cast<const unsigned char*>(a.f32().data());
    EXPECT_EQ(reinterpret_cast<const unsigned char*>(b.bf16().data()), first + 64);
    WeightMatrix<float> c = A;
    EXPECT_THROW(c.move_into(arena), std::length_error);  // full
  }  // the arena object is gone; its memory lives on in a and b
  EXPECT_EQ(a.f32(), A);
  EXPECT_EQ(b, b_before);
  const WeightMatrix<float> copy = a;  // a copy has memory of its own
  EXPECT_NE(copy.f32().data(), a.f32().data());
  EXPECT_EQ(copy, a);
}

// ---- The kernels -------------------------------------------------------------

namespace {

// The bound on |computed − exact| for y_i = Σ_j W_ij x_j in float: with
// bfloat16 weights (exact) and AVX-512 BF16, x is carried as two bfloat16
// (relative error 2^-16, 256 times below the 2^-8 of rounding the weights
// themselves); the sums in float add at most n·2^-24 of Σ|W_ij x_j|.
double bound(const Matrix<double>& W, const Matrix<double>& x, Eigen::Index i) {
  const double magnitude = (W.row(i).cwiseAbs().array() * x.row(0).cwiseAbs().array()).sum();
  return (std::ldexp(1.0, -16) + static_cast<double>(W.cols()) * std::ldexp(1.0, -24)) * magnitude;
}

}  // namespace

TEST(Gemv, EveryRowIsItsDotProductAtEveryWidth) {
  // Widths below, at and between the vector and unroll sizes, and the
  // stories models' (288, 768).
  for (const Eigen::Index n : {1, 3, 15, 16, 17, 31, 63, 64, 65, 100, 288, 768}) {
    const Matrix<float> W = random<float>(37, n, static_cast<std::uint64_t>(n));
    const Matrix<float> x = random<float>(1, n, 1000 + static_cast<std::uint64_t>(n));
    const Matrix<double> Wd = W.cast<double>(), xd = x.cast<double>();
    const Vector<double> exact = Wd * xd.transpose();
    std::vector<float> y(37, -1.0f);
    kvcache::detail::gemv_rows(W.data(), n, x.data(), y.data(), 5, 30);
    for (Eigen::Index i = 0; i < 37; ++i) {
      if (i < 5 || i >= 30) {
        EXPECT_EQ(y[static_cast<std::size_t>(i)], -1.0f) << "row " << i << " is outside the range";
        continue;
      }
      EXPECT_NEAR(y[static_cast<std::size_t>(i)], exact(i), bound(Wd, xd, i)) << "n = " << n << ", row " << i;
    }
  }
}

TEST(Gemv, Bfloat16RowsAreTheDotProductsOfTheRoundedWeights) {
  for (const Eigen::Index n : {1, 7, 16, 31, 32, 33, 64, 65, 97, 288, 768, 8192 + 40}) {
    WeightMatrix<float> W = random<float>(21, n, 7 + static_cast<std::uint64_t>(n));
    W.convert_to(WeightType::bf16);
    const Matrix<float> x = random<float>(1, n, 2000 + static_cast<std::uint64_t>(n));
    const Matrix<double> Wd = W.to_dense().cast<double>(), xd = x.cast<double>();
    const Vector<double> exact = Wd * xd.transpose();
    std::vector<float> y(21, -1.0f);
    kvcache::detail::gemv_rows_bf16(W.bf16().data(), n, x.data(), y.data(), 1, 20);
    EXPECT_EQ(y[0], -1.0f);
    EXPECT_EQ(y[20], -1.0f);
    for (Eigen::Index i = 1; i < 20; ++i)
      EXPECT_NEAR(y[static_cast<std::size_t>(i)], exact(i), bound(Wd, xd, i)) << "n = " << n << ", row " << i;
  }
}

TEST(Gemv, Bfloat16InDoubleIsExactToDoublePrecision) {
  WeightMatrix<double> W = random<double>(9, 50, 11);
  W.convert_to(WeightType::bf16);
  const Matrix<double> x = random<double>(1, 50, 12);
  std::vector<double> y(9);
  kvcache::detail::gemv_rows_bf16(W.bf16().data(), 50, x.data(), y.data(), 0, 9);
  const Vector<double> exact = W.to_dense() * x.transpose();
  for (Eigen::Index i = 0; i < 9; ++i) EXPECT_NEAR(y[static_cast<std::size_t>(i)], exact(i), 1e-13);
}

// The batched kernel: every count of tokens up to kGemvBatch, at widths
// that are not multiples of the vector width, over a range of rows that is
// not a multiple of any block size (2, 3 or 4 rows), against
// reference::linear in double; rows outside the range are left alone.
TEST(Gemv, BatchedRowsAreTheDotProductsAtAwkwardSizes) {
  constexpr int B = kvcache::detail::kGemvBatch;
  for (const Eigen::Index n : {1, 7, 15, 16, 17, 33, 100, 288})
    for (int count = 1; count <= B; ++count) {
      const Matrix<float> W = random<float>(29, n, 40 + static_cast<std::uint64_t>(n));
      const Matrix<float> X = random<float>(count, n, 50 + static_cast<std::uint64_t>(n + count));
      const Matrix<double> Wd = W.cast<double>(), Xd = X.cast<double>();
      const reference::Mat exact = reference::linear(Xd, Wd, reference::Vec());
      Matrix<float> Y = Matrix<float>::Constant(count, 29, -1.0f);
      const float* x[B];
      float* y[B];
      for (int k = 0; k < count; ++k) x[k] = X.row(k).data(), y[k] = Y.row(k).data();
      kvcache::detail::gemv_rows_upto(count, W.data(), n, x, y, 2, 25);
      for (int k = 0; k < count; ++k)
        for (Eigen::Index i = 0; i < 29; ++i) {
          if (i < 2 || i >= 25) {
            EXPECT_EQ(Y(k, i), -1.0f) << "row " << i << " is outside the range";
            continue;
          }
          EXPECT_NEAR(Y(k, i), exact(k, i), bound(Wd, Matrix<double>(Xd.row(k)), i))
              << "n = " << n << ", " << count << " tokens, token " << k << ", row " << i;
        }
    }
}

// A token's result does not depend on the tokens it is batched with: each
// of `count` tokens gets the bits of the same token alone (gemv_rows), for
// every count and position, and so through linear for every batch of a
// decode step (1 to kFewTokensF32 - 1 = 23 tokens, on 1 and 2 threads).
TEST(Gemv, ATokensBitsDoNotDependOnItsBatch) {
  constexpr int B = kvcache::detail::kGemvBatch;
  for (const Eigen::Index n : {5, 33, 288}) {
    // Values over many binades, so that summing in another order rounds
    // differently (the test fails if the order depends on the batch).
    Matrix<float> W = random<float>(31, n, 60), X = random<float>(kvcache::detail::kFewTokensF32 - 1, n, 61);
    for (Eigen::Index k = 0; k < W.size(); ++k) W.data()[k] *= std::ldexp(1.0f, static_cast<int>(k % 23) - 11);
    for (int count = 1; count <= B; ++count) {
      Matrix<float> Y(count, 31);
      const float* x[B];
      float* y[B];
      for (int k = 0; k < count; ++k) x[k] = X.row(k).data(), y[k] = Y.row(k).data();
      kvcache::detail::gemv_rows_upto(count, W.data(), n, x, y, 0, 31);
      for (int k = 0; k < count; ++k) {
        std::vector<float> alone(31);
        kvcache::detail::gemv_rows(W.data(), n, X.row(k).data(), alone.data(), 0, 31);
        for (Eigen::Index i = 0; i < 31; ++i)
          ASSERT_EQ(float_bits(Y(k, i)), float_bits(alone[static_cast<std::size_t>(i)]))
              << "n = " << n << ", " << count << " tokens, token " << k << ", row " << i;
      }
    }
    const WeightMatrix<float> Wm = W;
    for (const std::size_t threads : {1u, 2u})
      for (Eigen::Index m = 1; m < kvcache::detail::kFewTokensF32; ++m) {
        Matrix<float> Y(m, 31), one(1, 31);
        kvcache::detail::linear<float>(X.topRows(m), {{Wm, Vector<float>(), Y}}, threads);
        for (Eigen::Index t = 0; t < m; ++t) {
          kvcache::detail::linear<float>(X.row(t), {{Wm, Vector<float>(), one}}, 1);
          ASSERT_EQ(Matrix<float>(Y.row(t)), one) << "n = " << n << ", token " << t << " of " << m << ", " << threads << " threads";
        }
      }
  }
}

// The horizontal sums of the kernel's accumulators: each packet's lanes in
// one fixed order, whether it is reduced alone or with 23 others.
TEST(Gemv, PacketSumsDoNotDependOnHowManyAreSummed) {
  using Packet = Eigen::internal::packet_traits<float>::type;
  constexpr int P = Eigen::internal::packet_traits<float>::size;
  alignas(64) float lanes[24 * P];
  kvcache::detail::SplitMix64 rng(70);
  for (int k = 0; k < 24 * P; ++k) lanes[k] = static_cast<float>(rng.symmetric()) * std::ldexp(1.0f, k % 29 - 14);
  Packet a[24];
  for (int i = 0; i < 24; ++i) a[i] = Eigen::internal::pload<Packet>(lanes + i * P);
  float together[24];
  kvcache::detail::hsum_n<24, float>(a, together);
  for (int i = 0; i < 24; ++i) {
    float alone = 0.0f;
    kvcache::detail::hsum_n<1, float>(a + i, &alone);
    double exact = 0.0;
    for (int l = 0; l < P; ++l) exact += lanes[i * P + l];
    EXPECT_EQ(float_bits(together[i]), float_bits(alone)) << "packet " << i;
    EXPECT_NEAR(alone, exact, 1e-5 * std::abs(exact) + 1e-30) << "packet " << i;
  }
}

// ---- linear: Y = X·Wᵀ + b, split across threads -------------------------------

namespace {

Matrix<double> reference_linear(const Matrix<double>& X, const Matrix<double>& W, const Vector<double>& b) {
  Matrix<double> Y = X * W.transpose();
  if (b.size() != 0) Y.rowwise() += b.transpose();
  return Y;
}

}  // namespace

TEST(Linear, DecodeAndPrefillInBothWeightTypesMatchDouble) {
  for (const WeightType type : {WeightType::f32, WeightType::bf16})
    for (const Eigen::Index m : {1, 2, 9})
      for (const bool bias : {false, true}) {
        WeightMatrix<float> W = random<float>(200, 72, 3);
        W.convert_to(type);
        const Vector<float> b = bias ? Vector<float>(random<float>(200, 1, 4)) : Vector<float>();
        const Matrix<float> X = random<float>(m, 72, 5);
        const Matrix<double> Wd = W.to_dense().cast<double>(), Xd = X.cast<double>();
        const Matrix<double> expected = reference_linear(Xd, Wd, b.cast<double>());
        // The bound of the Gemv tests, for every entry: Σ_j |X_tj W_ij|
        // times (2^-16 + in·2^-24), plus the rounding of the bias.
        const Matrix<double> allowed = (std::ldexp(1.0, -16) + 72 * std::ldexp(1.0, -24)) *
                                           (Xd.cwiseAbs() * Wd.cwiseAbs().transpose()).array() +
                                       std::ldexp(1.0, -23);
        for (const std::size_t threads : {1u, 2u, 3u}) {
          Matrix<float> Y(m, 200);
          kvcache::detail::linear<float>(X, {{W, b, Y}}, threads);
          const Matrix<double> error = (Y.cast<double>() - expected).cwiseAbs();
          EXPECT_TRUE((error.array() <= allowed.array()).all())
              << kvcache::to_string(type) << " m = " << m << " bias = " << bias << " threads = " << threads
              << ": largest error " << error.maxCoeff();
        }
      }
}

// A decode step's products give the same bits whatever the thread count:
// every row is one dot product computed the same way wherever it falls.
TEST(Linear, DecodeGivesTheSameBitsOnAnyNumberOfThreads) {
  for (const WeightType type : {WeightType::f32, WeightType::bf16}) {
    WeightMatrix<float> W = random<float>(1000, 288, 8);
    W.convert_to(type);
    const Matrix<float> x = random<float>(1, 288, 9);
    Matrix<float> one(1, 1000), two(1, 1000), three(1, 1000);
    kvcache::detail::linear<float>(x, {{W, Vector<float>(), one}}, 1);
    kvcache::detail::linear<float>(x, {{W, Vector<float>(), two}}, 2);
    kvcache::detail::linear<float>(x, {{W, Vector<float>(), three}}, 3);
    EXPECT_EQ(one, two) << kvcache::to_string(type);
    EXPECT_EQ(one, three) << kvcache::to_string(type);
  }
}

// Q, K and V in one parallel region: each product equals the same product
// run on its own (the same bits for a decode step, where every row is one
// dot product), wherever the split between threads falls inside the terms.
TEST(Linear, FusedTermsEqualSeparateProducts) {
  for (const Eigen::Index m : {1, 5})
    for (const std::size_t threads : {1u, 2u, 3u}) {
      const WeightMatrix<float> W_Q = random<float>(48, 40, 21), W_K = random<float>(16, 40, 22);
      WeightMatrix<float> W_V = random<float>(16, 40, 23);
      W_V.convert_to(WeightType::bf16);  // terms of different types may share a region
      const Vector<float> b_Q = random<float>(48, 1, 24), none;
      const Matrix<float> X = random<float>(m, 40, 25);
      Matrix<float> Q(m, 48), K(m, 16), V(m, 16);
      kvcache::detail::linear<float>(X, {{W_Q, b_Q, Q}, {W_K, none, K}, {W_V, none, V}}, threads);
      Matrix<float> Q1(m, 48), K1(m, 16), V1(m, 16);
      kvcache::detail::linear<float>(X, {{W_Q, b_Q, Q1}}, 1);
      kvcache::detail::linear<float>(X, {{W_K, none, K1}}, 1);
      kvcache::detail::linear<float>(X, {{W_V, none, V1}}, 1);
      if (m == 1) {
        EXPECT_EQ(Q, Q1) << threads;
        EXPECT_EQ(K, K1) << threads;
        EXPECT_EQ(V, V1) << threads;
      } else {
        EXPECT_LE(reference::max_abs_diff(Q, Q1), 1e-5) << threads;
        EXPECT_LE(reference::max_abs_diff(K, K1), 1e-5) << threads;
        EXPECT_LE(reference::max_abs_diff(V, V1), 1e-5) << threads;
      }
    }
}

// A team splits every range the same way, and its barrier holds every
// thread until all have written: after it each thread reads what the others
// wrote.
TEST(Linear, TeamSlicesCoverTheRangeAndTheBarrierHolds) {
  for (const std::size_t threads : {1u, 2u, 3u}) {
    std::vector<int> first(100, 0), seen(3, -1);
    kvcache::detail::parallel_team(threads, [&](const kvcache::detail::Team& team) {
      const auto [begin, end] = team.slice(first.size(), 16);
      EXPECT_EQ(begin % 16, 0u);
      for (std::size_t i = begin; i < end; ++i) first[i] += 1;
      team.barrier();
      int sum = 0;
      for (const int v : first) sum += v;
      seen[team.id] = sum;
    });
    for (const int v : first) EXPECT_EQ(v, 1) << threads;  // every index exactly once
    EXPECT_EQ(seen[0], 100) << threads;
    for (const int sum : seen) EXPECT_TRUE(sum == -1 || sum == 100) << threads;  // -1: fewer threads ran
  }
}
