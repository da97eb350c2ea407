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

inline std::string describe_tokenizer(const std::string& path) { return "tokenizer '" + path + "'"; }

// What a tokenizer.bin holds.
struct TokenizerFile {
  int max_token_length = 0;
  std::vector<std::string> pieces;
  std::vector<float> scores;
};

inline void open_tokenizer_file(const std::string& path, std::ifstream& in) {
  const std::string problem = io::open_problem(path, in);
  if (!problem.empty()) throw std::runtime_error("cannot open " + describe_tokenizer(path) + ": " + problem);
}

// The stream's bytes from its position to its end, refusing more than
// max_bytes: a seekable stream is measured first (a huge file fails
// without being read), any other is read in chunks up to max_bytes + 1
// (/dev/zero or an endless pipe fails after max_bytes).
inline std::string read_tokenizer_bytes(std::istream& in, const std::string& name, std::uint64_t max_bytes) {
  const auto too_large = [&](const std::string& size) {
    return std::runtime_error(describe_tokenizer(name) + " is larger than LoadLimits::max_tokenizer_bytes (" + size +
                              " vs " + std::to_string(max_bytes) + " bytes)");
  };
  const std::optional<std::uint64_t> length = io::remaining_bytes(in);
  if (length && *length > max_bytes) throw too_large(std::to_string(*length));
  // Read straight into the string, a chunk at a time, never asking for
  // more than max_bytes + 1 in total.
  constexpr std::uint64_t kChunk = 1 << 16;
  std::string bytes;
  while (in) {
    const std::size_t old = bytes.size();
    const std::uint64_t room = max_bytes - old;  // old <= max_bytes here
    const auto want = static_cast<std::size_t>(room >= kChunk ? kChunk : room + 1);
    bytes.resize(old + want);
    in.read(&bytes[old], static_cast<std::streamsize>(want));
    bytes.resize(old + static_cast<std::size_t>(in.gcount()));
    if (bytes.size() > max_bytes) throw too_large("more than " + std::to_string(max_bytes));
  }
  if (in.bad()) throw std::runtime_error("error while reading " + describe_tokenizer(name));
  return bytes;
}

// Walks the file's bytes, checking every length against what is left.
class TokenizerReader {
 public:
  TokenizerReader(const std::string& path, const std::string& bytes) : path_(path), bytes_(bytes) {}

  bool at_end() const noexcept { return offset_ == bytes_.size(); }
  std::size_t bytes_left() const noexcept { return bytes_.size() - offset_; }
  // Each token is at least a score and a length: 8 bytes.
  std::size_t max_tokens_left() const noexcept { return bytes_left() / 8; }

  int read_max_token_length() {
    if (bytes_left() < 4)
      throw std::runtime_error(describe_tokenizer(path_) + " is " + std::to_string(bytes_.size()) +
                               " bytes, too short for its 4-byte header (max_token_length)");
    const std::int32_t value = io::get_i32_le(next(4));
    if (value < 0) throw error(": max_token_length is " + std::to_string(value) + ", must be >= 0");
    return value;
  }

  // Token `index`: its piece (moved into `piece`) and its score.
  float read_token(std::size_t index, int max_token_length, std::string& piece) {
    const std::string token = " token " + std::to_string(index);
    if (bytes_left() < 8)
      throw error(" is truncated:" + token + " needs 8 bytes (score, length) at offset " + std::to_string(offset_) +
                  " but only " + std::to_string(bytes_left()) + " remain");
    const float score = io::get_f32_le(next(4));
    const std::int32_t length = io::get_i32_le(next(4));
    if (std::isnan(score)) throw error(":" + token + " has a NaN score");
    if (length < 0) throw error(":" + token + " has length " + std::to_string(length) + ", must be >= 0");
    if (length > max_token_length)
      throw error(":" + token + " has length " + std::to_string(length) + ", above max_token_length " +
                  std::to_string(max_token_length));
    const auto size = static_cast<std::size_t>(length);
    if (size > bytes_left())
      throw error(" is truncated:" + token + " has length " + std::to_string(length) + " but only " +
                  std::to_string(bytes_left()) + " bytes remain");
    piece.assign(bytes_, offset_, size);
    offset_ += size;
    return score;
  }

