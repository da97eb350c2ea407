// examples/cli_args.hpp — the command line of kvcache-generate, parsed without
// touching any file, so that tests (and fuzzers) can call it directly.
//
//   kvcache-generate MODEL.bin [options]
//
// The options of llama2.c's `run` (-z -i -n -t -p -s) with the same defaults
// and meanings, plus --prompt-ids, --ids, --threads, --weights, --no-cache,
// --ignore-eos, --stats, the cache's --kv-type, --window and --sinks,
// --prompt-cache, batches (--prompts-file, --parallel), and -h/--help.
// Every malformed argument throws
// UsageError with a one-line message; checks that need the model (ids within
// the vocabulary, prompt length against steps) happen after loading it.
#pragma once

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <istream>
#include <limits>
#include <optional>
#include <stdexcept>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#include <kvcache/kv_cache.hpp>   // KVType
#include <kvcache/scheduler.hpp>  // SchedulerOptions

namespace kvcache_cli {

// A bad command line; what() is the one-line problem.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The largest --threads accepted: more threads than that only add overhead
// (and an absurd count would ask OpenMP for thousands of threads).
constexpr std::size_t kMaxThreads = 256;
// The largest --parallel accepted: a batch's buffers grow with it.
constexpr std::size_t kMaxParallel = 1024;
// The largest --step-tokens accepted: a step's buffers grow with it.
constexpr std::size_t kMaxStepTokens = 65536;
// The largest --block-size accepted: a block holds that many tokens of
// every layer, and a prompt shorter than one block shares nothing.
constexpr std::size_t kMaxBlockSize = 4096;

// The --threads default: the first count of OMP_NUM_THREADS when it holds
// one (the usual way to ask an OpenMP program for fewer threads; "4,2"
// gives 4), else the cores this process may run on; at most kMaxThreads.
// The output does not depend on it: decoding is bit-identical across thread
// counts.
inline std::size_t default_threads(const char* omp_num_threads, unsigned available_cores) {
  if (omp_num_threads != nullptr) {
    std::string first(omp_num_threads);
    first = first.substr(0, first.find(','));
    const std::size_t begin = first.find_first_not_of(" \t"), end = first.find_last_not_of(" \t");
    first = begin == std::string::npos ? "" : first.substr(begin, end - begin + 1);
    if (!first.empty() && first.find_first_not_of("0123456789") == std::string::npos) {
      std::size_t count = 0;
      for (const char c : first) count = std::min<std::size_t>(count * 10 + static_cast<std::size_t>(c - '0'), kMaxThreads);
      if (count >= 1) return count;
    }
  }
  return std::clamp<std::size_t>(available_cores, 1, kMaxThreads);
}

// The cores this process may run on (its CPU affinity, which taskset and
// containers narrow), else std::thread::hardware_concurrency().
inline unsigned available_cores() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return static_cast<unsigned>(CPU_COUNT(&set));
#endif
  return std::thread::hardware_concurrency();
}

