// fuzz/make_seeds.cpp — writes small valid inputs for each harness into
// OUT/<harness>/, the part of the seed corpus that is not a real model file
// (fuzz/run.sh adds those). Small seeds keep the fuzzers fast and put them
// one mutation away from every interesting header field.
//
//   kvcache_fuzz_seeds OUT
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <kvcache/decoder.hpp>
#include <kvcache/llama2c.hpp>
#include <kvcache/session_file.hpp>

#include "fuzz_support.hpp"
#include "generate_main.hpp"
#include "gguf_writer.hpp"

namespace fs = std::filesystem;

namespace {

void write(const fs::path& dir, const std::string& name, const std::string& bytes) {
  fs::create_directories(dir);
  std::ofstream out(dir / name, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write " + (dir / name).string());
}

// Tiny llama2.c checkpoints of several shapes (tied and untied, multi-head,
// grouped-query, multi-query), written by save_llama2c.
void checkpoints(const fs::path& dir) {
  struct Shape {
    std::size_t dim, hidden, layers, heads, kv_heads, vocab, seq_len;
    bool tied;
  };
  const std::vector<Shape> shapes = {
      {8, 12, 1, 2, 2, 11, 4, true},  {8, 12, 2, 2, 1, 10, 4, false}, {16, 24, 1, 4, 2, 16, 8, true},
      {2, 1, 1, 1, 1, 3, 1, true},    {4, 4, 2, 2, 1, 5, 2, false},
  };
  fs::create_directories(dir);
  int i = 0;
  for (const Shape& s : shapes) {
    const kvcache::ModelConfig c =
        kvcache::llama2c_config(s.dim, s.hidden, s.layers, s.heads, s.kv_heads, s.vocab, s.seq_len, s.tied);
    const kvcache::Decoder<float> d(c, kvcache::random_weights<float>(c, static_cast<std::uint64_t>(i + 1)));
    kvcache::save_llama2c(d, (dir / ("tiny" + std::to_string(i++) + ".bin")).string());
  }
}

std::string tokenizer(const std::vector<std::pair<std::string, float>>& vocab) {
  return kvcache_fuzz::tokenizer_bytes(vocab);
}

// Small tokenizer.bin files: the special tokens only, with a few merges, and
// with the 256 byte-fallback tokens.
void tokenizers(const fs::path& dir) {
  std::vector<std::pair<std::string, float>> vocab = {{"<unk>", 0}, {"\n<s>\n", 0}, {"\n</s>\n", 0}};
  write(dir, "special.bin", tokenizer(vocab));
  std::vector<std::pair<std::string, float>> merges = vocab;
  for (const char* piece : {" ", "a", "b", "ab", " ab", "ba", "\xC3\xA9"}) merges.push_back({piece, -1.0f});
  write(dir, "merges.bin", tokenizer(merges));
  static const char* const kHex = "0123456789ABCDEF";
  for (int b = 0; b < 256; ++b) vocab.push_back({std::string("<0x") + kHex[b >> 4] + kHex[b & 15] + ">", 0});
  vocab.insert(vocab.end(), {{" ", -1}, {"t", -2}, {"he", -3}, {"the", 1}, {" the", 2}, {" c", 0}, {"at", 0}});
  write(dir, "bytes.bin", tokenizer(vocab));
}

void prompts(const fs::path& dir) {
  const std::vector<std::string> texts = {
      "The cat", "", " ", "  leading spaces", "a\nb\tc", "h\xC3\xA9llo w\xC3\xB6rld \xE2\x9C\x93 \xF0\x9F\x98\x80",
      "\x80\xBF\xC3", "<0x41> <s> </s>", std::string("nul\0byte", 8), "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
  };
  int i = 0;
  for (const auto& t : texts) write(dir, "prompt" + std::to_string(i++), t);
}

void command_lines(const fs::path& dir) {
  const auto join = [](const std::vector<std::string>& args) {
    std::string out;
    for (std::size_t i = 0; i < args.size(); ++i) out += (i ? std::string(1, '\0') : std::string()) + args[i];
    return out;
  };
  const std::vector<std::vector<std::string>> lines = {
      {"model.bin"},
      {"model.bin", "-z", "tok.bin", "-i", "The cat", "-n", "128", "-t", "0"},
      {"model.bin", "-t", "0.8", "-p", "0.9", "-s", "42", "--threads", "2", "--stats"},
      {"model.bin", "--prompt-ids", "1,368,430", "--ids", "--no-cache", "--ignore-eos"},
      {"--help"},
  };
  int i = 0;
  for (const auto& l : lines) write(dir, "args" + std::to_string(i++), join(l));
}

// Session files of the harness's model: every storage type, with and
// without a sliding window (wrapped), with and without the last logits,
// empty and full.
void session_files(const fs::path& dir) {
  const kvcache::Decoder<float>& d = kvcache_fuzz::session_fuzz_decoder();
  struct Kind {
    kvcache::KVType type;
    kvcache::SlidingWindow window;
    std::size_t tokens;
    bool logits;
  };
  const std::vector<Kind> kinds = {
      {kvcache::KVType::full, {}, 0, false},     {kvcache::KVType::full, {}, 5, true},
      {kvcache::KVType::bf16, {}, 7, false},     {kvcache::KVType::int8, {}, 6, true},
      {kvcache::KVType::full, {8, 2}, 13, true}, {kvcache::KVType::int8, {6, 0}, 9, false},
      {kvcache::KVType::full, {}, 32, false},
  };
  int i = 0;
  for (const Kind& k : kinds) {
    kvcache::SessionOptions o;
    o.kv_type = k.type;
    o.window = k.window;
    kvcache::Session<float> s = d.new_session(o);
    std::vector<int> tokens;
    for (std::size_t t = 0; t < k.tokens; ++t) tokens.push_back(static_cast<int>((7 * t + 3) % d.config().vocab_size));
    kvcache::RowVector<float> logits;
    if (!tokens.empty()) {
      const kvcache::Matrix<float>& l = d.forward(tokens, s, kvcache::Logits::last);
      if (k.logits) logits = l.row(0);
    }
    std::ostringstream out;
    kvcache::write_session(out, d, s, tokens, logits);
    write(dir, "session" + std::to_string(i++) + ".kvs", out.str());
  }
}

// Whole runs of kvcache-generate for fuzz_generate: arguments, a prompts
// file and a prompt cache written by the program itself (a hit).
void generate_runs(const fs::path& dir) {
  const fs::path work = dir / "work";
  fs::create_directories(work);
  const kvcache_fuzz::GenerateFuzzFiles files = kvcache_fuzz::write_generate_fuzz_files(work);
  // The prompt cache of "the" (-n 8), as the program saves it.
  const std::string cache_path = (work / "cache.kvs").string();
  std::vector<std::string> save_args{"kvcache-generate", files.model, "-z", files.tokenizer, "-n", "8", "-s", "1",
                                     "-i", "the", "--prompt-cache", cache_path};
  std::vector<char*> argv;
  for (std::string& a : save_args) argv.push_back(a.data());
  std::ostringstream out, err;
  if (kvcache_cli::run_generate(static_cast<int>(argv.size()), argv.data(), out, err) != 0)
    throw std::runtime_error("cannot make the prompt cache seed: " + err.str());
  const std::string cache = kvcache_fuzz::read_file(cache_path);
  fs::remove_all(work);

  using Args = std::vector<std::string>;
  const std::vector<std::tuple<Args, std::string, std::string>> runs = {
      {{"MODEL", "-z", "TOK", "-n", "8", "-i", "The cat", "-t", "0"}, "", ""},
      {{"MODEL", "-z", "TOK", "-i", "the cat", "--stats", "--ids"}, "", ""},
      {{"MODEL", "--prompt-ids", "1,5,9", "--ids", "--no-cache", "--ignore-eos"}, "", ""},
      {{"MODEL", "-z", "TOK", "--window", "4", "--sinks", "1", "--kv-type", "int8", "-n", "8", "-i", "at"}, "", ""},
      {{"MODEL", "-z", "TOK", "--prompts-file", "PROMPTS", "--parallel", "2", "-t", "0"}, "The cat\nhe\r\nthe the\n", ""},
      {{"MODEL", "-z", "TOK", "--prompts-file", "PROMPTS", "-n", "4"}, "a\n\nb", ""},
      {{"MODEL", "-z", "TOK", "-n", "8", "-s", "1", "-i", "the", "--prompt-cache", "CACHE", "--stats"}, "", cache},
      {{"MODEL", "-z", "TOK", "-i", "the the", "--prompt-cache", "CACHE"}, "", cache},
      {{"MODEL", "-z", "TOK", "-i", "the", "--prompt-cache", "CACHE", "--kv-type", "bf16"}, "", cache},
      {{"MODEL", "-z", "TOK", "-i", "x", "--prompt-cache", "CACHE"}, "", "not a session file"},
      {{"MODEL", "-z", "TOK", "--weights", "bf16", "-n", "100", "-i", "\xc3\xa9t\xe9"}, "", ""},
      {{"--help"}, "", ""},
  };
  int i = 0;
  for (const auto& [args, prompts, cache_bytes] : runs)
    write(dir, "run" + std::to_string(i++), kvcache_fuzz::generate_fuzz_input(args, prompts, cache_bytes));
}

}  // namespace

// Tiny GGUF files (tests/gguf_writer.hpp): llama models of several shapes in
// f32, f16, bf16 and q8_0 (with f16 matrices whose rows are not whole q8_0
// blocks, as llama.cpp's converters write them), with a small SentencePiece
// vocabulary (control, byte and normal pieces), and one without tensors.
void gguf_files(const fs::path& dir) {
  struct Shape {
    std::size_t dim, hidden, layers, heads, kv_heads, seq_len;
    bool tied;
    std::uint32_t type;
  };
  const std::vector<Shape> shapes = {
      {8, 12, 1, 2, 2, 4, true, kvcache_test::kGgmlF32},   {32, 48, 1, 4, 1, 4, false, kvcache_test::kGgmlQ8_0},
      {8, 12, 2, 2, 1, 4, false, kvcache_test::kGgmlF16},  {16, 24, 1, 4, 2, 8, true, kvcache_test::kGgmlBf16},
      {32, 64, 1, 2, 2, 4, true, kvcache_test::kGgmlQ8_0},
  };
  kvcache::SentencePieceVocab v;
  v.pieces = {"<unk>", "<s>", "</s>", "<0x41>", "<0x0A>", "\xE2\x96\x81", "a", "b", "\xE2\x96\x81" "a", "ab", "ba", "c"};
  v.scores = {0, 0, 0, 0, 0, -1, -2, -2, -0.5f, -1, -1.5f, -3};
  v.types = {2, 3, 3, 6, 6, 1, 1, 1, 1, 1, 4, 1};
  int i = 0;
  for (const Shape& s : shapes) {
    kvcache::ModelConfig c = kvcache::llama2c_config(s.dim, s.hidden, s.layers, s.heads, s.kv_heads, v.pieces.size(),
                                                     s.seq_len, s.tied);
    const kvcache::Decoder<float> d(c, kvcache::random_weights<float>(c, static_cast<std::uint64_t>(i + 1)));
    write(dir, "tiny" + std::to_string(i++) + ".gguf", kvcache_test::llama_gguf(d, s.type, v));
  }
  kvcache_test::GgufWriter empty;
  empty.add_string("general.architecture", "llama");
  empty.add_u32("general.alignment", 64);
  write(dir, "empty.gguf", empty.bytes());
}

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
    return 1;
  }
  try {
    const fs::path out = argv[1];
    checkpoints(out / "fuzz_llama2c");
    tokenizers(out / "fuzz_tokenizer_load");
    prompts(out / "fuzz_tokenizer_encode");
    command_lines(out / "fuzz_cli_args");
    session_files(out / "fuzz_session_file");
    generate_runs(out / "fuzz_generate");
    gguf_files(out / "fuzz_gguf");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kvcache_fuzz_seeds: %s\n", e.what());
    return 1;
  }
  return 0;
}
