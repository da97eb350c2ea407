// KVCache: layout of the views, growth, limits, and that a failed call
// changes nothing.
#include <set>
#include <stdexcept>
#include <type_traits>

#include <gtest/gtest.h>
#include <kvcache/kv_cache.hpp>

using kvcache::KVCache;
using Mat = kvcache::Matrix<float>;

namespace {

// m tokens of n_kv_heads × d_k with entry values that encode where they came
// from, so a misplaced row is visible.
Mat tokens(Eigen::Index m, Eigen::Index kv_dim, float first_token, float sign = 1.0f) {
  Mat M(m, kv_dim);
  for (Eigen::Index i = 0; i < m; ++i)
    for (Eigen::Index c = 0; c < kv_dim; ++c) M(i, c) = sign * ((first_token + static_cast<float>(i)) * 1000.0f + static_cast<float>(c));
  return M;
}

// The cache's head views glued back into m × kv_dim rows.
Mat keys_of(const KVCache<float>& cache) {
  Mat M(static_cast<Eigen::Index>(cache.size()), static_cast<Eigen::Index>(cache.kv_dim()));
  for (std::size_t h = 0; h < cache.n_kv_heads(); ++h)
    M.middleCols(static_cast<Eigen::Index>(h * cache.d_k()), static_cast<Eigen::Index>(cache.d_k())) = cache.keys(h);
  return M;
}
Mat values_of(const KVCache<float>& cache) {
  Mat M(static_cast<Eigen::Index>(cache.size()), static_cast<Eigen::Index>(cache.kv_dim()));
  for (std::size_t h = 0; h < cache.n_kv_heads(); ++h)
    M.middleCols(static_cast<Eigen::Index>(h * cache.d_k()), static_cast<Eigen::Index>(cache.d_k())) = cache.values(h);
  return M;
}

}  // namespace

TEST(KVCache, StartsEmpty) {
  KVCache<float> c(3, 4);
  EXPECT_EQ(c.size(), 0u);
  EXPECT_TRUE(c.empty());
  EXPECT_EQ(c.capacity(), 0u);
  EXPECT_EQ(c.bytes(), 0u);
  EXPECT_EQ(c.kv_dim(), 12u);
  EXPECT_EQ(c.keys(0).rows(), 0);
}

TEST(KVCache, RejectsZeroShape) {
  EXPECT_THROW(KVCache<float>(0, 4), std::invalid_argument);
  EXPECT_THROW(KVCache<float>(2, 0), std::invalid_argument);
}

TEST(KVCache, ViewsHoldEachHeadsRowsContiguously) {
  KVCache<float> c(3, 4);
  const Mat K = tokens(5, 12, 0), V = tokens(5, 12, 0, -1);
  c.append(K, V);
  ASSERT_EQ(c.size(), 5u);
  for (std::size_t h = 0; h < 3; ++h) {
    const auto Kh = c.keys(h);
    EXPECT_EQ(Kh.rows(), 5);
    EXPECT_EQ(Kh.cols(), 4);
    EXPECT_EQ(Kh, K.middleCols(static_cast<Eigen::Index>(4 * h), 4));
    EXPECT_EQ(c.values(h), V.middleCols(static_cast<Eigen::Index>(4 * h), 4));
    // Contiguous: row i + 1 starts right after row i.
    EXPECT_EQ(Kh.data() + 4, &Kh.coeffRef(1, 0));
    EXPECT_EQ(Kh.outerStride(), 4);
  }
}

TEST(KVCache, AppendsAlongTheSequenceAcrossReallocations) {
  KVCache<float> c(2, 3);
  Mat all_K(0, 6), all_V(0, 6);
  float next = 0;
  for (Eigen::Index m : {1, 2, 7, 1, 16, 3, 40, 1}) {
    const Mat K = tokens(m, 6, next), V = tokens(m, 6, next, -1);
    next += static_cast<float>(m);
    c.append(K, V);
    Mat K2(all_K.rows() + m, 6), V2(all_V.rows() + m, 6);
    K2 << all_K, K;
    V2 << all_V, V;
    all_K = K2;
    all_V = V2;
    ASSERT_EQ(keys_of(c), all_K);
    ASSERT_EQ(values_of(c), all_V);
  }
}

TEST(KVCache, GrowsGeometricallySoAppendIsAmortizedConstant) {
  KVCache<float> c(1, 2);
  std::set<std::size_t> capacities;
  const Mat one = tokens(1, 2, 0);
  for (int i = 0; i < 10000; ++i) {
    c.append(one, one);
    capacities.insert(c.capacity());
  }
  // Doubling from 16 reaches 10000 in 10 steps; a linear growth would need thousands.
  EXPECT_LE(capacities.size(), 11u);
  EXPECT_GE(c.capacity(), 10000u);
}

TEST(KVCache, ReserveMoreGrowsGeometricallyLikeAppend) {
  KVCache<float> c(1, 2, 100);
  std::set<std::size_t> capacities;
  const Mat one = tokens(1, 2, 0);
  for (int i = 0; i < 100; ++i) {
    c.reserve_more(1);
    capacities.insert(c.capacity());
    c.append(one, one);
  }
  EXPECT_EQ(capacities, (std::set<std::size_t>{16, 32, 64, 100}));  // clamped to the limit
  EXPECT_THROW(c.reserve_more(1), std::length_error);
  EXPECT_EQ(c.size(), 100u);
}

