// kvcache-generate — llama2.c's `run`, on kvcache: loads a llama2.c
// checkpoint and its tokenizer, feeds the prompt in one prefill pass, then
// decodes one token at a time from the KV cache.
//
//   kvcache-generate MODEL.bin [-z TOKENIZER] [-i PROMPT] [-n STEPS]
//                    [-t TEMPERATURE] [-p TOPP] [-s SEED] [--prompt-ids IDS]
//                    [--ids] [--threads N] [--weights f32|bf16] [--no-cache]
//                    [--ignore-eos] [--stats]
//
// What is printed follows run: the pieces of every token after the leading
// BOS (the prompt's, then the generated ones) as they come, pieces that are a
// lone unprintable byte skipped, then a newline. STEPS counts positions
// prompt included, so a prompt of P tokens (BOS included) leaves
// STEPS - P + 1 tokens to generate (the last one is printed, never fed).
// Generation stops early when the model produces BOS, which is not printed as
// text (--ids prints it, as the reference id lists do). See cli_args.hpp for
// the options.
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <exception>
#include <iostream>
#include <kvcache/decoder.hpp>
#include <kvcache/generate.hpp>
#include <kvcache/llama2c.hpp>
#include <kvcache/tokenizer.hpp>
#include <optional>
#include <string>
#include <vector>

#include "cli_args.hpp"

namespace {

using Clock = std::chrono::steady_clock;
constexpr int kBos = kvcache::Tokenizer::kBosId;
constexpr const char* kProgram = "kvcache-generate";

// Either the ids or the text of each token, streamed to stdout.
class Printer {
 public:
  Printer(bool ids, const kvcache::Tokenizer* tokenizer) : ids_(ids), tokenizer_(tokenizer) {}

  // `stop` marks the BOS that ends generation: run does not print it as text.
  void print(int token, bool stop = false) {
    if (ids_) {
      std::cout << (first_ ? "" : " ") << token;
      first_ = false;
    } else if (!stop) {
      const std::string piece = tokenizer_->decode(prev_, token);
      if (kvcache::Tokenizer::is_printable_piece(piece)) std::cout << piece;
    }
    prev_ = token;
    std::cout.flush();
  }

  // The token before the first printed one (decides the leading space).
  void set_previous(int token) { prev_ = token; }

 private:
  bool ids_;
  const kvcache::Tokenizer* tokenizer_;
  bool first_ = true;
  int prev_ = -1;  // no token yet: the first piece keeps its leading space
};

std::string format_rate(double tokens, double seconds) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "%.2f", seconds > 0.0 ? tokens / seconds : 0.0);
  return buffer;
}

int run(int argc, char** argv) {
  const kvcache_cli::Options o = kvcache_cli::parse_args(argc, argv);
  if (o.help) {
    std::cout << kvcache_cli::usage(kProgram);
    return std::cout ? 0 : 1;
  }

  const kvcache::WeightType weight_type = o.weights == "bf16" ? kvcache::WeightType::bf16 : kvcache::WeightType::f32;
  const kvcache::Decoder<float> decoder = kvcache::load_llama2c(o.model_path, {}, weight_type);
  const kvcache::ModelConfig& config = decoder.config();

  // As run: 0, or more than the model can hold, means the model's seq_len.
  std::size_t steps = o.steps;
  if (steps == 0 || steps > config.max_seq_len) steps = config.max_seq_len;

  std::optional<kvcache::Tokenizer> tokenizer;
  if (o.needs_tokenizer()) tokenizer = kvcache::Tokenizer::load(o.tokenizer_path, config.vocab_size);

  std::vector<int> prompt;
  if (o.prompt_ids) {
    prompt = *o.prompt_ids;
    for (const int id : prompt)
      if (static_cast<std::size_t>(id) >= config.vocab_size)
        throw kvcache_cli::UsageError("--prompt-ids: id " + std::to_string(id) +
                                      " is outside the model's vocabulary [0, " + std::to_string(config.vocab_size) +
                                      ")");
  } else if (o.prompt && !o.prompt->empty()) {
    prompt = tokenizer->encode(*o.prompt, /*bos=*/true, /*eos=*/false);
  } else {
    prompt = {kBos};
  }
  if (prompt.size() > steps)
    throw kvcache_cli::UsageError("the prompt has " + std::to_string(prompt.size()) + " tokens but only " +
                                  std::to_string(steps) + " positions are run (-n " + std::to_string(o.steps) +
                                  ", seq_len " + std::to_string(config.max_seq_len) + ")");


  // Echo the prompt as run does: every token after a leading BOS.
  Printer printer(o.print_ids, tokenizer ? &*tokenizer : nullptr);
  std::size_t first_echoed = 0;
  if (prompt.front() == kBos) {
    printer.set_previous(kBos);
    first_echoed = 1;
  }
  for (std::size_t i = first_echoed; i < prompt.size(); ++i) printer.print(prompt[i]);

  kvcache::GenerateOptions options;
  options.max_new_tokens = steps - prompt.size() + 1;
  if (!o.ignore_eos) options.end_token = kBos;
  options.temperature = o.temperature;
  options.top_p = o.top_p;
  options.seed = o.seed != 0 ? o.seed : static_cast<std::uint64_t>(std::time(nullptr));
  if (options.seed == 0) options.seed = 1;  // xorshift cannot start from 0

  // The first id arrives right after the prefill pass (and one sampling
  // step), the others one decode step apart: their arrival times give both
  // rates.
  std::size_t generated = 0;
  const Clock::time_point start = Clock::now();
  Clock::time_point first_token = start, last_token = start;
  options.on_token = [&](int token) {
    last_token = Clock::now();
    if (generated++ == 0) first_token = last_token;
    printer.print(token, /*stop=*/options.end_token && token == *options.end_token);
  };

  std::size_t kv_bytes = 0;  // what is cached between steps: nothing with --no-cache
  if (o.no_cache) {
    kvcache::generate_uncached(decoder, prompt, options, o.threads);
  } else {
    // Room for every position the run can need: decoding never reallocates.
    kvcache::Session<float> session = decoder.new_session(0, steps);
    session.set_threads(o.threads);
    kvcache::generate(decoder, session, prompt, options);
    kv_bytes = session.kv_bytes();
  }
  std::cout << '\n';
  std::cout.flush();
  if (!std::cout) throw std::runtime_error("cannot write to stdout");

  if (o.stats) {
    const double prefill_s = std::chrono::duration<double>(first_token - start).count();
    const double decode_s = std::chrono::duration<double>(last_token - first_token).count();
    std::cerr << "stats: prompt_tokens=" << prompt.size() << " generated_tokens=" << generated
              << " prefill_tok_s=" << format_rate(static_cast<double>(prompt.size()), prefill_s)
              << " decode_tok_s=" << format_rate(static_cast<double>(generated - 1), decode_s)
              << " kv_bytes=" << kv_bytes << " threads=" << o.threads << std::endl;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const kvcache_cli::UsageError& e) {
    std::cout.flush();
    std::cerr << kProgram << ": " << e.what() << " (see " << kProgram << " --help)" << std::endl;
  } catch (const std::exception& e) {
    std::cout.flush();
    std::cerr << kProgram << ": " << e.what() << std::endl;
  } catch (...) {
    std::cout.flush();
    std::cerr << kProgram << ": unknown error" << std::endl;
  }
  return 1;
}