inline std::size_t default_threads() { return default_threads(std::getenv("OMP_NUM_THREADS"), available_cores()); }

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
  // --threads; when not given (threads_given false), parse_args sets
  // default_threads() and the program lowers it for a small model.
  std::size_t threads = 1;
  bool threads_given = false;
  std::string weights = "f32";  // --weights: how the weight matrices are stored, "f32" or "bf16"
  bool print_ids = false;    // --ids: print token ids instead of text
  bool no_cache = false;     // --no-cache: recompute the sequence every step
  bool ignore_eos = false;   // --ignore-eos: do not stop when BOS is produced
  bool stats = false;        // --stats: one line of timings on stderr
  bool help = false;         // -h, --help
  // --kv-type: what the cache stores keys and values as.
  kvcache::KVType kv_type = kvcache::KVType::full;
  std::size_t window = 0;  // --window: a sliding window of this many tokens (0: none)
  std::size_t sinks = 0;   // --sinks: tokens the window keeps for ever
  // --prompt-cache: a session file holding the state after a prompt, reused
  // when this run's prompt starts with that prompt, (re)written otherwise.
  std::optional<std::string> prompt_cache;
  // --prompts-file: one text prompt per line, at most --parallel generated
  // at once; outputs one line each, in the file's order.
  std::optional<std::string> prompts_file;
  std::size_t parallel = 1;  // --parallel
  // --step-tokens: the rows of a batched step (one per decoding prompt, the
  // rest chunks of the prompts being prefilled).
  std::size_t step_tokens = kvcache::SchedulerOptions{}.step_tokens;
  // --block-size: tokens per block of the KV pool the prompts' sessions
  // share; --no-prefix-sharing: they share no prompt blocks (the baseline).
  std::size_t block_size = kvcache::KVPoolOptions{}.block_tokens;
  bool prefix_sharing = true;

  // Text is needed to encode a non-empty -i prompt (without --prompt-ids) or
  // the lines of --prompts-file, or to print pieces (without --ids);
  // otherwise no tokenizer is read.
  bool needs_tokenizer() const {
    const bool encode = prompts_file || (!prompt_ids && prompt && !prompt->empty());
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
         "; default: OMP_NUM_THREADS\n"
         "                 when set, else the cores this process may use, at most one\n"
         "                 per 4 MiB of weights; the output is the same with any N\n"
         "  --weights TYPE store the weight matrices as f32 (default) or bf16:\n"
         "                 bfloat16, rounded to nearest even when loading; half the\n"
         "                 memory and the bytes each token reads, products in float32\n"
         "  --no-cache     recompute the whole sequence at every step (same output,\n"
         "                 slower: the baseline the cache is measured against)\n"
         "  --ignore-eos   do not stop when the model produces BOS (id 1)\n"
         "  --stats        print one line of statistics on stderr at the end\n"
         "Cache options:\n"
         "  --kv-type TYPE store keys and values as f32 (default), bf16 or int8 (one\n"
         "                 byte per value plus a byte of scale per token and head)\n"
         "  --window W     keep only W tokens: the first S (--sinks) and the newest\n"
         "                 W - S; generation may then go past seq_len (-n counts\n"
         "                 positions as usual; 0 means seq_len). W <= seq_len.\n"
         "  --sinks S      tokens the window keeps from the start, S < W (default 0)\n"
         "  --prompt-cache FILE  reuse the prompt's prefill: when FILE holds the state\n"
         "                 after a prompt this prompt starts with (same model and cache\n"
         "                 options), load it and prefill only the rest; otherwise\n"
         "                 prefill as usual and save the prompt's state to FILE. A\n"
         "                 session file that does not fit (other prompt, model or\n"
         "                 options, damaged) is reported on stderr and replaced; a FILE\n"
         "                 that exists and is not a kvcache session file (another\n"
         "                 file, a link, a directory, a device) is refused (exit 1)\n"
         "                 and left untouched\n"
         "Batches:\n"
         "  --prompts-file FILE  one text prompt per line (encoded as -i, BOS first; no\n"
         "                 empty lines); prints one output line per prompt, in the\n"
         "                 file's order: what a run with -i prints, with newlines\n"
         "                 written as \\n and backslashes as \\\\ (--ids: the ids).\n"
         "                 -n, -t, -p, --ignore-eos and the cache options apply to each\n"
         "                 prompt; line k samples with seed + k - 1, so line 1 is\n"
         "                 what -s SEED -i LINE gives\n"
         "  --parallel N   the most prompts generated at once, one forward per step\n"
         "                 for all of them; a finished prompt's place goes to the\n"
         "                 next line, 1.." +
         std::to_string(kMaxParallel) +
         " (default 1)\n"
         "  --step-tokens T  tokens a step feeds: one per prompt decoding, the rest\n"
         "                 chunks of the prompts being read, 1.." +
         std::to_string(kMaxStepTokens) + " (default " + std::to_string(kvcache::SchedulerOptions{}.step_tokens) +
         ")\n"
         "  --block-size B tokens per block of the KV pool the prompts share, 1.." +
         std::to_string(kMaxBlockSize) + " (default " + std::to_string(kvcache::KVPoolOptions{}.block_tokens) +
         ")\n"
         "  --no-prefix-sharing  compute every prompt in full, even the blocks it\n"
         "                 shares with an earlier one (the baseline)\n"
         "  -h, --help     print this help and exit\n"
         "\n"
         "Generation stops after STEPS positions or when the model produces BOS.\n"
         "Text goes to stdout as it is generated; messages go to stderr.\n";
}

// `text` with its control characters escaped (\n, \r, \t, \xNN for the
// others), so that a message quoting a file name or an argument stays on one
// line whatever they hold.
inline std::string one_line(const std::string& text) {
  static const char* const kHex = "0123456789abcdef";
  std::string out;
  out.reserve(text.size());
  for (const char c : text) {
    const auto byte = static_cast<unsigned char>(c);
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (byte < 0x20 || byte == 0x7F) {
      out += std::string("\\x") + kHex[byte >> 4] + kHex[byte & 15];
    } else {
      out += c;
    }
  }
  return out;
}

