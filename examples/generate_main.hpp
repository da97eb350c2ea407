// examples/generate_main.hpp — the whole of kvcache-generate (llama2.c's
// `run`, on kvcache) as one function, run_generate(argc, argv, out, err),
// which returns the exit code and never calls exit(): main() in
// kvcache_generate_main.cpp calls it with std::cout and std::cerr, and the fuzz
// harness fuzz/fuzz_generate.cpp calls it in-process. It loads a llama2.c
// checkpoint and its tokenizer, feeds the prompt in one prefill pass, then
// decodes one token at a time from the KV cache.
//
//   kvcache-generate MODEL.bin [-z TOKENIZER] [-i PROMPT] [-n STEPS]
//                    [-t TEMPERATURE] [-p TOPP] [-s SEED] [--prompt-ids IDS]
//                    [--ids] [--threads N] [--weights f32|bf16] [--no-cache]
//                    [--ignore-eos] [--stats]
//                    [--kv-type f32|bf16|int8] [--window W] [--sinks S]
//                    [--prompt-cache FILE]
//                    [--prompts-file FILE [--parallel N]]
//
// What is printed follows run: the pieces of every token after the leading
// BOS (the prompt's, then the generated ones) as they come, pieces that are a
// lone unprintable byte skipped, then a newline. STEPS counts positions
// prompt included, so a prompt of P tokens (BOS included) leaves
// STEPS - P + 1 tokens to generate (the last one is printed, never fed).
// Generation stops early when the model produces BOS (a GGUF model: its
// EOS), which is not printed as text (--ids prints it, as the reference id lists do). With --prompts-file,
// each line's output is printed as one line once its batch is done. See
// cli_args.hpp for the options.
#pragma once

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <ctime>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <kvcache/decoder.hpp>
#include <kvcache/generate.hpp>
#include <kvcache/scheduler.hpp>
#include <kvcache/llama2c.hpp>
#include <kvcache/session_file.hpp>
#include <kvcache/gguf.hpp>
#include <kvcache/tokenizer.hpp>
#include <optional>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "cli_args.hpp"

namespace {

using Clock = std::chrono::steady_clock;
constexpr int kBos = kvcache::Tokenizer::kBosId;
constexpr const char* kProgram = "kvcache-generate";

// Either the ids or the text of each token, streamed to stdout (or `out`).
class Printer {
 public:
  Printer(bool ids, const kvcache::Tokenizer* tokenizer, std::ostream& out)
      : ids_(ids), tokenizer_(tokenizer), out_(out) {}

  // `stop` marks the BOS that ends generation: run does not print it as text.
  void print(int token, bool stop = false) {
    if (ids_) {
      out_ << (first_ ? "" : " ") << token;
      first_ = false;
    } else if (!stop) {
      const std::string piece = tokenizer_->decode(prev_, token);
      if (kvcache::Tokenizer::is_printable_piece(piece)) out_ << piece;
    }
    prev_ = token;
    out_.flush();
  }

  // The token before the first printed one (decides the leading space).
  void set_previous(int token) { prev_ = token; }

 private:
  bool ids_;
  const kvcache::Tokenizer* tokenizer_;
  std::ostream& out_;
  bool first_ = true;
  int prev_ = -1;  // no token yet: the first piece keeps its leading space
};

std::string format_rate(double tokens, double seconds) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "%.2f", seconds > 0.0 ? tokens / seconds : 0.0);
  return buffer;
}

// ---- --prompt-cache -----------------------------------------------------------
//
// The file holds the session after the whole prompt and the logits of its
// last token (SavedSession::last_logits). Storing those vocab_size floats
// is what keeps the cache invisible in the output:
//   - a miss prefills the prompt in one pass, exactly as a run without the
//     cache does, and saves that very state, so its output is the same;
//   - a hit whose prompt is the saved one samples its first token from the
//     saved logits: the same numbers a one-pass prefill produced, so the
//     same output again;
//   - a hit with a longer prompt prefills only the new tokens on top of the
//     loaded state (the sums then run in another order than in one pass:
//     the same logits up to rounding, as any chunked prefill).
// Saving the state after all prompt tokens but the last instead would save
// the logits' bytes but make every miss prefill in two passes, whose last
// logits may differ from one pass in their last bits.

// A session that has been fed the whole prompt, with the last token's logits.
struct Prefilled {
  kvcache::Session<float> session;
  kvcache::RowVector<float> logits;
};

