// Batched sessions: several sequences at different lengths stepped together
// in one forward. Each sequence must get what it gets alone: its logits up to
// the rounding of a matrix-matrix product against a matrix-vector one (and
// against the formula, in double), its greedy ids exactly.
#include <algorithm>
#include <cstdint>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <kvcache/attention.hpp>
#include <kvcache/decoder.hpp>
#include <kvcache/generate.hpp>
#include <kvcache/llama2c.hpp>

#include "fixtures.hpp"
#include "models.hpp"
#include "reference.hpp"

using kvcache::BatchScratch;
using kvcache::Decoder;
using kvcache::GenerateOptions;
using kvcache::KVCache;
using kvcache::KVType;
using kvcache::Logits;
using kvcache::ModelConfig;
using kvcache::Session;
using kvcache::SessionOptions;
using kvcache::SlidingWindow;

namespace {

using Mat = kvcache::Matrix<float>;

Mat random_rows(Eigen::Index m, Eigen::Index cols, std::uint64_t seed) {
  kvcache::detail::SplitMix64 rng(seed);
  Mat M(m, cols);
  for (Eigen::Index i = 0; i < M.size(); ++i) M.data()[i] = static_cast<float>(rng.symmetric());
  return M;
}

// Expects `call` to throw E with a message containing `part`.
template <typename E, typename F>
void expect_throw_naming(F&& call, const std::string& part) {
  try {
    call();
    ADD_FAILURE() << "no exception; expected one naming '" << part << "'";
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
  }
}

// A session's position and the logits its next token gets: what "unchanged" means.
template <typename T>
kvcache::Matrix<T> probe(const Decoder<T>& d, Session<T>& s) {
  Session<T> copy = s.copy();
  return d.forward({3}, copy, Logits::last);
}

}  // namespace

// ---- One attention layer ------------------------------------------------------

// forward_batch over caches of different lengths, storage types and windows
// gives each cache's rows what forward() gives them alone, and leaves each
// cache as forward() leaves it. The windows are small enough that the steps
// fill them (a sequence appended chunk by chunk) and then run past them
// (queries re-rotated for the sinks).
TEST(BatchAttention, EachCacheGetsWhatItGetsAlone) {
  for (const auto& v : fixtures::variants()) {
    kvcache::AttentionConfig c;
    c.d_model = 32;
    c.n_heads = v.n_heads;
    c.n_kv_heads = v.n_kv_heads;
    c.max_seq_len = 40;
    c.positions = v.positions == kvcache::PositionEncoding::rope ? v.positions : kvcache::PositionEncoding::none;
    const Decoder<float> weights_from = fixtures::make_decoder<float>(fixtures::model(v));
    const kvcache::MultiHeadAttentionWithCache<float> layer(c, weights_from.block(0).attention.weights());

    const std::vector<KVType> types = {KVType::full, KVType::bf16, KVType::int8, KVType::full};
    const std::vector<SlidingWindow> windows = {{}, {}, {6, 2}, {9, 0}};
    const std::vector<std::size_t> prefix = {5, 0, 3, 7};
    std::vector<KVCache<float>> batched, alone;
    for (std::size_t b = 0; b < types.size(); ++b) {
      batched.push_back(layer.make_cache(types[b], windows[b]));
      alone.push_back(layer.make_cache(types[b], windows[b]));
      if (prefix[b] != 0) {
        const Mat x = random_rows(static_cast<Eigen::Index>(prefix[b]), 32, 100 + b);
        layer.forward(x, batched[b]);
        layer.forward(x, alone[b]);
      }
    }
    std::vector<KVCache<float>*> caches;
    for (auto& cache : batched) caches.push_back(&cache);
    kvcache::AttentionScratch<float> scratch;
    Mat out;
    // Every third step gives sequences 1 to 3 rows (a full window then takes
    // them one by one), the others one row each (all sequences at once).
    for (std::size_t step = 0; step < 10; ++step) {
      std::vector<std::size_t> first_row{0};
      for (std::size_t b = 0; b < caches.size(); ++b)
        first_row.push_back(first_row.back() + (step % 3 == 0 ? 1 + b % 3 : 1));
      const Mat x = random_rows(static_cast<Eigen::Index>(first_row.back()), 32, 1000 + step);
      layer.forward_batch(x, first_row, caches, out, scratch, 1 + step % 2);
      for (std::size_t b = 0; b < caches.size(); ++b) {
        const auto i0 = static_cast<Eigen::Index>(first_row[b]);
        const auto m = static_cast<Eigen::Index>(first_row[b + 1] - first_row[b]);
        const Mat expected = layer.forward(x.middleRows(i0, m), alone[b]);
        EXPECT_LE(reference::relative_error(out.middleRows(i0, m), expected), 1e-5)
            << v.name << " step " << step << " sequence " << b;
        EXPECT_EQ(batched[b].position(), alone[b].position());
        EXPECT_EQ(batched[b].size(), alone[b].size());
      }
    }
    EXPECT_GT(batched[2].evicted(), 0u) << "the window was meant to overflow";
  }
}

