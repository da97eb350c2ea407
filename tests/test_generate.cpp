// generate and generate_uncached: the same ids, the stopping rules, streaming,
// sampling, and errors raised before the session is touched.
#include <limits>
#include <map>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <kvcache/generate.hpp>

#include "fixtures.hpp"

using kvcache::Decoder;
using kvcache::GenerateOptions;
using kvcache::ModelConfig;
using kvcache::Sampler;
using kvcache::Session;

namespace {

using fixtures::make_decoder;

GenerateOptions greedy(std::size_t n) {
  GenerateOptions o;
  o.max_new_tokens = n;
  return o;
}

}  // namespace

TEST(Generate, CachedAndUncachedGiveTheSameIds) {
  for (const auto& v : fixtures::variants()) {
    const ModelConfig c = fixtures::model(v, 64);
    const auto prompt = fixtures::random_tokens(5, c.vocab_size, 9);
    const Decoder<float> f = make_decoder<float>(c);
    const auto cached = kvcache::generate(f, prompt, greedy(40));
    EXPECT_EQ(cached.size(), 40u);
    EXPECT_EQ(cached, kvcache::generate_uncached(f, prompt, greedy(40))) << v.name;
    EXPECT_EQ(cached, kvcache::generate(f, prompt, greedy(40), 2)) << v.name << " with 2 threads";
    const Decoder<double> d = make_decoder<double>(c);
    EXPECT_EQ(kvcache::generate(d, prompt, greedy(40)), kvcache::generate_uncached(d, prompt, greedy(40))) << v.name;
  }
}

// One set of immutable weights, several requests at once: each thread runs
// its own session on the shared decoder and gets what it gets alone.
TEST(Generate, ConcurrentSessionsOnOneDecoderGetWhatTheyGetAlone) {
  const ModelConfig c = fixtures::model(fixtures::variants()[4], 64);
  const Decoder<float> d = make_decoder<float>(c);
  constexpr int kThreads = 4;
  std::vector<std::vector<int>> prompts, alone(kThreads), together(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    prompts.push_back(fixtures::random_tokens(3 + static_cast<std::size_t>(t), c.vocab_size, 100 + static_cast<std::uint32_t>(t)));
    alone[static_cast<std::size_t>(t)] = kvcache::generate(d, prompts.back(), greedy(30));
  }
  std::vector<std::thread> workers;
  for (std::size_t t = 0; t < kThreads; ++t)
    workers.emplace_back([&, t] { together[t] = kvcache::generate(d, prompts[t], greedy(30), 1 + t % 2); });
  for (auto& w : workers) w.join();
  EXPECT_EQ(together, alone);
}

TEST(Generate, GreedyIdsAreTheArgmaxOfTheLogits) {
  const ModelConfig c = fixtures::model(fixtures::variants()[3]);
  const Decoder<double> d = make_decoder<double>(c);
  std::vector<int> sequence = {3, 1, 4};
  const auto ids = kvcache::generate(d, sequence, greedy(6));
  for (int id : ids) {
    Session<double> s = d.new_session();
    const auto& logits = d.forward(sequence, s, kvcache::Logits::last);
    Eigen::Index best;
    logits.row(0).maxCoeff(&best);
    EXPECT_EQ(id, best);
    sequence.push_back(id);
  }
}

TEST(Generate, StopsAtTheEndTokenAndIncludesIt) {
  const ModelConfig c = fixtures::model(fixtures::variants()[0], 64);
  const Decoder<float> d = make_decoder<float>(c);
  const std::vector<int> prompt = {1, 2, 3};
  const auto free_run = kvcache::generate(d, prompt, greedy(30));
  GenerateOptions o = greedy(30);
  o.end_token = free_run[4];
  std::size_t first = 0;
  while (free_run[first] != *o.end_token) ++first;
  const auto stopped = kvcache::generate(d, prompt, o);
  EXPECT_EQ(stopped, std::vector<int>(free_run.begin(), free_run.begin() + static_cast<std::ptrdiff_t>(first + 1)));
  EXPECT_EQ(kvcache::generate_uncached(d, prompt, o), stopped);
}

