// bench_batch — what batching buys: B sessions at different lengths decoded
// together, one Decoder::forward_batch per step, so that every weight matrix
// is read once per step for all B tokens instead of once per token.
//
//   BM_BatchedDecode/B:b/threads:t   b = 1, 2, 4, 8, 16 sessions, each
//                        prefilled with a prompt of 8 to 12 tokens, then
//                        kSteps decode steps (greedy, one token per session
//                        per step), with t = 1 or 2 threads
//
// The model has the shape of llama2.c's stories15M (6 layers, d_model 288,
// 6 heads, d_ff 768, vocab 32000: 15M weights, 60 MB in float32) with seeded
// random weights. With a few tokens per step each weight row is read from
// memory once and multiplied with every session's token while it is in the
// L1 cache (detail::linear_rows), so batch 1 is bound by memory bandwidth
// and larger batches by arithmetic, which a second thread doubles.
//
// Counters: tokens_per_second (all sessions' decoded tokens per second of
// wall time) and speedup (that rate over batch 1's with the same threads,
// from all such runs so far in this process, repetitions included; absent
// when batch 1 was filtered out). Time columns are per iteration of kSteps
// steps.

#include <chrono>
#include <cstddef>
#include <map>
#include <utility>
#include <vector>

#include <benchmark/benchmark.h>

#include <kvcache/kvcache.hpp>
#include <kvcache/llama2c.hpp>

namespace {

constexpr std::size_t kSteps = 16;  // decode steps per iteration

// Built once, on first use, and never changed.
const kvcache::Decoder<float>& stories15M_shape() {
  static const kvcache::Decoder<float> model(kvcache::llama2c_stories15M_config(),
                                             kvcache::random_weights<float>(kvcache::llama2c_stories15M_config(), 15));
  return model;
}

// Tokens and seconds of each (batch size, threads) so far, for the speedup
// counter.
struct Measured {
  double tokens = 0.0, seconds = 0.0;
};
std::map<std::pair<std::size_t, std::size_t>, Measured>& measured() {
  static std::map<std::pair<std::size_t, std::size_t>, Measured> runs;
  return runs;
}

void BM_BatchedDecode(benchmark::State& state) {
  const auto& model = stories15M_shape();
  const auto B = static_cast<std::size_t>(state.range(0));
  const auto threads = static_cast<std::size_t>(state.range(1));
  const std::size_t vocab = model.config().vocab_size;

  // B sessions at different lengths: prompts of 8 to 12 tokens.
  std::vector<kvcache::Session<float>> sessions;
  std::vector<kvcache::Session<float>*> batch;
  std::vector<std::size_t> prompt_length;
  std::vector<std::vector<int>> step(B, std::vector<int>(1));
  for (std::size_t b = 0; b < B; ++b) {
    prompt_length.push_back(8 + b % 5);
    std::vector<int> prompt(prompt_length.back());
    for (std::size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<int>((1 + 131 * b + 17 * i) % vocab);
    sessions.push_back(model.new_session(0, prompt_length.back() + kSteps));
    const auto& logits = model.forward(prompt, sessions.back(), kvcache::Logits::last);
    step[b][0] = kvcache::Sampler::argmax(logits.row(0));
  }
  for (auto& s : sessions) batch.push_back(&s);
  const std::vector<std::vector<int>> first_step = step;
  kvcache::BatchScratch<float> scratch;

  double seconds = 0.0;
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    for (std::size_t t = 0; t < kSteps; ++t) {
      const auto& logits = model.forward_batch(step, batch, scratch, kvcache::Logits::last, threads);
      for (std::size_t b = 0; b < B; ++b)
        step[b][0] = kvcache::Sampler::argmax(logits.row(static_cast<Eigen::Index>(b)));
    }
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    // Back to the prompts (O(1)): every iteration decodes the same positions.
    for (std::size_t b = 0; b < B; ++b) sessions[b].truncate(prompt_length[b]);
    step = first_step;
  }
  state.counters["tokens_per_second"] =
      benchmark::Counter(static_cast<double>(B * kSteps), benchmark::Counter::kIsIterationInvariantRate);
  Measured& run = measured()[{B, threads}];
  run.tokens += static_cast<double>(B * kSteps * static_cast<std::size_t>(state.iterations()));
  run.seconds += seconds;
  const auto base = measured().find({1, threads});
  if (base != measured().end() && base->second.seconds > 0.0 && run.seconds > 0.0)
    state.counters["speedup"] = (run.tokens / run.seconds) / (base->second.tokens / base->second.seconds);
}

}  // namespace

BENCHMARK(BM_BatchedDecode)
    ->ArgNames({"B", "threads"})
    ->ArgsProduct({{1, 2, 4, 8, 16}, {1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
