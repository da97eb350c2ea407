// bench_generate — what the KV cache buys, measured.
//
//   BM_GenerateCached/N     kvcache::generate: one prefill, then N-1 one-token
//                           decode steps over the cache (about N token passes)
//   BM_GenerateUncached/N   kvcache::generate_uncached: every step runs the
//                           whole sequence again (about N²/2 token passes)
//   BM_KVCacheAppend/N      KVCache::append one token at a time, N tokens
//   BM_NaiveConcatAppend/N  the same rows grown by "allocate n+1 rows, copy n,
//                           write one" per token, as torch.cat does in the
//                           seed pseudocode: O(N²) copying
//
// Counters: tokens_per_second (generated tokens over wall time), kv_bytes
// (Session::kv_bytes() after the run, in KiB/MiB as "k"/"M"), time_per_token
// (wall time per appended token, printed in ns or us).

#include <cstddef>
#include <cstdint>
#include <vector>

#include <Eigen/Core>
#include <benchmark/benchmark.h>

#include <kvcache/kvcache.hpp>

namespace {

// ============================================================================
// The model: small, so that the uncached run of 1024 tokens takes seconds
// ============================================================================

constexpr std::size_t prompt_tokens = 16;
constexpr std::size_t max_generated = 1024;

kvcache::ModelConfig bench_config() {
  kvcache::ModelConfig c;
  c.vocab_size = 256;
  c.d_model = 64;
  c.n_layers = 2;
  c.n_heads = 4;
  c.d_ff = 256;
  c.max_seq_len = prompt_tokens + max_generated;
  c.positions = kvcache::PositionEncoding::learned;
  c.norm = kvcache::NormKind::layer_norm;
  c.mlp = kvcache::MlpKind::gelu;
  c.tied_lm_head = false;
  return c;
}

// Built once, on first use, and never changed.
const kvcache::Decoder<float>& bench_model() {
  static const kvcache::Decoder<float> model(bench_config(), kvcache::random_weights<float>(bench_config(), 7));
  return model;
}

std::vector<int> bench_prompt() {
  std::vector<int> prompt(prompt_tokens);
  for (std::size_t i = 0; i < prompt_tokens; ++i) prompt[i] = static_cast<int>((i * 37 + 11) % 256);
  return prompt;
}

// ============================================================================
// Cached vs uncached generation
// ============================================================================

void BM_GenerateCached(benchmark::State& state) {
  const auto& model = bench_model();
  const std::vector<int> prompt = bench_prompt();
  kvcache::GenerateOptions options;
  options.max_new_tokens = static_cast<std::size_t>(state.range(0));
  // One session reused across iterations, as a server reuses one between
  // requests: clear() forgets the tokens and keeps the memory.
  kvcache::Session<float> session = model.new_session();
  for (auto _ : state) {
    session.clear();
    std::vector<int> ids = kvcache::generate(model, session, prompt, options);
    benchmark::DoNotOptimize(ids.data());
    benchmark::ClobberMemory();
  }
  state.counters["tokens_per_second"] = benchmark::Counter(static_cast<double>(options.max_new_tokens),
                                                           benchmark::Counter::kIsIterationInvariantRate);
  state.counters["kv_bytes"] = benchmark::Counter(static_cast<double>(session.kv_bytes()),
                                                  benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
}

void BM_GenerateUncached(benchmark::State& state) {
  const auto& model = bench_model();
  const std::vector<int> prompt = bench_prompt();
  kvcache::GenerateOptions options;
  options.max_new_tokens = static_cast<std::size_t>(state.range(0));
  for (auto _ : state) {
    std::vector<int> ids = kvcache::generate_uncached(model, prompt, options);
    benchmark::DoNotOptimize(ids.data());
    benchmark::ClobberMemory();
  }
  state.counters["tokens_per_second"] = benchmark::Counter(static_cast<double>(options.max_new_tokens),
                                                           benchmark::Counter::kIsIterationInvariantRate);
}

// 32, 64, ..., 1024 generated tokens. A run stops after the first iteration
// that takes longer than MinTime, so the long uncached runs are timed once.
BENCHMARK(BM_GenerateCached)
    ->RangeMultiplier(2)
    ->Range(32, static_cast<std::int64_t>(max_generated))
    ->Unit(benchmark::kMillisecond)
    ->MinTime(0.3)
    ->UseRealTime();
BENCHMARK(BM_GenerateUncached)
    ->RangeMultiplier(2)
    ->Range(32, static_cast<std::int64_t>(max_generated))
    ->Unit(benchmark::kMillisecond)
    ->MinTime(0.3)
    ->UseRealTime();

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

// 1, 8, 64, 512, 4096, 8192 tokens.
BENCHMARK(BM_KVCacheAppend)->RangeMultiplier(8)->Range(1, 8192)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_NaiveConcatAppend)
    ->RangeMultiplier(8)
    ->Range(1, 8192)
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(0.3)
    ->UseRealTime();

}  // namespace
