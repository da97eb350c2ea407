// bench_kv_cache — the cache itself: growing it, and reading it.
//
//   BM_KVCacheAppend/N      KVCache::append one token at a time, N tokens,
//                           into a new, empty cache each time: the cost
//                           includes growing it (geometric reallocations)
//                           and the first touch of fresh memory (page faults:
//                           glibc returns freed blocks over its mmap threshold
//                           to the kernel, so each iteration faults them in
//                           again, about 1 µs per 4 KiB page)
//   BM_KVCacheAppendReused/N the same into one cache cleared between
//                           iterations (clear() keeps the memory): the steady
//                           state of a session reused between requests
//   BM_NaiveConcatAppend/N  the same rows grown by "allocate n+1 rows, copy n,
//                           write one" per token, as torch.cat does in the
//                           seed pseudocode: O(N²) copying
//   BM_AttentionStep/n/threads:t
//                           one decode step of one MultiHeadAttentionWithCache
//                           layer of the stories15M shape (d_model 288, 6
//                           heads of d_k 48, RoPE) over a cache of n tokens
//
// Counters: time_per_token (wall time per appended token; JSON holds
// seconds), cached_tokens, kv_GBps (bytes of K and V read per step,
// 2·n·kv_dim·sizeof(float), per second of the step; the step also projects
// the token through W_Q, W_K, W_V, W_O, a fixed 1.3 MB of weights that
// dominates at small n). One layer's K and V of 8192 tokens are 18.9 MB and
// fit in this machine's 32 MB L3, so repeated steps may read them from L3
// faster than DRAM bandwidth.

#include <cstddef>
#include <cstdint>

#include <Eigen/Core>
#include <benchmark/benchmark.h>

#include <kvcache/kvcache.hpp>
#include <kvcache/llama2c.hpp>

