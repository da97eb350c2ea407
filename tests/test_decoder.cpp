// Decoder and Session: the formula, cached == uncached at every step, chunked
// prefill, session isolation, and the error paths that must leave the caches
// as they were.
#include <cstdint>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <kvcache/decoder.hpp>

#include "fixtures.hpp"
#include "reference.hpp"

using kvcache::Decoder;
using kvcache::Logits;
using kvcache::ModelConfig;
using kvcache::Session;

namespace {

using fixtures::make_decoder;

// Logits of the whole sequence fed in the given chunk sizes, stacked.
template <typename T>
kvcache::Matrix<T> chunked_logits(const Decoder<T>& d, Session<T>& s, const std::vector<int>& tokens,
                                  const std::vector<std::size_t>& chunks) {
  kvcache::Matrix<T> out(static_cast<Eigen::Index>(tokens.size()), static_cast<Eigen::Index>(d.config().vocab_size));
  std::size_t at = 0;
  for (std::size_t m : chunks) {
    const std::vector<int> piece(tokens.begin() + static_cast<std::ptrdiff_t>(at),
                                 tokens.begin() + static_cast<std::ptrdiff_t>(at + m));
    out.middleRows(static_cast<Eigen::Index>(at), static_cast<Eigen::Index>(m)) = d.forward(piece, s);
    at += m;
  }
  return out;
}

template <typename T>
void check_cached_equals_uncached(double tolerance) {
  for (const auto& v : fixtures::variants()) {
    const ModelConfig c = fixtures::model(v);
    const Decoder<T> d = make_decoder<T>(c);
    const auto tokens = fixtures::random_tokens(30, c.vocab_size, 7);
    // Prefill 6 tokens, then decode one at a time; at every step the last
    // row must equal a fresh uncached pass over the whole sequence.
    Session<T> cached = d.new_session();
    d.forward({tokens.begin(), tokens.begin() + 6}, cached);
    for (std::size_t n = 7; n <= tokens.size(); ++n) {
      const kvcache::Matrix<T> step = d.forward({tokens[n - 1]}, cached);
      Session<T> fresh = d.new_session();
      const kvcache::Matrix<T> full = d.forward({tokens.begin(), tokens.begin() + static_cast<std::ptrdiff_t>(n)}, fresh, Logits::last);
      ASSERT_LE(reference::relative_error(step, full), tolerance) << v.name << " at position " << n - 1;
    }
  }
}

}  // namespace

TEST(Decoder, MatchesTheFormulaInDouble) {
  for (const auto& v : fixtures::variants()) {
    ModelConfig c = fixtures::model(v);
    for (bool tied : {true, false}) {
      c.tied_lm_head = tied;
      const Decoder<double> d = make_decoder<double>(c);
      const auto tokens = fixtures::random_tokens(17, c.vocab_size, 1);
      Session<double> s = d.new_session();
      EXPECT_LE(reference::relative_error(d.forward(tokens, s), reference::decoder_logits(d, tokens)), 1e-12)
          << v.name << (tied ? " tied" : " untied");
    }
  }
}

TEST(Decoder, MatchesTheFormulaInFloat) {
  for (const auto& v : fixtures::variants()) {
    const ModelConfig c = fixtures::model(v);
    const Decoder<float> d = make_decoder<float>(c);
    const auto tokens = fixtures::random_tokens(17, c.vocab_size, 1);
    Session<float> s = d.new_session();
    EXPECT_LE(reference::relative_error(d.forward(tokens, s), reference::decoder_logits(d, tokens)), 1e-5) << v.name;
  }
}

TEST(Decoder, CachedLogitsEqualUncachedAtEveryDecodeStepDouble) { check_cached_equals_uncached<double>(1e-12); }
TEST(Decoder, CachedLogitsEqualUncachedAtEveryDecodeStepFloat) { check_cached_equals_uncached<float>(1e-5); }

