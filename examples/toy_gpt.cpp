// toy-gpt — what a KV cache buys, on a small GPT with seeded random weights.
//
// The model (learned positions, LayerNorm, GELU MLP, untied LM head) reads and
// writes the 95 printable ASCII characters, one token per character. The
// program encodes a prompt, generates greedily twice — with the cache
// (kvcache::generate: one prefill, then one token per step) and without it
// (kvcache::generate_uncached: the whole sequence again at every step) — checks
// that both produce the same tokens, and prints the speed of each and the
// memory the cache holds.
//
// The weights are random, so the text is noise; what matters is the timing.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <iostream>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include <Eigen/Core>

#include <kvcache/kvcache.hpp>

namespace {

// ============================================================================
// Vocabulary: id i <-> the character ' ' + i, for ' ' (32) .. '~' (126)
// ============================================================================

constexpr char first_char = ' ';
constexpr char last_char = '~';
constexpr std::size_t vocab_size = static_cast<std::size_t>(last_char - first_char + 1);  // 95

std::vector<int> encode(const std::string& text) {
  std::vector<int> ids;
  ids.reserve(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (c < first_char || c > last_char)
      throw std::invalid_argument("the prompt has a character outside printable ASCII (byte " +
                                  std::to_string(static_cast<unsigned char>(c)) + " at index " + std::to_string(i) +
                                  "); the vocabulary is ' ' .. '~'");
    ids.push_back(c - first_char);
  }
  return ids;
}

std::string decode(const std::vector<int>& ids) {
  std::string text;
  text.reserve(ids.size());
  for (int id : ids) text.push_back(static_cast<char>(first_char + id));
  return text;
}

// ============================================================================
// Command line
// ============================================================================

struct Options {
  std::string prompt = "Once upon a time, a small model";
  std::size_t tokens = 300;
  std::size_t layers = 4;
  std::size_t d_model = 128;
  std::size_t heads = 4;
  std::size_t kv_heads = 0;  // 0: same as heads
  std::size_t seq_len = 1024;
  std::uint64_t seed = 42;
  std::size_t threads = 1;
};

// Largest value any size flag accepts; the memory check below is the real
// limit, this one only keeps the arithmetic far from overflow.
constexpr std::uint64_t max_size_flag = 1000000;

void print_help(std::ostream& out) {
  const Options d;
  out << "Usage: toy-gpt [options]\n"
         "\n"
         "Generates text greedily with a small GPT that has seeded random weights,\n"
         "once with the KV cache and once without, and compares their speed.\n"
         "\n"
         "Options (each takes a value, given as '--flag value' or '--flag=value'):\n"
         "  --prompt TEXT   prompt, printable ASCII only     (default \""
      << d.prompt
      << "\")\n"
         "  --tokens N      tokens to generate               (default "
      << d.tokens
      << ")\n"
         "  --layers N      transformer blocks               (default "
      << d.layers
      << ")\n"
         "  --d-model N     model width                      (default "
      << d.d_model
      << ")\n"
         "  --heads N       query heads; must divide d-model (default "
      << d.heads
      << ")\n"
         "  --kv-heads N    key/value heads; must divide heads (default: same as heads)\n"
         "  --seq-len N     context length, max_seq_len      (default "
      << d.seq_len
      << ")\n"
         "  --seed N        seed of the random weights       (default "
      << d.seed
      << ")\n"
         "  --threads N     threads per forward pass         (default "
      << d.threads
      << ")\n"
         "  --help          print this and exit\n";
}

// A whole non-negative decimal number, nothing else ("12", not "12x" or "-1").
std::uint64_t parse_number(const std::string& flag, const std::string& text, std::uint64_t max) {
  if (text.empty()) throw std::invalid_argument(flag + " needs a number, got an empty value");
  std::uint64_t value = 0;
  for (char c : text) {
    if (c < '0' || c > '9') throw std::invalid_argument(flag + " needs a non-negative integer, got '" + text + "'");
    const auto digit = static_cast<std::uint64_t>(c - '0');
    if (value > (max - digit) / 10)
      throw std::invalid_argument(flag + " = " + text + " is too large (at most " + std::to_string(max) + ")");
    value = value * 10 + digit;
  }
  return value;
}

Options parse_args(int argc, char** argv, bool& help) {
  Options o;
  help = false;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      help = true;
      return o;
    }
    std::string value;
    const auto eq = flag.find('=');
    if (flag.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = flag.substr(eq + 1);
      flag.resize(eq);
    } else {
      const bool known = flag == "--prompt" || flag == "--tokens" || flag == "--layers" || flag == "--d-model" ||
                         flag == "--heads" || flag == "--kv-heads" || flag == "--seq-len" || flag == "--seed" ||
                         flag == "--threads";
      if (!known) throw std::invalid_argument("unknown argument '" + flag + "' (try --help)");
      if (i + 1 >= argc) throw std::invalid_argument(flag + " needs a value");
      value = argv[++i];
    }
    auto size = [&](std::size_t& field) {
      field = static_cast<std::size_t>(parse_number(flag, value, max_size_flag));
    };
    if (flag == "--prompt") o.prompt = value;
    else if (flag == "--tokens") size(o.tokens);
    else if (flag == "--layers") size(o.layers);
    else if (flag == "--d-model") size(o.d_model);
    else if (flag == "--heads") size(o.heads);
    else if (flag == "--kv-heads") size(o.kv_heads);
    else if (flag == "--seq-len") size(o.seq_len);
    else if (flag == "--threads") size(o.threads);
    else if (flag == "--seed") o.seed = parse_number(flag, value, std::numeric_limits<std::uint64_t>::max());
    else throw std::invalid_argument("unknown argument '" + flag + "' (try --help)");
  }
  return o;
}

