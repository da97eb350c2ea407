// Paged sessions (KVPool, kv_pool.hpp): a paged session computes what a
// contiguous one computes, in every storage type, with windows, truncate and
// rollback; forks share blocks and never see each other's writes; prompts
// that start alike share their full blocks (found by the exact token ids),
// give the same greedy ids as without sharing, and never let one session
// change a block another maps; the budget is kept, with a clear error that
// leaves every session and the pool as they were.
#include <gtest/gtest.h>

#include <filesystem>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <kvcache/decoder.hpp>
#include <kvcache/generate.hpp>
#include <kvcache/session_file.hpp>

#include "fixtures.hpp"
#include "reference.hpp"

namespace {

using kvcache::Decoder;
using kvcache::KVPool;
using kvcache::KVPoolOptions;
using kvcache::KVType;
using kvcache::Logits;
using kvcache::ModelConfig;
using kvcache::Session;
using kvcache::SessionOptions;
using kvcache::SlidingWindow;
using Mat = kvcache::Matrix<float>;

using fixtures::Storage;

// The storages the tests run through; the window holds 11 tokens, 2 of them sinks.
std::vector<Storage> storages() { return fixtures::storages({11, 2}); }

// Llama-style (RoPE, so windows are allowed), GQA, 96 positions.
ModelConfig rope_model() { return fixtures::model(fixtures::variants()[4], 96); }

std::shared_ptr<KVPool> pool_of(const Decoder<float>& d, KVType type, std::size_t B, std::size_t budget = 0,
                                bool sharing = true) {
  KVPoolOptions o;
  o.block_tokens = B;
  o.budget_bytes = budget;
  o.prefix_sharing = sharing;
  return d.make_pool(type, o);
}

std::vector<int> slice(const std::vector<int>& t, std::size_t from, std::size_t to) {
  return {t.begin() + static_cast<std::ptrdiff_t>(from), t.begin() + static_cast<std::ptrdiff_t>(to)};
}

std::vector<unsigned char> raw_bytes(const Session<float>& s) {
  std::vector<unsigned char> bytes;
  s.read_raw([&](const unsigned char* p, std::size_t n) { bytes.insert(bytes.end(), p, p + n); });
  return bytes;
}

// Paged and contiguous sum attention in different pieces: equal up to
// float rounding, relative to the logits.
void expect_close(const Mat& got, const Mat& want, const std::string& what) {
  EXPECT_LT(reference::relative_error(got, want), 2e-5) << what;
}

// f(what, paged, flat) for a paged and a contiguous session of d in every
// storage type (a window that wraps among them), with blocks of 1, 4 and 16
// tokens.
template <typename F>
void for_each_paged_and_flat(const Decoder<float>& d, F&& f) {
  for (const Storage& s : storages())
    for (std::size_t B : {1u, 4u, 16u}) {
      Session<float> paged = d.new_session(s.options(), pool_of(d, s.type, B));
      Session<float> flat = d.new_session(s.options());
      f(s.name() + " B=" + std::to_string(B), paged, flat);
    }
}

// The same feeds, truncates and rollbacks on a paged and a contiguous
// session give the same logits, in every storage type, with a window that
// wraps, and with blocks of 1, 4 and 16 tokens.
TEST(Paged, EqualsContiguousThroughFeedsTruncateAndRollBack) {
  const Decoder<float> d = fixtures::make_decoder<float>(rope_model());
  const auto t = fixtures::random_tokens(60, d.config().vocab_size, 5);
  for_each_paged_and_flat(d, [&](const std::string& what, Session<float>& paged, Session<float>& flat) {
    std::size_t at = 0;
    for (std::size_t m : {9u, 1u, 1u, 7u, 1u}) {
      const auto part = slice(t, at, at + m);
      at += m;
      expect_close(d.forward(part, paged), d.forward(part, flat), what + " feed");
    }
    ASSERT_EQ(paged.size(), flat.size()) << what;
    EXPECT_EQ(paged.ring_start(), flat.ring_start()) << what;
    paged.truncate(paged.size() - 3);
    flat.truncate(flat.size() - 3);
    const auto c = paged.checkpoint();
    expect_close(d.forward(slice(t, 30, 36), paged), d.forward(slice(t, 30, 36), flat), what + " after truncate");
    paged.roll_back(c);
    flat.roll_back(c);
    EXPECT_EQ(paged.size(), flat.size()) << what;
    for (std::size_t i = 40; i < 46; ++i)
      expect_close(d.forward({t[i]}, paged), d.forward({t[i]}, flat), what + " decode");
    EXPECT_EQ(raw_bytes(paged).size(), raw_bytes(flat).size()) << what;
  });
}

// Numerics::ggml (a GGUF model's) sums attention by slot index, whatever
// runs the slots come in: paged and contiguous give the same bits, in every
// storage type and block size. Token by token against the whole prompt at
// once (a prompt's sums use other lanes than a decode step's): close.
TEST(Paged, GgmlNumericsEqualContiguousBitForBit) {
  ModelConfig c = rope_model();
  c.numerics = kvcache::Numerics::ggml;
  const Decoder<float> d = fixtures::make_decoder<float>(c);
  const auto t = fixtures::random_tokens(80, c.vocab_size, 6);
  for_each_paged_and_flat(d, [&](const std::string& what, Session<float>& paged, Session<float>& flat) {
    std::size_t at = 0;
    for (std::size_t m : {9u, 1u, 20u, 1u, 1u, 1u}) {
      const auto part = slice(t, at, at + m);
      at += m;
      const Mat got = d.forward(part, paged), want = d.forward(part, flat);
      ASSERT_TRUE(reference::all_finite(got)) << what;
      for (Eigen::Index i = 0; i < got.size(); ++i) ASSERT_EQ(got.data()[i], want.data()[i]) << what << " " << at;
    }
  });
  Session<float> one = d.new_session(SessionOptions{}), all = d.new_session(SessionOptions{});
  const Mat whole = d.forward(slice(t, 0, 40), all, Logits::all);
  for (std::size_t i = 0; i < 40; ++i)
    expect_close(d.forward({t[i]}, one), whole.row(static_cast<Eigen::Index>(i)), "token " + std::to_string(i));
}

// Learned positions and a double decoder: the same paged path.
TEST(Paged, LearnedPositionsAndEveryVariant) {
  for (const auto& v : fixtures::variants()) {
    const ModelConfig c = fixtures::model(v);
    const Decoder<float> d = fixtures::make_decoder<float>(c);
    const auto t = fixtures::random_tokens(20, c.vocab_size, 3);
    Session<float> paged = d.new_session(SessionOptions{}, pool_of(d, KVType::f32, 4));
    Session<float> flat = d.new_session(SessionOptions{});
    expect_close(d.forward(slice(t, 0, 13), paged), d.forward(slice(t, 0, 13), flat), v.name);
    for (std::size_t i = 13; i < 20; ++i) expect_close(d.forward({t[i]}, paged), d.forward({t[i]}, flat), v.name);
  }
}

// A fork maps the same blocks (the pool holds no more), and neither
// session's later writes change what the other holds.
TEST(Paged, ForkSharesBlocksAndNeverSeesTheOthersWrites) {
  const Decoder<float> d = fixtures::make_decoder<float>(rope_model());
  const auto t = fixtures::random_tokens(40, d.config().vocab_size, 8);
  for (const Storage& s : storages()) {
    const std::string what = s.name();
    auto pool = pool_of(d, s.type, 4);
    Session<float> base = d.new_session(s.options(), pool);
    d.forward(slice(t, 0, 10), base);  // 2 full blocks and a half-filled one
    const std::size_t blocks = pool->stats().blocks;
    Session<float> fork = base.fork();
    EXPECT_EQ(pool->stats().blocks, blocks) << what << ": a fork copies no block";
    const auto before = raw_bytes(base);
    const Mat from_fork = d.forward(slice(t, 20, 26), fork);
    EXPECT_EQ(raw_bytes(base), before) << what << ": the fork wrote into a block the original maps";
    const Mat from_base = d.forward(slice(t, 10, 16), base);

    Session<float> fresh = d.new_session(s.options());
    d.forward(slice(t, 0, 10), fresh);
    Session<float> fresh2 = fresh.copy();
    expect_close(from_fork, d.forward(slice(t, 20, 26), fresh2), what + " fork");
    expect_close(from_base, d.forward(slice(t, 10, 16), fresh), what + " original");
  }
}

// Greedy generation from prompts that share a prefix: the same ids with
// sharing on, off, and with contiguous sessions, for every storage type
// and with a window; the shared prompt's blocks are mapped, not computed.
TEST(PrefixSharing, GreedyIdsIdenticalWithAndWithoutSharing) {
  const Decoder<float> d = fixtures::make_decoder<float>(rope_model());
  const auto prefix = fixtures::random_tokens(23, d.config().vocab_size, 11);
  kvcache::GenerateOptions g;
  g.max_new_tokens = 12;
  for (const Storage& s : storages()) {
    const std::string what = s.name();
    auto shared = pool_of(d, s.type, 4), alone = pool_of(d, s.type, 4, 0, false);
    for (std::uint32_t tail_seed = 0; tail_seed < 3; ++tail_seed) {
      auto prompt = prefix;
      const auto tail = fixtures::random_tokens(5, d.config().vocab_size, 100 + tail_seed);
      prompt.insert(prompt.end(), tail.begin(), tail.end());
      Session<float> a = d.new_session(s.options(), shared);
      Session<float> b = d.new_session(s.options(), alone);
      Session<float> c = d.new_session(s.options());
      const auto ids = kvcache::generate(d, c, prompt, g);
      EXPECT_EQ(kvcache::generate(d, a, prompt, g), ids) << what << " shared, tail " << tail_seed;
      EXPECT_EQ(kvcache::generate(d, b, prompt, g), ids) << what << " unshared, tail " << tail_seed;
    }
    // Blocks of 4 within the prefix; none with the window of 11, which the
    // 28-token prompts overrun: their slots are overwritten before the
    // blocks could be published.
    const std::size_t mapped = (s.window.window != 0 ? 0u : 20u);
    EXPECT_EQ(shared->stats().prefix_hit_tokens, 2 * mapped) << what;
    EXPECT_EQ(alone->stats().prefix_hit_tokens, 0u) << what;
  }
}

// A session that maps a published block and then writes where that block
// is (a truncate into it, a window that wraps over it) copies it first:
// the session that published it, and a later one mapping it, see the same
// bytes as before.
TEST(PrefixSharing, ASharedBlockIsNeverModified) {
  const Decoder<float> d = fixtures::make_decoder<float>(rope_model());
  const auto t = fixtures::random_tokens(60, d.config().vocab_size, 21);
  for (const Storage& s : storages()) {
    const std::string what = s.name();
    auto pool = pool_of(d, s.type, 4);
    Session<float> first = d.new_session(s.options(), pool);
    d.forward(slice(t, 0, 9), first, Logits::last);
    const auto before = raw_bytes(first);
    Session<float> second = d.new_session(s.options(), pool);
    d.forward(slice(t, 0, 10), second, Logits::last);
    EXPECT_EQ(pool->stats().prefix_hit_tokens, 8u) << what;
    second.truncate(5);
    d.forward(slice(t, 30, 33), second);                               // into the second shared block
    for (std::size_t i = 40; i < 55; ++i) d.forward({t[i]}, second);  // a window wraps over the first
    EXPECT_EQ(raw_bytes(first), before) << what;
    Session<float> third = d.new_session(s.options(), pool);
    Session<float> flat = d.new_session(s.options());
    expect_close(d.forward(slice(t, 0, 12), third, Logits::last), d.forward(slice(t, 0, 12), flat, Logits::last),
                 what + " third");
  }
}

// A block is found by every token id up to its end: the same ids after a
// different first block, or one id changed, map nothing; Logits::all maps
// nothing (the mapped tokens would get no logits).
TEST(PrefixSharing, OnlyTheExactPrefixIsMapped) {
  const Decoder<float> d = fixtures::make_decoder<float>(rope_model());
  auto pool = pool_of(d, KVType::f32, 4);
  const auto a = fixtures::random_tokens(13, d.config().vocab_size, 51);
  Session<float> first = d.new_session(SessionOptions{}, pool);
  d.forward(a, first, Logits::last);  // publishes blocks [0, 4), [4, 8), [8, 12)
  auto other_first_block = a;
  other_first_block[0] = (a[0] + 1) % 37;
  auto other_last_id = a;
  other_last_id[11] = (a[11] + 1) % 37;
  Session<float> s1 = d.new_session(SessionOptions{}, pool);
  d.forward(other_first_block, s1, Logits::last);
  EXPECT_EQ(pool->stats().prefix_hit_tokens, 0u);
  Session<float> s2 = d.new_session(SessionOptions{}, pool);
  d.forward(other_last_id, s2, Logits::last);
  EXPECT_EQ(pool->stats().prefix_hit_tokens, 8u);
  Session<float> s3 = d.new_session(SessionOptions{}, pool);
  d.forward(a, s3, Logits::all);
  EXPECT_EQ(pool->stats().prefix_hit_tokens, 8u);
}

// Blocks no session maps stay published until the budget needs them, least
// recently released first.
TEST(PrefixSharing, CachedBlocksAreEvictedLeastRecentlyUsedFirst) {
  const Decoder<float> d = fixtures::make_decoder<float>(rope_model());
  auto probe = pool_of(d, KVType::f32, 4);
  auto pool = pool_of(d, KVType::f32, 4, 6 * probe->block_bytes());
  const auto a = fixtures::random_tokens(13, d.config().vocab_size, 1);
  const auto b = fixtures::random_tokens(13, d.config().vocab_size, 2);
  {
    Session<float> s = d.new_session(SessionOptions{}, pool);
    d.forward(a, s, Logits::last);  // 4 blocks, 3 published
  }
  EXPECT_EQ(pool->stats().cached_blocks, 3u);
  {
    Session<float> s = d.new_session(SessionOptions{}, pool);
    d.forward(b, s, Logits::last);  // 4 blocks: 3 new, and a's last published one evicted
    EXPECT_EQ(pool->stats().evicted_blocks, 1u);
  }
  Session<float> s = d.new_session(SessionOptions{}, pool);
  d.forward(a, s, Logits::last);
  EXPECT_EQ(pool->stats().prefix_hit_tokens, 8u) << "a's first two blocks, released last, are kept";
}

// Over budget: std::length_error naming the budget, and the session, the
// other sessions of the batch and the pool are as they were.
TEST(Budget, AStepPastTheBudgetThrowsAndChangesNothing) {
  const Decoder<float> d = fixtures::make_decoder<float>(rope_model());
  auto probe = pool_of(d, KVType::int8, 4);
  for (bool sharing : {true, false}) {
    auto pool = pool_of(d, KVType::int8, 4, 5 * probe->block_bytes(), sharing);
    SessionOptions o;
    o.kv_type = KVType::int8;
    const auto t = fixtures::random_tokens(40, d.config().vocab_size, 4);
    Session<float> x = d.new_session(o, pool), y = d.new_session(o, pool);
    d.forward(slice(t, 0, 6), x);
    d.forward(slice(t, 0, 7), y);  // 4 blocks held (2 + 2), one left: x takes it, then y finds none
    const auto x_bytes = raw_bytes(x), y_bytes = raw_bytes(y);
    const auto stats = pool->stats();
    kvcache::Workspace<float> w;
    fixtures::expect_throw_naming<std::length_error>(
        [&] { d.forward_batch({slice(t, 6, 9), slice(t, 7, 20)}, {&x, &y}, w); }, "budget");  // x gets the last block
    EXPECT_EQ(x.size(), 6u);
    EXPECT_EQ(y.size(), 7u);
    EXPECT_EQ(raw_bytes(x), x_bytes);
    EXPECT_EQ(raw_bytes(y), y_bytes);
    EXPECT_EQ(pool->stats().blocks, stats.blocks);
    EXPECT_EQ(pool->stats().prefix_hit_tokens, stats.prefix_hit_tokens);
    Session<float> z = d.new_session(o, pool);
    fixtures::expect_throw_naming<std::length_error>([&] { d.forward(slice(t, 0, 30), z, Logits::last); },
                                                     "budget");
    EXPECT_EQ(z.size(), 0u);
    EXPECT_EQ(pool->stats().blocks, stats.blocks);
    EXPECT_EQ(pool->stats().prefix_hit_tokens, stats.prefix_hit_tokens);
    // Both still continue as before.
    Session<float> flat = d.new_session(o);
    d.forward(slice(t, 0, 6), flat);
    expect_close(d.forward(slice(t, 6, 8), x), d.forward(slice(t, 6, 8), flat), "after the failure");
  }
}

// Stats: the pool counts shared blocks once.
TEST(Stats, SharedTokensCountOnce) {
  const Decoder<float> d = fixtures::make_decoder<float>(rope_model());
  auto pool = pool_of(d, KVType::f32, 4);
  const auto t = fixtures::random_tokens(17, d.config().vocab_size, 6);
  Session<float> a = d.new_session(SessionOptions{}, pool);
  d.forward(t, a, Logits::last);
  const auto one = pool->stats();
  EXPECT_EQ(one.blocks, 5u);
  EXPECT_EQ(one.bytes, 5 * pool->block_bytes());
  EXPECT_EQ(one.bytes_needed, 17 * pool->block_bytes() / 4);
  Session<float> b = d.new_session(SessionOptions{}, pool);
  d.forward(t, b, Logits::last);  // maps 4 blocks, computes the last token
  const auto two = pool->stats();
  EXPECT_EQ(two.prefix_hit_tokens, 16u);
  EXPECT_EQ(two.blocks, 6u);
  EXPECT_EQ(two.bytes_needed, 18 * pool->block_bytes() / 4);
  EXPECT_EQ(two.bytes_peak, 6 * pool->block_bytes());
  EXPECT_LE(two.bytes_needed_at_peak, two.bytes_peak);
  EXPECT_EQ(a.kv_bytes(), 5 * pool->block_bytes());
}

// A paged session saves as a contiguous one does, and the file loads.
TEST(Paged, SessionFileRoundTrip) {
  const Decoder<float> d = fixtures::make_decoder<float>(rope_model());
  const auto t = fixtures::random_tokens(30, d.config().vocab_size, 12);
  const auto dir = (std::filesystem::path(KVCACHE_TEST_TMP_DIR) / "pool_session_file").string();
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  for (const Storage& s : storages()) {
    Session<float> paged = d.new_session(s.options(), pool_of(d, s.type, 4));
    Session<float> flat = d.new_session(s.options());
    const auto prompt = slice(t, 0, 15);
    const kvcache::RowVector<float> logits = d.forward(prompt, paged, Logits::last);
    d.forward(prompt, flat, Logits::last);
    const std::string path = dir + "/" + s.name() + ".kvs";
    kvcache::save_session(path, d, paged, prompt, logits);
    auto loaded = kvcache::load_session(path, d);
    EXPECT_EQ(raw_bytes(loaded.session), raw_bytes(paged)) << s.name();
    kvcache::SessionLoadOptions into_pool;
    into_pool.pool = pool_of(d, s.type, 4);
    auto paged_again = kvcache::load_session(path, d, into_pool);
    EXPECT_EQ(paged_again.session.pool(), into_pool.pool) << s.name();
    EXPECT_EQ(raw_bytes(paged_again.session), raw_bytes(paged)) << s.name();
    const Mat want = d.forward(slice(t, 15, 18), paged);
    expect_close(d.forward(slice(t, 15, 18), loaded.session), want, s.name());
    expect_close(d.forward(slice(t, 15, 18), paged_again.session), want, s.name() + " into a pool");
  }
}

// Sessions on several threads share one pool: each generates what it
// generates alone (run under TSan by CI).
TEST(Pool, SessionsOnSeveralThreadsShareOnePool) {
  const Decoder<float> d = fixtures::make_decoder<float>(rope_model());
  auto pool = pool_of(d, KVType::bf16, 4);
  SessionOptions o;
  o.kv_type = KVType::bf16;
  const auto prefix = fixtures::random_tokens(21, d.config().vocab_size, 31);
  kvcache::GenerateOptions g;
  g.max_new_tokens = 10;
  std::vector<std::vector<int>> prompts, expected, got(8);
  for (std::uint32_t i = 0; i < 8; ++i) {
    prompts.push_back(prefix);
    const auto tail = fixtures::random_tokens(1 + i, d.config().vocab_size, 40 + i);
    prompts.back().insert(prompts.back().end(), tail.begin(), tail.end());
    Session<float> alone = d.new_session(o);
    expected.push_back(kvcache::generate(d, alone, prompts.back(), g));
  }
  std::vector<std::thread> threads;
  for (std::size_t t = 0; t < 2; ++t)
    threads.emplace_back([&, t] {
      for (std::size_t i = t; i < 8; i += 2) {
        Session<float> s = d.new_session(o, pool);
        got[i] = kvcache::generate(d, s, prompts[i], g);
        Session<float> fork = s.fork();
        d.forward({1, 2, 3}, fork);
      }
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(got, expected);
  EXPECT_GT(pool->stats().prefix_hit_tokens, 0u);
}

TEST(Pool, MisuseIsRefused) {
  const Decoder<float> d = fixtures::make_decoder<float>(rope_model());
  const Decoder<float> other = fixtures::make_decoder<float>(rope_model(), 7);
  SessionOptions bf16;
  bf16.kv_type = KVType::bf16;
  fixtures::expect_throw_naming<std::invalid_argument>([&] { d.new_session(bf16, d.make_pool()); }, "kv_type bf16");
  fixtures::expect_throw_naming<std::invalid_argument>(
      [&] { d.new_session(SessionOptions{}, other.make_pool()); }, "another decoder");
  KVPoolOptions zero;
  zero.block_tokens = 0;
  fixtures::expect_throw_naming<std::invalid_argument>([&] { d.make_pool(KVType::f32, zero); }, "block_tokens");
  KVPoolOptions tiny;
  tiny.budget_bytes = 10;
  fixtures::expect_throw_naming<std::invalid_argument>([&] { d.make_pool(KVType::f32, tiny); }, "budget");
}

}  // namespace