TEST(Decoder, AnyChunkSplitOfThePromptEqualsOnePass) {
  const std::vector<std::vector<std::size_t>> splits = {
      {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}, {5, 19}, {2, 3, 5, 7, 7}, {23, 1}, {12, 12}};
  for (const auto& v : fixtures::variants()) {
    const ModelConfig c = fixtures::model(v);
    const Decoder<double> d = make_decoder<double>(c);
    const auto tokens = fixtures::random_tokens(24, c.vocab_size, 3);
    Session<double> one = d.new_session();
    const kvcache::Matrix<double> whole = d.forward(tokens, one);
    for (const auto& split : splits) {
      Session<double> s = d.new_session();
      EXPECT_LE(reference::relative_error(chunked_logits(d, s, tokens, split), whole), 1e-12) << v.name;
    }
  }
}

TEST(Decoder, LastLogitsAreTheLastRowOfAll) {
  const ModelConfig c = fixtures::model(fixtures::variants()[4]);
  const Decoder<float> d = make_decoder<float>(c);
  const auto tokens = fixtures::random_tokens(9, c.vocab_size, 3);
  Session<float> a = d.new_session(), b = d.new_session();
  const kvcache::Matrix<float> all = d.forward(tokens, a);
  const kvcache::Matrix<float> last = d.forward(tokens, b, Logits::last);
  ASSERT_EQ(last.rows(), 1);
  // One row is a matrix-vector product, many a matrix-matrix product: the
  // sums run in another order.
  EXPECT_LE(reference::relative_error(last, all.bottomRows(1)), 1e-6);
}

TEST(Decoder, ClearedSessionGivesExactlyWhatAFreshOneGives) {
  for (const auto& v : fixtures::variants()) {
    const ModelConfig c = fixtures::model(v);
    const Decoder<float> d = make_decoder<float>(c);
    const auto first = fixtures::random_tokens(20, c.vocab_size, 1), second = fixtures::random_tokens(11, c.vocab_size, 2);
    Session<float> reused = d.new_session();
    d.forward(first, reused);
    reused.clear();
    EXPECT_EQ(reused.size(), 0u);
    const kvcache::Matrix<float> after_clear = d.forward(second, reused);
    Session<float> fresh = d.new_session();
    EXPECT_EQ(after_clear, d.forward(second, fresh)) << v.name;  // bit for bit
  }
}

TEST(Decoder, InterleavedSessionsDoNotInterfere) {
  const ModelConfig c = fixtures::model(fixtures::variants()[1]);
  const Decoder<float> d = make_decoder<float>(c);
  const auto a_tokens = fixtures::random_tokens(15, c.vocab_size, 1), b_tokens = fixtures::random_tokens(15, c.vocab_size, 2);
  std::vector<int> a_alone(15), b_alone(15);
  auto run_alone = [&](const std::vector<int>& t) {
    Session<float> s = d.new_session();
    std::vector<kvcache::Matrix<float>> rows;
    for (int id : t) rows.push_back(d.forward({id}, s));
    return rows;
  };
  const auto a_expected = run_alone(a_tokens), b_expected = run_alone(b_tokens);
  Session<float> a = d.new_session(), b = d.new_session();
  for (std::size_t i = 0; i < 15; ++i) {
    EXPECT_EQ(d.forward({a_tokens[i]}, a), a_expected[i]);
    EXPECT_EQ(d.forward({b_tokens[i]}, b), b_expected[i]);
  }
}

TEST(Decoder, TruncateThenReappendEqualsNeverHavingAppended) {
  const ModelConfig c = fixtures::model(fixtures::variants()[5]);
  const Decoder<double> d = make_decoder<double>(c);
  const auto prefix = fixtures::random_tokens(8, c.vocab_size, 1), rejected = fixtures::random_tokens(5, c.vocab_size, 2),
             tail = fixtures::random_tokens(4, c.vocab_size, 3);
  Session<double> s = d.new_session();
  d.forward(prefix, s);
  d.forward(rejected, s);
  s.truncate(8);
  EXPECT_EQ(s.size(), 8u);
  const kvcache::Matrix<double> after = d.forward(tail, s);
  Session<double> clean = d.new_session();
  d.forward(prefix, clean);
  EXPECT_EQ(after, d.forward(tail, clean));
  EXPECT_THROW(s.truncate(13), std::out_of_range);
}

