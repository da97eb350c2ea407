// BatchScheduler: continuous batching with chunked prefill. Every request
// must get the ids its own generate() run gives it, whatever it is batched
// with, however many run at once, whatever the token budget of a step and
// the order requests arrive in; cancelling or failing one request touches
// no other.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <kvcache/scheduler.hpp>

#include "fixtures.hpp"

using kvcache::BatchScheduler;
using kvcache::Decoder;
using kvcache::GenerateOptions;
using kvcache::ModelConfig;
using kvcache::Request;
using kvcache::RequestId;
using kvcache::RequestStatus;
using kvcache::SchedulerOptions;
using kvcache::Session;

namespace {

// Prompts of 1 to 40 tokens; greedy and sampled (each its own seed, one with
// top-p), different limits, and an end token that some produce partway.
std::vector<Request> requests(const Decoder<float>& d) {
  const std::size_t vocab = d.config().vocab_size;
  std::vector<Request> all;
  const std::size_t lengths[] = {3, 40, 1, 17, 9, 33, 5};
  for (std::size_t i = 0; i < std::size(lengths); ++i) {
    Request r;
    r.prompt = fixtures::random_tokens(lengths[i], vocab, 500 + static_cast<std::uint32_t>(i));
    r.options.max_new_tokens = 12 + 5 * (i % 4);
    if (i % 2 == 1) {
      r.options.temperature = 0.9f;
      r.options.seed = 77 + i;
      if (i == 3) r.options.top_p = 0.8f;
    }
    all.push_back(r);
  }
  all[4].options.end_token = kvcache::generate(d, all[4].prompt, all[4].options)[5];  // leaves early
  return all;
}

SchedulerOptions scheduler_options(std::size_t n, std::size_t step_tokens, std::size_t threads = 1) {
  SchedulerOptions o;
  o.max_sequences = n;
  o.step_tokens = step_tokens;
  o.threads = threads;
  return o;
}

// Submits `all` in the order `order` gives, runs them, and returns each one's
// ids in the index order of `all`.
std::vector<std::vector<int>> run(BatchScheduler<float>& s, const std::vector<Request>& all,
                                  const std::vector<std::size_t>& order) {
  std::vector<RequestId> ids(all.size());
  for (const std::size_t i : order) ids[i] = s.submit(all[i]);
  s.run();
  std::vector<std::vector<int>> out;
  for (const RequestId id : ids) {
    kvcache::RequestResult r = s.take(id);
    EXPECT_EQ(r.status, RequestStatus::finished) << id;
    out.push_back(r.ids);
  }
  return out;
}

}  // namespace

TEST(Scheduler, EveryRequestGetsItsOwnRunWhateverTheBatchBudgetAndOrder) {
  for (const auto& v : fixtures::variants()) {
    const Decoder<float> d = fixtures::make_decoder<float>(fixtures::model(v, 96));
    const std::vector<Request> all = requests(d);
    std::vector<std::vector<int>> alone;
    for (const Request& r : all) alone.push_back(kvcache::generate(d, r.prompt, r.options));
    std::vector<std::size_t> forward(all.size()), backward;
    for (std::size_t i = 0; i < all.size(); ++i) forward[i] = i;
    backward.assign(forward.rbegin(), forward.rend());
    for (const std::size_t n : {1u, 2u, 3u, 8u})
      for (const std::size_t budget : {1u, 3u, 16u, 64u})
        for (const auto* order : {&forward, &backward}) {
          BatchScheduler<float> s(d, scheduler_options(n, budget, n == 3 ? 2 : 1));
          EXPECT_EQ(run(s, all, *order), alone)
              << v.name << " N = " << n << ", step_tokens = " << budget << (order == &backward ? ", reversed" : "");
          EXPECT_LE(s.sessions_made(), n);
          EXPECT_TRUE(s.idle());
        }
  }
}

