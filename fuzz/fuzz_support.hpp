// fuzz/fuzz_support.hpp — what the libFuzzer harnesses share: reporting a
// broken invariant, a reference tokenizer encoder written as plainly as
// llama2.c's, and finding the real model files.
//
// A harness catches only the exceptions a function documents for bad input
// (std::runtime_error from the readers, UsageError from the parser, ...).
// Anything else escapes LLVMFuzzerTestOneInput, terminates the process and
// is reported by libFuzzer as a crash, as are the sanitizers' findings and
// the invariant checks below.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <istream>
#include <iterator>
#include <streambuf>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <kvcache/decoder.hpp>
#include <kvcache/llama2c.hpp>
#include <kvcache/tokenizer.hpp>

namespace kvcache_fuzz {

// A broken invariant: print it and abort, which libFuzzer reports as a crash
// (and saves the input).
[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "kvcache fuzz invariant broken: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

inline void check(bool condition, const std::string& what) {
  if (!condition) fail(what);
}

// A std::istream over bytes that stay where they are: the fuzz input is read
// in place, without the copy a std::istringstream makes. Seekable like a
// file, or not, like a pipe.
class MemoryStream : private std::streambuf, public std::istream {
 public:
  MemoryStream(const void* data, std::size_t size, bool seekable = true)
      : std::istream(static_cast<std::streambuf*>(this)), seekable_(seekable) {
    char* begin = const_cast<char*>(static_cast<const char*>(data));  // only ever read
    setg(begin, begin, begin + size);
  }

 private:
  bool seekable_;

  pos_type seekoff(off_type off, std::ios_base::seekdir dir, std::ios_base::openmode which) override {
    if (!seekable_ || !(which & std::ios_base::in)) return pos_type(off_type(-1));
    const off_type base = dir == std::ios_base::beg ? 0 : dir == std::ios_base::cur ? gptr() - eback() : egptr() - eback();
    const off_type target = base + off;
    if (target < 0 || target > egptr() - eback()) return pos_type(off_type(-1));
    setg(eback(), eback() + target, egptr());
    return pos_type(target);
  }
  pos_type seekpos(pos_type pos, std::ios_base::openmode which) override {
    return seekoff(off_type(pos), std::ios_base::beg, which);
  }
};

// llama2.c's encode as it is written there: cut into chunks, look each up
// (byte fallback otherwise), then merge the best-scoring adjacent pair,
// leftmost on ties, rescanning every pair each time: O(n²) lookups. The fast
// encoder (a heap over a linked list) must give the same ids.
inline std::vector<int> naive_encode(const kvcache::Tokenizer& tok, const std::string& text, bool bos, bool eos) {
  std::vector<int> tokens;
  if (bos) tokens.push_back(kvcache::Tokenizer::kBosId);
  if (!text.empty() && tok.find(" ") >= 0) tokens.push_back(tok.find(" "));
  const auto continues = [&](std::size_t i) {
    return i < text.size() && (static_cast<unsigned char>(text[i]) & 0xC0) == 0x80;
  };
  for (std::size_t i = 0; i < text.size();) {
    std::size_t length = 1;
    while (length < 4 && continues(i + length)) ++length;
    const std::string chunk = text.substr(i, length);
    const int id = tok.find(chunk);
    if (id >= 0) {
      tokens.push_back(id);
    } else {
      for (const char c : chunk) {
        const int byte_id = static_cast<unsigned char>(c) + kvcache::Tokenizer::kByteFallbackOffset;
        if (static_cast<std::size_t>(byte_id) >= tok.vocab_size())
          throw std::runtime_error("naive_encode: no byte-fallback token");
        tokens.push_back(byte_id);
      }
    }
    i += length;
  }
  for (;;) {
    float best_score = -1e10f;
    int best_id = -1;
    std::size_t best_index = 0;
    for (std::size_t i = 0; i + 1 < tokens.size(); ++i) {
      const int id = tok.find(tok.piece(tokens[i]) + tok.piece(tokens[i + 1]));
      if (id >= 0 && tok.score(id) > best_score) {
        best_score = tok.score(id);
        best_id = id;
        best_index = i;
      }
    }
    if (best_id < 0) break;
    tokens[best_index] = best_id;
    tokens.erase(tokens.begin() + static_cast<std::ptrdiff_t>(best_index) + 1);
  }
  if (eos) tokens.push_back(kvcache::Tokenizer::kEosId);
  return tokens;
}

// ---- Session files ----------------------------------------------------------

// The model the session-file harness loads into and the seeds are saved
// from: Llama-style (RoPE, RMSNorm, SwiGLU, untied head) with grouped-query
// attention, small enough that a forward step costs microseconds. Session
// files name their model's shape and weights (a fingerprint), so harness and
// seeds must build exactly this one.
inline kvcache::ModelConfig session_fuzz_config() {
  kvcache::ModelConfig c;
  c.vocab_size = 37;
  c.d_model = 16;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.d_ff = 24;
  c.max_seq_len = 32;
  c.positions = kvcache::PositionEncoding::rope;
  c.norm = kvcache::NormKind::rms_norm;
  c.mlp = kvcache::MlpKind::swiglu;
  c.tied_lm_head = false;
  return c;
}

inline const kvcache::Decoder<float>& session_fuzz_decoder() {
  static const kvcache::Decoder<float> decoder(session_fuzz_config(),
                                               kvcache::random_weights<float>(session_fuzz_config(), 2024));
  return decoder;
}

// ---- tokenizer.bin files ------------------------------------------------------

inline void append_int32(std::string& out, std::int32_t v) {
  char raw[4];
  std::memcpy(raw, &v, 4);
  out.append(raw, 4);
}

inline void append_token(std::string& out, const std::string& piece, float score) {
  char raw[4];
  std::memcpy(raw, &score, 4);
  out.append(raw, 4);
  append_int32(out, static_cast<std::int32_t>(piece.size()));
  out += piece;
}

// The bytes of a tokenizer.bin with this vocabulary (max_token_length: its
// longest piece).
inline std::string tokenizer_bytes(const std::vector<std::pair<std::string, float>>& vocab) {
  std::size_t longest = 0;
  for (const auto& entry : vocab) longest = std::max(longest, entry.first.size());
  std::string out;
  append_int32(out, static_cast<std::int32_t>(longest));
  for (const auto& [piece, score] : vocab) append_token(out, piece, score);
  return out;
}

// ---- kvcache-generate in-process (fuzz_generate) ----------------------------

// The tokenizer of the program harness: the special tokens, the 256
// byte-fallback tokens (any text encodes) and a few merges.
inline std::vector<std::pair<std::string, float>> generate_fuzz_vocab() {
  std::vector<std::pair<std::string, float>> vocab = {{"<unk>", 0}, {"\n<s>\n", 0}, {"\n</s>\n", 0}};
  static const char* const kHex = "0123456789ABCDEF";
  for (int b = 0; b < 256; ++b) vocab.push_back({std::string("<0x") + kHex[b >> 4] + kHex[b & 15] + ">", 0});
  vocab.insert(vocab.end(), {{" ", -1}, {"t", -2}, {"he", -3}, {"the", 1}, {" the", 2}, {" c", 0}, {"at", 0}});
  return vocab;
}

// Its model: a tiny llama2.c checkpoint (RoPE, so that --window works) with
// a context of 8, so that every run is at most 8 positions. Session files
// name their model's weights: the harness and the seeds build this very one.
inline kvcache::Decoder<float> generate_fuzz_decoder() {
  const kvcache::ModelConfig c =
      kvcache::llama2c_config(16, 24, 2, 4, 2, generate_fuzz_vocab().size(), 8, /*tied=*/true);
  return kvcache::Decoder<float>(c, kvcache::random_weights<float>(c, 2025));
}

// Writes `bytes` to `path` (whole, replacing it); aborts on failure.
inline void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) fail("cannot write " + path);
}