TEST(Decoder, ForkedSessionContinuesLikeAFreshRun) {
  const ModelConfig c = fixtures::model(fixtures::variants()[3]);
  const Decoder<float> d = make_decoder<float>(c);
  const auto prefix = fixtures::random_tokens(10, c.vocab_size, 1), x = fixtures::random_tokens(3, c.vocab_size, 2),
             y = fixtures::random_tokens(3, c.vocab_size, 3);
  Session<float> base = d.new_session();
  d.forward(prefix, base);
  Session<float> fork = base.copy();
  const kvcache::Matrix<float> from_base = d.forward(x, base);
  const kvcache::Matrix<float> from_fork = d.forward(y, fork);
  Session<float> fresh_x = d.new_session(), fresh_y = d.new_session();
  d.forward(prefix, fresh_x);
  d.forward(prefix, fresh_y);
  EXPECT_EQ(from_base, d.forward(x, fresh_x));
  EXPECT_EQ(from_fork, d.forward(y, fresh_y));
}

TEST(Decoder, TwoThreadsGiveTheSameLogitsAsOne) {
  for (const auto& v : fixtures::variants()) {
    const ModelConfig c = fixtures::model(v);
    const Decoder<float> d = make_decoder<float>(c);
    const auto tokens = fixtures::random_tokens(20, c.vocab_size, 5);
    Session<float> one = d.new_session(), two = d.new_session();
    two.set_threads(2);
    EXPECT_LE(reference::relative_error(chunked_logits(d, two, tokens, {12, 1, 1, 6}),
                                        chunked_logits(d, one, tokens, {12, 1, 1, 6})),
              1e-5);
  }
}

// Each decode step makes room for its token before touching any cache; that
// room must grow geometrically, or every step would copy the whole cache.
TEST(Decoder, DecodeStepsGrowTheCachesGeometrically) {
  const ModelConfig c = fixtures::model(fixtures::variants()[1], 256);
  const Decoder<float> d = make_decoder<float>(c);
  Session<float> s = d.new_session();
  std::set<std::size_t> capacities;
  for (int i = 0; i < 256; ++i) {
    d.forward({i % 37}, s, Logits::last);
    capacities.insert(s.cache(1).capacity());
  }
  EXPECT_EQ(capacities, (std::set<std::size_t>{16, 32, 64, 128, 256}));
}

TEST(Decoder, KvBytesFollowTheFormula) {
  const ModelConfig c = fixtures::model(fixtures::variants()[1]);  // GQA: 2 kv heads of 8
  const Decoder<float> d = make_decoder<float>(c);
  Session<float> s = d.new_session(0, 40);
  // 2 × layers × kv_heads × d_k × tokens × bytes per value
  EXPECT_EQ(s.kv_bytes(), 2u * 2u * 2u * 8u * 40u * sizeof(float));
  EXPECT_EQ(c.kv_bytes_per_token<float>(), 2u * 2u * 2u * 8u * sizeof(float));
}

// ---- Weights stored as bfloat16 -----------------------------------------------

namespace {

template <typename T>
Decoder<T> make_bf16_decoder(const ModelConfig& c, std::uint64_t seed = 42) {
  return Decoder<T>(c, kvcache::random_weights<T>(c, seed), kvcache::WeightType::bf16);
}

}  // namespace