// What --prompt-cache did, for --stats.
struct PromptCacheResult {
  const char* status = "miss";  // hit, miss (no file) or rejected
  std::size_t reused = 0;       // prompt tokens loaded instead of prefilled
};

const char* kv_type_flag(kvcache::KVType t) { return t == kvcache::KVType::full ? "f32" : kvcache::to_string(t); }

std::string window_text(kvcache::SlidingWindow w) {
  return w.window == 0 ? "no window"
                       : "a window of " + std::to_string(w.window) + " with " + std::to_string(w.sinks) + " sinks";
}

// Loads the prompt cache at `path` and checks that it fits this run: the
// options that decide the cache's bytes, and a saved prompt that this
// prompt starts with. Throws std::exception with the reason when it does
// not.
kvcache::SavedSession<float> load_prompt_cache(const std::string& path, const kvcache::Decoder<float>& decoder,
                                               const kvcache::SessionOptions& wanted, const std::vector<int>& prompt,
                                               std::size_t steps) {
  kvcache::SessionLoadOptions load_options;
  load_options.reserve_tokens = wanted.reserve_tokens;
  kvcache::SavedSession<float> saved = kvcache::load_session(path, decoder, load_options);
  const kvcache::Session<float>& s = saved.session;
  if (s.kv_type() != wanted.kv_type)
    throw std::runtime_error(std::string("it was saved with --kv-type ") + kv_type_flag(s.kv_type()) +
                             ", this run has --kv-type " + kv_type_flag(wanted.kv_type));
  if (s.window().window != wanted.window.window || s.window().sinks != wanted.window.sinks)
    throw std::runtime_error("it was saved with " + window_text(s.window()) + ", this run has " +
                             window_text(wanted.window));
  if (s.window().window == 0 && s.max_tokens() < steps)
    throw std::runtime_error("its session holds at most " + std::to_string(s.max_tokens()) +
                             " tokens, this run needs " + std::to_string(steps));
  const std::vector<int>& t = saved.tokens;
  if (t.size() > prompt.size() || !std::equal(t.begin(), t.end(), prompt.begin()))
    throw std::runtime_error("its prompt of " + std::to_string(t.size()) +
                             " tokens is not the start of this prompt of " + std::to_string(prompt.size()));
  if (t.size() == prompt.size() && saved.last_logits.size() == 0)
    throw std::runtime_error("it holds this prompt but not the logits of its last token");
  return saved;
}

// SIGINT, SIGTERM and SIGHUP held back while the prompt cache is saved, and
// delivered once it is in place: the library's atomic write leaves no
// temporary file behind on its own where the system offers O_TMPFILE, except
// in the two system calls between linking a temporary name and renaming it,
// and on file systems without O_TMPFILE for the whole write. A signal that
// arrives then is noted by a handler (any thread may receive it) and raised
// again, with the program's previous action, after the save; so an
// interrupted run ends as it would have, a few milliseconds later, with the
// cache absent, as it was, or complete. SIGKILL cannot be held back by anyone.
volatile std::sig_atomic_t g_deferred_signal = 0;

extern "C" void note_signal(int signal) { g_deferred_signal = signal; }

class SignalsDeferred {
 public:
  SignalsDeferred() {
    struct sigaction note {};
    note.sa_handler = note_signal;
    note.sa_flags = SA_RESTART;
    sigemptyset(&note.sa_mask);
    for (std::size_t i = 0; i < kCount; ++i) sigaction(kSignals[i], &note, &previous_[i]);
  }
  ~SignalsDeferred() {
    for (std::size_t i = 0; i < kCount; ++i) sigaction(kSignals[i], &previous_[i], nullptr);
    if (g_deferred_signal != 0) std::raise(g_deferred_signal);
  }
  SignalsDeferred(const SignalsDeferred&) = delete;
  SignalsDeferred& operator=(const SignalsDeferred&) = delete;

 private:
  static constexpr std::size_t kCount = 3;
  static constexpr int kSignals[kCount] = {SIGINT, SIGTERM, SIGHUP};
  struct sigaction previous_[kCount] {};
};

