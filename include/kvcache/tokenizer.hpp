// kvcache/tokenizer.hpp — the llama2.c tokenizer: loads a `tokenizer.bin`,
// turns text into token ids the way llama2.c's `encode` does, and token ids
// back into text the way its `decode` and `run` print them.
//
// File format (all little-endian):
//   int32 max_token_length
//   then, per token:  float32 score, int32 length, `length` bytes (no NUL)
// The number of tokens is not stored: it is the model's vocab_size
// (load(path, vocab_size)), or whatever the file holds (load(path)). Id 0 is
// <unk>, id 1 is BOS, id 2 is EOS, and ids 3..258 are meant to be the
// byte-fallback tokens "<0x00>".."<0xFF>".
//
// Encoding, as llama2.c's `encode`:
//   1. BOS (id 1) if asked for.
//   2. If the text is non-empty, the token for " " (SentencePiece's dummy
//      prefix). llama2.c pushes -1 when the vocabulary has no " "; here the
//      dummy prefix is then left out.
//   3. The text is cut into chunks of one byte plus up to 3 following
//      continuation bytes (b & 0xC0) == 0x80, which is one code point for
//      valid UTF-8 and something harmless for anything else. A chunk found in
//      the vocabulary becomes that token; otherwise each of its bytes b
//      becomes the byte-fallback token b + 3.
//   4. Repeatedly, among all adjacent pairs (BOS included) whose concatenated
//      pieces are a vocabulary entry, the one whose entry has the highest score
//      is merged, the leftmost on ties; a merge must score above -1e10
//      (llama2.c's starting "best score"), so entries at or below that never
//      merge. Done when no pair merges.
//   5. EOS (id 2) if asked for.
// llama2.c rescans every pair after each merge (quadratic in the text's
// length); here the same sequence of merges is found with a priority queue of
// candidate pairs over a linked list of tokens, in O(n log n).
//
// Decoding, as llama2.c's `decode`: the piece of the token, without its
// leading space when the previous token is BOS; a piece of the exact form
// "<0xXX>" stands for that one raw byte.
//
// Piece lookups use a hash map. When a string occurs several times in the
// vocabulary, the lowest id is the one found (llama2.c's binary search over a
// sorted copy picks an unspecified one). Pieces are compared as whole byte
// strings, including any NUL bytes (llama2.c's C strings stop at the first).
#pragma once

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <fstream>
#include <istream>
#include <limits>
#include <memory>
#include <optional>
#include <queue>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "detail/io.hpp"
#include "limits.hpp"
#include "sentencepiece.hpp"

