// bench_generate — what the KV cache buys, measured on a stories15M-shaped
// model (d_model 288, 6 layers, 6 heads, d_ff 768, vocabulary 32000) with
// seeded random weights, on one thread, next to what the work predicts.
//
//   BM_GenerateCached/N     kvcache::generate from a one-token prompt to N
//                           positions: N forward passes of one token, the
//                           n-th over a cache of n - 1 tokens
//   BM_GenerateUncached/N   kvcache::generate_uncached, the same N positions:
//                           the n-th step runs all n tokens again
//   BM_CachedStep/n         one decode step that brings the sequence to n
//                           tokens: forward of 1 token over n - 1 cached
//   BM_UncachedStep/n       the uncached step to n tokens: forward of n tokens
//
// Counters:
//   predicted_s        time the work predicts (bench_work.hpp: FLOPs and bytes
//                      against the GEMM rate and read bandwidth measured right
//                      before the benchmark, reported as peak_gflops, read_GBps)
//   predicted_speedup  (generation) Σ predicted uncached steps / Σ predicted
//                      cached steps for N positions
//   speedup            (BM_GenerateUncached) measured time / the time of
//                      BM_GenerateCached with the same N earlier in this run
//   gflops, GBps       (steps) FLOPs and bytes of the work model per second
//   tokens_per_second  (generation) generated tokens per second

#include <cstddef>
#include <cstdint>
#include <map>
#include <vector>

#include <benchmark/benchmark.h>

#include <kvcache/kvcache.hpp>
#include <kvcache/llama2c.hpp>

#include "bench_machine.hpp"
#include "bench_work.hpp"

