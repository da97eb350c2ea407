// Misuse that reached memory out of bounds or undefined behaviour before:
// a session used with a decoder that did not make it, a head index past the
// cache's heads, a sampler over no logits, a moved-from session. Each is a
// clear exception now, and leaves what it was given as it was.
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>
#include <kvcache/kvcache.hpp>

#include "fixtures.hpp"

namespace {

using kvcache::Decoder;
using kvcache::Session;

kvcache::ModelConfig learned(std::size_t max_seq_len) {
  kvcache::ModelConfig c;
  c.vocab_size = 32;
  c.d_model = 16;
  c.n_layers = 2;
  c.n_heads = 2;
  c.d_ff = 32;
  c.max_seq_len = max_seq_len;
  return c;  // learned positions, LayerNorm, GELU
}

}  // namespace

// A session of a decoder with 64 learned positions, fed 40 tokens through a
// same-shaped decoder with 32: embedding read rows past the position table.
TEST(Misuse, ASessionOfAnotherDecoderIsRefusedAndUnchanged) {
  const Decoder<float> long_model = fixtures::make_decoder<float>(learned(64));
  const Decoder<float> short_model = fixtures::make_decoder<float>(learned(32));
  Session<float> s = long_model.new_session();
  long_model.forward(fixtures::random_tokens(30, 32, 1), s);
  fixtures::expect_throw_naming<std::invalid_argument>(
      [&] { short_model.forward(fixtures::random_tokens(10, 32, 2), s); }, "made by another decoder");
  EXPECT_EQ(s.size(), 30u);
  // Even a decoder of the very same shape and weights, built separately.
  const Decoder<float> twin = fixtures::make_decoder<float>(learned(64));
  fixtures::expect_throw_naming<std::invalid_argument>([&] { twin.forward({1}, s); }, "made by another decoder");
  std::vector<Session<float>*> batch{&s};
  kvcache::Workspace<float> w;
  fixtures::expect_throw_naming<std::invalid_argument>([&] { twin.forward_batch({{1}}, batch, w); }, "(sequence 0)");
  kvcache::GenerateOptions o;
  o.max_new_tokens = 2;
  fixtures::expect_throw_naming<std::invalid_argument>([&] { kvcache::generate(twin, s, {1}, o); }, "another decoder");
  EXPECT_EQ(s.size(), 30u);
  // A copy of the decoder holds the same weights: its sessions are welcome.
  const Decoder<float> copy = long_model;
  EXPECT_NO_THROW(copy.forward({1}, s));
  EXPECT_EQ(s.size(), 31u);
}

TEST(Misuse, AMovedFromSessionIsRefusedClearly) {
  const Decoder<float> d = fixtures::make_decoder<float>(learned(16));
  Session<float> s = d.new_session();
  d.forward({1, 2}, s);
  Session<float> moved = std::move(s);
  EXPECT_EQ(s.size(), 0u);  // NOLINT(bugprone-use-after-move): the point of the test
  EXPECT_EQ(s.n_layers(), 0u);
  fixtures::expect_throw_naming<std::invalid_argument>([&] { d.forward({3}, s); }, "moved from");
  EXPECT_EQ(moved.size(), 2u);
  EXPECT_NO_THROW(d.forward({3}, moved));
}

TEST(Misuse, HeadAndSlotIndicesAreChecked) {
  kvcache::KVCache<float> c(2, 4);
  kvcache::Matrix<float> K = kvcache::Matrix<float>::Ones(3, 8);
  c.append(K, K);
  fixtures::expect_throw_naming<std::out_of_range>([&] { c.keys(7); }, "kv head 7 past n_kv_heads = 2");
  fixtures::expect_throw_naming<std::out_of_range>([&] { c.values(2); }, "kv head 2");
  std::vector<float> out(4 * 4);
  fixtures::expect_throw_naming<std::out_of_range>([&] { c.load_keys(2, 0, 1, out.data()); }, "kv head 2");
  fixtures::expect_throw_naming<std::out_of_range>([&] { c.load_values(0, 2, 2, out.data()); }, "past size() = 3");
  const Decoder<float> d = fixtures::make_decoder<float>(learned(16));
  Session<float> s = d.new_session();
  d.forward({1, 2}, s);
  fixtures::expect_throw_naming<std::out_of_range>([&] { s.cache(2); }, "past n_layers() = 2");
  fixtures::expect_throw_naming<std::out_of_range>([&] { s.cache(0).keys(2); }, "kv head 2");
}

TEST(Misuse, ASamplerNeedsAVocabulary) {
  fixtures::expect_throw_naming<std::invalid_argument>([] { kvcache::Sampler(0, 0.0f, 1.0f, 1); }, "vocab_size > 0");
  kvcache::Sampler sampler(4, 0.0f, 1.0f, 1);
  const Eigen::VectorXf none(0);
  fixtures::expect_throw_naming<std::invalid_argument>([&] { sampler.sample(none); }, "got 0 logits, expected 4");
}