// A long prompt joining is fed in chunks of the budget while a decoding
// request goes on producing an id every step.
TEST(Scheduler, ChunkedPrefillDoesNotStallDecoding) {
  const Decoder<float> d = fixtures::make_decoder<float>(fixtures::model(fixtures::variants()[4], 96));
  BatchScheduler<float> s(d, scheduler_options(2, 5));
  std::vector<int> a_ids, b_ids;
  Request a{{1, 2, 3}, {}, [&](int id) { return a_ids.push_back(id), true; }};
  a.options.max_new_tokens = 30;
  Request b{fixtures::random_tokens(40, d.config().vocab_size, 9), {}, [&](int id) { return b_ids.push_back(id), true; }};
  b.options.max_new_tokens = 5;
  const RequestId first = s.submit(a);
  s.step();  // a's prompt (3 tokens) and its first id
  ASSERT_EQ(a_ids.size(), 1u);
  const RequestId second = s.submit(b);
  // Each step: a's token and 4 of b's 40 prompt tokens; b's first id after 10.
  for (std::size_t step = 1; step <= 10; ++step) {
    s.step();
    EXPECT_EQ(a_ids.size(), 1 + step) << step;
    EXPECT_EQ(b_ids.size(), step == 10 ? 1u : 0u) << step;
  }
  s.run();
  EXPECT_EQ(s.take(first).ids, kvcache::generate(d, a.prompt, a.options));
  EXPECT_EQ(s.take(second).ids, kvcache::generate(d, b.prompt, b.options));
  EXPECT_EQ(a_ids, kvcache::generate(d, a.prompt, a.options));
}

// A stream returning false stops its request there; cancel() stops a
// waiting request at once and a running one at the next step; the others
// get their own runs.
TEST(Scheduler, CancellationStopsOnlyThatRequest) {
  const Decoder<float> d = fixtures::make_decoder<float>(fixtures::model(fixtures::variants()[1], 96));
  std::vector<Request> all = requests(d);
  std::vector<std::vector<int>> alone;
  for (const Request& r : all) alone.push_back(kvcache::generate(d, r.prompt, r.options));
  BatchScheduler<float> s(d, scheduler_options(3, 8));
  std::vector<RequestId> id(all.size());
  std::size_t count = 0;
  all[0].stream = [&count](int) { return ++count < 4; };  // stops at its 4th id
  all[2].stream = [&](int) { return s.cancel(id[5]), true; };  // cancels request 5 once it runs
  for (std::size_t i = 0; i < all.size(); ++i) id[i] = s.submit(all[i]);
  EXPECT_EQ(s.status(id[6]), RequestStatus::waiting);
  EXPECT_TRUE(s.cancel(id[6]));
  EXPECT_EQ(s.status(id[6]), RequestStatus::cancelled);
  EXPECT_FALSE(s.cancel(id[6]));
  EXPECT_FALSE(s.cancel(1000));
  s.run();
  for (std::size_t i = 0; i < all.size(); ++i) {
    const kvcache::RequestResult r = s.take(id[i]);
    if (i == 0) {
      EXPECT_EQ(r.status, RequestStatus::cancelled);
      EXPECT_EQ(r.ids, std::vector<int>(alone[0].begin(), alone[0].begin() + 4));
    } else if (i == 5 || i == 6) {
      EXPECT_EQ(r.status, RequestStatus::cancelled) << i;
      EXPECT_LT(r.ids.size(), alone[i].size()) << i;  // 5: whatever it made before, 6: none
      EXPECT_TRUE(std::equal(r.ids.begin(), r.ids.end(), alone[i].begin())) << i;
    } else {
      EXPECT_EQ(r.status, RequestStatus::finished) << i;
      EXPECT_EQ(r.ids, alone[i]) << i;
    }
  }
  EXPECT_LE(s.sessions_made(), 3u);
}

// A request whose callback throws fails alone: its result holds the
// exception, its session (the caller's) is rolled back, the others finish.
TEST(Scheduler, AFailingRequestFailsAloneAndLeavesItsSessionAsItWas) {
  const Decoder<float> d = fixtures::make_decoder<float>(fixtures::model(fixtures::variants()[3], 96));
  const std::vector<Request> all = requests(d);
  BatchScheduler<float> s(d, scheduler_options(4, 6));
  Session<float> own = d.new_session(), finished = d.new_session();
  d.forward({4, 5, 6}, own);
  d.forward({7}, finished);
  Request failing = all[1];
  failing.options.on_token = [count = 0](int) mutable {
    if (++count == 3) throw std::runtime_error("client went away");
  };
  std::vector<RequestId> id;
  for (const Request& r : all) id.push_back(s.submit(r));
  const RequestId bad = s.submit(failing, &own);
  const RequestId good = s.submit(all[2], &finished);
  s.run();
  const kvcache::RequestResult r = s.take(bad);
  EXPECT_EQ(r.status, RequestStatus::failed);
  EXPECT_EQ(r.ids.size(), 3u);
  EXPECT_THROW(std::rethrow_exception(r.error), std::runtime_error);
  EXPECT_EQ(own.position(), 3u);
  for (std::size_t i = 0; i < all.size(); ++i)
    EXPECT_EQ(s.take(id[i]).ids, kvcache::generate(d, all[i].prompt, all[i].options)) << i;
  // A finished request in the caller's session leaves the prompt and every
  // id but the last there, as generate() does.
  Session<float> expected = d.new_session();
  d.forward({7}, expected);
  const auto good_ids = s.take(good).ids;
  EXPECT_EQ(good_ids, kvcache::generate(d, expected, all[2].prompt, all[2].options));
  EXPECT_EQ(finished.position(), expected.position());
}