namespace detail {

inline std::string quoted(const std::string& s) { return "'" + one_line(s) + "'"; }

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

// "1,368,430", "1 368 430" or "1, 368, 430" → {1, 368, 430}: ids separated
// by commas, by blanks (spaces, tabs) or both. Each id is a non-negative
// decimal integer that fits an int (digits only: no sign, no 0x); every
// comma-separated field holds at least one id, so "1,,2", ",1", "1," and
// "1, ,2" are malformed. Whether the ids are in the vocabulary is checked
// once the model is loaded.
inline std::vector<int> parse_id_list(const std::string& flag, const std::string& text) {
  if (text.find_first_not_of(" \t") == std::string::npos)
    throw UsageError(flag + " needs at least one token id, got " + detail::quoted(text));
  const auto is_blank = [](char c) { return c == ' ' || c == '\t'; };
  std::vector<int> ids;
  for (std::size_t start = 0, field = 1;; ++field) {
    const std::size_t end = std::min(text.find(',', start), text.size());
    bool empty = true;
    for (std::size_t i = start; i < end;) {
      if (is_blank(text[i])) {
        ++i;
        continue;
      }
      std::size_t j = i;
      while (j < end && !is_blank(text[j])) ++j;
      ids.push_back(static_cast<int>(detail::parse_unsigned(flag, text.substr(i, j - i),
                                                            static_cast<std::uint64_t>(std::numeric_limits<int>::max()),
                                                            "token ids (non-negative integers)")));
      empty = false;
      i = j;
    }
    if (empty)
      throw UsageError(flag + ": field " + std::to_string(field) + " of " + detail::quoted(text) +
                       " is empty (ids are separated by commas or blanks)");
    if (end == text.size()) return ids;
    start = end + 1;
  }
}

// Parses the arguments after the program name. Throws UsageError.
inline Options parse_args(const std::vector<std::string>& args) {
  Options o;
  for (const auto& a : args)
    if (a == "-h" || a == "--help") {
      o.help = true;
      return o;
    }
  o.threads = default_threads();
  bool have_model = false;
  std::string batch_option;  // the last of --parallel, --step-tokens, --block-size, --no-prefix-sharing given
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    const auto value = [&]() -> const std::string& {
      if (i + 1 >= args.size()) throw UsageError("option " + a + " needs a value");
      return args[++i];
    };
    // The option's value, a count in [1, most].
    const auto count = [&](std::size_t most) {
      const std::string& text = value();
      const auto n = static_cast<std::size_t>(detail::parse_unsigned(a, text, std::numeric_limits<std::uint32_t>::max()));
      if (n < 1 || n > most)
        throw UsageError(a + " must be in [1, " + std::to_string(most) + "], got " + detail::quoted(text));
      return n;
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
      o.threads = count(kMaxThreads);
      o.threads_given = true;
    } else if (a == "--kv-type") {
      const std::string& text = value();
      if (text == "f32")
        o.kv_type = kvcache::KVType::full;
      else if (text == "bf16")
        o.kv_type = kvcache::KVType::bf16;
      else if (text == "int8")
        o.kv_type = kvcache::KVType::int8;
      else
        throw UsageError("--kv-type must be f32, bf16 or int8, got " + detail::quoted(text));
    } else if (a == "--window") {
      o.window = static_cast<std::size_t>(
          detail::parse_unsigned(a, value(), static_cast<std::uint64_t>(std::numeric_limits<int>::max())));
      if (o.window == 0) throw UsageError("--window must be at least 1, got '0'");
    } else if (a == "--sinks") {
      o.sinks = static_cast<std::size_t>(
          detail::parse_unsigned(a, value(), static_cast<std::uint64_t>(std::numeric_limits<int>::max())));
    } else if (a == "--prompt-cache") {
      o.prompt_cache = value();
      if (o.prompt_cache->empty()) throw UsageError("--prompt-cache needs a file name, got ''");
    } else if (a == "--prompts-file") {
      o.prompts_file = value();
      if (o.prompts_file->empty()) throw UsageError("--prompts-file needs a file name, got ''");
    } else if (a == "--parallel") {
      o.parallel = count(kMaxParallel);
      batch_option = a;
    } else if (a == "--step-tokens") {
      o.step_tokens = count(kMaxStepTokens);
      batch_option = a;
    } else if (a == "--block-size") {
      o.block_size = count(kMaxBlockSize);
      batch_option = a;
    } else if (a == "--no-prefix-sharing") {
      o.prefix_sharing = false;
      batch_option = a;
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
  if (o.sinks != 0 && o.window == 0) throw UsageError("--sinks needs --window");
  if (o.window != 0 && o.sinks >= o.window)
    throw UsageError("--sinks must be less than --window, got " + std::to_string(o.sinks) + " sinks for a window of " +
                     std::to_string(o.window));
  if (o.no_cache && (o.window != 0 || o.kv_type != kvcache::KVType::full))
    throw UsageError("--no-cache keeps no cache: it cannot take --window or --kv-type");
  if (o.no_cache && o.prompt_cache) throw UsageError("--no-cache keeps no cache: it cannot take --prompt-cache");
  if (!batch_option.empty() && !o.prompts_file) throw UsageError(batch_option + " needs --prompts-file");
  if (o.prompts_file && (o.prompt || o.prompt_ids))
    throw UsageError("--prompts-file gives the prompts: it cannot take -i or --prompt-ids");
  if (o.prompts_file && o.no_cache)
    throw UsageError("--prompts-file decodes with the cache: it cannot take --no-cache");
  if (o.prompts_file && o.prompt_cache)
    throw UsageError("--prompts-file runs many prompts: it cannot take --prompt-cache");
  return o;
}

// Reads the prompts of a --prompts-file from `in`, one line at a time: a
// final newline ends the last line, and a trailing carriage return is dropped
// (files written on Windows). Each line is handed to on_line(number, line),
// numbered from 1, as soon as it is whole; only the line being read is held.
// A line longer than `max_line_bytes` is refused as soon as that is known,
// without reading the rest of it: UsageError(too_long(number)). Throws
// UsageError, naming `file_name` and the line, on an empty line or when there
// is no line at all, and std::runtime_error when `in` fails or holds more
// than `max_file_bytes`. Returns the number of lines.
template <typename TooLong, typename OnLine>
std::size_t read_prompt_lines(const std::string& file_name, std::istream& in, std::size_t max_line_bytes,
                              std::size_t max_file_bytes, TooLong&& too_long, OnLine&& on_line) {
  std::string line;
  std::size_t number = 0, total = 0;
  const auto finish = [&] {
    ++number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty())
      throw UsageError("--prompts-file " + detail::quoted(file_name) + ": line " + std::to_string(number) +
                       " is empty (one prompt per line)");
    if (line.size() > max_line_bytes) throw UsageError(too_long(number));
    on_line(number, static_cast<const std::string&>(line));
    line.clear();
  };
  std::vector<char> buffer(std::size_t{1} << 16);
  while (in) {
    in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    const auto got = static_cast<std::size_t>(in.gcount());
    total += got;
    if (total > max_file_bytes)
      throw std::runtime_error("prompts file " + detail::quoted(file_name) + " is larger than " +
                               std::to_string(max_file_bytes) + " bytes");
    for (std::size_t i = 0; i < got;) {
      const void* newline = std::memchr(buffer.data() + i, '\n', got - i);
      const std::size_t end = newline != nullptr ? static_cast<std::size_t>(static_cast<const char*>(newline) - buffer.data()) : got;
      line.append(buffer.data() + i, end - i);
      // One byte more than the limit may be the '\r' that finish() drops.
      if (line.size() > max_line_bytes && line.size() - max_line_bytes > 1) throw UsageError(too_long(number + 1));
      if (newline == nullptr) break;
      finish();
      i = end + 1;
    }
  }
  if (in.bad()) throw std::runtime_error("cannot read prompts file " + detail::quoted(file_name));
  if (!line.empty()) finish();
  if (number == 0) throw UsageError("--prompts-file " + detail::quoted(file_name) + " has no prompts");
  return number;
}

// The prompts of a --prompts-file whose text is `content`, one per line, as
// read_prompt_lines reads them (with no limit). Throws UsageError, naming
// `file_name` and the line, on an empty line, or when there is no line at
// all.
inline std::vector<std::string> parse_prompt_lines(const std::string& file_name, const std::string& content) {
  std::vector<std::string> lines;
  std::istringstream in(content);
  const std::size_t unlimited = std::numeric_limits<std::size_t>::max();
  read_prompt_lines(
      file_name, in, unlimited, unlimited, [](std::size_t) { return std::string(); },
      [&](std::size_t, const std::string& line) { lines.push_back(line); });
  return lines;
}

// A line of output for a --prompts-file prompt: newlines become \n and
// backslashes \\, so that each output stays on one line.
inline std::string escape_line(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (const char c : text) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out;
}

inline Options parse_args(int argc, const char* const argv[]) {
  std::vector<std::string> args;
  for (int i = 1; i < argc; ++i) args.emplace_back(argv[i] != nullptr ? argv[i] : "");
  return parse_args(args);
}

}  // namespace kvcache_cli
