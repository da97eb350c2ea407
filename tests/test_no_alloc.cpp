// A decode step allocates nothing once the session's buffers have grown:
// Eigen's own allocations are trapped with EIGEN_RUNTIME_NO_MALLOC, and
// operator new is counted.
#include <atomic>
#include <cstdlib>
#include <new>
#include <stdexcept>
#include <string>

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

void* operator new(std::size_t n) {
  ++g_news;
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
// g++ 12, once it inlines these into a caller, warns that free() gets a
// pointer from operator new: it does not see that operator new is this one,
// which allocates with malloc. The pairing is right; the warning is off here
// only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// With weights as float32 and as bfloat16, on 1 and 2 threads.
TEST(NoAllocation, DecodeStepsAllocateNothing) {
  for (const auto weights : {kvcache::WeightType::f32, kvcache::WeightType::bf16}) {
    for (const std::size_t threads : {1u, 2u}) {
      for (const auto& v : fixtures::variants()) {
        const std::string what = v.name + " " + kvcache::to_string(weights) + " " + std::to_string(threads) + " threads";
        const kvcache::ModelConfig c = fixtures::model(v, 64);
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
