// Exception safety: every mutating operation of KVCache and Session, made to
// fail in the middle — bad shapes, limits reached, and the allocation number
// N failing for every N — must leave the state exactly as it was: the same
// size and capacity, the same storage (the data pointers), and bitwise the
// same cached keys and values. The readers, failing at every allocation,
// must throw cleanly (and leak nothing: the ASan build runs LeakSanitizer).
//
// Allocations are failed on purpose in two places: operator new (every
// std::vector and std::string), and Eigen's own allocator, which never calls
// operator new. Eigen checks every heap allocation through eigen_assert when
// EIGEN_RUNTIME_NO_MALLOC is defined; eigen_assert is redefined here so that
// this check counts the allocation (and fails it when its turn comes).
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

#define EIGEN_RUNTIME_NO_MALLOC
namespace fault {
void eigen_assert_hook(bool ok, const char* expression);
}
#define eigen_assert(x) ::fault::eigen_assert_hook(static_cast<bool>(x), #x)

#include <gtest/gtest.h>

#include <cstdint>
#include <fstream>
#include <iterator>
#include <limits>
#include <optional>
#include <sstream>
#include <type_traits>
#include <vector>

#include <kvcache/kvcache.hpp>
#include <kvcache/llama2c.hpp>
#include <kvcache/session_file.hpp>
#include <kvcache/tokenizer.hpp>

#include "fixtures.hpp"
#include "models.hpp"

// ---------------------------------------------------------------------------
// Failure injection

namespace fault {

// Allocations left before one fails; negative: none fails.
std::atomic<long> g_allocations_left{-1};
std::atomic<long> g_allocations{0};
std::atomic<long> g_eigen_allocations{0};
std::atomic<std::size_t> g_largest_new{0};  // the largest operator new request

// Counts an allocation and throws std::bad_alloc when it is the one to fail.
void on_allocation() {
  ++g_allocations;
  long left = g_allocations_left.load();
  while (left >= 0) {
    if (left == 0) {
      g_allocations_left = -1;  // one failure per arming: the unwinding may allocate
      throw std::bad_alloc();
    }
    if (g_allocations_left.compare_exchange_weak(left, left - 1)) return;
  }
}

constexpr const char* kEigenMallocCheck = "heap allocation is forbidden";

void eigen_assert_hook(bool ok, const char* expression) {
  if (std::strstr(expression, kEigenMallocCheck) != nullptr) {
    ++g_eigen_allocations;
    on_allocation();  // malloc stays allowed: only this hook fails it
    return;
  }
  if (!ok) {
    std::fprintf(stderr, "eigen_assert failed: %s\n", expression);
    std::abort();
  }
}

// Fails the allocation number n (0-based) from now on, once.
struct FailAllocation {
  explicit FailAllocation(long n) { g_allocations_left = n; }
  ~FailAllocation() { g_allocations_left = -1; }
  FailAllocation(const FailAllocation&) = delete;
  FailAllocation& operator=(const FailAllocation&) = delete;
};

// Calls op() with allocation 0, 1, 2, … failing until it succeeds; after each
// failure (which must be std::bad_alloc, or what `expect` accepts) calls
// after_failure(n). Returns how many allocations op needs.
template <typename Op, typename AfterFailure>
long fail_each_allocation(Op&& op, AfterFailure&& after_failure, long max_allocations = 100000) {
  for (long n = 0; n < max_allocations; ++n) {
    bool failed = false;
    {
      FailAllocation arm(n);
      try {
        op();
      } catch (const std::bad_alloc&) {
        failed = true;
      }
    }
    if (!failed) return n;
    after_failure(n);
  }
  ADD_FAILURE() << "the operation never succeeded";
  return -1;
}

}  // namespace fault