namespace {

using kvcache_bench::Clock;
using kvcache_bench::forward_work;
using kvcache_bench::Peaks;
using kvcache_bench::predicted_seconds;

constexpr std::size_t kMaxPositions = 1024;
constexpr int kBos = 1;

// The stories15M shape; the published model stops at 256 positions, the
// shape is what is timed, so it is given room for 1024.
kvcache::ModelConfig generation_config() {
  kvcache::ModelConfig c = kvcache::llama2c_stories15M_config();
  c.max_seq_len = kMaxPositions;
  return c;
}

// Built once, on first use, and never changed.
const kvcache::Decoder<float>& model() {
  static const kvcache::Decoder<float> decoder(generation_config(),
                                               kvcache::random_weights<float>(generation_config(), 42));
  return decoder;
}

// n token ids, BOS first, the rest spread over the vocabulary.
std::vector<int> sequence(std::size_t n) {
  std::vector<int> ids(n);
  for (std::size_t i = 0; i < n; ++i) ids[i] = i == 0 ? kBos : static_cast<int>((i * 7919 + 13) % 32000);
  return ids;
}

// The n-th step of each way of generating (n = 1 ... N).
kvcache_bench::Work cached_step_work(std::size_t n) { return forward_work(model().config(), 1, n - 1); }
kvcache_bench::Work uncached_step_work(std::size_t n) { return forward_work(model().config(), n, 0); }

double predicted_generation_seconds(std::size_t positions, bool cached, const Peaks& peaks) {
  double total = 0.0;
  for (std::size_t n = 1; n <= positions; ++n)
    total += predicted_seconds(cached ? cached_step_work(n) : uncached_step_work(n), peaks);
  return total;
}

void report_peaks(benchmark::State& state, const Peaks& peaks) {
  state.counters["peak_gflops"] = peaks.flops_per_second * 1e-9;
  state.counters["read_GBps"] = peaks.bytes_per_second * 1e-9;
}

// Seconds per iteration of BM_GenerateCached/N, kept for the speedup counter
// of BM_GenerateUncached/N (which runs after it in the same process).
std::map<std::size_t, double>& cached_seconds() {
  static std::map<std::size_t, double> seconds;
  return seconds;
}

// ============================================================================
// Whole generations
// ============================================================================

void BM_GenerateCached(benchmark::State& state) {
  const std::size_t positions = static_cast<std::size_t>(state.range(0));
  const auto& decoder = model();
  kvcache::GenerateOptions options;
  options.max_new_tokens = positions;  // the prompt's position, then N - 1 fed back
  const std::vector<int> prompt = {kBos};
  const Peaks peaks = kvcache_bench::measure_peaks();
  // One session reused across iterations, as a server reuses one between
  // requests: clear() forgets the tokens and keeps the memory.
  kvcache::Session<float> session = decoder.new_session();
  const Clock::time_point start = Clock::now();
  for (auto _ : state) {
    session.clear();
    std::vector<int> ids = kvcache::generate(decoder, session, prompt, options);
    benchmark::DoNotOptimize(ids.data());
    benchmark::ClobberMemory();
  }
  cached_seconds()[positions] = kvcache_bench::seconds_since(start) / static_cast<double>(state.iterations());

  const double predicted_cached = predicted_generation_seconds(positions, true, peaks);
  state.counters["positions"] = static_cast<double>(positions);
  state.counters["predicted_s"] = predicted_cached;
  state.counters["predicted_speedup"] = predicted_generation_seconds(positions, false, peaks) / predicted_cached;
  state.counters["tokens_per_second"] =
      benchmark::Counter(static_cast<double>(positions), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["kv_bytes"] = static_cast<double>(session.kv_bytes());
  report_peaks(state, peaks);
}

void BM_GenerateUncached(benchmark::State& state) {
  const std::size_t positions = static_cast<std::size_t>(state.range(0));
  const auto& decoder = model();
  kvcache::GenerateOptions options;
  options.max_new_tokens = positions;
  const std::vector<int> prompt = {kBos};
  const Peaks peaks = kvcache_bench::measure_peaks();
  const Clock::time_point start = Clock::now();
  for (auto _ : state) {
    std::vector<int> ids = kvcache::generate_uncached(decoder, prompt, options);
    benchmark::DoNotOptimize(ids.data());
    benchmark::ClobberMemory();
  }
  const double seconds = kvcache_bench::seconds_since(start) / static_cast<double>(state.iterations());

  const double predicted_uncached = predicted_generation_seconds(positions, false, peaks);
  state.counters["positions"] = static_cast<double>(positions);
  state.counters["predicted_s"] = predicted_uncached;
  state.counters["predicted_speedup"] = predicted_uncached / predicted_generation_seconds(positions, true, peaks);
  if (auto it = cached_seconds().find(positions); it != cached_seconds().end())
    state.counters["speedup"] = seconds / it->second;
  state.counters["tokens_per_second"] =
      benchmark::Counter(static_cast<double>(positions), benchmark::Counter::kIsIterationInvariantRate);
  report_peaks(state, peaks);
}

// 16, 32, ..., 1024 positions. Google Benchmark stops after the first
// iteration count whose run lasts --benchmark_min_time (0.5 s by default), so
// the long uncached runs (a minute or more at 1024) are timed once. No
// MinTime here: it would override the flag, which the CI smoke run sets low.
BENCHMARK(BM_GenerateCached)
    ->RangeMultiplier(2)
    ->Range(16, static_cast<std::int64_t>(kMaxPositions))
    ->Unit(benchmark::kMillisecond)
    
    ->UseRealTime();
BENCHMARK(BM_GenerateUncached)
    ->RangeMultiplier(2)
    ->Range(16, static_cast<std::int64_t>(kMaxPositions))
    ->Unit(benchmark::kMillisecond)
    
    ->UseRealTime();

// ============================================================================
// One step at a given length: latency against position
// ============================================================================

void report_step(benchmark::State& state, std::size_t n, const kvcache_bench::Work& work, const Peaks& peaks) {
  state.counters["positions"] = static_cast<double>(n);
  state.counters["predicted_s"] = predicted_seconds(work, peaks);
  state.counters["flops"] = work.flops;
  state.counters["bytes"] = work.bytes;
  state.counters["gflops"] = benchmark::Counter(work.flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GBps"] = benchmark::Counter(work.bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  report_peaks(state, peaks);
}

void BM_CachedStep(benchmark::State& state) {
  const std::size_t n = static_cast<std::size_t>(state.range(0));
  const auto& decoder = model();
  const std::vector<int> ids = sequence(n);
  const std::vector<int> last = {ids.back()};
  kvcache::Session<float> session = decoder.new_session(0, n);
  if (n > 1) decoder.forward(std::vector<int>(ids.begin(), ids.end() - 1), session, kvcache::Logits::last);
  const Peaks peaks = kvcache_bench::measure_peaks();
  for (auto _ : state) {
    const auto& logits = decoder.forward(last, session, kvcache::Logits::last);
    benchmark::DoNotOptimize(logits.data());
    session.truncate(n - 1);  // O(1): the next iteration is the same step
  }
  report_step(state, n, cached_step_work(n), peaks);
}

void BM_UncachedStep(benchmark::State& state) {
  const std::size_t n = static_cast<std::size_t>(state.range(0));
  const auto& decoder = model();
  const std::vector<int> ids = sequence(n);
  kvcache::Session<float> session = decoder.new_session(0, n);
  const Peaks peaks = kvcache_bench::measure_peaks();
  for (auto _ : state) {
    session.clear();
    const auto& logits = decoder.forward(ids, session, kvcache::Logits::last);
    benchmark::DoNotOptimize(logits.data());
  }
  report_step(state, n, uncached_step_work(n), peaks);
}

void step_lengths(benchmark::internal::Benchmark* b) {
  for (std::int64_t n : {16, 32, 64, 128}) b->Arg(n);
  for (std::int64_t n = 256; n <= static_cast<std::int64_t>(kMaxPositions); n += 128) b->Arg(n);
}

BENCHMARK(BM_CachedStep)->Apply(step_lengths)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_UncachedStep)->Apply(step_lengths)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
