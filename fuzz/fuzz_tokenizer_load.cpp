// fuzz/fuzz_tokenizer_load.cpp — the tokenizer.bin reader on arbitrary bytes,
// then encode and decode with whatever vocabulary it accepted.
//
//   - Tokenizer::load(stream) either throws std::runtime_error or gives a
//     vocabulary of n tokens; then load(stream, n) must give the same one,
//     and load(stream, n ± 1) must be refused.
//   - With that vocabulary (duplicated pieces, NUL bytes, ±inf scores, no
//     byte fallback, no " " …), encoding the input's own bytes must give the
//     ids of the plain llama2.c algorithm (fuzz_support.hpp), or both fail
//     for want of a byte-fallback token; every id decodes.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <kvcache/tokenizer.hpp>

#include "fuzz_support.hpp"

namespace {

using kvcache::Tokenizer;
using kvcache_fuzz::check;

kvcache::LoadLimits limits() {
  kvcache::LoadLimits l;
  l.max_tokenizer_bytes = 1 << 20;
  l.max_vocab_size = 1 << 16;
  return l;
}

std::optional<Tokenizer> load(const std::string& bytes, std::optional<std::size_t> vocab_size) {
  kvcache_fuzz::MemoryStream in(bytes.data(), bytes.size());
  try {
    return vocab_size ? Tokenizer::load(in, "fuzz.bin", *vocab_size, limits()) : Tokenizer::load(in, "fuzz.bin", limits());
  } catch (const std::runtime_error&) {
    return std::nullopt;
  }
}

bool same_vocabulary(const Tokenizer& a, const Tokenizer& b) {
  if (a.vocab_size() != b.vocab_size() || a.max_token_length() != b.max_token_length()) return false;
  for (std::size_t id = 0; id < a.vocab_size(); ++id) {
    const int i = static_cast<int>(id);
    if (a.piece(i) != b.piece(i)) return false;
    const float sa = a.score(i), sb = b.score(i);
    if (std::memcmp(&sa, &sb, sizeof sa) != 0) return false;
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  const std::optional<Tokenizer> tok = load(bytes, std::nullopt);
  if (!tok) return 0;

  const std::size_t n = tok->vocab_size();
  check(n >= 3, "a vocabulary without the 3 special tokens loaded");
  const std::optional<Tokenizer> sized = load(bytes, n);
  check(sized && same_vocabulary(*tok, *sized), "load(n) differs from load() for the file's own n");
  check(!load(bytes, n + 1), "load(n + 1) accepted a file of n tokens");
  check(!load(bytes, n - 1), "load(n - 1) accepted a file of n tokens");

  // Encode a bounded piece of the input (the naive encoder is quadratic).
  const std::string text = bytes.substr(size > 96 ? size - 96 : 0);
  std::optional<std::vector<int>> fast, naive;
  try {
    fast = tok->encode(text, true, true);
  } catch (const std::runtime_error&) {
  }
  try {
    naive = kvcache_fuzz::naive_encode(*tok, text, true, true);
  } catch (const std::runtime_error&) {
  }
  check(fast.has_value() == naive.has_value(), "encode and the naive encoder disagree on failing");
  if (!fast) return 0;
  check(*fast == *naive, "encode differs from the naive llama2.c encoder");
  std::string decoded;
  int prev = Tokenizer::kBosId;
  for (const int id : *fast) {
    check(id >= 0 && static_cast<std::size_t>(id) < n, "encode produced an id outside the vocabulary");
    decoded += tok->decode(prev, id);
    (void)Tokenizer::is_printable_piece(tok->decode(prev, id));
    prev = id;
  }
  return 0;
}
