// fuzz/fuzz_tokenizer_encode.cpp — Tokenizer::encode on arbitrary bytes as a
// prompt, with the real tokenizers (tok512.bin, llama2_tokenizer.bin from
// the models folder) and a small one built here whose merges have ties,
// duplicates, a NUL byte, and scores at -1e10 and +inf.
//
// For every tokenizer and input:
//   - encode never fails (each has all 256 byte-fallback tokens) and every
//     id is in the vocabulary;
//   - encode gives the ids of the plain llama2.c algorithm (on the first
//     128 bytes: the reference is quadratic);
//   - decode(encode(text, bos = false)) == text, as tokenizer.hpp promises
//     for vocabularies with " " and "<0xXX>" byte tokens.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <kvcache/tokenizer.hpp>

#include "fuzz_support.hpp"

namespace {

using kvcache::Tokenizer;
using kvcache_fuzz::check;

void append_int32(std::string& out, std::int32_t v) {
  char raw[4];
  std::memcpy(raw, &v, 4);
  out.append(raw, 4);
}

void append_token(std::string& out, const std::string& piece, float score) {
  char raw[4];
  std::memcpy(raw, &score, 4);
  out.append(raw, 4);
  append_int32(out, static_cast<std::int32_t>(piece.size()));
  out += piece;
}

// <unk>, BOS, EOS, the byte tokens, " ", and merges chosen to be awkward.
std::string synthetic_tokenizer() {
  std::vector<std::pair<std::string, float>> vocab = {{"<unk>", 0}, {"\n<s>\n", 0}, {"\n</s>\n", 0}};
  static const char* const kHex = "0123456789ABCDEF";
  for (int b = 0; b < 256; ++b) vocab.push_back({std::string("<0x") + kHex[b >> 4] + kHex[b & 15] + ">", 0});
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<std::pair<std::string, float>> extra = {
      {" ", -1},     {"a", -2},       {"b", -2},          {"ab", 5},      {"ba", 5},   {"aa", 5},
      {"ab", 9},     {"abab", 5},     {" a", 5},          {"  ", 3},      {"   ", 4},  {"aab", -1e10f},
      {"bb", -1e10f}, {"bbb", inf},   {std::string("\0a", 2), 7}, {"é", 1}, {" é", 2}, {"éé", 2},
      {"\xC3", 1},   {"\xA9", 1},     {"<0x", 1},         {"<0x41>", 1},  {"c", 0},    {"cc", 0}, {"ccc", 0},
      {"cccc", 0},   {"\xF0\x9F\x98\x80", 1},              {"\xF0\x9F", 1}, {"xyzw", 3}, {"x", 0}, {"y", 0},
      {"xy", 1},     {"yz", 2},       {"z", 0},           {"zw", 1},      {"w", 0},    {"xyz", 1},
  };
  vocab.insert(vocab.end(), extra.begin(), extra.end());
  std::size_t longest = 0;
  for (const auto& [piece, score] : vocab) longest = std::max(longest, piece.size());
  std::string out;
  append_int32(out, static_cast<std::int32_t>(longest));
  for (const auto& [piece, score] : vocab) append_token(out, piece, score);
  return out;
}

struct Subject {
  std::string name;
  Tokenizer tokenizer;
  bool round_trips;  // has " " and the "<0xXX>" byte tokens at ids 3..258
};

bool has_byte_tokens(const Tokenizer& tok) {
  if (tok.vocab_size() < 259 || tok.find(" ") < 0) return false;
  static const char* const kHex = "0123456789ABCDEF";
  for (int b = 0; b < 256; ++b) {
    const std::string expected = std::string("<0x") + kHex[b >> 4] + kHex[b & 15] + ">";
    if (tok.piece(b + 3) != expected) return false;
  }
  return true;
}

std::vector<Subject>& subjects() {
  static std::vector<Subject> all = [] {
    std::vector<Subject> s;
    for (const char* file : {"tok512.bin", "llama2_tokenizer.bin"}) {
      const std::string path = kvcache_fuzz::model_file(file);
      if (path.empty()) continue;
      Tokenizer t = Tokenizer::load(path);
      const bool rt = has_byte_tokens(t);
      s.push_back({file, std::move(t), rt});
    }
    std::istringstream in(synthetic_tokenizer());
    Tokenizer t = Tokenizer::load(in, "synthetic");
    const bool rt = has_byte_tokens(t);
    s.push_back({"synthetic", std::move(t), rt});
    for (const Subject& subject : s)
      std::fprintf(stderr, "kvcache fuzz: tokenizer %s, %zu tokens, round trip %s\n", subject.name.c_str(),
                   subject.tokenizer.vocab_size(), subject.round_trips ? "checked" : "not checked");
    return s;
  }();
  return all;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  (void)subjects();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  for (const Subject& s : subjects()) {
    const Tokenizer& tok = s.tokenizer;
    const std::vector<int> ids = tok.encode(text, true, true);
    check(ids.size() >= 2 && ids.front() == Tokenizer::kBosId && ids.back() == Tokenizer::kEosId,
          s.name + ": BOS/EOS missing");
    for (const int id : ids)
      check(id >= 0 && static_cast<std::size_t>(id) < tok.vocab_size(), s.name + ": id outside the vocabulary");

    const std::string head = text.substr(0, 128);
    check((head.size() == text.size() ? ids : tok.encode(head, true, true)) ==
              kvcache_fuzz::naive_encode(tok, head, true, true),
          s.name + ": encode differs from the naive llama2.c encoder");

    if (s.round_trips) {
      const std::string decoded = tok.decode(tok.encode(text, false, false));
      check(decoded == text, s.name + ": decode(encode(text)) != text");
    }
  }
  return 0;
}