 private:
  std::runtime_error error(const std::string& what) const {
    return std::runtime_error(describe_tokenizer(path_) + what);
  }
  const unsigned char* next(std::size_t n) {  // n <= bytes_left(), checked by the caller
    offset_ += n;
    return reinterpret_cast<const unsigned char*>(bytes_.data()) + offset_ - n;
  }

  const std::string& path_;
  const std::string& bytes_;
  std::size_t offset_ = 0;
};

// The message for bytes left after the model's vocab_size tokens: more
// tokens when they parse as such, otherwise plain trailing garbage.
inline std::string describe_trailing_bytes(const std::string& path, const TokenizerReader& reader,
                                           std::size_t vocab_size, int max_token_length) {
  TokenizerReader probe = reader;
  std::size_t extra = 0;
  std::string piece;
  try {
    for (; !probe.at_end(); ++extra) probe.read_token(vocab_size + extra, max_token_length, piece);
  } catch (const std::runtime_error&) {
    return describe_tokenizer(path) + " has " + std::to_string(reader.bytes_left()) + " unexpected bytes after the " +
           std::to_string(vocab_size) + " tokens of the model's vocab_size";
  }
  return describe_tokenizer(path) + " holds " + std::to_string(vocab_size + extra) +
         " tokens but the model's vocab_size is " + std::to_string(vocab_size);
}

