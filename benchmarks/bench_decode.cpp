// bench_decode — tokens per second on llama2.c checkpoints of the stories15M,
// 42M and 110M shapes, written by kvcache with seeded random weights
// (bench_checkpoints.hpp) and loaded back with load_llama2c, as
// kvcache-generate loads a real model.
//
//   BM_MemoryRead/threads:t   one pass summing a 256 MB float array with t
//                             OpenMP threads: the read bandwidth decode is
//                             compared with, measured in this process
//   BM_Decode/MODEL/threads:t one decode step (forward of one token, logits of
//                             it, argmax) at positions 1 ... 255 in turn, as
//                             llama2.c's run decodes its default 256 steps
//   BM_DecodeBf16/MODEL/threads:t  BM_Decode with the weight matrices stored
//                             as bfloat16 (load_llama2c(path, {},
//                             WeightType::bf16)): half the bytes per token
//   BM_DecodeF16, BM_DecodeQ8_0/MODEL/threads:t  the same with f16 and q8_0
//                             weights (converted from the loaded float32
//                             model), computed as llama.cpp computes them
//   BM_Prefill/MODEL/threads:t one forward of a 256-token prompt over an empty
//                             cache, logits of the last position only
//   BM_MemoryReadAfter/threads:t the read bandwidth again, at the end
//
// Counters:
//   bytes_per_second (MemoryRead)  bytes summed per second
//   tokens_per_second              decoded or prompt tokens per second
//   bytes_per_token (Decode)       weights + the K and V read, averaged over
//                                  the positions the run went through
//   effective_GBps (Decode)        bytes_per_token × tokens_per_second
//   read_GBps (Decode)             the read bandwidth with the same threads,
//                                  measured right before the decode steps
//   gflops (Prefill)               FLOPs of the work model (bench_work.hpp)
//                                  per second
//   weight_bytes                   bytes of all parameters

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <benchmark/benchmark.h>

#include <kvcache/kvcache.hpp>
#include <kvcache/llama2c.hpp>

#include "bench_checkpoints.hpp"
#include "bench_machine.hpp"
#include "bench_work.hpp"