TEST(Scheduler, RejectsBadOptionsAndRequestsBeforeQueueingThem) {
  const ModelConfig c = fixtures::model(fixtures::variants()[0], 16);
  const Decoder<float> d = fixtures::make_decoder<float>(c);
  EXPECT_THROW(BatchScheduler<float>(d, scheduler_options(0, 8)), std::invalid_argument);
  EXPECT_THROW(BatchScheduler<float>(d, scheduler_options(2, 0)), std::invalid_argument);
  EXPECT_THROW(BatchScheduler<float>(d, scheduler_options(2, 8, 0)), std::invalid_argument);
  SchedulerOptions too_long = scheduler_options(2, 8);
  too_long.session.max_tokens = 17;
  EXPECT_THROW(BatchScheduler<float>(d, too_long), std::invalid_argument);
  // A pool that stores another type, or was made by another decoder.
  SchedulerOptions other_type = scheduler_options(2, 8);
  other_type.pool = d.make_pool(kvcache::KVType::bf16);
  fixtures::expect_throw_naming<std::invalid_argument>([&] { BatchScheduler<float>(d, other_type); },
                                                       "the KV pool stores bf16");
  const Decoder<float> other = fixtures::make_decoder<float>(c);
  SchedulerOptions other_decoder = scheduler_options(2, 8);
  other_decoder.pool = other.make_pool();
  fixtures::expect_throw_naming<std::invalid_argument>([&] { BatchScheduler<float>(d, other_decoder); },
                                                       "made by another decoder");
  fixtures::expect_throw_naming<std::invalid_argument>([&] { BatchScheduler<float>(d, scheduler_options(0, 8)); },
                                                       "max_sequences = 0");
  fixtures::expect_throw_naming<std::invalid_argument>([&] { BatchScheduler<float>(d, scheduler_options(1, 0)); },
                                                       "step_tokens = 0");

  BatchScheduler<float> s(d, scheduler_options(2, 8));
  const auto submit = [&](std::vector<int> prompt, std::size_t n, Session<float>* session = nullptr) {
    return [&s, prompt, n, session] {
      Request r{prompt, {}, {}};
      r.options.max_new_tokens = n;
      s.submit(r, session);
    };
  };
  fixtures::expect_throw_naming<std::invalid_argument>(submit({}, 4), "request 0: the prompt is empty");
  fixtures::expect_throw_naming<std::out_of_range>(submit({1, 99}, 4), "token id 99 at index 1");
  fixtures::expect_throw_naming<std::length_error>(submit({1, 2, 3}, 15), "request 0: ");
  Request zero_seed{{1}, {}, {}};
  zero_seed.options.seed = 0;
  zero_seed.options.max_new_tokens = 4;
  EXPECT_THROW(s.submit(zero_seed), std::invalid_argument);
  Session<float> mine = d.new_session();
  Request four{{1}, {}, {}};
  four.options.max_new_tokens = 4;
  EXPECT_EQ(s.submit(four, &mine), 0u);
  fixtures::expect_throw_naming<std::invalid_argument>(submit({2}, 4, &mine), "its session is request 0's");
  EXPECT_EQ(s.waiting(), 1u);
  EXPECT_THROW(s.take(0), std::out_of_range);  // not done yet
  EXPECT_THROW(s.take(7), std::out_of_range);  // never submitted
  EXPECT_THROW(s.status(7), std::out_of_range);
  // max_new_tokens = 0: finished at once, nothing fed.
  const RequestId none = s.submit({{1, 2}, GenerateOptions{0, {}, 0.0f, 1.0f, 1, {}}, {}});
  EXPECT_EQ(s.status(none), RequestStatus::finished);
  EXPECT_TRUE(s.take(none).ids.empty());
  s.run();
  EXPECT_EQ(s.take(0).ids, kvcache::generate(d, {1}, four.options));
  EXPECT_EQ(mine.position(), 4u);
}

