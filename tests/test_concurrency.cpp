// Concurrency: one Decoder (immutable weights) and one Tokenizer shared by
// several threads, each with its own Session (or its own batch of sessions),
// must give every thread exactly what it gets when the same work runs alone,
// one request after another.
// .ci/run also runs this file under ThreadSanitizer (with the std::thread
// backend of detail/parallel.hpp: libomp is not instrumented), which turns
// any data race, between sessions or between the threads of one forward
// pass, into a failure.
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <kvcache/generate.hpp>
#include <kvcache/scheduler.hpp>
#include <kvcache/llama2c.hpp>
#include <kvcache/session_file.hpp>
#include <kvcache/tokenizer.hpp>

#include "fixtures.hpp"
#include "models.hpp"
#include "reference.hpp"

namespace {

using kvcache::Decoder;
using kvcache::GenerateOptions;
using kvcache::Session;

constexpr std::size_t kThreads = 6;

// Runs job(i) for i in [0, n) on n threads at once, released together so
// that they overlap.
void run_concurrently(std::size_t n, const std::function<void(std::size_t)>& job) {
  std::atomic<std::size_t> ready{0};
  std::vector<std::thread> threads;
  for (std::size_t i = 0; i < n; ++i)
    threads.emplace_back([&, i] {
      ++ready;
      while (ready.load() < n) std::this_thread::yield();
      job(i);
    });
  for (auto& t : threads) t.join();
}

// Request i: its own prompt length, sampling settings and thread count.
struct Request {
  std::vector<int> prompt;
  GenerateOptions options;
  std::size_t threads;
};

std::vector<Request> requests(std::size_t vocab, std::size_t n) {
  std::vector<Request> r;
  for (std::size_t i = 0; i < n; ++i) {
    Request q;
    q.prompt = fixtures::random_tokens(1 + 3 * i, vocab, static_cast<std::uint32_t>(50 + i));
    q.options.max_new_tokens = 12 + 2 * i;
    if (i % 2 == 1) {  // half of them sample
      q.options.temperature = 0.9f;
      q.options.top_p = i % 4 == 1 ? 0.8f : 1.0f;
      q.options.seed = 1000 + i;
    }
    q.threads = 1 + i % 2;  // and half split their own work in two
    r.push_back(q);
  }
  return r;
}

std::vector<int> serve(const Decoder<float>& d, const Request& q) {
  Session<float> s = d.new_session();
  s.set_threads(q.threads);
  return kvcache::generate(d, s, q.prompt, q.options);
}

// Every attention variant and both model families: sessions on one decoder,
// all at once, equal the same requests served one by one.
TEST(Concurrency, SessionsOnOneDecoderMatchSequentialRuns) {
  for (const auto& v : fixtures::variants()) {
    SCOPED_TRACE(v.name);
    const kvcache::ModelConfig c = fixtures::model(v, 64);
    const Decoder<float> d = fixtures::make_decoder<float>(c);
    const std::vector<Request> work = requests(c.vocab_size, kThreads);
    std::vector<std::vector<int>> alone, together(kThreads);
    for (const Request& q : work) alone.push_back(serve(d, q));
    for (int round = 0; round < 3; ++round) {
      run_concurrently(kThreads, [&](std::size_t i) { together[i] = serve(d, work[i]); });
      EXPECT_EQ(together, alone) << "round " << round;
    }
  }
}

// A long-lived session per thread, reused across requests (cleared between
// them) and continued in the middle of a conversation.
TEST(Concurrency, ReusedAndContinuedSessions) {
  const kvcache::ModelConfig c = fixtures::model(fixtures::variants()[5], 96);
  const Decoder<float> d = fixtures::make_decoder<float>(c);
  const std::vector<Request> work = requests(c.vocab_size, kThreads);
  const auto conversation = [&](std::size_t i) {
    Session<float> s = d.new_session();
    std::vector<int> out;
    for (int turn = 0; turn < 3; ++turn) {
      const auto ids = kvcache::generate(d, s, work[(i + turn) % kThreads].prompt, work[i].options);
      out.insert(out.end(), ids.begin(), ids.end());
    }
    s.clear();
    const auto fresh = kvcache::generate(d, s, work[i].prompt, work[i].options);
    out.insert(out.end(), fresh.begin(), fresh.end());
    return out;
  };
  std::vector<std::vector<int>> alone, together(kThreads);
  for (std::size_t i = 0; i < kThreads; ++i) alone.push_back(conversation(i));
  run_concurrently(kThreads, [&](std::size_t i) { together[i] = conversation(i); });
  EXPECT_EQ(together, alone);
}

// One prefill, forked with Session::copy into every thread, each continuing
// it its own way while the others read the same weights.
TEST(Concurrency, ForkedSessionsContinueIndependently) {
  const kvcache::ModelConfig c = fixtures::model(fixtures::variants()[4], 64);
  const Decoder<float> d = fixtures::make_decoder<float>(c);
  Session<float> prefix = d.new_session();
  d.forward(fixtures::random_tokens(20, c.vocab_size, 3), prefix);
  const auto continue_from = [&](const Session<float>& base, std::size_t i) {
    Session<float> s = base.copy();
    GenerateOptions o;
    o.max_new_tokens = 20;
    o.temperature = 1.0f;
    o.seed = 77 + i;
    return kvcache::generate(d, s, {static_cast<int>(i % c.vocab_size)}, o);
  };
  std::vector<std::vector<int>> alone, together(kThreads);
  for (std::size_t i = 0; i < kThreads; ++i) alone.push_back(continue_from(prefix, i));
  // Every thread copies the same source session at the same time.
  run_concurrently(kThreads, [&](std::size_t i) { together[i] = continue_from(prefix, i); });
  EXPECT_EQ(together, alone);
  EXPECT_EQ(prefix.size(), 20u);
}

// Double precision takes the same paths with other kernels.
TEST(Concurrency, DoublePrecision) {
  const kvcache::ModelConfig c = fixtures::model(fixtures::variants()[1], 48);
  const Decoder<double> d = fixtures::make_decoder<double>(c);
  const auto run = [&](std::size_t i) {
    GenerateOptions o;
    o.max_new_tokens = 16;
    return kvcache::generate(d, fixtures::random_tokens(2 + i, c.vocab_size, static_cast<std::uint32_t>(i)), o,
                             1 + i % 2);
  };
  std::vector<std::vector<int>> alone, together(kThreads);
  for (std::size_t i = 0; i < kThreads; ++i) alone.push_back(run(i));
  run_concurrently(kThreads, [&](std::size_t i) { together[i] = run(i); });
  EXPECT_EQ(together, alone);
}

// The batched path: each thread steps its own batch of sessions (different
// lengths, storage types and windows) through generate_batch on the shared
// decoder, and gets what that batch gets alone.
TEST(Concurrency, BatchesOnOneDecoderMatchSequentialRuns) {
  const kvcache::ModelConfig c = fixtures::model(fixtures::variants()[4], 64);
  const Decoder<float> d = fixtures::make_decoder<float>(c);
  const auto run_batch = [&](std::size_t t) {
    std::vector<Session<float>> sessions;
    const kvcache::KVType types[] = {kvcache::KVType::full, kvcache::KVType::bf16, kvcache::KVType::int8};
    for (std::size_t i = 0; i < 3; ++i) {
      kvcache::SessionOptions o;
      o.kv_type = types[(t + i) % 3];
      if (i == 2) o.window = {8, 2};
      sessions.push_back(d.new_session(o));
    }
    std::vector<Session<float>*> batch;
    std::vector<std::vector<int>> prompts;
    std::vector<GenerateOptions> options(3);
    for (std::size_t i = 0; i < 3; ++i) {
      batch.push_back(&sessions[i]);
      prompts.push_back(fixtures::random_tokens(2 + t + i, c.vocab_size, static_cast<std::uint32_t>(10 * t + i)));
      options[i].max_new_tokens = 10 + i;
      if (i == 1) {
        options[i].temperature = 0.8f;
        options[i].seed = 5 + t;
      }
    }
    return kvcache::generate_batch(d, batch, prompts, options);
  };
  std::vector<std::vector<std::vector<int>>> alone, together(kThreads);
  for (std::size_t t = 0; t < kThreads; ++t) alone.push_back(run_batch(t));
  run_concurrently(kThreads, [&](std::size_t t) { together[t] = run_batch(t); });
  EXPECT_EQ(together, alone);
}

// Teams larger than the machine has cores, in several sessions at once:
// KVCACHE_TEST_THREADS threads per session (4 unless set; .ci/run sets 16
// under AddressSanitizer and ThreadSanitizer). Each session gets the logits
// that one thread gives, in prefill and in decode. The model is wide enough
// (256 features, 8 heads, 512 hidden units) that every team of up to 16
// really has that many threads.
TEST(Concurrency, MoreThreadsThanCoresGiveTheLogitsOfOne) {
  const char* from_env = std::getenv("KVCACHE_TEST_THREADS");
  const std::size_t threads = from_env != nullptr ? std::stoul(from_env) : 4;
  for (const auto& v : {fixtures::variants()[1], fixtures::variants()[5]}) {
    SCOPED_TRACE(v.name);
    kvcache::ModelConfig c = fixtures::model(v, 64);
    c.d_model = 256;
    c.n_heads = 8;
    c.n_kv_heads = 2 * v.n_kv_heads;
    c.d_ff = 512;
    c.vocab_size = 320;
    const Decoder<float> d = fixtures::make_decoder<float>(c);
    const auto logits = [&](std::size_t i, std::size_t n) {
      Session<float> s = d.new_session();
      s.set_threads(n);
      std::vector<kvcache::Matrix<float>> out{d.forward(fixtures::random_tokens(9 + i, c.vocab_size, static_cast<std::uint32_t>(7 + i)), s)};
      for (int step = 0; step < 6; ++step) out.push_back(d.forward({(step * 31 + static_cast<int>(i)) % 320}, s));
      return out;
    };
    std::vector<std::vector<kvcache::Matrix<float>>> alone, together(kThreads);
    for (std::size_t i = 0; i < kThreads; ++i) alone.push_back(logits(i, 1));
    run_concurrently(kThreads, [&](std::size_t i) { together[i] = logits(i, threads); });
    for (std::size_t i = 0; i < kThreads; ++i)
      for (std::size_t k = 0; k < alone[i].size(); ++k)
        EXPECT_LE(reference::relative_error(together[i][k], alone[i][k]), 1e-5)
            << threads << " threads, request " << i << ", call " << k;
  }
}

// Session files: one saved prefix loaded by every thread at once (the
// decoder's weights fingerprinted concurrently), each continuing it.
TEST(Concurrency, OneSessionFileLoadedByEveryThread) {
  const kvcache::ModelConfig c = fixtures::model(fixtures::variants()[5], 64);
  const Decoder<float> d = fixtures::make_decoder<float>(c);
  Session<float> s = d.new_session();
  const std::vector<int> prefix = fixtures::random_tokens(12, c.vocab_size, 4);
  d.forward(prefix, s);
  std::ostringstream out;
  kvcache::write_session(out, d, s, prefix);
  const std::string file = out.str();
  const auto continue_saved = [&](std::size_t i) {
    std::istringstream in(file);
    kvcache::SavedSession<float> saved = kvcache::read_session(in, d, {});
    GenerateOptions o;
    o.max_new_tokens = 12;
    o.temperature = 0.7f;
    o.seed = 31 + i;
    return kvcache::generate(d, saved.session, {static_cast<int>(i % c.vocab_size)}, o);
  };
  std::vector<std::vector<int>> alone, together(kThreads);
  for (std::size_t i = 0; i < kThreads; ++i) alone.push_back(continue_saved(i));
  run_concurrently(kThreads, [&](std::size_t i) { together[i] = continue_saved(i); });
  EXPECT_EQ(together, alone);
}

// The real model and its tokenizer, shared: each thread encodes its own
// prompt, generates and decodes, as kvcache-generate does per request.
TEST(Concurrency, RealModelAndTokenizerShared) {
  KVCACHE_MODEL_FILE_OR_SKIP(model, "aidreams260K.bin");
  KVCACHE_MODEL_FILE_OR_SKIP(tok_file, "tok512.bin");
  const Decoder<float> d = kvcache::load_llama2c(model);
  const kvcache::Tokenizer tok = kvcache::Tokenizer::load(tok_file, d.config().vocab_size);
  const std::vector<std::string> prompts = {"The cat", "Echoes", "A gentle hum", "vectors unfold",
                                            "I sense the nodes", "Contrast"};
  const auto request = [&](std::size_t i) {
    GenerateOptions o;
    o.max_new_tokens = 40;
    o.temperature = i % 2 == 0 ? 0.0f : 0.8f;
    o.seed = 9 + i;
    const std::vector<int> ids = kvcache::generate(d, tok.encode(prompts[i % prompts.size()]), o, 1 + i % 2);
    return tok.decode(ids);
  };
  std::vector<std::string> alone, together(kThreads);
  for (std::size_t i = 0; i < kThreads; ++i) alone.push_back(request(i));
  run_concurrently(kThreads, [&](std::size_t i) { together[i] = request(i); });
  EXPECT_EQ(together, alone);
  EXPECT_EQ(alone[0].rfind("ries unfold, a tapestry of probability", 0), 0u) << alone[0];
}

}  // namespace
