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
  std::size_t n_kv_heads, d_k, max_tokens, size, capacity, bytes;
  const float* keys_data;
  const float* values_data;
  std::vector<std::vector<unsigned char>> key_bytes, value_bytes;  // per head, size() rows

  bool operator==(const CacheSnapshot& o) const {
    return n_kv_heads == o.n_kv_heads && d_k == o.d_k && max_tokens == o.max_tokens && size == o.size &&
           capacity == o.capacity && bytes == o.bytes && keys_data == o.keys_data && values_data == o.values_data &&
           key_bytes == o.key_bytes && value_bytes == o.value_bytes;
  }
};

template <typename Map>
std::vector<unsigned char> raw(const Map& m) {
  std::vector<unsigned char> bytes(static_cast<std::size_t>(m.size()) * sizeof(float));
  if (!bytes.empty()) std::memcpy(bytes.data(), m.data(), bytes.size());
  return bytes;
}

CacheSnapshot snapshot(const KVCache<float>& c) {
  CacheSnapshot s{c.n_kv_heads(), c.d_k(), c.max_tokens(), c.size(), c.capacity(), c.bytes(),
                  c.keys(0).data(), c.values(0).data(), {}, {}};
  for (std::size_t h = 0; h < c.n_kv_heads(); ++h) {
    s.key_bytes.push_back(raw(c.keys(h)));
    s.value_bytes.push_back(raw(c.values(h)));
  }
  return s;
}

std::ostream& operator<<(std::ostream& out, const CacheSnapshot& s) {
  return out << "{size " << s.size << ", capacity " << s.capacity << ", keys at " << s.keys_data << "}";
}

struct SessionSnapshot {
  std::size_t size, max_tokens, threads, kv_bytes;
  std::vector<CacheSnapshot> caches;
  bool operator==(const SessionSnapshot& o) const {
    return size == o.size && max_tokens == o.max_tokens && threads == o.threads && kv_bytes == o.kv_bytes &&
           caches == o.caches;
  }
};

SessionSnapshot snapshot(const Session<float>& s) {
  SessionSnapshot out{s.size(), s.max_tokens(), s.threads(), s.kv_bytes(), {}};
  for (std::size_t l = 0; l < s.n_layers(); ++l) out.caches.push_back(snapshot(s.cache(l)));
  return out;
}

std::ostream& operator<<(std::ostream& out, const SessionSnapshot& s) {
  out << "{size " << s.size << ", kv_bytes " << s.kv_bytes << ", layers";
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
        ASSERT_EQ(after.size, before.size) << "allocation " << n;
        for (std::size_t l = 0; l < after.caches.size(); ++l) {
          ASSERT_GE(after.caches[l].capacity, before.caches[l].capacity) << "allocation " << n << ", layer " << l;
          ASSERT_EQ(after.caches[l].key_bytes, before.caches[l].key_bytes) << "allocation " << n << ", layer " << l;
          ASSERT_EQ(after.caches[l].value_bytes, before.caches[l].value_bytes) << "allocation " << n << ", layer " << l;
        }
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
    ASSERT_EQ(after.size, before.size) << "allocation " << n;
    for (std::size_t l = 0; l < after.caches.size(); ++l)
      ASSERT_EQ(after.caches[l].key_bytes, before.caches[l].key_bytes) << "allocation " << n;
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

}  // namespace