namespace kvcache {
namespace detail {

// ============================================================================
// Reading tokenizer.bin
// ============================================================================

inline std::string tokenizer_label(const std::string& name) { return "tokenizer '" + name + "'"; }

// What a tokenizer.bin holds.
struct TokenizerFile {
  int max_token_length = 0;
  std::vector<std::string> pieces;
  std::vector<float> scores;
};

// Token `index`: its score (returned) and its piece, each checked. The piece
// is read 64 KB at a time, so that memory grows with the bytes that arrive,
// never with the length a token claims.
inline float read_token(io::BoundedReader& reader, const std::string& label, std::size_t index, int max_token_length,
                        std::string& piece) {
  const std::string token = io::text("token ", index);
  unsigned char field[8];
  reader.read(field, 8, token + "'s score and length");
  const float score = io::get_le<float>(field);
  const std::int32_t length = io::get_le<std::int32_t>(field + 4);
  if (std::isnan(score)) io::fail(label, token, " has a NaN score");
  if (length < 0 || length > max_token_length)
    io::fail(label, token, " has length ", length, ", outside [0, max_token_length ", max_token_length, "]");
  piece.clear();
  for (std::size_t have = 0; have < static_cast<std::size_t>(length); have = piece.size()) {
    piece.resize(std::min<std::size_t>(length, have + (std::size_t{1} << 16)));
    reader.read(reinterpret_cast<unsigned char*>(&piece[have]), piece.size() - have, token);
  }
  return score;
}

// Reads a tokenizer.bin from the stream: exactly vocab_size tokens when it is
// given (the model's vocab_size), otherwise every token up to the end. A
// stream longer than limits.max_tokenizer_bytes is refused before it is read
// when it can be measured, otherwise (a pipe, /dev/zero) once it has given
// that many bytes.
inline TokenizerFile read_tokenizer(std::istream& in, const std::string& name, std::optional<std::size_t> vocab_size,
                                    const LoadLimits& limits) {
  const std::string label = tokenizer_label(name);
  // Ids are ints: whatever the limit says, no more tokens than that.
  constexpr std::uint64_t kMaxId = std::numeric_limits<int>::max();
  const auto max_tokens = static_cast<std::size_t>(std::min(limits.max_vocab_size, kMaxId));
  const std::string vocab_limit = io::text("LoadLimits::max_vocab_size ", limits.max_vocab_size, ", ids up to ", kMaxId);
  if (vocab_size && *vocab_size > max_tokens)
    io::fail(label, "the model's vocab_size ", *vocab_size, " is above the limit (", vocab_limit, ")");
  const std::uint64_t max_bytes = limits.max_tokenizer_bytes;
  const std::optional<std::uint64_t> length = io::remaining_bytes(in);
  if (length && *length > max_bytes)
    io::fail(label, "is larger than LoadLimits::max_tokenizer_bytes (", *length, " vs ", max_bytes, " bytes)");
  io::BoundedReader reader(in, label, max_bytes, "LoadLimits::max_tokenizer_bytes");

  TokenizerFile out;
  reader.read_values<std::int32_t>(1, "4-byte header (max_token_length)",
                                   [&](std::int32_t v) { out.max_token_length = v; });
  if (out.max_token_length < 0) io::fail(label, "max_token_length is ", out.max_token_length, ", must be >= 0");
  // Every token up to the end. Past the model's vocab_size tokens, the
  // message tells more tokens (another vocabulary) from plain trailing bytes.
  std::uint64_t after = 0;  // bytes up to the model's vocab_size tokens
  while (in.peek() != std::char_traits<char>::eof()) {
    if (out.pieces.size() == max_tokens) io::fail(label, "holds more tokens than the limit (", vocab_limit, ")");
    if (vocab_size && out.pieces.size() == *vocab_size) after = reader.consumed();
    out.pieces.emplace_back();
    try {
      out.scores.push_back(read_token(reader, label, out.pieces.size() - 1, out.max_token_length, out.pieces.back()));
    } catch (const std::runtime_error&) {
      if (!vocab_size || out.pieces.size() <= *vocab_size || reader.consumed() > max_bytes) throw;
      io::fail(label, length && *length > after ? std::to_string(*length - after) : "some",
               " unexpected bytes after the ", *vocab_size, " tokens of the model's vocab_size");
    }
  }
  if (vocab_size && out.pieces.size() != *vocab_size)
    io::fail(label, "holds ", out.pieces.size(), " tokens but the model's vocab_size is ", *vocab_size);
  if (out.pieces.size() < 3)
    io::fail(label, "holds ", out.pieces.size(), " tokens, fewer than the 3 special ones (<unk>, BOS, EOS)");
  return out;
}

// ============================================================================
// Encoding: byte-pair merges (step 4 of the encoding above)
// ============================================================================

// llama2.c starts its search for the best merge at this score and only
// accepts a strictly higher one.
constexpr float kMinMergeScore = -1e10f;

// Merges `tokens` in place. find_merge(left_id, right_id) gives the id and
// score of the entry spelling the two pieces together (id -1: none).
// The tokens form a doubly linked list over their initial positions; merging
// a pair keeps the left node (with the merged id) and marks the right one
// removed (id -1), so the surviving nodes stay in position order and a node's
// initial position orders it exactly as its current index would. A max-heap
// holds candidate merges keyed by (score, then lowest left position), which is
// llama2.c's "highest score, leftmost on ties". A candidate whose two nodes
// are no longer neighbours with the ids it saw is skipped when it reaches the
// top (lazy deletion); one whose pair still stands merges what a fresh one
// would, since the merge depends on the two ids only.
template <typename FindMerge>
void merge_pairs(std::vector<int>& tokens, const FindMerge& find_merge) {
  const std::size_t n = tokens.size();
  constexpr std::size_t kNone = std::numeric_limits<std::size_t>::max();

  struct Candidate {
    float score;
    std::size_t left, right;  // node positions
    int left_id, right_id, merged_id;
    // "comes out after b": a lower score, or the same score further right.
    bool operator<(const Candidate& b) const { return score != b.score ? score < b.score : left > b.left; }
  };
  std::priority_queue<Candidate> heap;

  std::vector<std::size_t> prev(n), next(n);
  for (std::size_t i = 0; i < n; ++i) {
    prev[i] = i == 0 ? kNone : i - 1;
    next[i] = i + 1 == n ? kNone : i + 1;
  }
  const auto consider = [&](std::size_t left, std::size_t right) {
    const std::pair<int, float> merge = find_merge(tokens[left], tokens[right]);
    if (merge.first >= 0 && merge.second > kMinMergeScore)
      heap.push(Candidate{merge.second, left, right, tokens[left], tokens[right], merge.first});
  };
  for (std::size_t i = 0; i + 1 < n; ++i) consider(i, i + 1);

  while (!heap.empty()) {
    const Candidate best = heap.top();
    heap.pop();
    if (next[best.left] != best.right || tokens[best.left] != best.left_id || tokens[best.right] != best.right_id)
      continue;  // stale
    tokens[best.left] = best.merged_id;
    tokens[best.right] = -1;
    const std::size_t after_right = next[best.right];
    next[best.left] = after_right;
    if (after_right != kNone) prev[after_right] = best.left;
    if (prev[best.left] != kNone) consider(prev[best.left], best.left);
    if (after_right != kNone) consider(best.left, after_right);
  }
  tokens.erase(std::remove(tokens.begin(), tokens.end(), -1), tokens.end());
}

}  // namespace detail

// A byte-pair-merge tokenizer in llama2.c's `tokenizer.bin` format: the file
// format, encoding and decoding are described at the top of this file.
class Tokenizer {
 public:
  static constexpr int kUnknownId = 0;
  static constexpr int kBosId = 1;
  static constexpr int kEosId = 2;
  static constexpr int kByteFallbackOffset = 3;  // byte b is token b + 3