// Prefills `prompt`, from the prompt cache at `path` when it fits, and
// (re)writes the cache when it did not. A cache that does not fit or cannot
// be written costs one line on stderr, never the run.
Prefilled prefill_with_prompt_cache(const kvcache::Decoder<float>& decoder, const kvcache::SessionOptions& options,
                                    const std::vector<int>& prompt, std::size_t steps, std::size_t threads,
                                    const std::string& path, PromptCacheResult& result) {
  std::optional<kvcache::SavedSession<float>> saved;
  kvcache::Workspace<float> workspace;
  std::error_code ec;
  if (std::filesystem::exists(path, ec) || ec) {
    try {
      saved.emplace(load_prompt_cache(path, decoder, options, prompt, steps));
    } catch (const std::exception& e) {
      std::cerr << kProgram << ": " << kvcache_cli::one_line("prompt cache " + path + " rejected: " + e.what())
                << "; ignoring it" << std::endl;
      result.status = "rejected";
    }
  }
  if (saved) {
    Prefilled p{std::move(saved->session), std::move(saved->last_logits)};
    p.session.set_threads(threads);
    result.status = "hit";
    result.reused = saved->tokens.size();
    if (result.reused < prompt.size()) {
      const std::vector<int> rest(prompt.begin() + static_cast<std::ptrdiff_t>(result.reused), prompt.end());
      p.logits = decoder.forward(rest, p.session, workspace, kvcache::Logits::last).row(0);
    }
    return p;
  }
  Prefilled p{decoder.new_session(options), {}};
  p.session.set_threads(threads);
  p.logits = decoder.forward(prompt, p.session, workspace, kvcache::Logits::last).row(0);
  try {
    const SignalsDeferred deferred;
    kvcache::save_session(path, decoder, p.session, prompt, p.logits);
  } catch (const std::exception& e) {
    std::cerr << kProgram << ": " << kvcache_cli::one_line("cannot save prompt cache " + path + ": " + e.what())
              << std::endl;
  }
  return p;
}

// ---- prompt lengths -----------------------------------------------------------
//
// A prompt that cannot fit the positions a run has is refused before it is
// encoded, so that memory and time are bounded by the work that will run,
// not by the size of the input: a token stands for at most the tokenizer's
// longest piece (max_token_length bytes; a byte-fallback token for one byte),
// so a text of b bytes encodes to at least 1 + ceil(b / max_token_length)
// tokens, BOS included. (The encoder's buffers are several times the text:
// a 255 MiB line once took 11.8 GB before its length was checked.)

// "only 16 positions are run (-n 16, seq_len 128)"
std::string positions_text(const kvcache_cli::Options& o, std::size_t steps, const kvcache::ModelConfig& config) {
  return "only " + std::to_string(steps) + " positions are run (-n " + std::to_string(o.steps) + ", seq_len " +
         std::to_string(config.max_seq_len) + ")";
}

// The bytes a token stands for at most.
std::size_t longest_token_bytes(const kvcache::Tokenizer& tokenizer) {
  return static_cast<std::size_t>(std::max(1, tokenizer.max_token_length()));
}

// The most bytes of text whose tokens (BOS first) can fit `steps` positions.
std::size_t max_prompt_bytes(const kvcache::Tokenizer& tokenizer, std::size_t steps) {
  // steps and max_token_length are at most INT_MAX: the product fits.
  return steps == 0 ? 0 : (steps - 1) * longest_token_bytes(tokenizer);
}

// Why `bytes` of text cannot fit: "at least N tokens (a token stands for at
// most L bytes), but only S positions are run (...)".
std::string too_many_bytes(const kvcache::Tokenizer& tokenizer, std::size_t bytes, const kvcache_cli::Options& o,
                           std::size_t steps, const kvcache::ModelConfig& config) {
  const std::size_t longest = longest_token_bytes(tokenizer);
  return "at least " + std::to_string(1 + bytes / longest + (bytes % longest != 0)) +
         " tokens (a token stands for at most " + std::to_string(longest) + " bytes), but " +
         positions_text(o, steps, config);
}

// -n beyond seq_len without a window runs seq_len positions, as run does;
// unlike run, this is said once the run is known to start.
void note_clamped_steps(const kvcache_cli::Options& o, const kvcache::ModelConfig& config, std::ostream& err) {
  if (o.window == 0 && o.steps > config.max_seq_len)
    err << kProgram << ": -n " << o.steps << " is more than the model's seq_len of " << config.max_seq_len
        << ": running " << config.max_seq_len << " positions" << std::endl;
}

// ---- --prompts-file -------------------------------------------------------------