namespace {

// ============================================================================
// Appending one token at a time: KVCache vs reallocate-and-copy
// ============================================================================

// One layer of a small model: 4 kv heads of d_k = 16.
constexpr std::size_t append_kv_heads = 4;
constexpr std::size_t append_d_k = 16;
constexpr auto append_kv_dim = static_cast<Eigen::Index>(append_kv_heads * append_d_k);

// Wall time per appended token = time / (tokens × iterations): the inverse of
// a tokens-per-second rate. The console prints it with its unit (ns, us);
// JSON output holds seconds.
benchmark::Counter time_per_token(std::int64_t tokens) {
  return benchmark::Counter(static_cast<double>(tokens),
                            benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

void BM_KVCacheAppend(benchmark::State& state) {
  const std::int64_t n = state.range(0);
  const kvcache::Matrix<float> k = kvcache::Matrix<float>::Random(1, append_kv_dim);
  const kvcache::Matrix<float> v = kvcache::Matrix<float>::Random(1, append_kv_dim);
  for (auto _ : state) {
    kvcache::KVCache<float> cache(append_kv_heads, append_d_k);  // starts empty, grows geometrically
    for (std::int64_t t = 0; t < n; ++t) cache.append(k, v);
    benchmark::DoNotOptimize(cache.keys(0).data());
    benchmark::ClobberMemory();
  }
  state.counters["time_per_token"] = time_per_token(n);
}

void BM_KVCacheAppendReused(benchmark::State& state) {
  const std::int64_t n = state.range(0);
  const kvcache::Matrix<float> k = kvcache::Matrix<float>::Random(1, append_kv_dim);
  const kvcache::Matrix<float> v = kvcache::Matrix<float>::Random(1, append_kv_dim);
  kvcache::KVCache<float> cache(append_kv_heads, append_d_k);
  for (std::int64_t t = 0; t < n; ++t) cache.append(k, v);  // grown once, outside the timing
  for (auto _ : state) {
    cache.clear();
    for (std::int64_t t = 0; t < n; ++t) cache.append(k, v);
    benchmark::DoNotOptimize(cache.keys(0).data());
    benchmark::ClobberMemory();
  }
  state.counters["time_per_token"] = time_per_token(n);
}

void BM_NaiveConcatAppend(benchmark::State& state) {
  const std::int64_t n = state.range(0);
  const kvcache::Matrix<float> k = kvcache::Matrix<float>::Random(1, append_kv_dim);
  const kvcache::Matrix<float> v = kvcache::Matrix<float>::Random(1, append_kv_dim);
  for (auto _ : state) {
    kvcache::Matrix<float> K(0, append_kv_dim), V(0, append_kv_dim);
    for (std::int64_t t = 0; t < n; ++t) {
      // K = cat([K, k]): a new (t+1)-row matrix, the old t rows copied in.
      kvcache::Matrix<float> K_next(t + 1, append_kv_dim), V_next(t + 1, append_kv_dim);
      K_next.topRows(t) = K;
      K_next.row(t) = k;
      V_next.topRows(t) = V;
      V_next.row(t) = v;
      K.swap(K_next);
      V.swap(V_next);
    }
    benchmark::DoNotOptimize(K.data());
    benchmark::DoNotOptimize(V.data());
    benchmark::ClobberMemory();
  }
  state.counters["time_per_token"] = time_per_token(n);
}

// 1, 2, 4, ..., 8192 tokens.
BENCHMARK(BM_KVCacheAppend)
    ->RangeMultiplier(2)
    ->Range(1, 8192)
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(0.1)
    ->UseRealTime();
BENCHMARK(BM_KVCacheAppendReused)
    ->RangeMultiplier(2)
    ->Range(1, 8192)
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(0.1)
    ->UseRealTime();
BENCHMARK(BM_NaiveConcatAppend)
    ->RangeMultiplier(2)
    ->Range(1, 8192)
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(0.1)
    ->UseRealTime();

// ============================================================================
// One decode step of attention over a cache of n tokens
// ============================================================================

constexpr std::size_t kMaxCached = 8192;

kvcache::AttentionConfig attention_config() {
  kvcache::AttentionConfig a = kvcache::llama2c_stories15M_config().attention();
  a.max_seq_len = kMaxCached + 1;  // n cached + the step's own token
  return a;
}

// The first layer of a stories15M-shaped model with seeded random weights.
const kvcache::MultiHeadAttentionWithCache<float>& attention_layer() {
  static const kvcache::MultiHeadAttentionWithCache<float> layer = [] {
    kvcache::ModelConfig c = kvcache::llama2c_stories15M_config();
    c.n_layers = 1;
    return kvcache::MultiHeadAttentionWithCache<float>(attention_config(),
                                                       std::move(kvcache::random_weights<float>(c, 42).blocks[0].attention));
  }();
  return layer;
}

void BM_AttentionStep(benchmark::State& state) {
  const auto n = static_cast<std::size_t>(state.range(0));
  const auto threads = static_cast<std::size_t>(state.range(1));
  const auto& layer = attention_layer();
  const kvcache::AttentionConfig& a = layer.config();
  const auto kv_dim = static_cast<Eigen::Index>(a.kv_dim());

  // n tokens of random keys and values, then room for the step's own token.
  kvcache::KVCache<float> cache = layer.make_cache();
  cache.reserve(n + 1);
  cache.append(kvcache::Matrix<float>::Random(static_cast<Eigen::Index>(n), kv_dim),
               kvcache::Matrix<float>::Random(static_cast<Eigen::Index>(n), kv_dim));
  const kvcache::Matrix<float> x = kvcache::Matrix<float>::Random(1, static_cast<Eigen::Index>(a.d_model));
  kvcache::Matrix<float> out;
  kvcache::AttentionScratch<float> scratch;
  layer.forward(x, cache, out, scratch, threads);  // sizes the scratch: the timed steps allocate nothing
  cache.truncate(n);

  for (auto _ : state) {
    layer.forward(x, cache, out, scratch, threads);
    benchmark::DoNotOptimize(out.data());
    cache.truncate(n);  // O(1): the next iteration is the same step
  }
  const double kv_bytes = 2.0 * static_cast<double>(n) * static_cast<double>(kv_dim) * sizeof(float);
  state.counters["cached_tokens"] = static_cast<double>(n);
  state.counters["kv_GBps"] = benchmark::Counter(kv_bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// 16, 32, ..., 8192 cached tokens, on 1 and 2 threads.
BENCHMARK(BM_AttentionStep)
    ->ArgNames({"", "threads"})
    ->ArgsProduct({benchmark::CreateRange(16, static_cast<std::int64_t>(kMaxCached), 2), {1, 2}})
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(0.1)
    ->UseRealTime();

}  // namespace