// The bytes of the file at `path` ("" when it cannot be read).
inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// The model and tokenizer files of the program harness, in `dir`.
struct GenerateFuzzFiles {
  std::string model, tokenizer, model_bytes, tokenizer_bytes;
};

inline GenerateFuzzFiles write_generate_fuzz_files(const std::filesystem::path& dir) {
  GenerateFuzzFiles f;
  f.model = (dir / "model.bin").string();
  f.tokenizer = (dir / "tok.bin").string();
  kvcache::save_llama2c(generate_fuzz_decoder(), f.model);
  f.model_bytes = read_file(f.model);
  f.tokenizer_bytes = tokenizer_bytes(generate_fuzz_vocab());
  write_file(f.tokenizer, f.tokenizer_bytes);
  return f;
}

// An input of fuzz_generate: the program's arguments separated by NUL
// bytes, then kGenerateFuzzMarker and the bytes of the --prompts-file, then
// the marker again and the bytes of the --prompt-cache file (absent when
// empty).
constexpr const char* kGenerateFuzzMarker = "\xff\xfe";

inline std::string generate_fuzz_input(const std::vector<std::string>& args, const std::string& prompts,
                                       const std::string& cache) {
  std::string out;
  for (std::size_t i = 0; i < args.size(); ++i) out += (i ? std::string(1, '\0') : std::string()) + args[i];
  return out + kGenerateFuzzMarker + prompts + kGenerateFuzzMarker + cache;
}

// The folder of the real model files: $KVCACHE_MODELS_DIR, else the
// ../shared/models the build was configured with.
inline std::string models_dir() {
  const char* from_env = std::getenv("KVCACHE_MODELS_DIR");
  if (from_env != nullptr && *from_env != '\0') return from_env;
#ifdef KVCACHE_DEFAULT_MODELS_DIR
  return KVCACHE_DEFAULT_MODELS_DIR;
#else
  return "";
#endif
}

// The path of a real model file, or "" when it is absent; with
// KVCACHE_REQUIRE_MODELS=1 an absent file aborts (CI must not fuzz less than
// it claims).
inline std::string model_file(const std::string& name) {
  const std::filesystem::path path = std::filesystem::path(models_dir()) / name;
  std::error_code ignored;
  if (std::filesystem::is_regular_file(path, ignored)) return path.string();
  const char* required = std::getenv("KVCACHE_REQUIRE_MODELS");
  if (required != nullptr && std::string(required) == "1")
    fail(name + " not found in '" + models_dir() + "' and KVCACHE_REQUIRE_MODELS=1");
  std::fprintf(stderr, "kvcache fuzz: %s not found in '%s', fuzzing without it\n", name.c_str(),
               models_dir().c_str());
  return "";
}

}  // namespace kvcache_fuzz
