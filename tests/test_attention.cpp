// MultiHeadAttentionWithCache against the formula, in every split of the
// sequence into chunks, and its error paths.
#include <stdexcept>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <kvcache/attention.hpp>
#include <kvcache/decoder.hpp>

#include "reference.hpp"

using kvcache::AttentionConfig;
using kvcache::AttentionWeights;
using kvcache::KVCache;
using kvcache::MultiHeadAttentionWithCache;
using kvcache::PositionEncoding;

namespace {

struct Shape {
  const char* name;
  std::size_t n_heads, n_kv_heads;
  PositionEncoding positions;
  bool biases;
};

const Shape kShapes[] = {
    {"MHA", 4, 4, PositionEncoding::none, true},  {"GQA", 4, 2, PositionEncoding::none, false},
    {"MQA", 4, 1, PositionEncoding::none, true},  {"MHA_rope", 4, 4, PositionEncoding::rope, false},
    {"GQA_rope", 6, 3, PositionEncoding::rope, true}, {"MQA_rope", 4, 1, PositionEncoding::rope, false},
};

AttentionConfig config_of(const Shape& s) {
  AttentionConfig c;
  c.d_model = 8 * s.n_heads;
  c.n_heads = s.n_heads;
  c.n_kv_heads = s.n_kv_heads;
  c.positions = s.positions;
  c.max_seq_len = 64;
  return c;
}

template <typename T>
AttentionWeights<T> weights_of(const AttentionConfig& c, bool biases, std::uint64_t seed) {
  kvcache::detail::SplitMix64 rng(seed);
  const std::size_t d = c.d_model, kv = c.kv_dim();
  AttentionWeights<T> w;
  w.W_Q = kvcache::detail::random_matrix<T>(rng, d, d, 0.3);
  w.W_K = kvcache::detail::random_matrix<T>(rng, kv, d, 0.3);
  w.W_V = kvcache::detail::random_matrix<T>(rng, kv, d, 0.3);
  w.W_O = kvcache::detail::random_matrix<T>(rng, d, d, 0.3);
  if (biases) {
    w.b_Q = kvcache::detail::random_matrix<T>(rng, d, 1, 0.3);
    w.b_K = kvcache::detail::random_matrix<T>(rng, kv, 1, 0.3);
    w.b_V = kvcache::detail::random_matrix<T>(rng, kv, 1, 0.3);
    w.b_O = kvcache::detail::random_matrix<T>(rng, d, 1, 0.3);
  }
  return w;
}

template <typename T>
kvcache::Matrix<T> inputs(std::size_t n, std::size_t d, std::uint64_t seed) {
  kvcache::detail::SplitMix64 rng(seed);
  return kvcache::detail::random_matrix<T>(rng, n, d, 1.0);
}

// Feeds x through the layer in chunks of the given sizes, one cache, and
// returns the outputs stacked.
template <typename T>
kvcache::Matrix<T> chunked(const MultiHeadAttentionWithCache<T>& layer, const kvcache::Matrix<T>& x,
                           const std::vector<Eigen::Index>& chunks, std::size_t threads = 1) {
  KVCache<T> cache = layer.make_cache();
  kvcache::Matrix<T> out(x.rows(), x.cols());
  Eigen::Index row = 0;
  for (Eigen::Index m : chunks) {
    out.middleRows(row, m) = layer.forward(x.middleRows(row, m), cache, threads);
    row += m;
  }
  EXPECT_EQ(row, x.rows());
  EXPECT_EQ(cache.size(), static_cast<std::size_t>(x.rows()));
  return out;
}

const std::vector<std::vector<Eigen::Index>> kSplits = {
    {20}, {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}, {7, 13}, {3, 1, 4, 1, 5, 6}, {19, 1}, {1, 19}};

template <typename T>
void check_against_reference(const Shape& s, double tolerance) {
  const AttentionConfig c = config_of(s);
  const MultiHeadAttentionWithCache<T> layer(c, weights_of<T>(c, s.biases, 11));
  const auto x = inputs<T>(20, c.d_model, 12);
  const reference::Mat expected = reference::attention(x.template cast<double>(), c, layer.weights());
  for (const auto& split : kSplits)
    EXPECT_LE(reference::relative_error(chunked(layer, x, split), expected), tolerance)
        << s.name << ", first chunk " << split.front();
}

}  // namespace

TEST(Attention, MatchesTheFormulaInDoubleInEveryChunkSplit) {
  for (const Shape& s : kShapes) check_against_reference<double>(s, 1e-12);
}

TEST(Attention, MatchesTheFormulaInFloatInEveryChunkSplit) {
  for (const Shape& s : kShapes) check_against_reference<float>(s, 1e-5);
}

// The seed pseudocode's create_causal_mask(q_len, k_len) masks as if the
// queries started at position 0; with a cached prefix of p tokens, query i
// must see keys up to p + i. A chunk of 5 after a prefix of 7 shows the
// difference: computing it with the offset-free mask gives other numbers.
TEST(Attention, CausalMaskIsOffsetByTheCachedPrefix) {
  const AttentionConfig c = config_of(kShapes[0]);
  const MultiHeadAttentionWithCache<double> layer(c, weights_of<double>(c, false, 3));
  const auto x = inputs<double>(12, c.d_model, 4);
  const reference::Mat full = reference::attention(x, c, layer.weights());
  const auto split = chunked(layer, x, {7, 5});
  EXPECT_LE(reference::relative_error(split, full), 1e-12);
  // What a mask without the offset would produce for the second chunk: each
  // query i sees only keys 0..i.
  const reference::Mat wrong = reference::attention(x.topRows(5), c, layer.weights());
  EXPECT_GT(reference::relative_error(split.bottomRows(5), wrong), 1e-3);
}