TEST(DecoderBf16, EveryWeightMatrixIsStoredRoundedAndTheRestStaysT) {
  const ModelConfig c = fixtures::model(fixtures::variants()[4]);  // rope, swiglu, untied
  const auto w = kvcache::random_weights<float>(c, 42);
  const Decoder<float> f32(c, w);
  const Decoder<float> bf16 = make_bf16_decoder<float>(c);
  EXPECT_EQ(f32.weight_type(), kvcache::WeightType::f32);
  EXPECT_EQ(bf16.weight_type(), kvcache::WeightType::bf16);
  const auto rounded = [](const kvcache::WeightMatrix<float>& W) {
    kvcache::WeightMatrix<float> R = W;
    R.convert_to(kvcache::WeightType::bf16);
    return R;
  };
  EXPECT_EQ(bf16.token_embedding(), rounded(w.token_embedding));
  EXPECT_EQ(bf16.lm_head(), rounded(w.lm_head));
  for (std::size_t l = 0; l < c.n_layers; ++l) {
    const auto& a = bf16.block(l).attention;
    EXPECT_EQ(a.W_Q, rounded(w.blocks[l].attention.W_Q));
    EXPECT_EQ(a.W_K, rounded(w.blocks[l].attention.W_K));
    EXPECT_EQ(a.W_V, rounded(w.blocks[l].attention.W_V));
    EXPECT_EQ(a.W_O, rounded(w.blocks[l].attention.W_O));
    EXPECT_EQ(bf16.block(l).mlp.W_1, rounded(w.blocks[l].mlp.W_1));
    EXPECT_EQ(bf16.block(l).mlp.W_2, rounded(w.blocks[l].mlp.W_2));
    EXPECT_EQ(bf16.block(l).mlp.W_3, rounded(w.blocks[l].mlp.W_3));
    EXPECT_EQ(bf16.block(l).mlp_norm.gamma, w.blocks[l].mlp_norm.gamma);
  }
  // Matrices take 2 bytes a value, the norms still 4.
  const std::size_t norms = (2 * c.n_layers + 1) * c.d_model * sizeof(float);
  EXPECT_EQ(bf16.weight_bytes(), (f32.weight_bytes() - norms) / 2 + norms);
}

// The matrices under 2 MB share one block of memory, in order (so that
// together they fill huge pages), whatever the weight type.
TEST(DecoderBf16, SmallMatricesShareOneBlock) {
  const ModelConfig c = fixtures::model(fixtures::variants()[4]);
  for (const auto type : {kvcache::WeightType::f32, kvcache::WeightType::bf16}) {
    const Decoder<float> d(c, kvcache::random_weights<float>(c, 42), type);
    const auto& a = d.block(0).attention;
    const auto address = [type](const kvcache::WeightMatrix<float>& W) {
      return type == kvcache::WeightType::f32 ? reinterpret_cast<const char*>(W.f32().data())
                                              : reinterpret_cast<const char*>(W.bf16().data());
    };
    EXPECT_EQ(address(a.W_K) - address(a.W_Q),
              static_cast<std::ptrdiff_t>(kvcache::detail::WeightArena::slice_bytes(a.W_Q.bytes())));
    EXPECT_EQ(address(d.block(1).attention.W_Q) - address(d.block(0).mlp.W_3),
              static_cast<std::ptrdiff_t>(kvcache::detail::WeightArena::slice_bytes(d.block(0).mlp.W_3.bytes())));
  }
}

// The reference reads the weights the decoder holds, i.e. rounded to
// bfloat16: in double the products match it to double precision. In float
// the portable kernel lands near 3e-7, as float32 weights do; the AVX-512
// BF16 one carries x with 16 significant bits (tests/test_linear.cpp), a
// relative error up to 2^-16 = 1.5e-5 per product, and lands near 8e-6.
TEST(DecoderBf16, MatchesTheFormulaOnTheRoundedWeights) {
  for (const auto& v : fixtures::variants()) {
    const ModelConfig c = fixtures::model(v);
    const auto tokens = fixtures::random_tokens(17, c.vocab_size, 1);
    const Decoder<double> d = make_bf16_decoder<double>(c);
    Session<double> s = d.new_session();
    EXPECT_LE(reference::relative_error(d.forward(tokens, s), reference::decoder_logits(d, tokens)), 1e-12) << v.name;
    const Decoder<float> f = make_bf16_decoder<float>(c);
    Session<float> sf = f.new_session();
    EXPECT_LE(reference::relative_error(f.forward(tokens, sf), reference::decoder_logits(f, tokens)), 3e-5) << v.name;
  }
}