// The most a --prompts-file may hold: the text of its lines is kept for the
// run, so a mistaken path (a pipe that never ends, a 50 GB file of short
// lines) must fail, not fill the memory. (/dev/zero is one endless line:
// refused once longer than a prompt can be.)
constexpr std::size_t kMaxPromptsFileBytes = std::size_t{1} << 28;

// Whether request `id` has left the scheduler (finished, cancelled or failed).
bool left(const kvcache::BatchScheduler<float>& scheduler, kvcache::RequestId id) {
  const kvcache::RequestStatus status = scheduler.status(id);
  return status != kvcache::RequestStatus::waiting && status != kvcache::RequestStatus::running;
}

// What a single run prints, echoed prompt first, on one line.
void print_output(const kvcache_cli::Options& o, const kvcache::Tokenizer& tokenizer, int bos, int end_id,
                  const std::vector<int>& prompt, const std::vector<int>& ids, std::ostream& out) {
  std::ostringstream line;
  Printer printer(o.print_ids, &tokenizer, line);
  const std::size_t first_echoed = !prompt.empty() && prompt.front() == bos ? 1 : 0;
  printer.set_previous(bos);
  for (std::size_t i = first_echoed; i < prompt.size(); ++i) printer.print(prompt[i]);
  for (const int id : ids) printer.print(id, /*stop=*/!o.ignore_eos && id == end_id);
  out << (o.print_ids ? line.str() : kvcache_cli::escape_line(line.str())) << '\n';
}

// --prompts-file: every line a prompt, generated by a kvcache::BatchScheduler
// that steps at most o.parallel of them at once (a finished one's place is
// taken by the next line at the next step); each output printed as one line
// once it and all before it are done, in the file's order. Prompt k (from 0)
// samples with seed + k.
//
// The file is read once, line by line, and checked whole before anything is
// printed: a line too long for the positions is refused after reading
// max_prompt_bytes + 1 of its bytes, the others are encoded one at a time to
// check their length, and only their text is kept (at most the file's size).
// The lines are encoded again as they are submitted (while fewer than
// o.parallel wait), and a prompt's tokens are dropped once its output is
// printed.
// `bos` starts every prompt (decides the first piece's leading space),
// `end_id` ends generation (llama2.c: BOS; GGUF: the file's EOS).
int run_prompts_file(const kvcache_cli::Options& o, const kvcache::Decoder<float>& decoder,
                     const kvcache::Tokenizer& tokenizer, int bos, int end_id, std::size_t steps, std::ostream& out,
                     std::ostream& err) {
  const std::string& path = *o.prompts_file;
  const kvcache::ModelConfig& config = decoder.config();
  std::error_code ignored;
  if (std::filesystem::is_directory(path, ignored))
    throw std::runtime_error("cannot read prompts file '" + path + "': it is a directory");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open prompts file '" + path + "'");
  const std::size_t max_bytes = max_prompt_bytes(tokenizer, steps);
  const auto too_long = [&](std::size_t line) {
    return "--prompts-file line " + std::to_string(line) + ": the prompt is more than " + std::to_string(max_bytes) +
           " bytes: " + too_many_bytes(tokenizer, max_bytes + 1, o, steps, config);
  };
  std::string text;  // the lines, each ended by '\n'
  std::size_t prompt_tokens = 0;
  const std::size_t n_prompts = kvcache_cli::read_prompt_lines(
      path, in, max_bytes, kMaxPromptsFileBytes, too_long, [&](std::size_t line, const std::string& prompt) {
        const std::size_t tokens = tokenizer.encode(prompt, /*bos=*/true, /*eos=*/false).size();
        if (tokens > steps)
          throw kvcache_cli::UsageError("--prompts-file line " + std::to_string(line) + ": the prompt has " +
                                        std::to_string(tokens) + " tokens but " + positions_text(o, steps, config));
        prompt_tokens += tokens;
        text += prompt;
        text += '\n';
      });
  in.close();
  note_clamped_steps(o, config, err);
  std::uint64_t seed = o.seed != 0 ? o.seed : static_cast<std::uint64_t>(std::time(nullptr));
  if (seed == 0) seed = 1;

  kvcache::SessionOptions session_options;
  session_options.reserve_tokens = steps;
  session_options.kv_type = o.kv_type;
  session_options.window = kvcache::SlidingWindow{o.window, o.sinks};
  kvcache::SchedulerOptions scheduler_options;
  scheduler_options.max_sequences = o.parallel;
  scheduler_options.threads = o.threads;
  scheduler_options.step_tokens = o.step_tokens;
  scheduler_options.session = session_options;
  // The prompts' sessions are paged in one pool, which finds the blocks that
  // a prompt shares with an earlier one (unless --no-prefix-sharing).
  kvcache::KVPoolOptions pool_options;
  pool_options.block_tokens = o.block_size;
  pool_options.prefix_sharing = o.prefix_sharing;
  scheduler_options.pool = decoder.make_pool(o.kv_type, pool_options);
  kvcache::BatchScheduler<float> scheduler(decoder, scheduler_options);
  std::size_t generated = 0;
  std::size_t next_line = 0;  // where the next prompt to submit starts in `text`
  std::size_t submitted = 0;  // prompt k is request k
  std::deque<std::vector<int>> unprinted;  // the prompts of requests [printed, submitted)
  const Clock::time_point start = Clock::now();
  for (std::size_t printed = 0; printed < n_prompts;) {
    // Requests wait at most o.parallel deep: the tokens of the whole file
    // are never held.
    for (; submitted < n_prompts && scheduler.waiting() < o.parallel; ++submitted) {
      const std::size_t end = text.find('\n', next_line);
      kvcache::Request request;
      request.prompt =
          tokenizer.encode(std::string_view(text).substr(next_line, end - next_line), /*bos=*/true, /*eos=*/false);
      next_line = end + 1;
      request.options.max_new_tokens = steps - request.prompt.size() + 1;
      if (!o.ignore_eos) request.options.end_token = end_id;
      request.options.temperature = o.temperature;
      request.options.top_p = o.top_p;
      request.options.seed = kvcache::sequence_seed(seed, submitted);
      unprinted.push_back(request.prompt);
      scheduler.submit(std::move(request));
    }
    scheduler.step();
    // Each output once it and every one before it are done, in the file's order.
    for (; printed < submitted && left(scheduler, printed); ++printed) {
      kvcache::RequestResult result = scheduler.take(printed);
      if (result.error) std::rethrow_exception(result.error);
      print_output(o, tokenizer, bos, end_id, unprinted.front(), result.ids, out);
      unprinted.pop_front();
      generated += result.ids.size();
      out.flush();
      if (!out) throw std::runtime_error("cannot write to stdout");
    }
  }
  if (o.stats) {
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    err << "stats: prompts=" << n_prompts << " prompt_tokens=" << prompt_tokens
        << " generated_tokens=" << generated << " tok_s=" << format_rate(static_cast<double>(generated), seconds)
        << " parallel=" << o.parallel << " threads=" << o.threads;
    const kvcache::KVPoolStats pool = scheduler_options.pool->stats();
    err << " block_size=" << o.block_size << " prefix_hit_tokens=" << pool.prefix_hit_tokens
        << " kv_bytes_peak=" << pool.bytes_peak << " kv_bytes_needed_peak=" << pool.bytes_needed_at_peak << std::endl;
  }
  return 0;
}