TEST(Attention, ThreadsGiveTheSameResult) {
  const AttentionConfig c = config_of(kShapes[4]);
  const MultiHeadAttentionWithCache<float> layer(c, weights_of<float>(c, true, 5));
  const auto x = inputs<float>(20, c.d_model, 6);
  for (const auto& split : kSplits)
    EXPECT_LE(reference::relative_error(chunked(layer, x, split, 2), chunked(layer, x, split, 1)), 1e-6);
}

TEST(Attention, SeedApiOwnsACacheAndResets) {
  const AttentionConfig c = config_of(kShapes[3]);
  MultiHeadAttentionWithCache<double> layer(c, weights_of<double>(c, false, 8));
  const auto x = inputs<double>(10, c.d_model, 9);
  const kvcache::Matrix<double> full = layer.forward(x, false);
  EXPECT_EQ(layer.cache_size(), 0u);  // use_cache = false leaves the cache alone
  kvcache::Matrix<double> stepped(10, c.d_model);
  for (Eigen::Index i = 0; i < 10; ++i) stepped.row(i) = layer.forward(x.row(i), true);
  EXPECT_EQ(layer.cache_size(), 10u);
  EXPECT_LE(reference::relative_error(stepped, full), 1e-12);
  layer.reset_cache();
  EXPECT_EQ(layer.cache_size(), 0u);
  // After the reset, the first token is at position 0 again.
  EXPECT_LE(reference::relative_error(layer.forward(x.topRows(3), true), full.topRows(3)), 1e-12);
}

TEST(Attention, RejectsBadConfigsNamingTheField) {
  AttentionConfig c = config_of(kShapes[0]);
  const auto w = weights_of<float>(c, false, 1);
  auto message = [&](AttentionConfig bad, AttentionWeights<float> weights) -> std::string {
    try {
      MultiHeadAttentionWithCache<float> layer(bad, std::move(weights));
    } catch (const std::invalid_argument& e) {
      return e.what();
    }
    return "no exception";
  };
  AttentionConfig bad = c;
  bad.n_heads = 5;
  EXPECT_NE(message(bad, w).find("d_model % n_heads"), std::string::npos);
  bad = c;
  bad.n_kv_heads = 3;
  EXPECT_NE(message(bad, w).find("n_heads % n_kv_heads"), std::string::npos);
  bad = c;
  bad.n_heads = 0;
  EXPECT_NE(message(bad, w).find("n_heads = 0"), std::string::npos);
  bad = c;
  bad.max_seq_len = 0;
  EXPECT_NE(message(bad, w).find("max_seq_len = 0"), std::string::npos);
  bad = c;
  bad.positions = PositionEncoding::rope;
  bad.rope_base = 0.5;
  EXPECT_NE(message(bad, w).find("rope_base"), std::string::npos);
  auto wrong = w;
  wrong.W_K = kvcache::Matrix<float>::Zero(3, 32);
  EXPECT_NE(message(c, wrong).find("W_K is 3 x 32, expected 32 x 32"), std::string::npos) << message(c, wrong);
  wrong = w;
  wrong.b_O = kvcache::Vector<float>::Zero(7);
  EXPECT_NE(message(c, wrong).find("b_O"), std::string::npos);
}

TEST(Attention, BadInputThrowsAndLeavesTheCacheUnchanged) {
  const AttentionConfig c = config_of(kShapes[1]);  // max_seq_len 64
  const MultiHeadAttentionWithCache<float> layer(c, weights_of<float>(c, false, 1));
  KVCache<float> cache = layer.make_cache();
  const auto x = inputs<float>(70, c.d_model, 2);
  layer.forward(x.topRows(10), cache);
  const kvcache::Matrix<float> K0 = cache.keys(0);
  auto unchanged = [&] {
    EXPECT_EQ(cache.size(), 10u);
    EXPECT_EQ(kvcache::Matrix<float>(cache.keys(0)), K0);
  };
  EXPECT_THROW(layer.forward(kvcache::Matrix<float>(1, c.d_model + 1), cache), std::invalid_argument);
  unchanged();
  EXPECT_THROW(layer.forward(kvcache::Matrix<float>(0, c.d_model), cache), std::invalid_argument);
  unchanged();
  try {
    layer.forward(x.middleRows(10, 55), cache);
    ADD_FAILURE() << "expected std::length_error";
  } catch (const std::length_error& e) {
    EXPECT_NE(std::string(e.what()).find("65"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("max_seq_len = 64"), std::string::npos) << e.what();
  }
  unchanged();
  KVCache<float> wrong_shape(c.n_kv_heads + 1, c.d_k());
  EXPECT_THROW(layer.forward(x.topRows(1), wrong_shape), std::invalid_argument);
  EXPECT_EQ(wrong_shape.size(), 0u);
  // A cache with a tighter limit than the layer's.
  KVCache<float> small(c.n_kv_heads, c.d_k(), 4);
  layer.forward(x.topRows(3), small);
  EXPECT_THROW(layer.forward(x.topRows(2), small), std::length_error);
  EXPECT_EQ(small.size(), 3u);
}