TEST(Generate, StreamsEachIdAsItIsProduced) {
  const ModelConfig c = fixtures::model(fixtures::variants()[4], 64);
  const Decoder<float> d = make_decoder<float>(c);
  std::vector<int> streamed;
  GenerateOptions o = greedy(12);
  o.on_token = [&](int id) { streamed.push_back(id); };
  const auto ids = kvcache::generate(d, {5, 6}, o);
  EXPECT_EQ(streamed, ids);
}

TEST(Generate, ContinuesASessionAndPrefillsOnce) {
  const ModelConfig c = fixtures::model(fixtures::variants()[2], 64);
  const Decoder<float> d = make_decoder<float>(c);
  Session<float> s = d.new_session();
  const auto first = kvcache::generate(d, s, {1, 2, 3}, greedy(5));
  // The last generated id was never fed: the session holds the prompt and
  // all new ids but the last.
  EXPECT_EQ(s.size(), 3u + 5u - 1u);
  std::vector<int> all = {1, 2, 3};
  all.insert(all.end(), first.begin(), first.end());
  all.push_back(7);
  const auto more = kvcache::generate(d, s, {first.back(), 7}, greedy(4));
  EXPECT_EQ(more, kvcache::generate(d, all, greedy(4)));
  s.clear();
  EXPECT_EQ(kvcache::generate(d, s, {1, 2, 3}, greedy(5)), first);  // no stale state after clear
}

TEST(Generate, ZeroNewTokensReturnsNothing) {
  const ModelConfig c = fixtures::model(fixtures::variants()[0]);
  const Decoder<float> d = make_decoder<float>(c);
  EXPECT_TRUE(kvcache::generate(d, {1}, greedy(0)).empty());
  EXPECT_TRUE(kvcache::generate_uncached(d, {1}, greedy(0)).empty());
}

TEST(Generate, ErrorsComeBeforeTheSessionIsTouched) {
  const ModelConfig c = fixtures::model(fixtures::variants()[0], 16);
  const Decoder<float> d = make_decoder<float>(c);
  Session<float> s = d.new_session();
  d.forward({1, 2, 3, 4}, s);
  EXPECT_THROW(kvcache::generate(d, s, {}, greedy(3)), std::invalid_argument);
  EXPECT_THROW(kvcache::generate(d, s, {1, 2, 3}, greedy(11)), std::length_error);  // 4 + 3 + 10 > 16
  EXPECT_THROW(kvcache::generate(d, s, {1, 99}, greedy(2)), std::out_of_range);
  EXPECT_EQ(s.size(), 4u);
  EXPECT_NO_THROW(kvcache::generate(d, s, {1, 2, 3}, greedy(10)));  // exactly fits
  EXPECT_EQ(s.size(), 16u);
  EXPECT_THROW(kvcache::generate_uncached(d, std::vector<int>(17, 1), greedy(1)), std::length_error);
  GenerateOptions bad = greedy(3);
  bad.temperature = -1;
  EXPECT_THROW(kvcache::generate(d, {1}, bad), std::invalid_argument);
  bad = greedy(3);
  bad.top_p = 1.5f;
  EXPECT_THROW(kvcache::generate(d, {1}, bad), std::invalid_argument);
}

TEST(Generate, SeededSamplingIsReproducibleAndCacheIndependent) {
  const ModelConfig c = fixtures::model(fixtures::variants()[3], 64);
  const Decoder<float> d = make_decoder<float>(c);
  GenerateOptions o = greedy(30);
  o.temperature = 1.0f;
  o.top_p = 0.9f;
  o.seed = 1234;
  const auto a = kvcache::generate(d, {1, 2}, o);
  EXPECT_EQ(a, kvcache::generate(d, {1, 2}, o));
  EXPECT_EQ(a, kvcache::generate_uncached(d, {1, 2}, o));
  o.seed = 99;
  EXPECT_NE(a, kvcache::generate(d, {1, 2}, o));
}

