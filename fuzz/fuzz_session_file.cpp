// fuzz/fuzz_session_file.cpp — the session-file reader (read_session) on
// arbitrary bytes, for the model of fuzz_support.hpp.
//
// Each input is read three ways, which must agree:
//   1. as it is, from a seekable stream (the length is checked up front);
//   2. as it is, from a stream that cannot seek (a pipe: the length is
//      found by reading);
//   3. with both checksums recomputed (the header's, and the whole file's in
//      the last 8 bytes), so that mutations reach the checks behind them:
//      the state, the lengths, the token ids.
// A file that loads must describe its session exactly: one token id per
// position, ids in the vocabulary, write_session of what was loaded gives
// back the same bytes, and the session continues (a forward step and a few
// generated tokens).
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <kvcache/generate.hpp>
#include <kvcache/session_file.hpp>

#include "fuzz_support.hpp"

namespace {

using kvcache_fuzz::check;

constexpr std::size_t kHeaderBytes = 27 * 8;

std::uint64_t fnv1a64(const std::uint8_t* p, std::size_t n) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (std::size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

void put_u64(std::uint64_t v, std::uint8_t* p) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<std::uint8_t>((v >> (8 * i)) & 0xFFu);
}

struct Loaded {
  std::vector<int> tokens;
  std::size_t size, position;
};

// Loads `bytes`; nullopt when read_session refuses them (as it may, with
// std::runtime_error, or std::invalid_argument for another model).
std::optional<Loaded> load(const std::uint8_t* bytes, std::size_t n, bool seekable) {
  const kvcache::Decoder<float>& d = kvcache_fuzz::session_fuzz_decoder();
  kvcache::SessionLoadOptions options;
  options.max_bytes = std::uint64_t{1} << 20;
  options.reserve_tokens = n > 0 ? bytes[0] % 40 : 0;
  kvcache_fuzz::MemoryStream in(bytes, n, seekable);
  std::optional<kvcache::SavedSession<float>> saved;
  try {
    saved.emplace(kvcache::read_session(in, d, options, "fuzz.kvs"));
  } catch (const std::runtime_error&) {
    return std::nullopt;
  } catch (const std::invalid_argument&) {
    return std::nullopt;
  }
  kvcache::Session<float>& s = saved->session;
  const kvcache::ModelConfig& c = d.config();
  check(saved->tokens.size() == s.position(), "a token id per position");
  for (const int id : saved->tokens)
    check(id >= 0 && static_cast<std::size_t>(id) < c.vocab_size, "a loaded id outside the vocabulary");
  check(s.size() <= s.max_tokens() && s.size() <= s.position(), "a session holding more than it can");
  check(saved->last_logits.size() == 0 || static_cast<std::size_t>(saved->last_logits.size()) == c.vocab_size,
        "last_logits of the wrong size");

  // What was loaded, saved again, is the same file.
  std::ostringstream out;
  kvcache::write_session(out, d, s, saved->tokens, saved->last_logits);
  const std::string again = out.str();
  check(again.size() == n && std::memcmp(again.data(), bytes, n) == 0, "write_session(read_session(f)) != f");

  Loaded result{saved->tokens, s.size(), s.position()};
  // And it goes on.
  if (s.position() < s.position_limit()) {
    kvcache::GenerateOptions o;
    o.max_new_tokens = std::min<std::size_t>(3, s.position_limit() - s.position());
    try {
      const std::vector<int> ids = kvcache::generate(d, s, {static_cast<int>(n % c.vocab_size)}, o);
      check(!ids.empty(), "a loaded session generated nothing");
    } catch (const std::domain_error&) {
      // The file's logits or caches can hold anything, NaN included.
    }
  }
  return result;
}

bool same(const std::optional<Loaded>& a, const std::optional<Loaded>& b) {
  if (a.has_value() != b.has_value()) return false;
  return !a || (a->tokens == b->tokens && a->size == b->size && a->position == b->position);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::optional<Loaded> seekable = load(data, size, true);
  const std::optional<Loaded> pipe = load(data, size, false);
  check(same(seekable, pipe), "a pipe and a file of the same bytes load differently");

  if (size < kHeaderBytes + 8) return 0;
  std::vector<std::uint8_t> fixed(data, data + size);
  put_u64(fnv1a64(fixed.data(), kHeaderBytes - 8), fixed.data() + kHeaderBytes - 8);
  put_u64(fnv1a64(fixed.data(), size - 8), fixed.data() + size - 8);
  const std::optional<Loaded> a = load(fixed.data(), size, true);
  const std::optional<Loaded> b = load(fixed.data(), size, false);
  check(same(a, b), "a pipe and a file of the same (checksum-fixed) bytes load differently");
  return 0;
}