TEST(KVCache, ReserveAndBytes) {
  KVCache<float> c(2, 8);
  c.reserve(100);
  EXPECT_EQ(c.capacity(), 100u);
  EXPECT_EQ(c.size(), 0u);
  EXPECT_EQ(c.bytes(), 2u * 2u * 8u * 100u * sizeof(float));
  KVCache<double> d(2, 8);
  d.reserve(10);
  EXPECT_EQ(d.bytes(), 2u * 2u * 8u * 10u * sizeof(double));
  c.reserve(10);  // never shrinks
  EXPECT_EQ(c.capacity(), 100u);
  const Mat K = tokens(3, 16, 0);
  c.append(K, K);
  c.shrink_to_fit();
  EXPECT_EQ(c.capacity(), 3u);
  EXPECT_EQ(keys_of(c), K);
}

TEST(KVCache, ClearForgetsTokensButKeepsMemory) {
  KVCache<float> c(2, 2);
  c.append(tokens(5, 4, 0), tokens(5, 4, 0));
  const std::size_t capacity = c.capacity();
  c.clear();
  EXPECT_EQ(c.size(), 0u);
  EXPECT_EQ(c.capacity(), capacity);
  const Mat K = tokens(2, 4, 50);
  c.append(K, K);
  EXPECT_EQ(keys_of(c), K);  // nothing stale in front
}

TEST(KVCache, TruncateThenReappendEqualsNeverAppending) {
  KVCache<float> a(2, 2), b(2, 2);
  const Mat prefix = tokens(4, 4, 0), junk = tokens(3, 4, 100), tail = tokens(2, 4, 4);
  a.append(prefix, prefix);
  a.append(junk, junk);
  a.truncate(4);
  a.append(tail, tail);
  b.append(prefix, prefix);
  b.append(tail, tail);
  EXPECT_EQ(keys_of(a), keys_of(b));
  EXPECT_EQ(values_of(a), values_of(b));
}

TEST(KVCache, TruncatePastSizeThrowsAndChangesNothing) {
  KVCache<float> c(1, 2);
  c.append(tokens(3, 2, 0), tokens(3, 2, 0));
  EXPECT_THROW(c.truncate(4), std::out_of_range);
  EXPECT_EQ(c.size(), 3u);
  c.truncate(3);
  EXPECT_EQ(c.size(), 3u);
}

TEST(KVCache, LimitIsEnforcedAndAFailedAppendChangesNothing) {
  KVCache<float> c(2, 2, 5);
  const Mat K = tokens(4, 4, 0), V = tokens(4, 4, 0, -1);
  c.append(K, V);
  try {
    c.append(tokens(2, 4, 9), tokens(2, 4, 9));
    FAIL() << "expected std::length_error";
  } catch (const std::length_error& e) {
    EXPECT_NE(std::string(e.what()).find("max_tokens = 5"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("6"), std::string::npos) << e.what();
  }
  EXPECT_EQ(c.size(), 4u);
  EXPECT_EQ(keys_of(c), K);
  EXPECT_EQ(values_of(c), V);
  EXPECT_LE(c.capacity(), 5u);  // growth is clamped to the limit
  EXPECT_THROW(c.reserve(6), std::length_error);
  c.append(tokens(1, 4, 4), tokens(1, 4, 4));
  EXPECT_EQ(c.size(), 5u);
}

TEST(KVCache, ShapeMismatchThrowsAndChangesNothing) {
  KVCache<float> c(2, 2);
  const Mat K = tokens(2, 4, 0);
  c.append(K, K);
  EXPECT_THROW(c.append(tokens(1, 3, 0), tokens(1, 4, 0)), std::invalid_argument);
  EXPECT_THROW(c.append(tokens(1, 4, 0), tokens(1, 5, 0)), std::invalid_argument);
  EXPECT_THROW(c.append(tokens(2, 4, 0), tokens(1, 4, 0)), std::invalid_argument);
  EXPECT_EQ(keys_of(c), K);
}

TEST(KVCache, CopyIsExplicitAndDeep) {
  static_assert(!std::is_copy_constructible_v<KVCache<float>>, "copies must be explicit");
  static_assert(!std::is_copy_assignable_v<KVCache<float>>, "copies must be explicit");
  static_assert(std::is_nothrow_move_constructible_v<KVCache<float>>);
  KVCache<float> a(2, 2, 10);
  const Mat K = tokens(3, 4, 0);
  a.append(K, K);
  KVCache<float> b = a.copy();
  EXPECT_EQ(b.max_tokens(), 10u);
  a.truncate(1);
  a.append(tokens(2, 4, 77), tokens(2, 4, 77));
  EXPECT_EQ(keys_of(b), K);
  EXPECT_EQ(b.size(), 3u);
}

TEST(KVCache, MovedFromIsEmptyAndUsable) {
  KVCache<float> a(2, 2);
  const Mat K = tokens(3, 4, 0);
  a.append(K, K);
  KVCache<float> b(std::move(a));
  EXPECT_EQ(keys_of(b), K);
  EXPECT_EQ(a.size(), 0u);  // NOLINT(bugprone-use-after-move): documented state
  EXPECT_EQ(a.capacity(), 0u);
  KVCache<float> c(1, 1);
  c = std::move(b);
  EXPECT_EQ(keys_of(c), K);
}

TEST(KVCache, WorksInDouble) {
  KVCache<double> c(1, 3);
  kvcache::Matrix<double> K(2, 3);
  K << 1, 2, 3, 4, 5, 6;
  c.append(K, K);
  EXPECT_EQ(c.keys(0), K);
}