TEST(Sampler, RejectsNonFiniteLogitsAndSurvivesTinyTemperatures) {
  Eigen::RowVectorXf logits(3);
  logits << 1, std::numeric_limits<float>::quiet_NaN(), 2;
  for (float top_p : {0.0f, 0.5f, 1.0f}) {
    Sampler s(3, 0.7f, top_p, 5);
    EXPECT_THROW(s.sample(logits), std::domain_error);
    Sampler greedy_sampler(3, 0.0f, top_p, 5);
    EXPECT_THROW(greedy_sampler.sample(logits), std::domain_error);
  }
  logits << 1, std::numeric_limits<float>::infinity(), 2;
  EXPECT_THROW(Sampler(3, 1.0f, 0.9f, 5).sample(logits), std::domain_error);
  // logits / 1e-40 overflows float: the limit is greedy.
  logits << 1, 3, 2;
  for (float top_p : {0.0f, 0.5f, 1.0f}) {
    Sampler tiny(3, 1e-40f, top_p, 5);
    EXPECT_EQ(tiny.sample(logits), 1);
  }
}

TEST(Sampler, ArgmaxTakesTheLowestIdOnTies) {
  Eigen::RowVectorXf logits(5);
  logits << 1, 3, 2, 3, 0;
  EXPECT_EQ(Sampler::argmax(logits), 1);
  Sampler greedy_sampler(5, 0.0f, 0.9f, 1);
  EXPECT_EQ(greedy_sampler.sample(logits), 1);
  Sampler wrong(4, 0.0f, 1.0f, 1);
  EXPECT_THROW(wrong.sample(logits), std::invalid_argument);
  EXPECT_THROW(Sampler(4, 1.0f, 1.0f, 0), std::invalid_argument);
  EXPECT_THROW(Sampler::argmax(Eigen::RowVectorXf(0)), std::invalid_argument);
}

// Against a plain compare loop, on vocabulary-sized rows whose maximum sits
// first, last, anywhere, or is tied; and a non-finite logit at any place is
// refused by sample().
TEST(Sampler, ArgmaxEqualsAPlainLoop) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> value(-8.0f, 8.0f);
  Eigen::RowVectorXf logits(32000);
  for (int trial = 0; trial < 40; ++trial) {
    for (Eigen::Index i = 0; i < logits.size(); ++i) logits(i) = value(rng);
    if (trial % 4 == 1) logits(0) = 9.0f;
    if (trial % 4 == 2) logits(logits.size() - 1) = 9.0f;
    if (trial % 4 == 3) logits(trial * 500) = logits(trial * 700) = 9.0f;
    Eigen::Index want = 0;
    for (Eigen::Index i = 1; i < logits.size(); ++i)
      if (logits(i) > logits(want)) want = i;
    EXPECT_EQ(Sampler::argmax(logits), want) << "trial " << trial;
  }
  Sampler greedy(32000, 0.0f, 1.0f, 1);
  for (Eigen::Index at : {Eigen::Index{0}, Eigen::Index{12345}, Eigen::Index{31999}})
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity()}) {
      Eigen::RowVectorXf row = logits;
      row(at) = bad;
      EXPECT_THROW(greedy.sample(row), std::domain_error) << "at " << at;
    }
}

// With a fixed seed the draws are deterministic; 20000 of them must follow
// the softmax probabilities (temperature 1) and, with top_p, never leave the
// nucleus.
TEST(Sampler, DrawsFollowTheDistributionAndTheNucleus) {
  Eigen::RowVectorXf logits(4);
  logits << std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f);
  Sampler full(4, 1.0f, 1.0f, 7);
  std::map<int, int> counts;
  for (int i = 0; i < 20000; ++i) ++counts[full.sample(logits)];
  EXPECT_NEAR(counts[0] / 20000.0, 0.5, 0.02);
  EXPECT_NEAR(counts[1] / 20000.0, 0.3, 0.02);
  EXPECT_NEAR(counts[2] / 20000.0, 0.15, 0.02);
  EXPECT_NEAR(counts[3] / 20000.0, 0.05, 0.02);
  // top_p = 0.7: the nucleus is {0, 1} (0.5 + 0.3 > 0.7), renormalised to 5/8, 3/8.
  Sampler nucleus(4, 1.0f, 0.7f, 7);
  counts.clear();
  for (int i = 0; i < 20000; ++i) ++counts[nucleus.sample(logits)];
  EXPECT_EQ(counts[2] + counts[3], 0);
  EXPECT_NEAR(counts[0] / 20000.0, 0.625, 0.02);
}