TEST(BatchAttention, RejectsMalformedBatchesAndChangesNothing) {
  kvcache::AttentionConfig c;
  c.d_model = 16;
  c.n_heads = 2;
  c.n_kv_heads = 2;
  c.max_seq_len = 8;
  kvcache::AttentionWeights<float> w;
  w.W_Q = w.W_K = w.W_V = w.W_O = kvcache::WeightMatrix<float>::Identity(16, 16);
  const kvcache::MultiHeadAttentionWithCache<float> layer(c, w);
  KVCache<float> a = layer.make_cache(), b = layer.make_cache(), full = layer.make_cache();
  layer.forward(random_rows(7, 16, 1), full);
  kvcache::AttentionScratch<float> scratch;
  Mat out;
  const Mat x = random_rows(3, 16, 2);
  const auto call = [&](const std::vector<std::size_t>& rows, const std::vector<KVCache<float>*>& caches) {
    return [&, rows, caches] { layer.forward_batch(x, rows, caches, out, scratch); };
  };
  expect_throw_naming<std::invalid_argument>(call({0}, {}), "no sequences");
  expect_throw_naming<std::invalid_argument>(call({0, 3}, {&a, &b}), "first_row has 2 entries");
  expect_throw_naming<std::invalid_argument>(call({0, 1, 2}, {&a, &b}), "expected 0 to the rows of x = 3");
  expect_throw_naming<std::invalid_argument>(call({0, 0, 3}, {&a, &b}), "sequence 0 has no rows");
  expect_throw_naming<std::invalid_argument>(call({0, 1, 3}, {&a, nullptr}), "caches[1] is null");
  expect_throw_naming<std::invalid_argument>(call({0, 1, 3}, {&a, &a}), "caches[0] and caches[1]");
  // Sequence 1 would pass max_seq_len: sequence 0 must not have been appended.
  expect_throw_naming<std::length_error>(call({0, 1, 3}, {&a, &full}), "(sequence 1)");
  KVCache<float> other(1, 8);
  expect_throw_naming<std::invalid_argument>(call({0, 1, 3}, {&a, &other}), "(sequence 1)");
  EXPECT_EQ(a.size(), 0u);
  EXPECT_EQ(full.size(), 7u);
}

// ---- The decoder ------------------------------------------------------------