// ============================================================================
// Model
// ============================================================================

kvcache::ModelConfig make_config(const Options& o) {
  kvcache::ModelConfig c;
  c.vocab_size = vocab_size;
  c.d_model = o.d_model;
  c.n_layers = o.layers;
  c.n_heads = o.heads;
  c.n_kv_heads = o.kv_heads;
  c.d_ff = 4 * o.d_model;
  c.max_seq_len = o.seq_len;
  c.positions = kvcache::PositionEncoding::learned;
  c.norm = kvcache::NormKind::layer_norm;
  c.mlp = kvcache::MlpKind::gelu;
  // With a tied head and random weights the logit of the current token
  // (its embedding dotted with itself) dominates and the model repeats it.
  c.tied_lm_head = false;
  c.validate();  // throws std::invalid_argument naming the bad field
  return c;
}

// Refuses a model whose weights and cache would not fit comfortably in memory,
// before anything is allocated.
void check_memory(const kvcache::ModelConfig& c) {
  const double d = static_cast<double>(c.d_model), L = static_cast<double>(c.n_layers);
  const double V = static_cast<double>(c.vocab_size), S = static_cast<double>(c.max_seq_len);
  const double ff = static_cast<double>(c.d_ff), kv = static_cast<double>(c.kv_dim());
  const double weights = V * d * 2 + S * d + L * (2 * d * d + 2 * kv * d + 2 * d * ff);
  const double cache = 2 * L * kv * S;
  const double scratch = S * (4 * d + 2 * kv + ff + S);  // the uncached run's widest forward
  const double bytes = (weights + cache + scratch) * sizeof(float);
  const double limit = 4.0 * 1024 * 1024 * 1024;
  if (bytes > limit) {
    char gib[32];
    std::snprintf(gib, sizeof gib, "%.1f", bytes / (1024.0 * 1024 * 1024));
    throw std::invalid_argument(std::string("this model needs about ") + gib +
                                " GiB (weights, cache and buffers), more than the 4 GiB this demo allows; "
                                "choose a smaller --d-model, --layers or --seq-len");
  }
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// ============================================================================
// main
// ============================================================================

int run(const Options& o) {
  const kvcache::ModelConfig config = make_config(o);
  const std::vector<int> prompt = encode(o.prompt);
  if (prompt.empty()) throw std::invalid_argument("the prompt is empty; give at least one character");
  if (o.tokens == 0) throw std::invalid_argument("--tokens = 0; generate at least 1 token");
  if (prompt.size() + o.tokens > config.max_seq_len)
    throw std::invalid_argument("the prompt (" + std::to_string(prompt.size()) + " tokens) + --tokens " +
                                std::to_string(o.tokens) + " = " + std::to_string(prompt.size() + o.tokens) +
                                " tokens do not fit in --seq-len " + std::to_string(config.max_seq_len));
  if (o.threads == 0) throw std::invalid_argument("--threads = 0; need at least 1");
  check_memory(config);

  const kvcache::Decoder<float> model(config, kvcache::random_weights<float>(config, o.seed));
  kvcache::GenerateOptions options;  // temperature 0: greedy
  options.max_new_tokens = o.tokens;

  // With the cache: one prefill over the prompt, then one token per step.
  kvcache::Session<float> session = model.new_session();
  session.set_threads(o.threads);
  auto start = std::chrono::steady_clock::now();
  const std::vector<int> cached = kvcache::generate(model, session, prompt, options);
  const double cached_s = seconds_since(start);

  // Without it: every step runs the whole sequence so far.
  start = std::chrono::steady_clock::now();
  const std::vector<int> uncached = kvcache::generate_uncached(model, prompt, options, o.threads);
  const double uncached_s = seconds_since(start);

  if (cached != uncached) {
    std::size_t i = 0;
    while (i < cached.size() && i < uncached.size() && cached[i] == uncached[i]) ++i;
    std::cerr << "toy-gpt: cached and uncached generation differ at generated token " << i << " (cached "
              << cached.size() << " tokens, uncached " << uncached.size() << ")\n";
    return 1;
  }

  const double n = static_cast<double>(cached.size());
  const std::size_t tokens_in_cache = session.size();  // prompt + generated - 1: the last id is never fed
  const std::size_t formula = 2 * config.n_layers * config.kv_heads() * config.d_k() * tokens_in_cache * sizeof(float);

  std::printf("model            d_model %zu, %zu layers, %zu heads (%zu kv heads, d_k %zu), d_ff %zu, "
              "max_seq_len %zu, vocab %zu, seed %llu, threads %zu\n",
              config.d_model, config.n_layers, config.n_heads, config.kv_heads(), config.d_k(), config.d_ff,
              config.max_seq_len, config.vocab_size, static_cast<unsigned long long>(o.seed), o.threads);
  std::printf("prompt           \"%s\"\n", o.prompt.c_str());
  std::printf("generated        \"%s\"\n", decode(cached).c_str());
  std::printf("prompt length    %zu tokens\n", prompt.size());
  std::printf("tokens generated %zu (cached and uncached identical)\n", cached.size());
  std::printf("cached           %10.1f tokens/s  (%.3f s)\n", n / cached_s, cached_s);
  std::printf("uncached         %10.1f tokens/s  (%.3f s)\n", n / uncached_s, uncached_s);
  std::printf("speedup          %10.1fx\n", uncached_s / cached_s);
  std::printf("KV cache         %zu bytes allocated (Session::kv_bytes(), capacity %zu tokens)\n", session.kv_bytes(),
              session.cache(0).capacity());
  std::printf("                 2 x %zu layers x %zu kv heads x %zu d_k x %zu tokens x %zu bytes = %zu bytes\n",
              config.n_layers, config.kv_heads(), config.d_k(), tokens_in_cache, sizeof(float), formula);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    bool help = false;
    const Options options = parse_args(argc, argv, help);
    if (help) {
      print_help(std::cout);
      return 0;
    }
    return run(options);
  } catch (const std::exception& e) {
    std::cerr << "toy-gpt: " << e.what() << "\n";
    return 1;
  }
}