// Many requests through few sessions: the scheduler makes at most N and
// reuses them, each cleared between requests.
TEST(Scheduler, ReusesItsSessionsForRequestAfterRequest) {
  const Decoder<float> d = fixtures::make_decoder<float>(fixtures::model(fixtures::variants()[5], 64));
  BatchScheduler<float> s(d, scheduler_options(3, 16));
  std::vector<Request> all;
  for (std::size_t i = 0; i < 20; ++i) {
    Request r{fixtures::random_tokens(1 + i % 6, d.config().vocab_size, static_cast<std::uint32_t>(i)), {}, {}};
    r.options.max_new_tokens = 3 + i % 5;
    all.push_back(r);
  }
  std::vector<std::size_t> order(all.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  const auto got = run(s, all, order);
  for (std::size_t i = 0; i < all.size(); ++i) EXPECT_EQ(got[i], kvcache::generate(d, all[i].prompt, all[i].options));
  EXPECT_EQ(s.sessions_made(), 3u);
}

// Sessions paged in a pool: prompts that share a prefix (here 21 tokens, so
// one block of 8 can be shared, then 2) get their own runs' ids with and
// without prefix sharing; with it, the requests that join together wait for
// the first one to compute the shared blocks and then map them (15 × 16
// tokens not computed), and the pool holds less at its peak.
TEST(Scheduler, PagedSessionsSharePromptPrefixesAndKeepEveryRequestsIds) {
  const Decoder<float> d = fixtures::make_decoder<float>(fixtures::model(fixtures::variants()[4], 96));
  const std::vector<int> prefix = fixtures::random_tokens(21, d.config().vocab_size, 900);
  std::vector<Request> all;
  for (std::uint32_t i = 0; i < 16; ++i) {
    Request r;
    r.prompt = prefix;
    const std::vector<int> tail = fixtures::random_tokens(3 + i % 5, d.config().vocab_size, 910 + i);
    r.prompt.insert(r.prompt.end(), tail.begin(), tail.end());
    r.options.max_new_tokens = 10;
    all.push_back(r);
  }
  std::vector<std::vector<int>> alone;
  for (const Request& r : all) alone.push_back(kvcache::generate(d, r.prompt, r.options));
  std::vector<std::size_t> order(all.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::size_t peak[2] = {};
  for (const bool sharing : {true, false}) {
    SCOPED_TRACE(sharing ? "sharing" : "not sharing");
    SchedulerOptions o = scheduler_options(16, 64);
    kvcache::KVPoolOptions p;
    p.block_tokens = 8;
    p.prefix_sharing = sharing;
    o.pool = d.make_pool(kvcache::KVType::f32, p);
    BatchScheduler<float> s(d, o);
    EXPECT_EQ(run(s, all, order), alone);
    const kvcache::KVPoolStats stats = o.pool->stats();
    EXPECT_EQ(stats.prefix_hit_tokens, sharing ? 15u * 16u : 0u);
    peak[sharing ? 0 : 1] = stats.bytes_peak;
  }
  EXPECT_LT(peak[0], peak[1]);
}

// Session::map_prefix maps only an empty paged session's cached blocks, at
// most all but the prompt's last token, and the rest fed after them gives
// the logits of the whole prompt fed afresh.
TEST(Scheduler, MapPrefixMapsWholeCachedBlocksOfAnEmptyPagedSession) {
  const Decoder<float> d = fixtures::make_decoder<float>(fixtures::model(fixtures::variants()[4], 96));
  kvcache::KVPoolOptions p;
  p.block_tokens = 4;
  const auto pool = d.make_pool(kvcache::KVType::f32, p);
  const std::vector<int> prompt = fixtures::random_tokens(13, d.config().vocab_size, 920);
  Session<float> first = d.new_session({}, pool);
  d.forward(prompt, first);  // publishes blocks [0, 4), [4, 8), [8, 12)
  Session<float> contiguous = d.new_session({});
  EXPECT_EQ(contiguous.map_prefix(prompt), 0u);
  Session<float> second = d.new_session({}, pool);
  const std::vector<int> twelve(prompt.begin(), prompt.begin() + 12);
  EXPECT_EQ(second.map_prefix(twelve), 8u);  // at most 11 tokens: two whole blocks
  EXPECT_EQ(second.map_prefix(prompt), 0u);  // no longer empty
  EXPECT_EQ(second.size(), 8u);
  const std::vector<int> rest(prompt.begin() + 8, prompt.end());
  const kvcache::Matrix<float> mapped = d.forward(rest, second);
  Session<float> fresh = d.new_session({});
  const kvcache::Matrix<float> want = d.forward(prompt, fresh);
  // (Paged attention sums block by block: equal up to rounding; NaN fails.)
  EXPECT_TRUE(mapped.bottomRows(5).isApprox(want.bottomRows(5), 1e-5f));
  EXPECT_EQ(pool->stats().prefix_hit_tokens, 8u);
}