// Reads a tokenizer.bin from the stream: exactly vocab_size tokens when it
// is given (the model's vocab_size), otherwise every token up to the end. At
// most limits.max_tokenizer_bytes + 1 bytes are read.
inline TokenizerFile read_tokenizer(std::istream& in, const std::string& name, std::optional<std::size_t> vocab_size,
                                    const LoadLimits& limits) {
  constexpr auto kMaxId = static_cast<std::size_t>(std::numeric_limits<int>::max());
  const std::string file = describe_tokenizer(name);
  if (vocab_size && *vocab_size > kMaxId)
    throw std::runtime_error(file + ": the model's vocab_size " + std::to_string(*vocab_size) +
                             " exceeds the largest id " + std::to_string(kMaxId));
  if (vocab_size && *vocab_size > limits.max_vocab_size)
    throw std::runtime_error(file + ": the model's vocab_size is above LoadLimits::max_vocab_size (" +
                             std::to_string(*vocab_size) + " vs " + std::to_string(limits.max_vocab_size) + ")");
  const std::string bytes = read_tokenizer_bytes(in, name, limits.max_tokenizer_bytes);
  TokenizerReader reader(name, bytes);
  TokenizerFile out;
  out.max_token_length = reader.read_max_token_length();
  // Ids are ints: whatever the limit says, no more tokens than that.
  const std::size_t max_tokens =
      vocab_size ? *vocab_size
                 : static_cast<std::size_t>(std::min<std::uint64_t>(limits.max_vocab_size, std::uint64_t{kMaxId}));
  // Each token takes at least 8 bytes, so the file bounds what is reserved,
  // whatever vocab_size claims.
  const std::size_t reserved = std::min(max_tokens, reader.max_tokens_left());
  out.pieces.reserve(reserved);
  out.scores.reserve(reserved);
  while (vocab_size ? out.pieces.size() < *vocab_size : !reader.at_end()) {
    if (reader.at_end())  // only with a vocab_size
      throw std::runtime_error(file + " holds " + std::to_string(out.pieces.size()) +
                               " tokens but the model's vocab_size is " + std::to_string(*vocab_size));
    if (out.pieces.size() == max_tokens)  // only without
      throw std::runtime_error(file + " holds more tokens than the limit (LoadLimits::max_vocab_size " +
                               std::to_string(limits.max_vocab_size) + ", ids up to " + std::to_string(kMaxId) + ")");
    out.pieces.emplace_back();
    out.scores.push_back(reader.read_token(out.pieces.size() - 1, out.max_token_length, out.pieces.back()));
  }
  if (vocab_size && !reader.at_end())
    throw std::runtime_error(describe_trailing_bytes(name, reader, *vocab_size, out.max_token_length));
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
// a pair keeps the left node (with the merged id) and unlinks the right one,
// so the surviving nodes stay in position order and a node's initial position
// orders it exactly as its current index would. A max-heap holds candidate
// merges keyed by (score, then lowest left position), which is llama2.c's
// "highest score, leftmost on ties". A merge changes its left node and
// removes its right one; candidates that saw either node before that are
// recognised by a per-node version stamp and skipped when they reach the top
// (lazy deletion).
template <typename FindMerge>
void merge_pairs(std::vector<int>& tokens, const FindMerge& find_merge) {
  const std::size_t n = tokens.size();
  if (n < 2) return;
  constexpr std::size_t kNone = std::numeric_limits<std::size_t>::max();

  struct Candidate {
    float score;
    std::size_t left, right;  // node positions
    int merged_id;
    std::uint32_t left_version, right_version;
  };
  // "a comes out after b": lower score, or the same score further right.
  const auto after = [](const Candidate& a, const Candidate& b) {
    if (a.score != b.score) return a.score < b.score;
    return a.left > b.left;
  };
  std::priority_queue<Candidate, std::vector<Candidate>, decltype(after)> heap(after);

  std::vector<std::size_t> prev(n), next(n);
  for (std::size_t i = 0; i < n; ++i) {
    prev[i] = i == 0 ? kNone : i - 1;
    next[i] = i + 1 == n ? kNone : i + 1;
  }
  std::vector<std::uint32_t> version(n, 0);

  const auto consider = [&](std::size_t left, std::size_t right) {
    const std::pair<int, float> merge = find_merge(tokens[left], tokens[right]);
    if (merge.first < 0 || !(merge.second > kMinMergeScore)) return;
    heap.push(Candidate{merge.second, left, right, merge.first, version[left], version[right]});
  };

  for (std::size_t i = 0; i + 1 < n; ++i) consider(i, i + 1);

  while (!heap.empty()) {
    const Candidate best = heap.top();
    heap.pop();
    const bool stale = version[best.left] != best.left_version || version[best.right] != best.right_version ||
                       next[best.left] != best.right;
    if (stale) continue;

    tokens[best.left] = best.merged_id;
    ++version[best.left];
    ++version[best.right];  // removed: every candidate naming it is stale
    const std::size_t after_right = next[best.right];
    next[best.left] = after_right;
    if (after_right != kNone) prev[after_right] = best.left;

    if (prev[best.left] != kNone) consider(prev[best.left], best.left);
    if (after_right != kNone) consider(best.left, after_right);
  }

  // Node 0 is never a right node, so it heads the surviving list.
  std::size_t kept = 0;
  for (std::size_t i = 0; i != kNone; i = next[i]) tokens[kept++] = tokens[i];
  tokens.resize(kept);
}

// The byte a piece of the exact form "<0xXX>" (either hex case) stands for,
// or -1. (llama2.c uses sscanf("<0x%02hhX>"), which also accepts a prefix
// such as "<0x4" or "<0x41>junk"; no real vocabulary has such pieces.)
inline int parse_byte_piece(std::string_view text) noexcept {
  const auto hex_digit = [](char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  if (text.size() != 6 || text.substr(0, 3) != "<0x" || text[5] != '>') return -1;
  const int high = hex_digit(text[3]);
  const int low = hex_digit(text[4]);
  if (high < 0 || low < 0) return -1;
  return high * 16 + low;
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
    std::ifstream in;
    detail::open_tokenizer_file(path, in);
    return load(in, path, vocab_size, limits);
  }

  // Reads every token in the file; vocab_size() is how many there are.
  static Tokenizer load(const std::string& path, const LoadLimits& limits = {}) {
    std::ifstream in;
    detail::open_tokenizer_file(path, in);
    return load(in, path, limits);
  }

  // The same from a stream (a file, a std::istringstream over bytes in
  // memory), read from its position to its end; `name` stands for the path in
  // messages. The stream need not be seekable: at most
  // limits.max_tokenizer_bytes + 1 bytes are read from it.
  static Tokenizer load(std::istream& in, const std::string& name, std::size_t vocab_size,
                        const LoadLimits& limits = {}) {
    return Tokenizer(detail::read_tokenizer(in, name, vocab_size, limits), name);
  }

  static Tokenizer load(std::istream& in, const std::string& name, const LoadLimits& limits = {}) {
    return Tokenizer(detail::read_tokenizer(in, name, std::nullopt, limits), name);
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
    append_chunk_tokens(text, tokens);
    std::string joined;  // reused by every lookup of a pair
    detail::merge_pairs(tokens, [&](int left, int right) {
      const std::string& a = pieces_[static_cast<std::size_t>(left)];
      const std::string& b = pieces_[static_cast<std::size_t>(right)];
      // No entry is longer than max_token_length (checked at load).
      if (a.size() + b.size() > static_cast<std::size_t>(max_token_length_)) return std::pair<int, float>(-1, 0.0f);
      joined.assign(a).append(b);
      const auto it = ids_.find(joined);
      if (it == ids_.end()) return std::pair<int, float>(-1, 0.0f);
      return std::pair<int, float>(it->second, scores_[static_cast<std::size_t>(it->second)]);
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
    const int byte = detail::parse_byte_piece(text);
    if (byte >= 0) return std::string(1, static_cast<char>(byte));
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
    if (piece.size() != 1) return true;
    const auto byte = static_cast<unsigned char>(piece[0]);
    const bool printable = byte >= 0x20 && byte <= 0x7E;  // isprint, C locale
    const bool space = byte == ' ' || (byte >= '\t' && byte <= '\r');  // isspace
    return printable || space;
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
  // Checks the vocabulary has the special ids and builds the lookup table.
  Tokenizer(detail::TokenizerFile file, const std::string& path)
      : pieces_(std::move(file.pieces)), scores_(std::move(file.scores)), max_token_length_(file.max_token_length) {
    if (pieces_.size() <= static_cast<std::size_t>(kEosId))
      throw std::runtime_error(detail::describe_tokenizer(path) + " holds " + std::to_string(pieces_.size()) +
                               " tokens, fewer than the 3 special ones (<unk>, BOS, EOS)");
    ids_.reserve(pieces_.size());
    // emplace keeps the existing entry, so a duplicated string maps to its lowest id.
    for (std::size_t id = 0; id < pieces_.size(); ++id) ids_.emplace(pieces_[id], static_cast<int>(id));
    dummy_prefix_id_ = find(" ");
  }

  std::size_t checked_index(int id) const {
    if (id < 0 || static_cast<std::size_t>(id) >= pieces_.size())
      throw std::out_of_range("kvcache::Tokenizer: token id " + std::to_string(id) +
                              " is outside the vocabulary [0, " + std::to_string(pieces_.size()) + ")");
    return static_cast<std::size_t>(id);
  }

  // Step 3 of encoding: one token per chunk found in the vocabulary, byte
  // fallback for the rest. A chunk is a byte plus up to 3 continuation bytes,
  // whatever the first byte is: that is how llama2.c groups bytes, so e.g.
  // "a\x80" is one chunk (not in the vocabulary, so two fallback bytes).
  void append_chunk_tokens(std::string_view text, std::vector<int>& tokens) const {
    constexpr std::size_t kMaxChunk = 4;
    const auto is_continuation_byte = [](char c) { return (static_cast<unsigned char>(c) & 0xC0) == 0x80; };
    for (std::size_t begin = 0, length = 1; begin < text.size(); begin += length, length = 1) {
      while (length < kMaxChunk && begin + length < text.size() && is_continuation_byte(text[begin + length]))
        ++length;
      const std::string_view chunk = text.substr(begin, length);
      const int id = find(chunk);
      if (id >= 0) {
        tokens.push_back(id);
      } else {
        for (const char byte : chunk) tokens.push_back(byte_fallback_id(static_cast<unsigned char>(byte)));
      }
    }
  }

  int byte_fallback_id(unsigned char byte) const {
    const int id = kByteFallbackOffset + byte;
    if (static_cast<std::size_t>(id) >= pieces_.size())
      throw std::runtime_error("kvcache::Tokenizer: byte " + std::to_string(byte) + " needs byte-fallback token " +
                               std::to_string(id) + " but the vocabulary has only " + std::to_string(pieces_.size()) +
                               " tokens");
    return id;
  }

  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int> ids_;
  int max_token_length_ = 0;
  int dummy_prefix_id_ = -1;
  std::shared_ptr<const SentencePieceTokenizer> spm_;  // set: llama.cpp's rules instead of llama2.c's
};

}  // namespace kvcache