  // Reads a tokenizer that must hold exactly `vocab_size` tokens (the model's
  // vocab_size). Throws std::runtime_error, naming the file, for a missing or
  // unreadable file, a malformed or truncated one, NaN scores, a token count
  // other than vocab_size, or a file or vocabulary past `limits`
  // (max_tokenizer_bytes, max_vocab_size).
  static Tokenizer load(const std::string& path, std::size_t vocab_size, const LoadLimits& limits = {}) {
    std::ifstream in = detail::io::open_for_reading(path, detail::tokenizer_label(path));
    return load(in, path, vocab_size, limits);
  }

  // Reads every token in the file; vocab_size() is how many there are.
  static Tokenizer load(const std::string& path, const LoadLimits& limits = {}) {
    std::ifstream in = detail::io::open_for_reading(path, detail::tokenizer_label(path));
    return load(in, path, limits);
  }

  // The same from a stream (a file, a std::istringstream over bytes in
  // memory), read from its position to its end; `name` stands for the path in
  // messages. The stream need not be seekable: one that cannot be measured
  // is refused once it has given more than limits.max_tokenizer_bytes (at
  // most 64 KB more are read).
  static Tokenizer load(std::istream& in, const std::string& name, std::size_t vocab_size,
                        const LoadLimits& limits = {}) {
    return Tokenizer(detail::read_tokenizer(in, name, vocab_size, limits));
  }

  static Tokenizer load(std::istream& in, const std::string& name, const LoadLimits& limits = {}) {
    return Tokenizer(detail::read_tokenizer(in, name, std::nullopt, limits));
  }

