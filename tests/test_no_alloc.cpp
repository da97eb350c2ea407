// A decode step allocates nothing once the session's buffers have grown:
// Eigen's own allocations are trapped with EIGEN_RUNTIME_NO_MALLOC, and
// operator new is counted.
#include <array>
#include <atomic>
#include <cstdlib>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#define EIGEN_RUNTIME_NO_MALLOC
// Eigen reports a forbidden allocation through eigen_assert: make it throw so
// the test can say where.
#define eigen_assert(x) \
  do {                  \
    if (!(x)) throw std::logic_error("eigen_assert failed: " #x); \
  } while (false)

#include <gtest/gtest.h>
#include <kvcache/kvcache.hpp>

#include "fixtures.hpp"

namespace {
std::atomic<long> g_news{0};
}

// Not inlined: once g++ sees malloc inside operator new and free inside
// operator delete at the same call site, it warns (-Wmismatched-new-delete)
// about the very pairing that the replacement makes correct.
#if defined(__GNUC__)
#define KVCACHE_TEST_NOINLINE __attribute__((noinline))
#else
#define KVCACHE_TEST_NOINLINE
#endif

KVCACHE_TEST_NOINLINE void* operator new(std::size_t n) {
  ++g_news;
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
// Some g++ 12 builds (-march=native) still warn at the definitions; the
// warning is off here only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
KVCACHE_TEST_NOINLINE void operator delete(void* p) noexcept { std::free(p); }
KVCACHE_TEST_NOINLINE void operator delete(void* p, std::size_t) noexcept { std::free(p); }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// With weights as float32, bfloat16, f16 and q8_0 (whose inputs are
// converted into per-thread buffers, grown by the first steps), on 1 and 2
// threads.
TEST(NoAllocation, DecodeStepsAllocateNothing) {
  using kvcache::WeightType;
  for (const auto weights : {WeightType::f32, WeightType::bf16, WeightType::f16, WeightType::q8_0}) {
    for (const std::size_t threads : {1u, 2u}) {
      for (const auto& v : fixtures::variants()) {
        const std::string what = v.name + " " + kvcache::to_string(weights) + " " + std::to_string(threads) + " threads";
        kvcache::ModelConfig c = fixtures::model(v, 64);
        c.d_ff = 64;  // q8_0 rows are whole blocks of 32
        const kvcache::Decoder<float> d(c, kvcache::random_weights<float>(c, 1), weights);
        kvcache::Session<float> s = d.new_session(0, 64);
        s.set_threads(threads);
        d.forward(fixtures::random_tokens(8, c.vocab_size, 1), s, kvcache::Logits::last);
        std::vector<int> step{3};
        d.forward(step, s, kvcache::Logits::last);  // first decode step sizes the buffers
        // The scores buffer grows geometrically with the cache: grow it past the
        // positions tested below.
        for (int i = 0; i < 40; ++i) d.forward(step, s, kvcache::Logits::last);
        s.truncate(10);
        const long before = g_news;
        Eigen::internal::set_is_malloc_allowed(false);
        try {
          for (int i = 0; i < 40; ++i) d.forward(step, s, kvcache::Logits::last);
        } catch (const std::exception& e) {
          Eigen::internal::set_is_malloc_allowed(true);
          FAIL() << what << ": " << e.what();
        }
        Eigen::internal::set_is_malloc_allowed(true);
        EXPECT_EQ(g_news - before, 0) << what;
      }
    }
  }
}

// The same for a batch: three sessions at different lengths (full, int8 and,
// with RoPE, bf16 in a sliding window with sinks that overflows) stepped
// together by Decoder::forward_batch, one token each, reusing a BatchScratch.
TEST(NoAllocation, BatchedDecodeStepsAllocateNothing) {
  for (const auto& v : fixtures::variants()) {
    const kvcache::ModelConfig c = fixtures::model(v, 128);
    const kvcache::Decoder<float> d(c, kvcache::random_weights<float>(c, 1));
    const bool rope = v.positions == kvcache::PositionEncoding::rope;
    std::array<kvcache::SessionOptions, 3> kinds{};
    kinds[1].kv_type = kvcache::KVType::int8;
    kinds[2].kv_type = kvcache::KVType::bf16;
    if (rope) kinds[2].window = {12, 2};
    std::vector<kvcache::Session<float>> sessions;
    std::vector<kvcache::Session<float>*> batch;
    for (std::size_t b = 0; b < kinds.size(); ++b) {
      kinds[b].reserve_tokens = 128;
      sessions.push_back(d.new_session(kinds[b]));
      d.forward(fixtures::random_tokens(3 + 2 * b, c.vocab_size, static_cast<std::uint32_t>(b)), sessions.back());
    }
    for (auto& s : sessions) batch.push_back(&s);
    const std::vector<std::vector<int>> step{{3}, {4}, {5}};
    kvcache::BatchScratch<float> scratch;
    // Grow every buffer (the scores with the longest cache) past the positions tested below.
    for (int i = 0; i < 40; ++i) d.forward_batch(step, batch, scratch, kvcache::Logits::last);
    for (auto& s : sessions)
      if (s.window().window == 0) s.truncate(10);  // a window stays full
    const long before = g_news;
    Eigen::internal::set_is_malloc_allowed(false);
    try {
      for (int i = 0; i < 30; ++i) d.forward_batch(step, batch, scratch, kvcache::Logits::last);
    } catch (const std::exception& e) {
      Eigen::internal::set_is_malloc_allowed(true);
      FAIL() << v.name << ": " << e.what();
    }
    Eigen::internal::set_is_malloc_allowed(true);
    EXPECT_EQ(g_news - before, 0) << v.name;
    if (rope) {
      EXPECT_GT(sessions[2].cache(0).evicted(), 0u) << v.name;
    }
  }
}