// The least weights worth a thread of their own: --threads' default gives a
// model at most one thread per this many bytes. A smaller share costs more
// in synchronisation than it saves: on 2 cores, the ~1 MB models decode
// 1.7x (aidreams260K: 10272 against 6006 tok/s) to 5.9x (stories260K: 5514
// against 941 tok/s, the machine shared) slower on 2 threads than on 1; a
// decode step meets a barrier a few times per layer (microseconds each),
// while reading 4 MiB of weights takes a core about 200 us.
constexpr std::size_t kWeightBytesPerThread = std::size_t{4} << 20;

// The model at o.model_path: a GGUF file (told by its first bytes, "GGUF")
// or a llama2.c checkpoint; with the ids that start a prompt and end the
// generation (llama2.c: BOS and BOS, as its `run`; GGUF: the file's BOS and
// EOS), and, for a GGUF file when text is needed, its tokenizer.
struct LoadedModel {
  kvcache::Decoder<float> decoder;
  int bos = kBos, end_token = kBos;
  std::optional<kvcache::Tokenizer> tokenizer;
};

LoadedModel load_model(const kvcache_cli::Options& o) {
  const kvcache::WeightType weight_type = o.weights == "bf16" ? kvcache::WeightType::bf16 : kvcache::WeightType::f32;
  if (!kvcache::is_gguf_file(o.model_path)) return {kvcache::load_llama2c(o.model_path, {}, weight_type), kBos, kBos, std::nullopt};
  const kvcache::GgufFile file = kvcache::GgufFile::open(o.model_path);
  // GGUF weights stay as the file stores them unless --weights bf16 asks.
  std::optional<kvcache::WeightType> convert;
  if (weight_type != kvcache::WeightType::f32) convert = weight_type;
  LoadedModel m{kvcache::load_gguf(file, {}, convert), kBos, kBos, std::nullopt};
  const std::size_t vocab = m.decoder.config().vocab_size;
  const auto id = [&](const char* key, std::uint64_t fallback) {
    const std::uint64_t v = file.get_uint(key).value_or(fallback);
    if (v >= vocab)
      throw std::runtime_error("kvcache: " + o.model_path + ": metadata key '" + key + "' = " + std::to_string(v) +
                               ", outside the vocabulary of " + std::to_string(vocab) + " tokens");
    return static_cast<int>(v);
  };
  m.bos = id("tokenizer.ggml.bos_token_id", 1);
  m.end_token = id("tokenizer.ggml.eos_token_id", 2);
  // The file's own vocabulary (-z is not read): llama.cpp's SentencePiece rules.
  if (o.needs_tokenizer()) {
    try {
      m.tokenizer.emplace(kvcache::read_gguf_vocab(file));
    } catch (const std::invalid_argument& e) {
      throw std::runtime_error("kvcache: " + o.model_path + ": the vocabulary: " + e.what());
    }
  }
  return m;
}

