// examples/cli_args.hpp — the command line of kvcache-generate, parsed without
// touching any file, so that tests (and fuzzers) can call it directly.
//
//   kvcache-generate MODEL.bin [options]
//
// The options of llama2.c's `run` (-z -i -n -t -p -s) with the same defaults
// and meanings, plus --prompt-ids, --ids, --threads, --weights, --no-cache,
// --ignore-eos, --stats and -h/--help. Every malformed argument throws
// UsageError with a one-line message; checks that need the model (ids within
// the vocabulary, prompt length against steps) happen after loading it.
#pragma once

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace kvcache_cli {

// A bad command line; what() is the one-line problem.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The largest --threads accepted: more threads than that only add overhead
// (and an absurd count would ask OpenMP for thousands of threads).
constexpr std::size_t kMaxThreads = 256;

struct Options {
  std::string model_path;                        // the one positional argument
  std::string tokenizer_path = "tokenizer.bin";  // -z
  std::optional<std::string> prompt;             // -i: text, encoded with BOS first
  // --prompt-ids: the exact ids fed to the model, BOS included when wanted
  // (run's prompts always start with BOS 1); overrides -i.
  std::optional<std::vector<int>> prompt_ids;
  std::size_t steps = 256;   // -n: total positions, prompt included; 0 = seq_len
  float temperature = 1.0f;  // -t: 0 = greedy
  float top_p = 0.9f;        // -p: nucleus sampling threshold in [0, 1]
  std::uint64_t seed = 0;    // -s: 0 = seconds since the epoch, as run does
  std::size_t threads = 1;   // --threads
  std::string weights = "f32";  // --weights: how the weight matrices are stored, "f32" or "bf16"
  bool print_ids = false;    // --ids: print token ids instead of text
  bool no_cache = false;     // --no-cache: recompute the sequence every step
  bool ignore_eos = false;   // --ignore-eos: do not stop when BOS is produced
  bool stats = false;        // --stats: one line of timings on stderr
  bool help = false;         // -h, --help

  // Text is needed to encode a non-empty -i prompt (without --prompt-ids) or
  // to print pieces (without --ids); otherwise no tokenizer is read.
  bool needs_tokenizer() const {
    const bool encode = !prompt_ids && prompt && !prompt->empty();
    return encode || !print_ids;
  }
};

inline std::string usage(const std::string& program = "kvcache-generate") {
  return "Usage: " + program +
         " MODEL.bin [options]\n"
         "Generates text with a llama2.c checkpoint, using a KV cache.\n"
         "\n"
         "Options (as llama2.c's run):\n"
         "  -z PATH        tokenizer file (default tokenizer.bin)\n"
         "  -i TEXT        prompt text; BOS (id 1) is put first (default: BOS only)\n"
         "  -n STEPS       positions to run, prompt included (default 256; 0 or more\n"
         "                 than the model's seq_len means seq_len)\n"
         "  -t TEMP        temperature, >= 0; 0 is greedy (default 1.0)\n"
         "  -p TOPP        top-p (nucleus) threshold in [0, 1] (default 0.9)\n"
         "  -s SEED        random seed, a non-negative integer (default 0: the current\n"
         "                 time in seconds)\n"
         "Further options:\n"
         "  --prompt-ids IDS  the prompt as token ids separated by commas or spaces,\n"
         "                 e.g. 1,368,430 (fed as given: put BOS 1 first to match -i);\n"
         "                 overrides -i\n"
         "  --ids          print token ids (those after a leading BOS: prompt, then\n"
         "                 generated, including a final stopping BOS) instead of text;\n"
         "                 no tokenizer is needed with --prompt-ids\n"
         "  --threads N    threads per forward pass, 1.." +
         std::to_string(kMaxThreads) +
         " (default 1)\n"
         "  --weights TYPE store the weight matrices as f32 (default) or bf16:\n"
         "                 bfloat16, rounded to nearest even when loading; half the\n"
         "                 memory and the bytes each token reads, products in float32\n"
         "  --no-cache     recompute the whole sequence at every step (same output,\n"
         "                 slower: the baseline the cache is measured against)\n"
         "  --ignore-eos   do not stop when the model produces BOS (id 1)\n"
         "  --stats        print one line of statistics on stderr at the end\n"
         "  -h, --help     print this help and exit\n"
         "\n"
         "Generation stops after STEPS positions or when the model produces BOS.\n"
         "Text goes to stdout as it is generated; messages go to stderr.\n";
}

namespace detail {

inline std::string quoted(const std::string& s) { return "'" + s + "'"; }

// A non-negative decimal integer, digits only, at most `max`.
inline std::uint64_t parse_unsigned(const std::string& flag, const std::string& text, std::uint64_t max,
                                    const char* what = "a non-negative integer") {
  if (text.empty() || text.find_first_not_of("0123456789") != std::string::npos)
    throw UsageError(flag + " needs " + what + ", got " + quoted(text));
  std::uint64_t value = 0;
  for (const char c : text) {
    const auto digit = static_cast<std::uint64_t>(c - '0');
    if (value > (max - digit) / 10)
      throw UsageError(flag + " value " + quoted(text) + " is too large (max " + std::to_string(max) + ")");
    value = value * 10 + digit;
  }
  return value;
}

// A finite decimal number (as strtod reads it in the C locale), nothing else.
inline float parse_float(const std::string& flag, const std::string& text) {
  const auto bad = [&] { return UsageError(flag + " needs a number, got " + quoted(text)); };
  if (text.empty() || std::isspace(static_cast<unsigned char>(text.front()))) throw bad();
  errno = 0;
  char* end = nullptr;
  const double value = std::strtod(text.c_str(), &end);
  if (end != text.c_str() + text.size()) throw bad();
  if (errno == ERANGE || !std::isfinite(value) || std::fabs(value) > std::numeric_limits<float>::max())
    throw UsageError(flag + " value " + quoted(text) + " is out of range");
  return static_cast<float>(value);
}

}  // namespace detail

// "1,368,430" or "1 368 430" → {1, 368, 430}. Ids must be non-negative
// integers that fit an int; whether they are in the vocabulary is checked
// once the model is loaded.
inline std::vector<int> parse_id_list(const std::string& flag, const std::string& text) {
  std::vector<int> ids;
  std::size_t i = 0;
  const auto is_separator = [](char c) { return c == ',' || c == ' ' || c == '\t'; };
  while (i < text.size()) {
    if (is_separator(text[i])) {
      ++i;
      continue;
    }
    std::size_t j = i;
    while (j < text.size() && !is_separator(text[j])) ++j;
    const std::string item = text.substr(i, j - i);
    ids.push_back(static_cast<int>(detail::parse_unsigned(
        flag, item, static_cast<std::uint64_t>(std::numeric_limits<int>::max()), "token ids (non-negative integers)")));
    i = j;
  }
  if (ids.empty()) throw UsageError(flag + " needs at least one token id, got " + detail::quoted(text));
  return ids;
}

// Parses the arguments after the program name. Throws UsageError.
inline Options parse_args(const std::vector<std::string>& args) {
  Options o;
  for (const auto& a : args)
    if (a == "-h" || a == "--help") {
      o.help = true;
      return o;
    }
  bool have_model = false;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    const auto value = [&]() -> const std::string& {
      if (i + 1 >= args.size()) throw UsageError("option " + a + " needs a value");
      return args[++i];
    };
    if (a == "-z") {
      o.tokenizer_path = value();
      if (o.tokenizer_path.empty()) throw UsageError("-z needs a file name, got ''");
    } else if (a == "-i") {
      o.prompt = value();
    } else if (a == "-n") {
      o.steps = static_cast<std::size_t>(
          detail::parse_unsigned(a, value(), static_cast<std::uint64_t>(std::numeric_limits<int>::max())));
    } else if (a == "-t") {
      const std::string& text = value();
      o.temperature = detail::parse_float(a, text);
      if (o.temperature < 0.0f) throw UsageError("-t must be >= 0, got " + detail::quoted(text));
    } else if (a == "-p") {
      const std::string& text = value();
      o.top_p = detail::parse_float(a, text);
      if (!(o.top_p >= 0.0f && o.top_p <= 1.0f)) throw UsageError("-p must be in [0, 1], got " + detail::quoted(text));
    } else if (a == "-s") {
      o.seed = detail::parse_unsigned(a, value(), std::numeric_limits<std::uint64_t>::max());
    } else if (a == "--prompt-ids") {
      o.prompt_ids = parse_id_list(a, value());
    } else if (a == "--threads") {
      const std::string& text = value();
      o.threads = static_cast<std::size_t>(detail::parse_unsigned(a, text, std::numeric_limits<std::uint32_t>::max()));
      if (o.threads < 1 || o.threads > kMaxThreads)
        throw UsageError("--threads must be in [1, " + std::to_string(kMaxThreads) + "], got " + detail::quoted(text));
    } else if (a == "--weights") {
      o.weights = value();
      if (o.weights != "f32" && o.weights != "bf16")
        throw UsageError("--weights must be f32 or bf16, got " + detail::quoted(o.weights));
    } else if (a == "--ids") {
      o.print_ids = true;
    } else if (a == "--no-cache") {
      o.no_cache = true;
    } else if (a == "--ignore-eos") {
      o.ignore_eos = true;
    } else if (a == "--stats") {
      o.stats = true;
    } else if (!a.empty() && a[0] == '-') {
      throw UsageError("unknown option " + detail::quoted(a));
    } else if (!have_model) {
      if (a.empty()) throw UsageError("the model file name is empty");
      o.model_path = a;
      have_model = true;
    } else {
      throw UsageError("unexpected argument " + detail::quoted(a) + " (the model is already " +
                       detail::quoted(o.model_path) + ")");
    }
  }
  if (!have_model) throw UsageError("no model file given");
  return o;
}

inline Options parse_args(int argc, const char* const argv[]) {
  std::vector<std::string> args;
  for (int i = 1; i < argc; ++i) args.emplace_back(argv[i] != nullptr ? argv[i] : "");
  return parse_args(args);
}

}  // namespace kvcache_cli
