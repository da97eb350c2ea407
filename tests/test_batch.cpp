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
#include <kvcache/scheduler.hpp>
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

GenerateOptions greedy(std::size_t n) {
  GenerateOptions o;
  o.max_new_tokens = n;
  return o;
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
    const kvcache::MultiHeadAttentionWithCache<float> layer(c, weights_from.block(0).attention);

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
  w.W_Q = w.W_K = w.W_V = w.W_O = kvcache::WeightMatrix<float>(Mat::Identity(16, 16));
  const kvcache::MultiHeadAttentionWithCache<float> layer(c, w);
  KVCache<float> a = layer.make_cache(), b = layer.make_cache(), full = layer.make_cache();
  layer.forward(random_rows(7, 16, 1), full);
  kvcache::AttentionScratch<float> scratch;
  Mat out;
  const Mat x = random_rows(3, 16, 2);
  const auto call = [&](const std::vector<std::size_t>& rows, const std::vector<KVCache<float>*>& caches) {
    return [&, rows, caches] { layer.forward_batch(x, rows, caches, out, scratch); };
  };
  fixtures::expect_throw_naming<std::invalid_argument>(call({0}, {}), "no sequences");
  fixtures::expect_throw_naming<std::invalid_argument>(call({0, 3}, {&a, &b}), "first_row has 2 entries");
  fixtures::expect_throw_naming<std::invalid_argument>(call({0, 1, 2}, {&a, &b}), "expected 0 to the rows of x = 3");
  fixtures::expect_throw_naming<std::invalid_argument>(call({0, 0, 3}, {&a, &b}), "sequence 0 has no rows");
  fixtures::expect_throw_naming<std::invalid_argument>(call({0, 1, 3}, {&a, nullptr}), "caches[1] is null");
  fixtures::expect_throw_naming<std::invalid_argument>(call({0, 1, 3}, {&a, &a}), "caches[0] and caches[1]");
  // Sequence 1 would pass max_seq_len: sequence 0 must not have been appended.
  fixtures::expect_throw_naming<std::length_error>(call({0, 1, 3}, {&a, &full}), "(sequence 1)");
  KVCache<float> other(1, 8);
  fixtures::expect_throw_naming<std::invalid_argument>(call({0, 1, 3}, {&a, &other}), "(sequence 1)");
  EXPECT_EQ(a.size(), 0u);
  EXPECT_EQ(full.size(), 7u);
}

// ---- The decoder ------------------------------------------------------------

// Logits of batched steps (prefill chunks and decode steps mixed, both
// Logits::all and ::last) against each session alone and against the
// formula in double. float: a prefill chunk's rows and a decode step round
// differently, so the batch is equal only within 1e-5 relative; double:
// within 1e-12 of the formula.
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