  // Instead of llama2.c's rules, llama.cpp's SentencePiece tokenizer over a
  // GGUF "llama" vocabulary (sentencepiece.hpp): encode(text, bos, eos) is
  // llama_tokenize(text, add_special = bos) then EOS when asked; decode()
  // gives llama.cpp's piece text, without its leading space after BOS;
  // find() gives the highest id of a duplicated piece. BOS and EOS are the
  // vocabulary's bos_id and eos_id (sentencepiece()->vocab()), which need
  // not be kBosId and kEosId: bos_id() and eos_id() stay llama2.c's, and
  // decode()'s default prev_token too. Throws std::invalid_argument for an
  // invalid vocabulary (SentencePieceTokenizer).
  explicit Tokenizer(SentencePieceVocab vocab) {
    spm_ = std::make_shared<const SentencePieceTokenizer>(std::move(vocab));
    pieces_ = spm_->vocab().pieces;
    scores_ = spm_->vocab().scores;
    for (const std::string& p : pieces_)
      max_token_length_ = static_cast<int>(std::min<std::size_t>(std::max<std::size_t>(max_token_length_, p.size()),
                                                                 std::numeric_limits<int>::max()));
  }

  // Token ids for `text`, exactly as llama2.c's encode (see the top of
  // this file). Any byte string is accepted; bytes that are not valid UTF-8 go
  // to byte fallback. Throws std::runtime_error when a byte needs a fallback
  // token the vocabulary does not have (fewer than 259 tokens).
  std::vector<int> encode(std::string_view text, bool bos = true, bool eos = false) const {
    if (spm_) {
      std::vector<int> ids = spm_->encode(text, bos);
      if (eos) ids.push_back(spm_->vocab().eos_id);
      return ids;
    }
    std::vector<int> tokens;
    tokens.reserve(text.size() + 3);
    if (bos) tokens.push_back(kBosId);
    if (!text.empty() && dummy_prefix_id_ >= 0) tokens.push_back(dummy_prefix_id_);
    // Step 3: one token per chunk found in the vocabulary, byte fallback for
    // the rest. A chunk is a byte plus up to 3 continuation bytes, whatever
    // the first byte is: that is how llama2.c groups bytes, so e.g. "a\x80"
    // is one chunk (not in the vocabulary, so two fallback bytes).
    const auto is_continuation_byte = [](char c) { return (static_cast<unsigned char>(c) & 0xC0) == 0x80; };
    for (std::size_t begin = 0, length = 1; begin < text.size(); begin += length, length = 1) {
      while (length < 4 && begin + length < text.size() && is_continuation_byte(text[begin + length])) ++length;
      const std::string_view chunk = text.substr(begin, length);
      if (const int id = find(chunk); id >= 0) {
        tokens.push_back(id);
        continue;
      }
      for (const char byte : chunk) {
        const int fallback = kByteFallbackOffset + static_cast<unsigned char>(byte);
        if (static_cast<std::size_t>(fallback) >= pieces_.size())
          throw std::runtime_error(detail::io::text("kvcache::Tokenizer: byte ", fallback - kByteFallbackOffset,
                                                    " needs byte-fallback token ", fallback,
                                                    " but the vocabulary has only ", pieces_.size(), " tokens"));
        tokens.push_back(fallback);
      }
    }
    std::string joined;  // reused by every lookup of a pair
    detail::merge_pairs(tokens, [&](int left, int right) {
      const std::string& a = pieces_[static_cast<std::size_t>(left)];
      const std::string& b = pieces_[static_cast<std::size_t>(right)];
      // No entry is longer than max_token_length (checked at load).
      const std::pair<int, float> none(-1, 0.0f);
      if (a.size() + b.size() > static_cast<std::size_t>(max_token_length_)) return none;
      const auto it = ids_.find(joined.assign(a).append(b));
      return it == ids_.end() ? none : std::pair<int, float>(it->second, scores_[static_cast<std::size_t>(it->second)]);
    });
    if (eos) tokens.push_back(kEosId);
    return tokens;
  }

