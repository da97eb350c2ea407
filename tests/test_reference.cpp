// tests/test_reference.cpp — the comparison helpers every numeric test relies
// on (tests/reference.hpp). A helper that lets a NaN or an infinity through
// makes every test that uses it blind: Eigen's maxCoeff() skips a NaN that is
// not the first entry, so poisoning one logit of every row once left the
// whole suite green. Each helper must report a non-finite value anywhere, in
// either argument, as an error no tolerance accepts.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <gtest/gtest-spi.h>
#include <gtest/gtest.h>

#include "reference.hpp"

namespace {

using FloatMatrix = kvcache::Matrix<float>;

constexpr double kInf = std::numeric_limits<double>::infinity();

const std::vector<double>& non_finite() {
  static const std::vector<double> values{std::numeric_limits<double>::quiet_NaN(), kInf, -kInf};
  return values;
}

// Ordinary values, none of them zero: 3 rows of 7.
FloatMatrix values() {
  FloatMatrix m(3, 7);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = 0.25f * static_cast<float>(i % 5) - 0.6f;
  return m;
}

// Where a poisoned value goes: every entry of a 3 × 7 matrix, so index 0,
// the middle of a row, the end of a row, and each row.
std::vector<std::pair<Eigen::Index, Eigen::Index>> every_entry() {
  std::vector<std::pair<Eigen::Index, Eigen::Index>> at;
  for (Eigen::Index r = 0; r < 3; ++r)
    for (Eigen::Index c = 0; c < 7; ++c) at.emplace_back(r, c);
  return at;
}

}  // namespace

TEST(ComparisonHelpers, MeasureFiniteValues) {
  const FloatMatrix b = values();
  EXPECT_EQ(reference::relative_error(b, b), 0.0);
  EXPECT_EQ(reference::max_abs_diff(b, b), 0.0);
  FloatMatrix a = b;
  a(2, 6) += 0.5f;  // the largest |b| is 0.6
  EXPECT_NEAR(reference::max_abs_diff(a, b), 0.5, 1e-7);
  EXPECT_NEAR(reference::relative_error(a, b), 0.5 / 0.6, 1e-6);
  // All zeros: the difference itself.
  const FloatMatrix zeros = FloatMatrix::Zero(3, 7);
  EXPECT_NEAR(reference::relative_error(a - b, zeros), 0.5, 1e-7);
  EXPECT_TRUE(reference::all_finite(b));
}

TEST(ComparisonHelpers, FailOnANonFiniteValueAnywhereInEitherArgument) {
  const FloatMatrix clean = values();
  const reference::Mat clean_double = clean.cast<double>();
  for (const double bad : non_finite())
    for (const auto& [r, c] : every_entry())
      for (const int where : {0, 1, 2}) {  // in a, in b, in both
        FloatMatrix a = clean, b = clean;
        reference::Mat a_double = clean_double, b_double = clean_double;
        if (where != 1) a(r, c) = static_cast<float>(bad), a_double(r, c) = bad;
        if (where != 0) b(r, c) = static_cast<float>(bad), b_double(r, c) = bad;
        const auto at = ::testing::Message() << bad << " at (" << r << ", " << c << ") in "
                                             << (where == 0 ? "a" : where == 1 ? "b" : "both");
        EXPECT_EQ(reference::relative_error(a, b), kInf) << at;
        EXPECT_EQ(reference::max_abs_diff(a, b), kInf) << at;
        EXPECT_EQ(reference::relative_error(a_double, b_double), kInf) << at;
        EXPECT_EQ(reference::max_abs_diff(a_double, b_double), kInf) << at;
        // Mixed types, as a test compares float logits with the double reference.
        EXPECT_EQ(reference::relative_error(a, b_double), kInf) << at;
        EXPECT_EQ(reference::relative_error(a_double, b), kInf) << at;
        EXPECT_FALSE(reference::all_finite(where == 1 ? b : a)) << at;
        // Through a row, as the decode tests compare one step with one row.
        EXPECT_EQ(reference::relative_error(a.row(r), b_double.row(r)), kInf) << at;
        EXPECT_EQ(reference::relative_error(a.middleRows(r, 1), b.middleRows(r, 1)), kInf) << at;
      }
}

TEST(ComparisonHelpers, FailOnANonFiniteValueInAVector) {
  const kvcache::Vector<float> clean = values().row(1).transpose();
  for (const double bad : non_finite())
    for (Eigen::Index i = 0; i < clean.size(); ++i) {
      kvcache::Vector<float> a = clean;
      a(i) = static_cast<float>(bad);
      EXPECT_EQ(reference::relative_error(a, clean), kInf) << bad << " at " << i;
      EXPECT_EQ(reference::relative_error(clean, a), kInf) << bad << " at " << i;
      EXPECT_EQ(reference::max_abs_diff(clean, a), kInf) << bad << " at " << i;
    }
}

// The ways a test uses the result must all see the failure: a tolerance, a
// "these differ" check, and a running maximum over steps.
TEST(ComparisonHelpers, NoToleranceAcceptsANonFiniteValue) {
  FloatMatrix a = values();
  const FloatMatrix b = values();
  a(1, 3) = std::numeric_limits<float>::quiet_NaN();
  EXPECT_NONFATAL_FAILURE(EXPECT_LE(reference::relative_error(a, b), 1e300), "relative_error");
  EXPECT_NONFATAL_FAILURE(EXPECT_LE(reference::max_abs_diff(a, b), 1e300), "max_abs_diff");
  double worst = 0.0;
  for (int step = 0; step < 3; ++step) worst = std::max(worst, reference::relative_error(step == 1 ? a : b, b));
  EXPECT_EQ(worst, kInf);
}

TEST(ComparisonHelpers, FailOnShapesThatDiffer) {
  const FloatMatrix a = values();
  EXPECT_EQ(reference::relative_error(a, a.topRows(2)), kInf);
  EXPECT_EQ(reference::max_abs_diff(a, a.leftCols(6)), kInf);
  EXPECT_EQ(reference::relative_error(a.row(0), a.row(0).transpose()), kInf);
}