// Decode steps of a batch smaller than detail::kFewTokensF32: every weight
// row is multiplied with each session's token by the decode kernel, summed in
// the same order as for one token, so each session gets exactly the logits
// of its own decode step, whatever it is batched with (6 sessions: one group
// of detail::kGemvTokens and the rest one by one; 16: two groups over tiles
// of W that stay in L1). With 2 threads the
// attention of a decode step splits the query heads of a shared kv head
// (MQA, GQA) between threads, and the batched path splits them otherwise;
// heads multiplied together round differently, so there the match is
// within 1e-6 relative.
TEST(DecoderBatch, DecodeStepsGiveTheBitsOfSingleDecode) {
  for (const auto& v : fixtures::variants()) {
    const ModelConfig c = fixtures::model(v, 48);
    const Decoder<float> f = fixtures::make_decoder<float>(c);
    for (const std::size_t threads : {1u, 2u})
      for (const std::size_t B : {std::size_t{6}, std::size_t{16}}) {
        std::vector<Session<float>> batched, alone;
        std::vector<Session<float>*> sessions;
        for (std::size_t b = 0; b < B; ++b) {
          alone.push_back(f.new_session());
          alone.back().set_threads(threads);
          f.forward(fixtures::random_tokens(b + 1, c.vocab_size, static_cast<std::uint32_t>(b)), alone.back());
          batched.push_back(alone.back().copy());
        }
        for (auto& s : batched) sessions.push_back(&s);
        BatchScratch<float> scratch;
        for (std::size_t step = 0; step < 4; ++step) {
          std::vector<std::vector<int>> tokens(B);
          for (std::size_t b = 0; b < B; ++b)
            tokens[b] = fixtures::random_tokens(1, c.vocab_size, static_cast<std::uint32_t>(100 + 10 * step + b));
          const Mat logits = f.forward_batch(tokens, sessions, scratch, Logits::last, threads);
          for (std::size_t b = 0; b < B; ++b) {
            const Mat got = logits.row(static_cast<Eigen::Index>(b));
            const Mat own = f.forward(tokens[b], alone[b], Logits::last);
            const std::string what = v.name + " " + std::to_string(threads) + " threads, " + std::to_string(B) + " sessions, step " +
                                     std::to_string(step) + " sequence " + std::to_string(b);
            if (threads == 1 || c.n_kv_heads == c.n_heads)
              EXPECT_EQ(got, own) << what;
            else
              EXPECT_LE(reference::relative_error(got, own), 1e-6) << what;
          }
        }
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
  fixtures::expect_throw_naming<std::invalid_argument>(call({}, {}), "no sessions");
  fixtures::expect_throw_naming<std::invalid_argument>(call({{1}}, {&a, &b}), "1 token lists for 2 sessions");
  fixtures::expect_throw_naming<std::invalid_argument>(call({{1}, {}}, {&a, &b}), "no tokens (sequence 1)");
  fixtures::expect_throw_naming<std::invalid_argument>(call({{1}, {2}}, {&a, &a}), "sessions[0] and sessions[1]");
  fixtures::expect_throw_naming<std::invalid_argument>(call({{1}, {2}}, {&a, nullptr}), "sessions[1] is null");
  fixtures::expect_throw_naming<std::invalid_argument>(call({{1}, {2}}, {&a, &other}), "made by another decoder");
  fixtures::expect_throw_naming<std::out_of_range>(call({{1}, {2, 99}}, {&a, &b}), "token id 99 at index 1");
  fixtures::expect_throw_naming<std::out_of_range>(call({{1}, {2, 99}}, {&a, &b}), "(sequence 1)");
  fixtures::expect_throw_naming<std::length_error>(call({{1}, {2, 3}}, {&a, &near_full}), "(sequence 1)");
  fixtures::expect_throw_naming<std::invalid_argument>(call({{1}, {2}}, {&a, &b}, 0), "threads = 0");
  EXPECT_EQ(a.position(), 3u);
  EXPECT_EQ(b.position(), 0u);
  EXPECT_EQ(near_full.position(), 15u);
  EXPECT_EQ(probe(d, a), a_before);
  EXPECT_EQ(probe(d, b), b_before);
  // And the scratch still works after all that.
  EXPECT_EQ(d.forward_batch({{1}, {2}}, {&a, &b}, scratch).rows(), 2);
}

// ---- generate_batch -----------------------------------------------------------

// Greedy: every sequence of a batch of prompts of different lengths gets
// exactly the ids generate() gives it alone, with sequences leaving the
// batch at different steps (an end token, then the length limit).
TEST(GenerateBatch, GreedyEqualsGenerateAlone) {
  for (const auto& v : fixtures::variants()) {
    const ModelConfig c = fixtures::model(v, 64);
    const Decoder<float> d = fixtures::make_decoder<float>(c);
    std::vector<std::vector<int>> prompts;
    for (std::size_t i = 0; i < 6; ++i)
      prompts.push_back(fixtures::random_tokens(1 + (i * 5) % 7, c.vocab_size, 50 + static_cast<std::uint32_t>(i)));
    GenerateOptions options = greedy(30);
    // An end token that some sequence produces partway: it leaves early.
    const std::vector<int> first = kvcache::generate(d, prompts[1], options);
    options.end_token = first[10];
    std::vector<std::vector<int>> alone;
    std::size_t stopped_early = 0;
    for (const auto& p : prompts) {
      alone.push_back(kvcache::generate(d, p, options));
      stopped_early += alone.back().size() < 30;
    }
    EXPECT_GT(stopped_early, 0u) << v.name;
    EXPECT_EQ(kvcache::generate_batch(d, prompts, options), alone) << v.name;
    EXPECT_EQ(kvcache::generate_batch(d, prompts, options, 2), alone) << v.name << " with 2 threads";
  }
}

// One GenerateOptions per sequence: each its own limit, sampler and stream;
// sessions of every storage type and a window, some holding a prefix.
TEST(GenerateBatch, PerSequenceOptionsAndSessions) {
  const ModelConfig c = fixtures::model(fixtures::variants()[4], 64);
  const Decoder<float> d = fixtures::make_decoder<float>(c);
  const std::vector<SessionOptions> kinds = {
      {}, {0, 0, KVType::bf16, {}}, {0, 0, KVType::int8, {}}, {0, 0, KVType::full, {12, 3}}};
  std::vector<Session<float>> batched, alone;
  std::vector<std::vector<int>> prompts, streamed(kinds.size()), expected;
  std::vector<GenerateOptions> options;
  for (std::size_t i = 0; i < kinds.size(); ++i) {
    batched.push_back(d.new_session(kinds[i]));
    alone.push_back(d.new_session(kinds[i]));
    if (i % 2 == 1) {  // a conversation that goes on
      const auto prefix = fixtures::random_tokens(4, c.vocab_size, 70 + static_cast<std::uint32_t>(i));
      d.forward(prefix, batched[i]);
      d.forward(prefix, alone[i]);
    }
    prompts.push_back(fixtures::random_tokens(2 + i, c.vocab_size, 80 + static_cast<std::uint32_t>(i)));
    GenerateOptions o = greedy(10 + 7 * i);  // the window runs past 12 tokens
    if (i >= 2) {
      o.temperature = 0.8f;
      o.top_p = i == 3 ? 0.9f : 1.0f;
      o.seed = 1234 + i;
    }
    expected.push_back(kvcache::generate(d, alone[i], prompts[i], o));
    o.on_token = [&streamed, i](int id) { streamed[i].push_back(id); };
    options.push_back(o);
  }
  std::vector<Session<float>*> sessions;
  for (auto& s : batched) sessions.push_back(&s);
  sessions.front()->set_threads(2);
  const auto ids = kvcache::generate_batch(d, sessions, prompts, options);
  EXPECT_EQ(ids, expected);
  EXPECT_EQ(streamed, expected);
  for (std::size_t i = 0; i < kinds.size(); ++i) EXPECT_EQ(batched[i].position(), alone[i].position()) << i;
  EXPECT_GT(batched[3].cache(0).evicted(), 0u);
}

// Sampling with one set of options: sequence i samples with seed + i.
TEST(GenerateBatch, SharedOptionsSeedEachSequence) {
  const ModelConfig c = fixtures::model(fixtures::variants()[1], 64);
  const Decoder<float> d = fixtures::make_decoder<float>(c);
  GenerateOptions o = greedy(20);
  o.temperature = 1.0f;
  o.seed = 99;
  const std::vector<std::vector<int>> prompts = {{1, 2, 3}, {4}, {5, 6}};
  const auto ids = kvcache::generate_batch(d, prompts, o);
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    GenerateOptions own = o;
    own.seed = 99 + i;
    EXPECT_EQ(ids[i], kvcache::generate(d, prompts[i], own)) << i;
  }
  EXPECT_EQ(kvcache::sequence_seed(~std::uint64_t{0}, 1), 1u);  // wraps past 0
  EXPECT_TRUE(kvcache::generate_batch(d, {}, o).empty());
  EXPECT_EQ(kvcache::generate_batch(d, prompts, greedy(0)), std::vector<std::vector<int>>(3));
}

TEST(GenerateBatch, RejectsBadInputBeforeAnySessionChanges) {
  const ModelConfig c = fixtures::model(fixtures::variants()[0], 16);
  const Decoder<float> d = fixtures::make_decoder<float>(c);
  ModelConfig other_config = c;
  other_config.n_kv_heads = 2;
  const Decoder<float> other_model = fixtures::make_decoder<float>(other_config);
  Session<float> a = d.new_session(), b = d.new_session(), other = other_model.new_session();
  using Prompts = std::vector<std::vector<int>>;
  using Sessions = std::vector<Session<float>*>;
  const auto call = [&](Prompts prompts, Sessions sessions, std::size_t n = 4) {
    return [&d, prompts, sessions, n] {
      kvcache::generate_batch(d, sessions, prompts, std::vector<GenerateOptions>(prompts.size(), greedy(n)));
    };
  };
  fixtures::expect_throw_naming<std::invalid_argument>(call({{1}, {2}}, {&a}), "2 prompts, 1 sessions");
  fixtures::expect_throw_naming<std::invalid_argument>(call({{1}, {}}, {&a, &b}), "sequence 1: the prompt is empty");
  fixtures::expect_throw_naming<std::invalid_argument>(call({{1}, {2}}, {&a, &a}), "generate_batch: sessions[0] and sessions[1] are the same session");
  fixtures::expect_throw_naming<std::invalid_argument>(call({{1}, {2}}, {&a, nullptr}), "generate_batch: sessions[1] is null");
  fixtures::expect_throw_naming<std::invalid_argument>(call({{1}, {2}}, {&a, &other}), "made by another decoder");
  fixtures::expect_throw_naming<std::invalid_argument>(call({{1}, {2}}, {&a, &other}), "(sequence 1)");
  fixtures::expect_throw_naming<std::out_of_range>(call({{1}, {2, -1}}, {&a, &b}), "token id -1 at index 1 is outside");
  fixtures::expect_throw_naming<std::out_of_range>(call({{1}, {2, -1}}, {&a, &b}), "(sequence 1)");
  fixtures::expect_throw_naming<std::length_error>(call({{1}, {2, 3}}, {&a, &b}, 16), "sequence 1: ");
  GenerateOptions streaming = greedy(3);
  streaming.on_token = [](int) {};
  EXPECT_THROW(kvcache::generate_batch(d, {{1}}, streaming), std::invalid_argument);
  EXPECT_THROW(kvcache::generate_batch(d, {{1}}, greedy(3), 0), std::invalid_argument);
  GenerateOptions zero_seed = greedy(3);
  zero_seed.seed = 0;
  EXPECT_THROW(kvcache::generate_batch(d, {&a}, {{1}}, {zero_seed}), std::invalid_argument);
  EXPECT_EQ(a.position(), 0u);
  EXPECT_EQ(b.position(), 0u);
}

// ---- The real checkpoints -----------------------------------------------------

// stories260K and aidreams260K: prompts of 1 to 9 tokens generated as a
// batch equal each prompt alone, and a batched decode step's logits are
// within 1e-5 (relative) of the single-session step's.
TEST(GenerateBatch, RealModelsGreedyEqualsAlone) {
  for (const char* file : {"stories260K.bin", "aidreams260K.bin"}) {
    KVCACHE_MODEL_FILE_OR_SKIP(path, file);
    const Decoder<float> d = kvcache::load_llama2c(path);
    const ModelConfig& c = d.config();
    std::vector<std::vector<int>> prompts;
    for (std::size_t i = 0; i < 8; ++i) {
      std::vector<int> p{1};
      const auto rest = fixtures::random_tokens(i + (i % 3), c.vocab_size, 300 + static_cast<std::uint32_t>(i));
      p.insert(p.end(), rest.begin(), rest.end());
      prompts.push_back(p);
    }
    GenerateOptions o = greedy(100);
    o.end_token = 1;
    std::vector<std::vector<int>> alone;
    for (const auto& p : prompts) alone.push_back(kvcache::generate(d, p, o));
    EXPECT_EQ(kvcache::generate_batch(d, prompts, o), alone) << file;

    // One batched decode step after the prefills, against the same step alone.
    std::vector<Session<float>> batched, single;
    std::vector<Session<float>*> sessions;
    std::vector<std::vector<int>> step;
    for (std::size_t i = 0; i < prompts.size(); ++i) {
      batched.push_back(d.new_session());
      single.push_back(d.new_session());
      d.forward(prompts[i], batched.back(), Logits::last);
      d.forward(prompts[i], single.back(), Logits::last);
      step.push_back({alone[i][0]});
    }
    for (auto& s : batched) sessions.push_back(&s);
    BatchScratch<float> scratch;
    const Mat logits = d.forward_batch(step, sessions, scratch);
    double worst = 0.0;
    for (std::size_t i = 0; i < prompts.size(); ++i) {
      const Mat own = d.forward(step[i], single[i], Logits::last);
      worst = std::max(worst, reference::relative_error(logits.row(static_cast<Eigen::Index>(i)), own));
    }
    EXPECT_LE(worst, 1e-5) << file;
    std::cout << "[          ] " << file << ": batched vs single decode step, largest relative logit difference "
              << worst << "\n";
  }
}