  // The text llama2.c prints for `token` when it follows `prev_token`.
  // Throws std::out_of_range when `token` is not in [0, vocab_size()).
  std::string decode(int prev_token, int token) const {
    if (spm_) return spm_->decode(prev_token, token);
    std::string_view text = piece(token);
    if (prev_token == kBosId && !text.empty() && text.front() == ' ') text.remove_prefix(1);
    // A piece of the exact form "<0xXX>" (either hex case) is that byte.
    // (llama2.c uses sscanf("<0x%02hhX>"), which also accepts a prefix such
    // as "<0x4" or "<0x41>junk"; no real vocabulary has such pieces.)
    unsigned byte = 0;
    if (text.size() == 6 && text.substr(0, 3) == "<0x" && text[5] == '>' &&
        std::from_chars(&text[3], &text[5], byte, 16).ptr == &text[5])
      return std::string(1, static_cast<char>(byte));
    return std::string(text);
  }

  // The concatenated text of `ids`, each decoded after the one before it, the
  // first after `prev_token`. Every id is decoded, BOS included, so pass the
  // tokens that follow BOS (as `run` prints a prompt):
  // decode(encode(text, /*bos=*/false)) == text, the default prev_token
  // standing for the BOS that was left out.
  std::string decode(const std::vector<int>& ids, int prev_token = kBosId) const {
    std::string text;
    for (const int id : ids) {
      text += decode(prev_token, id);
      prev_token = id;
    }
    return text;
  }

  // llama2.c's `safe_printf` rule: a piece that is one byte which is neither
  // printable nor whitespace (in the C locale) is not printed; every other
  // piece is.
  static bool is_printable_piece(const std::string& piece) {
    const auto byte = static_cast<unsigned char>(piece[0]);  // '\0' for an empty piece
    // isprint (0x20 to 0x7E) or isspace ('\t' to '\r', and ' ') in the C locale
    return piece.size() != 1 || (byte >= 0x20 && byte <= 0x7E) || (byte >= '\t' && byte <= '\r');
  }

  std::size_t vocab_size() const noexcept { return pieces_.size(); }
  int max_token_length() const noexcept { return max_token_length_; }
  static constexpr int bos_id() noexcept { return kBosId; }
  static constexpr int eos_id() noexcept { return kEosId; }
  // The SentencePiece tokenizer this one delegates to, or nullptr (llama2.c's rules).
  const SentencePieceTokenizer* sentencepiece() const noexcept { return spm_.get(); }

  // The raw vocabulary string of `id`. Throws std::out_of_range.
  const std::string& piece(int id) const { return pieces_[checked_index(id)]; }
  // The merge score of `id`. Throws std::out_of_range.
  float score(int id) const { return scores_[checked_index(id)]; }

  // The id of the vocabulary entry equal to `text` (the lowest such id), or -1.
  int find(std::string_view text) const {
    if (spm_) return spm_->find(text);
    const auto it = ids_.find(std::string(text));
    return it == ids_.end() ? -1 : it->second;
  }

 private:
  // Builds the lookup table.
  explicit Tokenizer(detail::TokenizerFile file)
      : pieces_(std::move(file.pieces)), scores_(std::move(file.scores)), max_token_length_(file.max_token_length) {
    ids_.reserve(pieces_.size());
    // emplace keeps the existing entry, so a duplicated string maps to its lowest id.
    for (std::size_t id = 0; id < pieces_.size(); ++id) ids_.emplace(pieces_[id], static_cast<int>(id));
    dummy_prefix_id_ = find(" ");
  }

  std::size_t checked_index(int id) const {
    if (id < 0 || static_cast<std::size_t>(id) >= pieces_.size())
      throw std::out_of_range(detail::io::text("kvcache::Tokenizer: token id ", id, " is outside the vocabulary [0, ",
                                               pieces_.size(), ")"));
    return static_cast<std::size_t>(id);
  }

  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int> ids_;
  int max_token_length_ = 0;
  int dummy_prefix_id_ = -1;
  std::shared_ptr<const SentencePieceTokenizer> spm_;  // set: llama.cpp's rules instead of llama2.c's
};

}  // namespace kvcache