// Logits of batched steps (prefill chunks and decode steps mixed, both
// Logits::all and ::last) against each session alone and against the
// formula in double. float: GEMM and GEMV round differently, so the batch is
// equal only within 1e-5 relative; double: within 1e-12 of the formula.
TEST(DecoderBatch, EachSessionGetsItsOwnLogits) {
  for (const auto& v : fixtures::variants()) {
    const ModelConfig c = fixtures::model(v, 48);
    const Decoder<float> f = fixtures::make_decoder<float>(c);
    const Decoder<double> d = fixtures::make_decoder<double>(c);
    constexpr std::size_t B = 4;
    std::vector<std::vector<int>> sequence(B);
    std::vector<Session<float>> batched, alone;
    std::vector<Session<double>> batched64;
    for (std::size_t b = 0; b < B; ++b) {
      batched.push_back(f.new_session());
      alone.push_back(f.new_session());
      batched64.push_back(d.new_session());
    }
    std::vector<Session<float>*> sessions;
    std::vector<Session<double>*> sessions64;
    for (std::size_t b = 0; b < B; ++b) {
      sessions.push_back(&batched[b]);
      sessions64.push_back(&batched64[b]);
    }
    BatchScratch<float> scratch;
    BatchScratch<double> scratch64;
    for (std::size_t step = 0; step < 6; ++step) {
      // Step 0 prefills 1..4 tokens, later steps are mostly single tokens.
      std::vector<std::vector<int>> tokens(B);
      for (std::size_t b = 0; b < B; ++b) {
        const std::size_t m = step == 0 ? b + 1 : (step == 3 && b == 2 ? 3 : 1);
        tokens[b] = fixtures::random_tokens(m, c.vocab_size, static_cast<std::uint32_t>(10 * step + b));
        sequence[b].insert(sequence[b].end(), tokens[b].begin(), tokens[b].end());
      }
      const Logits which = step % 2 == 0 ? Logits::all : Logits::last;
      const Mat logits = f.forward_batch(tokens, sessions, scratch, which);
      const kvcache::Matrix<double> logits64 = d.forward_batch(tokens, sessions64, scratch64, which, 2);
      Eigen::Index row = 0;
      for (std::size_t b = 0; b < B; ++b) {
        const Mat own = f.forward(tokens[b], alone[b], which);
        const auto rows = own.rows();
        ASSERT_EQ(rows, which == Logits::all ? static_cast<Eigen::Index>(tokens[b].size()) : 1);
        EXPECT_LE(reference::relative_error(logits.middleRows(row, rows), own), 1e-5)
            << v.name << " step " << step << " sequence " << b;
        const reference::Mat formula = reference::decoder_logits(d, sequence[b]).bottomRows(rows);
        EXPECT_LE(reference::relative_error(logits64.middleRows(row, rows), formula), 1e-12)
            << v.name << " step " << step << " sequence " << b;
        EXPECT_EQ(batched[b].position(), sequence[b].size());
        row += rows;
      }
      EXPECT_EQ(row, logits.rows());
    }
  }
}

TEST(DecoderBatch, RejectsBadBatchesAndChangesNoSession) {
  const ModelConfig c = fixtures::model(fixtures::variants()[4], 16);
  const Decoder<float> d = fixtures::make_decoder<float>(c);
  Session<float> a = d.new_session(), b = d.new_session(), near_full = d.new_session();
  d.forward(fixtures::random_tokens(3, c.vocab_size, 1), a);
  d.forward(fixtures::random_tokens(15, c.vocab_size, 2), near_full);
  ModelConfig other_config = c;
  other_config.n_layers = 3;
  const Decoder<float> other_model = fixtures::make_decoder<float>(other_config);
  Session<float> other = other_model.new_session();
  const Mat a_before = probe(d, a), b_before = probe(d, b);
  BatchScratch<float> scratch;
  using Tokens = std::vector<std::vector<int>>;
  using Sessions = std::vector<Session<float>*>;
  const auto call = [&](Tokens tokens, Sessions sessions, std::size_t threads = 1) {
    return [&d, &scratch, tokens, sessions, threads] {
      d.forward_batch(tokens, sessions, scratch, Logits::last, threads);
    };
  };
  expect_throw_naming<std::invalid_argument>(call({}, {}), "no sessions");
  expect_throw_naming<std::invalid_argument>(call({{1}}, {&a, &b}), "1 token lists for 2 sessions");
  expect_throw_naming<std::invalid_argument>(call({{1}, {}}, {&a, &b}), "sequence 1 has no tokens");
  expect_throw_naming<std::invalid_argument>(call({{1}, {2}}, {&a, &a}), "sessions[0] and sessions[1]");
  expect_throw_naming<std::invalid_argument>(call({{1}, {2}}, {&a, nullptr}), "sessions[1] is null");
  expect_throw_naming<std::invalid_argument>(call({{1}, {2}}, {&a, &other}), "another model shape (sequence 1)");
  expect_throw_naming<std::out_of_range>(call({{1}, {2, 99}}, {&a, &b}), "token id 99 at index 1");
  expect_throw_naming<std::out_of_range>(call({{1}, {2, 99}}, {&a, &b}), "(sequence 1)");
  expect_throw_naming<std::length_error>(call({{1}, {2, 3}}, {&a, &near_full}), "(sequence 1)");
  expect_throw_naming<std::invalid_argument>(call({{1}, {2}}, {&a, &b}, 0), "threads = 0");
  EXPECT_EQ(a.position(), 3u);
  EXPECT_EQ(b.position(), 0u);
  EXPECT_EQ(near_full.position(), 15u);
  EXPECT_EQ(probe(d, a), a_before);
  EXPECT_EQ(probe(d, b), b_before);
  // And the scratch still works after all that.
  EXPECT_EQ(d.forward_batch({{1}, {2}}, {&a, &b}, scratch).rows(), 2);
}