// "f32 1040128" or, for a file of several types, "q8_0+f16+f32 …": the
// types of the weight matrices and the bytes of all parameters.
std::string weights_text(const kvcache::Decoder<float>& d) {
  std::vector<std::string> types;
  const auto add = [&](const kvcache::WeightMatrix<float>& W) {
    const std::string t = kvcache::to_string(W.type());
    if (W.size() != 0 && std::find(types.begin(), types.end(), t) == types.end()) types.push_back(t);
  };
  add(d.token_embedding());
  for (std::size_t l = 0; l < d.config().n_layers; ++l)
    for (const auto* W : {&d.block(l).attention.W_Q, &d.block(l).attention.W_K, &d.block(l).attention.W_V,
                          &d.block(l).attention.W_O, &d.block(l).mlp.W_1, &d.block(l).mlp.W_2, &d.block(l).mlp.W_3})
      add(*W);
  add(d.lm_head());
  std::string text;
  for (const std::string& t : types) text += (text.empty() ? "" : "+") + t;
  return text + " weight_bytes=" + std::to_string(d.weight_bytes());
}

int run(int argc, char** argv, std::ostream& out, std::ostream& err) {
  kvcache_cli::Options o = kvcache_cli::parse_args(argc, argv);
  if (o.help) {
    out << kvcache_cli::usage(kProgram);
    return out ? 0 : 1;
  }

  // Before any work: a --prompt-cache path that exists must be a kvcache
  // session file, which a miss may replace; anything else (a text file, a
  // link, a directory, a device) is refused and left untouched.
  if (o.prompt_cache) {
    try {
      kvcache::check_session_replaceable(*o.prompt_cache);
    } catch (const std::runtime_error& e) {
      throw std::runtime_error(std::string("--prompt-cache: ") + e.what());
    }
  }

  LoadedModel model = load_model(o);
  const kvcache::Decoder<float>& decoder = model.decoder;
  const kvcache::ModelConfig& config = decoder.config();
  if (!o.threads_given)
    o.threads = std::min(o.threads, std::max<std::size_t>(1, decoder.weight_bytes() / kWeightBytesPerThread));

  // As run: 0, or more than the model can hold, means the model's seq_len.
  // A sliding window holds any number of positions.
  std::size_t steps = o.steps;
  if (steps == 0 || (steps > config.max_seq_len && o.window == 0)) steps = config.max_seq_len;
  if (o.window > config.max_seq_len)
    throw kvcache_cli::UsageError("--window " + std::to_string(o.window) + " is longer than the model's seq_len " +
                                  std::to_string(config.max_seq_len));

  std::optional<kvcache::Tokenizer> tokenizer;
  if (o.needs_tokenizer())
    tokenizer = model.tokenizer ? std::move(model.tokenizer) : kvcache::Tokenizer::load(o.tokenizer_path, config.vocab_size);
  if (o.prompts_file) return run_prompts_file(o, decoder, *tokenizer, model.bos, model.end_token, steps, out, err);

  std::vector<int> prompt;
  if (o.prompt_ids) {
    prompt = *o.prompt_ids;
    for (const int id : prompt)
      if (static_cast<std::size_t>(id) >= config.vocab_size)
        throw kvcache_cli::UsageError("--prompt-ids: id " + std::to_string(id) +
                                      " is outside the model's vocabulary [0, " + std::to_string(config.vocab_size) +
                                      ")");
  } else if (o.prompt && !o.prompt->empty()) {
    if (o.prompt->size() > max_prompt_bytes(*tokenizer, steps))
      throw kvcache_cli::UsageError("the prompt is " + std::to_string(o.prompt->size()) +
                                    " bytes: " + too_many_bytes(*tokenizer, o.prompt->size(), o, steps, config));
    prompt = tokenizer->encode(*o.prompt, /*bos=*/true, /*eos=*/false);
  } else {
    prompt = {model.bos};
  }
  if (prompt.size() > steps)
    throw kvcache_cli::UsageError("the prompt has " + std::to_string(prompt.size()) + " tokens but " +
                                  positions_text(o, steps, config));
  note_clamped_steps(o, config, err);

  // Echo the prompt as run does: every token after a leading BOS.
  Printer printer(o.print_ids, tokenizer ? &*tokenizer : nullptr, out);
  std::size_t first_echoed = 0;
  if (prompt.front() == model.bos) {
    printer.set_previous(model.bos);
    first_echoed = 1;
  }
  for (std::size_t i = first_echoed; i < prompt.size(); ++i) printer.print(prompt[i]);

  kvcache::GenerateOptions options;
  options.max_new_tokens = steps - prompt.size() + 1;
  if (!o.ignore_eos) options.end_token = model.end_token;
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
  PromptCacheResult prompt_cache;
  if (o.no_cache) {
    kvcache::generate_uncached(decoder, prompt, options, o.threads);
  } else {
    // Room for every position the run can need: decoding never reallocates.
    kvcache::SessionOptions session_options;
    session_options.reserve_tokens = steps;
    session_options.kv_type = o.kv_type;
    session_options.window = kvcache::SlidingWindow{o.window, o.sinks};
    if (o.prompt_cache) {
      Prefilled p =
          prefill_with_prompt_cache(decoder, session_options, prompt, steps, o.threads, *o.prompt_cache, prompt_cache);
      kvcache::decode(decoder, p.session, p.logits, options);
      kv_bytes = p.session.kv_bytes();
    } else {
      kvcache::Session<float> session = decoder.new_session(session_options);
      session.set_threads(o.threads);
      kvcache::generate(decoder, session, prompt, options);
      kv_bytes = session.kv_bytes();
    }
  }
  out << '\n';
  out.flush();
  if (!out) throw std::runtime_error("cannot write to stdout");

  if (o.stats) {
    const double prefill_s = std::chrono::duration<double>(first_token - start).count();
    const double decode_s = std::chrono::duration<double>(last_token - first_token).count();
    err << "stats: prompt_tokens=" << prompt.size() << " generated_tokens=" << generated
        << " prefill_tok_s=" << format_rate(static_cast<double>(prompt.size()), prefill_s)
        << " decode_tok_s=" << (generated > 1 ? format_rate(static_cast<double>(generated - 1), decode_s) : "n/a")
        << " kv_bytes=" << kv_bytes << " threads=" << o.threads << " weights=" << weights_text(decoder);
    if (o.prompt_cache)
      err << " prompt_cache=" << prompt_cache.status << " reused_tokens=" << prompt_cache.reused;
    err << std::endl;
  }
  return 0;
}

}  // namespace

namespace kvcache_cli {

// kvcache-generate with `argv` (argv[0] is the program's name): the output on
// `out`, the messages on `err`, and the exit code returned: 0, or 1 after one
// line on `err` naming the problem. Never calls exit().
inline int run_generate(int argc, char** argv, std::ostream& out, std::ostream& err) {
  try {
    return run(argc, argv, out, err);
  } catch (const kvcache_cli::UsageError& e) {
    out.flush();
    err << kProgram << ": " << kvcache_cli::one_line(e.what()) << " (see " << kProgram << " --help)" << std::endl;
  } catch (const std::exception& e) {
    out.flush();
    err << kProgram << ": " << kvcache_cli::one_line(e.what()) << std::endl;
  } catch (...) {
    out.flush();
    err << kProgram << ": unknown error" << std::endl;
  }
  return 1;
}

}  // namespace kvcache_cli