namespace {

constexpr int kBos = 1;
constexpr std::size_t kDecodePositions = 256;  // run's default -n
constexpr std::size_t kPromptTokens = 256;

// Each shape written once, and loaded once per weight type, on first use.
const kvcache::Decoder<float>& loaded_model(const std::string& name,
                                            kvcache::WeightType weights = kvcache::WeightType::f32) {
  static std::map<std::pair<std::string, kvcache::WeightType>, std::unique_ptr<kvcache::Decoder<float>>> models;
  auto& slot = models[{name, weights}];
  if (!slot && (weights == kvcache::WeightType::f16 || weights == kvcache::WeightType::q8_0)) {
    const kvcache::Decoder<float>& d = loaded_model(name);
    kvcache::DecoderWeights<float> w;
    w.token_embedding = d.token_embedding();
    for (std::size_t l = 0; l < d.config().n_layers; ++l) w.blocks.push_back(d.block(l));
    w.final_norm = d.final_norm();
    if (!d.config().tied_lm_head) w.lm_head = d.lm_head();
    slot = std::make_unique<kvcache::Decoder<float>>(d.config(), std::move(w), weights);
  }
  if (!slot) {
    const kvcache_bench::ModelShape shape = kvcache_bench::stories_shape(name);
    const std::string path = kvcache_bench::write_checkpoint(shape);
    slot = std::make_unique<kvcache::Decoder<float>>(kvcache::load_llama2c(path, {}, weights));
    // The work model's bytes must be the decoder's own.
    const double counted = kvcache_bench::parameter_count(slot->config()) * sizeof(float);
    if (weights == kvcache::WeightType::f32 && counted != static_cast<double>(slot->weight_bytes()))
      throw std::logic_error("bench_work.hpp counts " + std::to_string(counted) + " weight bytes for " + name +
                             ", the decoder holds " + std::to_string(slot->weight_bytes()));
  }
  return *slot;
}

std::vector<int> prompt_ids(std::size_t n, std::size_t vocab) {
  std::vector<int> ids(n);
  for (std::size_t i = 0; i < n; ++i) ids[i] = i == 0 ? kBos : static_cast<int>((i * 7919 + 13) % vocab);
  return ids;
}

// ============================================================================
// Memory read bandwidth
// ============================================================================

void BM_MemoryRead(benchmark::State& state) {
  const auto threads = static_cast<std::size_t>(state.range(0));
  kvcache_bench::read_buffer();  // allocated and touched outside the timing
  for (auto _ : state) benchmark::DoNotOptimize(kvcache_bench::sum_buffer(threads));
  state.counters["bytes_per_second"] =
      benchmark::Counter(static_cast<double>(kvcache_bench::kReadBufferFloats * sizeof(float)),
                         benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}

// ============================================================================
// Decode and prefill
// ============================================================================

void BM_Decode(benchmark::State& state, const std::string& name, kvcache::WeightType weights) {
  const auto threads = static_cast<std::size_t>(state.range(0));
  const auto& decoder = loaded_model(name, weights);
  const kvcache::ModelConfig& c = decoder.config();
  kvcache::Session<float> session = decoder.new_session(0, kDecodePositions);
  session.set_threads(threads);
  std::vector<int> token = {kBos};
  decoder.forward(token, session, kvcache::Logits::last);  // position 0
  const double weight_bytes = static_cast<double>(decoder.weight_bytes());
  const double kv_bytes_per_position = static_cast<double>(c.kv_bytes_per_token<float>());

  const double read_bandwidth = kvcache_bench::read_bandwidth(threads);

  double bytes = 0.0;  // read over all steps
  for (auto _ : state) {
    const std::size_t p = session.size();
    const auto& logits = decoder.forward(token, session, kvcache::Logits::last);
    token[0] = kvcache::Sampler::argmax(logits.row(0));
    bytes += weight_bytes + kv_bytes_per_position * static_cast<double>(p + 1);
    if (session.size() == kDecodePositions) session.truncate(1);  // O(1): start over at position 1
  }
  const double steps = static_cast<double>(state.iterations());
  state.counters["weight_bytes"] = weight_bytes;
  state.counters["tokens_per_second"] = benchmark::Counter(1.0, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["bytes_per_token"] = bytes / steps;
  state.counters["effective_GBps"] =
      benchmark::Counter(bytes / steps * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["read_GBps"] = read_bandwidth * 1e-9;
}

void BM_Prefill(benchmark::State& state, const std::string& name) {
  const auto threads = static_cast<std::size_t>(state.range(0));
  const auto& decoder = loaded_model(name);
  const std::vector<int> prompt = prompt_ids(kPromptTokens, decoder.config().vocab_size);
  kvcache::Session<float> session = decoder.new_session(0, kPromptTokens);
  session.set_threads(threads);
  for (auto _ : state) {
    session.clear();
    const auto& logits = decoder.forward(prompt, session, kvcache::Logits::last);
    benchmark::DoNotOptimize(logits.data());
  }
  const kvcache_bench::Work work = kvcache_bench::forward_work(decoder.config(), kPromptTokens, 0);
  state.counters["weight_bytes"] = static_cast<double>(decoder.weight_bytes());
  state.counters["tokens_per_second"] =
      benchmark::Counter(static_cast<double>(kPromptTokens), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["gflops"] = benchmark::Counter(work.flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// Bandwidth first, then each shape's decode and prefill in turn (each decode
// also measures the bandwidth right before it runs: read_GBps), then the
// bandwidth again, to show how much it moved during the run.
BENCHMARK(BM_MemoryRead)->ArgName("threads")->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime();

[[maybe_unused]] const bool models_registered = [] {
  for (const auto& shape : kvcache_bench::stories_shapes()) {
    for (auto* b : {benchmark::RegisterBenchmark(("BM_Decode/" + shape.name).c_str(), BM_Decode, shape.name,
                                                 kvcache::WeightType::f32),
                    benchmark::RegisterBenchmark(("BM_DecodeBf16/" + shape.name).c_str(), BM_Decode, shape.name,
                                                 kvcache::WeightType::bf16),
                    benchmark::RegisterBenchmark(("BM_DecodeF16/" + shape.name).c_str(), BM_Decode, shape.name,
                                                 kvcache::WeightType::f16),
                    benchmark::RegisterBenchmark(("BM_DecodeQ8_0/" + shape.name).c_str(), BM_Decode, shape.name,
                                                 kvcache::WeightType::q8_0),
                    benchmark::RegisterBenchmark(("BM_Prefill/" + shape.name).c_str(), BM_Prefill, shape.name)})
      b->ArgName("threads")->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime();
  }
  return true;
}();

BENCHMARK(BM_MemoryRead)
    ->Name("BM_MemoryReadAfter")
    ->ArgName("threads")
    ->Arg(1)
    ->Arg(2)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