// decode() continues from logits the caller holds (a prompt cache's): the
// same ids as generate() over the whole prompt, and a failure rolls back.
TEST(Generate, DecodeFromSavedLogitsContinuesLikeGenerate) {
  for (const auto& v : fixtures::variants()) {
    const ModelConfig c = fixtures::model(v, 64);
    const Decoder<float> d = make_decoder<float>(c);
    const auto prompt = fixtures::random_tokens(6, c.vocab_size, 3);
    GenerateOptions o;
    o.max_new_tokens = 12;
    Session<float> whole = d.new_session();
    const std::vector<int> expected = kvcache::generate(d, whole, prompt, o);

    Session<float> s = d.new_session();
    const Eigen::VectorXf last = d.forward(prompt, s, kvcache::Logits::last).row(0).transpose();
    EXPECT_EQ(kvcache::decode(d, s, last, o), expected) << v.name;
    EXPECT_EQ(s.position(), whole.position()) << v.name;

    Session<float> failing = d.new_session();
    d.forward(prompt, failing, kvcache::Logits::last);
    GenerateOptions throwing = o;
    int seen = 0;
    throwing.on_token = [&](int) {
      if (++seen == 5) throw std::runtime_error("stop");
    };
    EXPECT_THROW(kvcache::decode(d, failing, last, throwing), std::runtime_error);
    EXPECT_EQ(failing.position(), prompt.size()) << v.name;
  }
}

// decode()'s inputs: logits of the wrong size, a session of another decoder.
// Each is a clear error, and the session is as it was.
TEST(Generate, DecodeRejectsBadInputAndKeepsTheSession) {
  const ModelConfig c = fixtures::model(fixtures::variants()[0], 64);
  const Decoder<float> d = make_decoder<float>(c);
  const Decoder<float> other = make_decoder<float>(c, 7);
  Session<float> s = d.new_session();
  d.forward({1, 2, 3}, s, kvcache::Logits::last);
  GenerateOptions o;
  o.max_new_tokens = 4;
  const Eigen::VectorXf short_logits = Eigen::VectorXf::Zero(static_cast<Eigen::Index>(c.vocab_size - 1));
  EXPECT_THROW(kvcache::decode(d, s, short_logits, o), std::invalid_argument);
  EXPECT_EQ(s.position(), 3u);
  const Eigen::VectorXf logits = Eigen::VectorXf::Zero(static_cast<Eigen::Index>(c.vocab_size));
  EXPECT_THROW(kvcache::decode(other, s, logits, o), std::invalid_argument);
  EXPECT_EQ(s.position(), 3u);
  o.max_new_tokens = 64;  // 3 cached + 63 fed > 64 positions
  EXPECT_THROW(kvcache::decode(d, s, logits, o), std::length_error);
  EXPECT_EQ(s.position(), 3u);
}

// The one checkpoint: roll_back() drops what was fed since checkpoint().
TEST(Generate, SessionRollsBackToACheckpoint) {
  const ModelConfig c = fixtures::model(fixtures::variants()[1], 64);
  const Decoder<float> d = make_decoder<float>(c);
  Session<float> s = d.new_session();
  d.forward({1, 2, 3}, s);
  const kvcache::Matrix<float> before = d.forward({4}, s);
  s.truncate(3);
  const auto checkpoint = s.checkpoint();
  d.forward({9, 9, 9, 9}, s);
  s.roll_back(checkpoint);
  EXPECT_EQ(s.size(), 3u);
  EXPECT_EQ(d.forward({4}, s), before) << "the same bits as before the detour";
}