void* operator new(std::size_t n) {
  fault::on_allocation();
  for (std::size_t largest = fault::g_largest_new.load();
       n > largest && !fault::g_largest_new.compare_exchange_weak(largest, n);) {
  }
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
// g++ 12 inlines these pairs and then mistakes the replacement operator new's
// malloc for the built-in operator new when it meets the free.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

namespace {

using kvcache::Decoder;
using kvcache::KVCache;
using kvcache::Matrix;
using kvcache::Session;

// ---------------------------------------------------------------------------
// Snapshots: everything observable about a cache, and its storage's address

struct CacheSnapshot {
  std::size_t n_kv_heads, d_k, max_tokens, size, capacity, bytes, position, ring_start;
  kvcache::KVType type;
  // Every stored array of every head (KVCache::read_raw: keys, values, and
  // int8 scale codes), as where it lives and what it holds.
  std::vector<const unsigned char*> addresses;
  std::vector<std::vector<unsigned char>> contents;

  bool operator==(const CacheSnapshot& o) const {
    return n_kv_heads == o.n_kv_heads && d_k == o.d_k && max_tokens == o.max_tokens && size == o.size &&
           capacity == o.capacity && bytes == o.bytes && position == o.position && ring_start == o.ring_start &&
           type == o.type && addresses == o.addresses && contents == o.contents;
  }
  // The same tokens in the same state, wherever the storage is and however
  // large it has grown.
  bool same_tokens(const CacheSnapshot& o) const {
    return size == o.size && position == o.position && ring_start == o.ring_start && contents == o.contents;
  }
};

// A KVCache, or a Session's layer (a KVCacheView): the same reader.
template <typename Cache>
CacheSnapshot snapshot(const Cache& c) {
  CacheSnapshot s{c.n_kv_heads(), c.d_k(),      c.max_tokens(), c.size(), c.capacity(), c.bytes(),
                  c.position(),   c.ring_start(), c.type(),     {},       {}};
  c.read_raw([&](const unsigned char* p, std::size_t n) {
    s.addresses.push_back(n == 0 ? nullptr : p);
    s.contents.emplace_back(p, p + n);
  });
  return s;
}

std::ostream& operator<<(std::ostream& out, const CacheSnapshot& s) {
  return out << "{size " << s.size << ", position " << s.position << ", ring_start " << s.ring_start << ", capacity "
             << s.capacity << ", storage at " << static_cast<const void*>(s.addresses.empty() ? nullptr : s.addresses[0])
             << "}";
}

struct SessionSnapshot {
  std::size_t size, position, max_tokens, threads, kv_bytes;
  std::vector<CacheSnapshot> caches;
  bool operator==(const SessionSnapshot& o) const {
    return size == o.size && position == o.position && max_tokens == o.max_tokens && threads == o.threads &&
           kv_bytes == o.kv_bytes && caches == o.caches;
  }
  bool same_tokens(const SessionSnapshot& o) const {
    if (caches.size() != o.caches.size()) return false;
    for (std::size_t l = 0; l < caches.size(); ++l)
      if (!caches[l].same_tokens(o.caches[l])) return false;
    return true;
  }
  bool capacity_kept_or_grown(const SessionSnapshot& o) const {  // o: before
    for (std::size_t l = 0; l < caches.size(); ++l)
      if (caches[l].capacity < o.caches[l].capacity) return false;
    return true;
  }
};

SessionSnapshot snapshot(const Session<float>& s) {
  SessionSnapshot out{s.size(), s.position(), s.max_tokens(), s.threads(), s.kv_bytes(), {}};
  for (std::size_t l = 0; l < s.n_layers(); ++l) out.caches.push_back(snapshot(s.cache(l)));
  return out;
}

std::ostream& operator<<(std::ostream& out, const SessionSnapshot& s) {
  out << "{size " << s.size << ", position " << s.position << ", kv_bytes " << s.kv_bytes << ", layers";
  for (const auto& c : s.caches) out << " " << c;
  return out << "}";
}

// Rows of distinct values, so that any overwritten or reordered row shows.
Matrix<float> rows(std::size_t m, std::size_t width, float start) {
  Matrix<float> M(static_cast<Eigen::Index>(m), static_cast<Eigen::Index>(width));
  for (Eigen::Index i = 0; i < M.size(); ++i) M.data()[i] = start + static_cast<float>(i);
  return M;
}

// A cache of 2 heads × d_k 3 holding `n` tokens, with capacity 16 (full at 16).
KVCache<float> filled_cache(std::size_t n, std::size_t max_tokens = 0) {
  KVCache<float> c(2, 3, max_tokens);
  c.append(rows(n, 6, 0.5f), rows(n, 6, 1000.5f));
  return c;
}

// ---------------------------------------------------------------------------
// KVCache

TEST(KVCacheExceptionSafety, NothrowOperationsAreMarkedSo) {
  static_assert(noexcept(std::declval<KVCache<float>&>().clear()));
  static_assert(std::is_nothrow_move_constructible_v<KVCache<float>>);
  static_assert(std::is_nothrow_move_assignable_v<KVCache<float>>);
  KVCache<float> c = filled_cache(5);
  const CacheSnapshot before = snapshot(c);
  c.clear();
  EXPECT_EQ(c.size(), 0u);
  EXPECT_EQ(c.capacity(), before.capacity);  // memory kept
}

TEST(KVCacheExceptionSafety, AppendWithABadShapeChangesNothing) {
  KVCache<float> c = filled_cache(5);
  const CacheSnapshot before = snapshot(c);
  EXPECT_THROW(c.append(rows(2, 5, 0), rows(2, 6, 0)), std::invalid_argument);  // K too narrow
  EXPECT_THROW(c.append(rows(2, 6, 0), rows(2, 7, 0)), std::invalid_argument);  // V too wide
  EXPECT_THROW(c.append(rows(2, 6, 0), rows(3, 6, 0)), std::invalid_argument);  // rows differ
  // Rows that differ and would also need a reallocation (5 + 40 > 16).
  EXPECT_THROW(c.append(rows(40, 6, 0), rows(39, 6, 0)), std::invalid_argument);
  EXPECT_EQ(snapshot(c), before);
}

TEST(KVCacheExceptionSafety, AppendPastTheLimitChangesNothing) {
  KVCache<float> c = filled_cache(5, /*max_tokens=*/8);
  const CacheSnapshot before = snapshot(c);
  EXPECT_THROW(c.append(rows(4, 6, 0), rows(4, 6, 0)), std::length_error);
  EXPECT_EQ(snapshot(c), before);
  c.append(rows(3, 6, 0), rows(3, 6, 0));  // exactly to the limit
  const CacheSnapshot full = snapshot(c);
  EXPECT_THROW(c.append(rows(1, 6, 0), rows(1, 6, 0)), std::length_error);
  EXPECT_EQ(snapshot(c), full);
}

TEST(KVCacheExceptionSafety, AppendFailingAtEveryAllocationChangesNothing) {
  for (const std::size_t already : {std::size_t{0}, std::size_t{5}, std::size_t{16}}) {
    SCOPED_TRACE("cache holding " + std::to_string(already) + " tokens");
    KVCache<float> c(2, 3);
    if (already > 0) c.append(rows(already, 6, 0.5f), rows(already, 6, 1000.5f));
    const Matrix<float> K = rows(20, 6, 7000.5f), V = rows(20, 6, 9000.5f);  // needs a reallocation
    const CacheSnapshot before = snapshot(c);
    const long needed = fault::fail_each_allocation([&] { c.append(K, V); },
                                                    [&](long n) { ASSERT_EQ(snapshot(c), before) << "allocation " << n; });
    EXPECT_GE(needed, 2) << "keys and values: two allocations at least";
    ASSERT_EQ(c.size(), already + 20);
    EXPECT_EQ(c.keys(1).bottomRows(20), K.middleCols(3, 3));
    EXPECT_EQ(c.values(0).bottomRows(20), V.middleCols(0, 3));
  }
}

TEST(KVCacheExceptionSafety, ReserveFailingChangesNothing) {
  KVCache<float> c = filled_cache(5, /*max_tokens=*/100);
  const CacheSnapshot before = snapshot(c);
  EXPECT_THROW(c.reserve(101), std::length_error);
  EXPECT_THROW(c.reserve_more(96), std::length_error);
  EXPECT_EQ(snapshot(c), before);
  fault::fail_each_allocation([&] { c.reserve(64); },
                              [&](long n) { ASSERT_EQ(snapshot(c), before) << "allocation " << n; });
  EXPECT_EQ(c.capacity(), 64u);
  const CacheSnapshot reserved = snapshot(c);
  fault::fail_each_allocation([&] { c.reserve_more(80); },
                              [&](long n) { ASSERT_EQ(snapshot(c), reserved) << "allocation " << n; });
  EXPECT_GE(c.capacity(), 85u);
  EXPECT_EQ(c.keys(0), filled_cache(5).keys(0));
}

TEST(KVCacheExceptionSafety, ShrinkToFitFailingChangesNothing) {
  KVCache<float> c = filled_cache(5);
  c.reserve(200);
  const CacheSnapshot before = snapshot(c);
  fault::fail_each_allocation([&] { c.shrink_to_fit(); },
                              [&](long n) { ASSERT_EQ(snapshot(c), before) << "allocation " << n; });
  EXPECT_EQ(c.capacity(), 5u);
  EXPECT_EQ(c.values(1), filled_cache(5).values(1));
}

TEST(KVCacheExceptionSafety, TruncatePastTheSizeChangesNothing) {
  KVCache<float> c = filled_cache(5);
  const CacheSnapshot before = snapshot(c);
  EXPECT_THROW(c.truncate(6), std::out_of_range);
  EXPECT_EQ(snapshot(c), before);
  EXPECT_NO_THROW(c.truncate(5));
  EXPECT_EQ(snapshot(c), before);
}

TEST(KVCacheExceptionSafety, CopyFailingLeavesTheSourceAlone) {
  const KVCache<float> c = filled_cache(7);
  const CacheSnapshot before = snapshot(c);
  std::optional<KVCache<float>> copy;
  fault::fail_each_allocation([&] { copy.emplace(c.copy()); },
                              [&](long n) { ASSERT_EQ(snapshot(c), before) << "allocation " << n; });
  ASSERT_TRUE(copy);
  EXPECT_EQ(copy->keys(1), c.keys(1));
  EXPECT_EQ(copy->values(0), c.values(0));
}

// ---------------------------------------------------------------------------
// Session (through Decoder::forward and generate)

// A Llama-style model (RoPE, GQA) of 2 layers, context 24.
kvcache::ModelConfig small_model() { return fixtures::model(fixtures::variants()[4], 24); }

TEST(SessionExceptionSafety, NothrowOperationsAreMarkedSo) {
  static_assert(noexcept(std::declval<Session<float>&>().clear()));
  static_assert(std::is_nothrow_move_constructible_v<Session<float>>);
  static_assert(std::is_nothrow_move_assignable_v<Session<float>>);
}

TEST(SessionExceptionSafety, BadInputToForwardChangesNothing) {
  const kvcache::ModelConfig c = small_model();
  const Decoder<float> d = fixtures::make_decoder<float>(c);
  Session<float> s = d.new_session();
  d.forward({1, 2, 3, 4, 5}, s);
  const SessionSnapshot before = snapshot(s);
  EXPECT_THROW(d.forward({}, s), std::invalid_argument);
  EXPECT_THROW(d.forward({1, 2, 37}, s), std::out_of_range);  // vocab_size 37
  EXPECT_THROW(d.forward({1, -1}, s), std::out_of_range);
  EXPECT_THROW(d.forward(std::vector<int>(20, 1), s), std::length_error);  // 5 + 20 > 24
  Session<float> limited = d.new_session(6);
  d.forward({1, 2, 3, 4, 5}, limited);
  const SessionSnapshot limited_before = snapshot(limited);
  EXPECT_THROW(d.forward({1, 2}, limited), std::length_error);
  EXPECT_EQ(snapshot(limited), limited_before);
  // A session of another model shape.
  const Decoder<float> other = fixtures::make_decoder<float>(fixtures::model(fixtures::variants()[3], 24));
  EXPECT_THROW(other.forward({1}, s), std::invalid_argument);
  EXPECT_EQ(snapshot(s), before);
}

// Every allocation of a forward pass fails in turn — the KV caches growing,
// the activations, the attention scratch, the logits. The cached tokens are
// always those of before, bit for bit; and the session then goes on to give
// exactly what a session that never failed gives. (Before the fix in
// detail/resize.hpp, a failure in a work buffer's resize left a dangling
// pointer that the next resize freed a second time.)
//
// What is not restored is memory: the caches of the layers that grew before
// the failing allocation keep their new capacity (all-or-nothing growth
// would need KVCache to stage its new storage for every layer before
// committing any). The test pins that down: capacity never shrinks.
TEST(SessionExceptionSafety, ForwardFailingAtEveryAllocationKeepsTheTokens) {
  const kvcache::ModelConfig c = small_model();
  const Decoder<float> d = fixtures::make_decoder<float>(c);
  const std::vector<int> prefix{1, 5, 9}, more{2, 30, 7, 7, 11, 3, 4, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28};

  Session<float> reference = d.new_session();
  d.forward(prefix, reference);
  const Matrix<float> expected = d.forward(more, reference);

  Session<float> s = d.new_session();
  d.forward(prefix, s);
  const SessionSnapshot before = snapshot(s);
  const Matrix<float>* logits = nullptr;  // into the session: nothing allocated after forward
  const long needed = fault::fail_each_allocation(
      [&] { logits = &d.forward(more, s); },
      [&](long n) {
        const SessionSnapshot after = snapshot(s);
        ASSERT_TRUE(after.same_tokens(before)) << "allocation " << n << ": " << after << " vs " << before;
        ASSERT_TRUE(after.capacity_kept_or_grown(before)) << "allocation " << n;
      });
  EXPECT_GT(needed, 5);
  ASSERT_TRUE(logits);
  EXPECT_EQ(*logits, expected);  // bit for bit
}

// With the caches reserved beforehand no cache grows, and then a failure
// anywhere leaves the session exactly as it was, capacity and storage too.
TEST(SessionExceptionSafety, ForwardFailingWithReservedCachesChangesNothing) {
  const kvcache::ModelConfig c = small_model();
  const Decoder<float> d = fixtures::make_decoder<float>(c);
  Session<float> s = d.new_session(0, /*reserve_tokens=*/24);
  d.forward({1, 5, 9}, s);
  const SessionSnapshot before = snapshot(s);
  fault::fail_each_allocation([&] { d.forward({2, 30, 7, 7}, s); },
                              [&](long n) { ASSERT_EQ(snapshot(s), before) << "allocation " << n; });
  EXPECT_EQ(s.size(), 7u);
}

TEST(SessionExceptionSafety, TruncatePastTheSizeChangesNothing) {
  const Decoder<float> d = fixtures::make_decoder<float>(small_model());
  Session<float> s = d.new_session();
  d.forward({1, 2, 3}, s);
  const SessionSnapshot before = snapshot(s);
  EXPECT_THROW(s.truncate(4), std::out_of_range);
  EXPECT_EQ(snapshot(s), before);
  EXPECT_THROW(s.set_threads(0), std::invalid_argument);
  EXPECT_EQ(snapshot(s), before);
}

TEST(SessionExceptionSafety, CopyFailingLeavesTheSourceAlone) {
  const Decoder<float> d = fixtures::make_decoder<float>(small_model());
  Session<float> s = d.new_session();
  d.forward({1, 2, 3, 4}, s);
  const SessionSnapshot before = snapshot(s);
  std::optional<Session<float>> copy;
  fault::fail_each_allocation([&] { copy.emplace(s.copy()); },
                              [&](long n) { ASSERT_EQ(snapshot(s), before) << "allocation " << n; });
  ASSERT_TRUE(copy);
  EXPECT_EQ(copy->size(), 4u);
  EXPECT_EQ(copy->cache(1).keys(0), s.cache(1).keys(0));
}

TEST(SessionExceptionSafety, NewSessionFailingThrowsCleanly) {
  const Decoder<float> d = fixtures::make_decoder<float>(small_model());
  std::optional<Session<float>> s;
  fault::fail_each_allocation([&] { s.emplace(d.new_session(0, 24)); }, [](long) {});
  ASSERT_TRUE(s);
  EXPECT_GE(s->cache(0).capacity(), 24u);
}

// generate is prefill then one forward per token: a failure in any of them
// (an allocation, the caller's on_token callback, non-finite logits) rolls
// the session back to where the call found it.
TEST(SessionExceptionSafety, GenerateFailingRollsTheSessionBack) {
  const Decoder<float> d = fixtures::make_decoder<float>(small_model());
  Session<float> s = d.new_session();
  d.forward({1, 5, 9}, s);
  const SessionSnapshot before = snapshot(s);
  const auto same_tokens = [&](long n) {
    const SessionSnapshot after = snapshot(s);
    ASSERT_TRUE(after.same_tokens(before)) << "allocation " << n << ": " << after << " vs " << before;
  };
  kvcache::GenerateOptions o;
  o.max_new_tokens = 6;
  std::vector<int> ids;
  fault::fail_each_allocation([&] { ids = kvcache::generate(d, s, {4, 2}, o); }, same_tokens);
  ASSERT_EQ(ids.size(), 6u);
  Session<float> fresh = d.new_session();
  d.forward({1, 5, 9}, fresh);
  EXPECT_EQ(ids, kvcache::generate(d, fresh, {4, 2}, o));

  // The caller's callback throws at the third token.
  Session<float> t = d.new_session();
  d.forward({1, 5, 9}, t);
  const SessionSnapshot t_before = snapshot(t);
  o.on_token = [count = 0](int) mutable {
    if (++count == 3) throw std::runtime_error("client went away");
  };
  EXPECT_THROW(kvcache::generate(d, t, {4, 2}, o), std::runtime_error);
  EXPECT_EQ(snapshot(t), t_before);
}

TEST(SessionExceptionSafety, GenerateWithNonFiniteLogitsRollsBack) {
  const kvcache::ModelConfig c = small_model();
  kvcache::DecoderWeights<float> w = kvcache::random_weights<float>(c, 3);
  w.final_norm.gamma(0) = std::numeric_limits<float>::quiet_NaN();  // every logit is NaN
  const Decoder<float> d(c, std::move(w));
  Session<float> s = d.new_session();
  d.forward({1, 5}, s);  // a forward pass does not look at its logits
  const SessionSnapshot before = snapshot(s);
  kvcache::GenerateOptions o;
  o.max_new_tokens = 4;
  EXPECT_THROW(kvcache::generate(d, s, {1, 2, 3}, o), std::domain_error);
  EXPECT_EQ(snapshot(s), before);
}

// ---------------------------------------------------------------------------
// Sliding windows and compact storage: once a window is full an append
// overwrites the oldest slot, which no rollback can bring back, so every
// allocation of a forward pass is made before the first cache changes. All
// but Eigen's own inside a large product (GEMM blocks above 128 KiB): when
// one of those fails after a full window has overwritten tokens, the
// session is cleared. (Before, the rollback truncated the window to a mix of
// old tokens that no longer matched its position, or, when more tokens had
// been appended than the window holds, threw out_of_range from its catch
// block in place of the std::bad_alloc.)

// True when `after` is `before` exactly, or, for a session whose forward
// would overwrite a full window, a cleared session.
bool unchanged_or_cleared(const SessionSnapshot& after, const SessionSnapshot& before, bool window_overwrites,
                          long* cleared) {
  if (after == before) return true;
  if (window_overwrites && after.size == 0 && after.position == 0) {
    ++*cleared;
    return true;
  }
  return false;
}

struct CacheKind {
  std::string name;
  kvcache::KVType type;
  kvcache::SlidingWindow window;
};

std::vector<CacheKind> cache_kinds() {
  using kvcache::KVType;
  return {{"f32", KVType::full, {}},           {"bf16", KVType::bf16, {}},          {"int8", KVType::int8, {}},
          {"f32 window", KVType::full, {8, 2}}, {"bf16 window", KVType::bf16, {8, 2}}, {"int8 window", KVType::int8, {8, 0}}};
}

TEST(KVCacheExceptionSafety, WindowsAndCompactTypesChangeNothingOnFailure) {
  for (const CacheKind& kind : cache_kinds()) {
    SCOPED_TRACE(kind.name);
    KVCache<float> c(2, 3, 0, kind.type, kind.window);
    c.append(rows(13, 6, 0.5f), rows(13, 6, 1000.5f));  // a window of 8 has wrapped
    const CacheSnapshot before = snapshot(c);
    EXPECT_THROW(c.append(rows(2, 5, 0), rows(2, 6, 0)), std::invalid_argument);
    EXPECT_THROW(c.append(rows(2, 6, 0), rows(3, 6, 0)), std::invalid_argument);
    EXPECT_THROW(c.truncate(c.size() + 1), std::out_of_range);
    EXPECT_EQ(snapshot(c), before);
    const Matrix<float> K = rows(20, 6, 7000.5f), V = rows(20, 6, 9000.5f);
    fault::fail_each_allocation([&] { c.append(K, V); },
                                [&](long n) { ASSERT_EQ(snapshot(c), before) << "allocation " << n; });
    EXPECT_EQ(c.position(), 33u);
  }
}

// A model whose MLP products are large enough for Eigen to take its GEMM
// blocks from the heap (more than EIGEN_STACK_ALLOCATION_LIMIT, 128 KiB):
// d_ff 1024 with 48-row prefills.
kvcache::ModelConfig wide_model(std::size_t max_seq_len) {
  kvcache::ModelConfig c = fixtures::model(fixtures::variants()[4], max_seq_len);
  c.d_model = 128;
  c.d_ff = 1024;
  return c;
}

TEST(SessionExceptionSafety, ForwardFailingInWindowsAndCompactCachesChangesNothing) {
  for (const bool wide : {false, true}) {
    const kvcache::ModelConfig c = wide ? wide_model(256) : small_model();
    const Decoder<float> d = fixtures::make_decoder<float>(c);
    const std::size_t m = wide ? 48 : 5;
    for (const CacheKind& kind : cache_kinds()) {
      SCOPED_TRACE(kind.name + (wide ? ", wide model" : ", small model"));
      kvcache::SessionOptions o;
      o.kv_type = kind.type;
      o.window = kind.window;
      if (kind.window.window != 0) o.window.window = wide ? 64 : 8;
      o.reserve_tokens = c.max_seq_len;  // no cache grows: the state must be exactly as before
      Session<float> s = d.new_session(o);
      d.forward(fixtures::random_tokens(wide ? 70 : 11, c.vocab_size, 5), s);  // windows have wrapped
      const SessionSnapshot before = snapshot(s);
      const std::vector<int> more = fixtures::random_tokens(m, c.vocab_size, 6);
      long cleared = 0;
      const long needed = fault::fail_each_allocation(
          [&] { d.forward(more, s); },
          [&](long n) {
            ASSERT_TRUE(unchanged_or_cleared(snapshot(s), before, kind.window.window != 0, &cleared))
                << "allocation " << n << ": " << snapshot(s) << " vs " << before;
            if (s.size() == 0) d.forward(fixtures::random_tokens(wide ? 70 : 11, c.vocab_size, 5), s);  // as before
          });
      EXPECT_GE(needed, 1);
      EXPECT_EQ(s.position(), before.position + m);
      if (!wide) {
        EXPECT_EQ(cleared, 0) << "small products allocate nothing after the first append";
      }
    }
  }
}

// ---------------------------------------------------------------------------
// The batched path: Decoder::forward_batch and generate_batch

TEST(BatchExceptionSafety, ForwardBatchFailingAtEveryAllocationKeepsEveryTokenAndSurvives) {
  for (const bool wide : {false, true}) {
    SCOPED_TRACE(wide ? "wide model" : "small model");
    const kvcache::ModelConfig c = wide ? wide_model(256) : small_model();
    const Decoder<float> d = fixtures::make_decoder<float>(c);
    std::vector<Session<float>> sessions;
    const std::vector<CacheKind> kinds = cache_kinds();
    for (const CacheKind& kind : kinds) {
      kvcache::SessionOptions o;
      o.kv_type = kind.type;
      o.window = kind.window;
      sessions.push_back(d.new_session(o));
      d.forward(fixtures::random_tokens(3 + sessions.size(), c.vocab_size, 7), sessions.back());
    }
    std::vector<Session<float>*> batch;
    std::vector<std::vector<int>> tokens;
    for (std::size_t b = 0; b < sessions.size(); ++b) {
      batch.push_back(&sessions[b]);
      tokens.push_back(fixtures::random_tokens(wide ? 40 : 1 + b % 3, c.vocab_size, static_cast<std::uint32_t>(b)));
    }
    {
      // Reused across the failures, then destroyed. A decode step first sizes
      // its buffers, so that the failing calls resize buffers that hold memory.
      kvcache::BatchScratch<float> scratch;
      d.forward_batch(std::vector<std::vector<int>>(sessions.size(), std::vector<int>{2}), batch, scratch);
      std::vector<SessionSnapshot> before;
      for (const auto& s : sessions) before.push_back(snapshot(s));
      const Matrix<float>* logits = nullptr;
      fault::fail_each_allocation(
          [&] { logits = &d.forward_batch(tokens, batch, scratch, kvcache::Logits::last); },
          [&](long n) {
            for (std::size_t b = 0; b < sessions.size(); ++b) {
              const SessionSnapshot after = snapshot(sessions[b]);
              const bool overwrites = kinds[b].window.window != 0 && before[b].size + tokens[b].size() > 8;
              const bool cleared = overwrites && after.size == 0 && after.position == 0;
              ASSERT_TRUE(after.same_tokens(before[b]) || cleared) << "allocation " << n << ", sequence " << b;
              if (cleared) d.forward(fixtures::random_tokens(before[b].position, c.vocab_size, 7), sessions[b]);
            }
          });
      ASSERT_NE(logits, nullptr);
      EXPECT_EQ(logits->rows(), static_cast<Eigen::Index>(sessions.size()));
      // The scratch that saw every failure still works.
      std::vector<std::vector<int>> step(sessions.size(), std::vector<int>{1});
      EXPECT_NO_THROW(d.forward_batch(step, batch, scratch));
    }
  }
}

// generate_batch prefills each sequence, then steps them together: a failure
// anywhere (an allocation, non-finite logits, a callback) rolls every
// session back to where the call found it.
TEST(BatchExceptionSafety, GenerateBatchFailingRollsEverySessionBack) {
  const kvcache::ModelConfig c = small_model();
  const Decoder<float> d = fixtures::make_decoder<float>(c);
  std::vector<Session<float>> sessions;
  for (int i = 0; i < 3; ++i) {
    sessions.push_back(d.new_session());
    d.forward({1, 2 + i}, sessions.back());
  }
  std::vector<Session<float>*> batch;
  std::vector<SessionSnapshot> before;
  for (auto& s : sessions) {
    batch.push_back(&s);
    before.push_back(snapshot(s));
  }
  const std::vector<std::vector<int>> prompts = {{4, 5}, {6}, {7, 8, 9}};
  std::vector<kvcache::GenerateOptions> options(3);
  for (auto& o : options) o.max_new_tokens = 5;
  const auto all_as_before = [&](long n) {
    for (std::size_t b = 0; b < sessions.size(); ++b)
      ASSERT_TRUE(snapshot(sessions[b]).same_tokens(before[b])) << "allocation " << n << ", sequence " << b;
  };
  std::vector<std::vector<int>> ids;
  fault::fail_each_allocation([&] { ids = kvcache::generate_batch(d, batch, prompts, options); }, all_as_before);
  ASSERT_EQ(ids.size(), 3u);
  for (auto& s : sessions) s.truncate(2);
  for (std::size_t b = 0; b < sessions.size(); ++b) before[b] = snapshot(sessions[b]);

  // The second sequence's callback throws at its third token.
  options[1].on_token = [count = 0](int) mutable {
    if (++count == 3) throw std::runtime_error("client went away");
  };
  EXPECT_THROW(kvcache::generate_batch(d, batch, prompts, options), std::runtime_error);
  all_as_before(-1);
}

// BatchScheduler: a step that fails at any allocation (joining requests,
// planning the step, the forward) throws with every session as it was, and
// the scheduler steps on from there to the ids each request gets alone.
TEST(BatchExceptionSafety, SchedulerStepFailingAtEveryAllocationChangesNoSessionAndGoesOn) {
  const kvcache::ModelConfig c = small_model();
  const Decoder<float> d = fixtures::make_decoder<float>(c);
  std::vector<Session<float>> sessions;
  for (int i = 0; i < 3; ++i) sessions.push_back(d.new_session());
  kvcache::SchedulerOptions o;
  o.max_sequences = 2;  // the third request joins when one leaves
  o.step_tokens = 4;    // the 7-token prompt is fed in two chunks
  kvcache::BatchScheduler<float> scheduler(d, o);
  const std::vector<std::vector<int>> prompts = {{4, 5}, {6, 1, 2, 3, 4, 5, 6}, {7, 8, 9}};
  std::vector<kvcache::GenerateOptions> options(3);
  for (std::size_t i = 0; i < 3; ++i) {
    options[i].max_new_tokens = 3 + 2 * i;
    scheduler.submit({prompts[i], options[i], {}}, &sessions[i]);
  }
  for (std::size_t steps = 0; !scheduler.idle(); ++steps) {
    ASSERT_LT(steps, 100u);
    std::vector<SessionSnapshot> before;
    for (const auto& s : sessions) before.push_back(snapshot(s));
    fault::fail_each_allocation([&] { scheduler.step(); }, [&](long n) {
      for (std::size_t b = 0; b < sessions.size(); ++b)
        ASSERT_TRUE(snapshot(sessions[b]).same_tokens(before[b])) << "step " << steps << ", allocation " << n << ", session " << b;
    });
  }
  for (std::size_t i = 0; i < 3; ++i) {
    const kvcache::RequestResult r = scheduler.take(i);
    EXPECT_EQ(r.status, kvcache::RequestStatus::finished) << i;
    EXPECT_EQ(r.ids, kvcache::generate(d, prompts[i], options[i])) << i;
  }
}

// ---------------------------------------------------------------------------
// Readers: a failure at any allocation throws (std::bad_alloc, or the
// reader's std::runtime_error naming the file) and leaks nothing.

std::string small_checkpoint() {
  const kvcache::ModelConfig c = kvcache::llama2c_config(8, 12, 2, 2, 1, 10, 4, false);
  const Decoder<float> d(c, kvcache::random_weights<float>(c, 11));
  const std::string path = std::string(KVCACHE_TEST_TMP_DIR) + "/exception_safety_small.bin";
  kvcache::save_llama2c(d, path);
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

TEST(ReaderExceptionSafety, CheckpointLoadFailingAtEveryAllocation) {
  const std::string bytes = small_checkpoint();
  std::optional<Decoder<float>> d;
  const long needed = fault::fail_each_allocation(
      [&] {
        std::istringstream in(bytes);
        try {
          d.emplace(kvcache::load_llama2c(in, "small.bin"));
        } catch (const std::runtime_error& e) {
          // Reported as the reader's error, naming the file.
          EXPECT_NE(std::string(e.what()).find("kvcache: small.bin: out of memory loading 1160 parameters (4640 bytes)"),
                    std::string::npos)
              << e.what();
          throw std::bad_alloc();
        }
      },
      [](long) {});
  ASSERT_TRUE(d);
  EXPECT_GT(needed, 10);
  EXPECT_EQ(d->config().vocab_size, 10u);
}

TEST(ReaderExceptionSafety, TokenizerLoadFailingAtEveryAllocation) {
  std::string bytes;
  const auto append_int32 = [&](std::int32_t v) { bytes.append(reinterpret_cast<const char*>(&v), 4); };
  append_int32(5);
  for (const char* piece : {"<unk>", "<s>", "</s>", " ", "a", "b", " a", "ab"}) {
    const float score = -1.0f;
    bytes.append(reinterpret_cast<const char*>(&score), 4);
    append_int32(static_cast<std::int32_t>(std::strlen(piece)));
    bytes += piece;
  }
  std::optional<kvcache::Tokenizer> tok;
  fault::fail_each_allocation(
      [&] {
        std::istringstream in(bytes);
        tok.emplace(kvcache::Tokenizer::load(in, "tok.bin", 8));
      },
      [](long) {});
  ASSERT_TRUE(tok);
  std::vector<int> ids;
  fault::fail_each_allocation([&] { ids = tok->encode(" ab a", true, false); }, [](long) {});
  EXPECT_EQ(tok->decode(std::vector<int>(ids.begin() + 1, ids.end())), " ab a");
}

// "The header says huge" is refused before anything is allocated: no Eigen
// allocation at all, and nothing from operator new bigger than an error
// message, for headers that claim terabytes, overflow 64 bits, or promise a
// KV cache of 34 GB; and a tokenizer claiming a 2 GB token allocates no
// more than its own few bytes.
TEST(ReaderExceptionSafety, HugeHeadersFailBeforeAllocating) {
  const auto header = [](std::vector<std::int32_t> fields) {
    std::string h;
    for (const std::int32_t v : fields) h.append(reinterpret_cast<const char*>(&v), 4);
    return h + std::string(64, '\0');
  };
  const std::int32_t max = std::numeric_limits<std::int32_t>::max();
  const std::vector<std::string> files = {
      header({1 << 30, 12, 2, 2, 1, 10, 4}),          // 2^60 parameters
      header({max - 3, max, max, 2, 1, -max, max}),   // past 2^64
      header({2, 1, 13000, 1, 1, 3, 167000}),         // a 34 GB KV cache
      header({8, 12, 2, 2, 1, 10, max}),              // a huge context
      header({4096, 11008, 32, 32, 32, 32000, 4096}), // Llama 2 7B's header on 92 bytes
  };
  for (const std::string& bytes : files) {
    std::istringstream in(bytes);
    const long eigen_before = fault::g_eigen_allocations;
    fault::g_largest_new = 0;
    EXPECT_THROW((void)kvcache::load_llama2c(in, "huge.bin"), std::runtime_error);
    EXPECT_EQ(fault::g_eigen_allocations - eigen_before, 0);
    EXPECT_LT(fault::g_largest_new.load(), 1024u);
  }

  std::string tok;
  const auto append_int32 = [&](std::int32_t v) { tok.append(reinterpret_cast<const char*>(&v), 4); };
  append_int32(max);  // max_token_length
  append_int32(0);    // score
  append_int32(max);  // length: 2 GB
  tok += "abc";
  std::istringstream in(tok);
  fault::g_largest_new = 0;
  EXPECT_THROW((void)kvcache::Tokenizer::load(in, "huge-token.bin", 1), std::runtime_error);
  EXPECT_LT(fault::g_largest_new.load(), std::size_t{1} << 17);  // one 64 KiB read chunk at most
}

// A session file from a stream that cannot seek (a pipe) has no length to
// check its header against: a header claiming 2^26 token ids made the
// reader allocate (and zero) 256 MB before reading any of them, and 2^31
// made it 8 GB, from 216 bytes of input. The ids now arrive before the
// memory for them does.
TEST(ReaderExceptionSafety, SessionFromAPipeAllocatesOnlyWhatArrives) {
  const kvcache::ModelConfig c = small_model();
  const Decoder<float> d = fixtures::make_decoder<float>(c);
  kvcache::SessionOptions o;
  o.window = {8, 2};
  Session<float> s = d.new_session(o);
  std::vector<int> tokens = fixtures::random_tokens(13, c.vocab_size, 1);
  d.forward(tokens, s);
  std::ostringstream out;
  kvcache::write_session(out, d, s, tokens);
  std::string bytes = out.str();
  // position (field 22) = n_tokens (field 24) = 2^26, header checksum redone.
  const auto put_u64 = [&](std::size_t offset, std::uint64_t v) {
    for (int i = 0; i < 8; ++i) bytes[offset + static_cast<std::size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xFF);
  };
  put_u64(22 * 8, std::uint64_t{1} << 26);
  put_u64(24 * 8, std::uint64_t{1} << 26);
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (std::size_t i = 0; i < 26 * 8; ++i) h = (h ^ static_cast<unsigned char>(bytes[i])) * 0x100000001b3ull;
  put_u64(26 * 8, h);

  struct Pipe : std::streambuf {
    explicit Pipe(std::string& b) { setg(&b[0], &b[0], &b[0] + b.size()); }
  } pipe(bytes);
  std::istream unseekable(&pipe);
  fault::g_largest_new = 0;
  try {
    (void)kvcache::read_session(unseekable, d, {}, "pipe");
    ADD_FAILURE() << "a truncated session loaded";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("truncated"), std::string::npos) << e.what();
  }
  EXPECT_LT(fault::g_largest_new.load(), std::size_t{1} << 20);
  // From a file (seekable) the length check refuses it outright.
  std::istringstream file(bytes);
  EXPECT_THROW((void)kvcache::read_session(file, d, {}, "file"), std::runtime_error);
}

// Loading a session file fails cleanly at every allocation, and leaks nothing.
TEST(ReaderExceptionSafety, SessionLoadFailingAtEveryAllocation) {
  const Decoder<float> d = fixtures::make_decoder<float>(small_model());
  for (const CacheKind& kind : cache_kinds()) {
    SCOPED_TRACE(kind.name);
    kvcache::SessionOptions o;
    o.kv_type = kind.type;
    o.window = kind.window;
    Session<float> s = d.new_session(o);
    const std::vector<int> tokens = fixtures::random_tokens(11, small_model().vocab_size, 2);
    const kvcache::RowVector<float> logits = d.forward(tokens, s, kvcache::Logits::last).row(0);
    std::ostringstream out;
    kvcache::write_session(out, d, s, tokens, logits);
    const std::string bytes = out.str();
    std::optional<kvcache::SavedSession<float>> loaded;
    fault::fail_each_allocation(
        [&] {
          std::istringstream in(bytes);
          loaded.emplace(kvcache::read_session(in, d, {}, "saved"));
        },
        [](long) {});
    ASSERT_TRUE(loaded);
    EXPECT_EQ(loaded->tokens, tokens);
    EXPECT_TRUE(snapshot(loaded->session).same_tokens(snapshot(s)));
  }
}

}  // namespace