TEST(DecoderBf16, CachedEqualsUncachedAndTwoThreadsEqualOne) {
  for (const auto& v : fixtures::variants()) {
    const ModelConfig c = fixtures::model(v);
    const Decoder<float> d = make_bf16_decoder<float>(c);
    const auto tokens = fixtures::random_tokens(20, c.vocab_size, 5);
    Session<float> one = d.new_session(), two = d.new_session(), whole = d.new_session();
    two.set_threads(2);
    const kvcache::Matrix<float> stepped = chunked_logits(d, one, tokens, {12, 1, 1, 6});
    EXPECT_LE(reference::relative_error(chunked_logits(d, two, tokens, {12, 1, 1, 6}), stepped), 1e-5) << v.name;
    EXPECT_LE(reference::relative_error(d.forward(tokens, whole), stepped), 1e-5) << v.name;
  }
}

// ---- Configuration errors ---------------------------------------------------

namespace {

std::string construction_error(const ModelConfig& c, kvcache::DecoderWeights<float> w) {
  try {
    Decoder<float> d(c, std::move(w));
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "no exception";
}

std::string config_error(const ModelConfig& c) {
  try {
    c.validate();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "no exception";
}

}  // namespace

TEST(Decoder, RejectsEveryInvalidConfigNamingTheFieldAndValues) {
  const ModelConfig good = fixtures::model(fixtures::variants()[1]);
  struct Case {
    void (*mutate)(ModelConfig&);
    const char* expected;
  };
  const Case cases[] = {
      {[](ModelConfig& c) { c.vocab_size = 0; }, "vocab_size = 0"},
      {[](ModelConfig& c) { c.d_model = 0; }, "d_model = 0"},
      {[](ModelConfig& c) { c.n_layers = 0; }, "n_layers = 0"},
      {[](ModelConfig& c) { c.n_heads = 0; }, "n_heads = 0"},
      {[](ModelConfig& c) { c.d_ff = 0; }, "d_ff = 0"},
      {[](ModelConfig& c) { c.max_seq_len = 0; }, "max_seq_len = 0"},
      {[](ModelConfig& c) { c.n_heads = 5; }, "d_model % n_heads != 0 (d_model = 32, n_heads = 5)"},
      {[](ModelConfig& c) { c.n_kv_heads = 3; }, "n_heads % n_kv_heads != 0 (n_heads = 4, n_kv_heads = 3)"},
      {[](ModelConfig& c) { c.norm_eps = 0; }, "norm_eps"},
      {[](ModelConfig& c) {
         c.positions = kvcache::PositionEncoding::rope;
         c.d_model = 12;
         c.n_heads = 4;
         c.n_kv_heads = 4;
       },
       "even d_k"},
  };
  for (const Case& k : cases) {
    ModelConfig c = good;
    k.mutate(c);
    EXPECT_NE(config_error(c).find(k.expected), std::string::npos) << config_error(c);
  }
}

TEST(Decoder, RejectsWeightsOfTheWrongShape) {
  const ModelConfig c = fixtures::model(fixtures::variants()[4]);  // rope, swiglu, untied
  const auto good = kvcache::random_weights<float>(c, 1);
  auto expect = [&](void (*mutate)(kvcache::DecoderWeights<float>&), const char* text) {
    auto w = good;
    mutate(w);
    const std::string e = construction_error(c, std::move(w));
    EXPECT_NE(e.find(text), std::string::npos) << e;
  };
  expect([](auto& w) { w.token_embedding.resize(36, 32); }, "token_embedding is 36 x 32, expected 37 x 32");
  expect([](auto& w) { w.blocks.pop_back(); }, "1 blocks but n_layers = 2");
  expect([](auto& w) { w.blocks[1].attention.W_K.resize(32, 32); }, "blocks[1].attention.W_K is 32 x 32, expected 16 x 32");
  expect([](auto& w) { w.blocks[0].mlp.W_3.resize(0, 0); }, "blocks[0].mlp.W_3 is 0 x 0, expected 48 x 32");
  expect([](auto& w) { w.blocks[0].mlp.W_2.resize(48, 32); }, "blocks[0].mlp.W_2 is 48 x 32, expected 32 x 48");
  expect([](auto& w) { w.blocks[1].mlp_norm.gamma.resize(31); }, "blocks[1].mlp_norm.gamma has 31 entries");
  expect([](auto& w) { w.final_norm.beta.setZero(32); }, "final_norm.beta given but RMSNorm");
  expect([](auto& w) { w.lm_head.resize(0, 0); }, "lm_head is 0 x 0, expected 37 x 32");
  expect([](auto& w) { w.position_embedding.setZero(48, 32); }, "position_embedding given but positions = rope");
}

// ---- Bad input leaves every cache as it was ---------------------------------

TEST(Decoder, BadTokensThrowAndLeaveTheSessionUnchanged) {
  const ModelConfig c = fixtures::model(fixtures::variants()[0], 16);
  const Decoder<float> d = make_decoder<float>(c);
  const auto prefix = fixtures::random_tokens(10, c.vocab_size, 1), next = fixtures::random_tokens(3, c.vocab_size, 2);
  Session<float> s = d.new_session();
  d.forward(prefix, s);
  auto expect_error = [&](auto call, const char* text) {
    try {
      call();
      ADD_FAILURE() << "expected an exception containing '" << text << "'";
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
    EXPECT_EQ(s.size(), 10u);
  };
  expect_error([&] { d.forward({}, s); }, "no tokens");
  expect_error([&] { d.forward({1, 2, 37}, s); }, "token id 37 at index 2 is outside [0, vocab_size = 37)");
  expect_error([&] { d.forward({-1}, s); }, "token id -1");
  expect_error([&] { d.forward(fixtures::random_tokens(7, c.vocab_size, 3), s); }, "17 tokens (10 cached + 7 new) exceeds the limit of 16");
  EXPECT_THROW(d.forward({37}, s), std::out_of_range);
  EXPECT_THROW(d.forward(fixtures::random_tokens(7, c.vocab_size, 3), s), std::length_error);
  // The session still continues exactly like one that never saw the errors.
  Session<float> clean = d.new_session();
  d.forward(prefix, clean);
  EXPECT_EQ(d.forward(next, s), d.forward(next, clean));
}

TEST(Decoder, SessionLimitAndForeignSessionsAreRejected) {
  const ModelConfig c = fixtures::model(fixtures::variants()[0]);
  const Decoder<float> d = make_decoder<float>(c);
  EXPECT_THROW(d.new_session(c.max_seq_len + 1), std::invalid_argument);
  Session<float> small = d.new_session(4);
  d.forward({1, 2, 3}, small);
  EXPECT_THROW(d.forward({4, 5}, small), std::length_error);
  EXPECT_EQ(small.size(), 3u);
  EXPECT_EQ(small.cache(0).size(), 3u);

  ModelConfig other = c;
  other.n_kv_heads = 2;
  const Decoder<float> d2 = make_decoder<float>(other);
  Session<float> foreign = d2.new_session();
  EXPECT_THROW(d.forward({1}, foreign), std::invalid_argument);
  EXPECT_EQ(foreign.size(), 0u);
  EXPECT_THROW(small.set_threads(0), std::invalid_argument);
}
