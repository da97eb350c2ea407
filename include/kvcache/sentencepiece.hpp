// kvcache/sentencepiece.hpp — llama.cpp's SentencePiece tokenizer (GGUF
// `tokenizer.ggml.model = "llama"`, llama.cpp's llm_tokenizer_spm) over a
// vocabulary given in memory: the pieces, scores and token types a GGUF file
// stores. kvcache::Tokenizer (tokenizer.hpp) can be built from one.
//
// Encoding, as llama_tokenize(text, add_special, parse_special = false):
//   1. BOS when add_special and the vocabulary's add_bos. An empty text gives
//      nothing more.
//   2. A space in front of the text when add_space_prefix; then every space
//      becomes U+2581 ("▁"), as the pieces spell it.
//   3. The text is cut into symbols of one UTF-8 character each, the length
//      taken from the lead byte alone (0xC0.. 2, 0xE0.. 3, 0xF0.. 4 bytes,
//      anything else 1; cut short at the end of the text), so any byte string
//      is accepted.
//   4. Repeatedly, the adjacent pair of symbols whose concatenation is a piece
//      of the vocabulary (of any type) with the highest score is merged, the
//      leftmost pair on equal scores (a priority queue of candidate pairs).
//   5. Each remaining symbol becomes the token spelling it; a symbol that is
//      no piece (only a single character can be) becomes one token per byte:
//      the piece "<0xAB>" (upper-case hex), else the one-byte piece, else
//      unknown_id (llama.cpp throws std::out_of_range there).
// Before step 2, as llama.cpp's tokenizer_st_partition, the text is cut at
// every occurrence of a user-defined piece (type 4), longest pieces first
// (equal lengths: lowest id first), each occurrence becoming that token;
// the rest is tokenized in pieces, each as above, but with the space prefix
// only at the start of the text and after a user-defined token. (llama.cpp's
// strip attributes, set only for a few models by name, are not reproduced.)
// When a string is the piece of several ids, the highest id is the one
// found, as llama.cpp's token_to_id map keeps the last.
//
// Decoding, as llama_token_to_piece(id, lstrip, special = false): a normal
// piece with each U+2581 as a space, a byte piece as its byte, a
// user-defined piece as is, nothing for the other types (control, unknown,
// unused, undefined). With `strip_space`, one leading space of that text is
// dropped. detokenize() is llama_detokenize(remove_special = false,
// unparse_special = false): the first token of the list loses its leading
// space when add_space_prefix, so detokenize(encode(text, false)) == text for
// valid UTF-8 that the vocabulary can spell (with BOS first, BOS takes that
// place and " text" comes back, as in llama.cpp).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <queue>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace kvcache {

// A SentencePiece vocabulary as a GGUF file stores it (tokenizer.ggml.*).
struct SentencePieceVocab {
  std::vector<std::string> pieces;  // as stored in GGUF (U+2581 for space, <0xAB> byte pieces)
  std::vector<float> scores;
  std::vector<std::int32_t> types;  // llama.cpp: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
  std::int32_t bos_id = 1, eos_id = 2, unknown_id = 0;
  bool add_bos = true;              // tokenizer.ggml.add_bos_token
  bool add_space_prefix = true;     // tokenizer.ggml.add_space_prefix
};

namespace detail {

// llama.cpp's token types (tokenizer.ggml.token_type); 0 is "undefined".
enum SpmTokenType : std::int32_t {
  kSpmUndefined = 0,
  kSpmNormal = 1,
  kSpmUnknown = 2,
  kSpmControl = 3,
  kSpmUserDefined = 4,
  kSpmUnused = 5,
  kSpmByte = 6,
};

inline constexpr std::string_view kSpmSpace = "\xE2\x96\x81";  // U+2581

// The byte a piece of the exact form "<0xHH>" (either hex case) stands for, or -1.
inline int spm_byte_of_piece(std::string_view piece) noexcept {
  const auto hex = [](char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  if (piece.size() != 6 || piece.substr(0, 3) != "<0x" || piece[5] != '>') return -1;
  const int high = hex(piece[3]);
  const int low = hex(piece[4]);
  return high < 0 || low < 0 ? -1 : high * 16 + low;
}

// The length of the UTF-8 character a byte leads, from its top 4 bits alone.
inline std::size_t spm_utf8_length(char lead) noexcept {
  const unsigned top = static_cast<unsigned char>(lead) >> 4;
  return top < 12 ? 1 : top < 14 ? 2 : top == 14 ? 3 : 4;
}

// The text with the space prefix (when asked) and every space as U+2581.
inline std::string spm_escape_spaces(std::string_view text, bool space_prefix) {
  std::string out;
  out.reserve((text.size() + 1) * kSpmSpace.size());
  if (space_prefix) out += kSpmSpace;
  for (const char c : text) {
    if (c == ' ') {
      out += kSpmSpace;
    } else {
      out += c;
    }
  }
  return out;
}

// "SentencePieceVocab: " + what, as std::invalid_argument.
inline std::invalid_argument spm_vocab_error(const std::string& what) {
  return std::invalid_argument("kvcache::SentencePieceVocab: " + what);
}

// Checks a vocabulary: the three arrays agree in size, the special ids are
// in range, no piece is empty, no score is NaN, types are 0..6 and every
// byte piece (type 6) is "<0xHH>".
inline void validate_spm_vocab(const SentencePieceVocab& v) {
  const std::size_t n = v.pieces.size();
  if (v.scores.size() != n || v.types.size() != n)
    throw spm_vocab_error(std::to_string(n) + " pieces but " + std::to_string(v.scores.size()) + " scores and " +
                          std::to_string(v.types.size()) + " types; the three must agree");
  if (n == 0) throw spm_vocab_error("no pieces");
  if (n > static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()))
    throw spm_vocab_error(std::to_string(n) + " pieces, more than ids can number");
  const auto check_id = [n](const char* name, std::int32_t id) {
    if (id < 0 || static_cast<std::size_t>(id) >= n)
      throw spm_vocab_error(std::string(name) + " " + std::to_string(id) + " is outside the vocabulary [0, " +
                            std::to_string(n) + ")");
  };
  check_id("bos_id", v.bos_id);
  check_id("eos_id", v.eos_id);
  check_id("unknown_id", v.unknown_id);
  for (std::size_t i = 0; i < n; ++i) {
    const std::string id = "token " + std::to_string(i);
    if (v.pieces[i].empty()) throw spm_vocab_error(id + " has an empty piece");
    if (std::isnan(v.scores[i])) throw spm_vocab_error(id + " has a NaN score");
    if (v.types[i] < kSpmUndefined || v.types[i] > kSpmByte)
      throw spm_vocab_error(id + " has type " + std::to_string(v.types[i]) + ", not in 0..6");
    if (v.types[i] == kSpmByte && spm_byte_of_piece(v.pieces[i]) < 0)
      throw spm_vocab_error(id + " is a byte token (type 6) but its piece '" + v.pieces[i] + "' is not <0xHH>");
  }
}

}  // namespace detail

// llama.cpp's SentencePiece tokenizer over a SentencePieceVocab (see the top
// of this file). Immutable once built; safe to share between threads.
class SentencePieceTokenizer {
 public:
  // Validates the vocabulary (detail::validate_spm_vocab); throws
  // std::invalid_argument naming the offending token or size.
  explicit SentencePieceTokenizer(SentencePieceVocab vocab) : vocab_(std::move(vocab)) {
    detail::validate_spm_vocab(vocab_);
    ids_.reserve(vocab_.pieces.size());
    // operator[] overwrites: a duplicated piece maps to its highest id.
    for (std::size_t id = 0; id < vocab_.pieces.size(); ++id) ids_[vocab_.pieces[id]] = static_cast<int>(id);
    for (std::size_t id = 0; id < vocab_.pieces.size(); ++id)
      if (vocab_.types[id] == detail::kSpmUserDefined) user_defined_.push_back(static_cast<int>(id));
    std::stable_sort(user_defined_.begin(), user_defined_.end(), [this](int a, int b) {
      return vocab_.pieces[static_cast<std::size_t>(a)].size() > vocab_.pieces[static_cast<std::size_t>(b)].size();
    });
    static constexpr char kHex[] = "0123456789ABCDEF";
    for (int b = 0; b < 256; ++b) {
      const std::string byte_piece{'<', '0', 'x', kHex[b >> 4], kHex[b & 15], '>'};
      int id = find(byte_piece);
      if (id < 0) id = find(std::string(1, static_cast<char>(b)));
      byte_ids_[static_cast<std::size_t>(b)] = id >= 0 ? id : vocab_.unknown_id;
    }
  }

  // Token ids for `text` (any bytes), as llama_tokenize(text, add_special,
  // parse_special = false): BOS first when add_special and add_bos.
  std::vector<int> encode(std::string_view text, bool add_special = true) const {
    std::vector<int> ids;
    if (add_special && vocab_.add_bos) ids.push_back(vocab_.bos_id);
    bool after_special = true;  // at the start, the space prefix applies
    for (const Fragment& f : fragments(text)) {
      if (f.token >= 0) {
        ids.push_back(f.token);
        after_special = true;
      } else {
        const std::string_view raw = text.substr(f.begin, f.size);
        append_text_tokens(detail::spm_escape_spaces(raw, vocab_.add_space_prefix && after_special), ids);
        after_special = false;
      }
    }
    return ids;
  }

  // The text of one token (see the top of this file). Throws
  // std::out_of_range when `id` is not in [0, size()).
  std::string token_to_piece(int id, bool strip_space = false) const {
    const std::size_t i = checked_index(id);
    const std::string& piece = vocab_.pieces[i];
    std::string text;
    switch (vocab_.types[i]) {
      case detail::kSpmNormal:
        for (std::size_t at = 0; at < piece.size();) {
          if (piece.compare(at, detail::kSpmSpace.size(), detail::kSpmSpace) == 0) {
            text += ' ';
            at += detail::kSpmSpace.size();
          } else {
            text += piece[at++];
          }
        }
        break;
      case detail::kSpmByte:
        text.assign(1, static_cast<char>(detail::spm_byte_of_piece(piece)));
        break;
      case detail::kSpmUserDefined:
        text = piece;
        break;
      default:  // control, unknown, unused, undefined: nothing
        break;
    }
    if (strip_space && !text.empty() && text.front() == ' ') text.erase(0, 1);
    return text;
  }

  // The text of `token` when it follows `prev_token`: its leading space is
  // dropped after BOS when add_space_prefix (the space encode() put in front
  // of the text), as llama2.c's decode does.
  std::string decode(int prev_token, int token) const {
    return token_to_piece(token, vocab_.add_space_prefix && prev_token == vocab_.bos_id);
  }

  // llama_detokenize(ids, remove_special = false, unparse_special = false):
  // only the first token of the list loses its leading space (when
  // add_space_prefix), even when it is BOS, which prints nothing.
  std::string detokenize(const std::vector<int>& ids) const {
    std::string text;
    for (std::size_t i = 0; i < ids.size(); ++i) text += token_to_piece(ids[i], i == 0 && vocab_.add_space_prefix);
    return text;
  }

  // The id whose piece is `piece` (the highest such id), or -1.
  int find(std::string_view piece) const {
    const auto it = ids_.find(std::string(piece));
    return it == ids_.end() ? -1 : it->second;
  }

  // The token byte `b` falls back to: "<0xBB>", else the one-byte piece, else unknown_id.
  int byte_token(unsigned char b) const noexcept { return byte_ids_[b]; }

  const SentencePieceVocab& vocab() const noexcept { return vocab_; }
  std::size_t size() const noexcept { return vocab_.pieces.size(); }

 private:
  std::size_t checked_index(int id) const {
    if (id < 0 || static_cast<std::size_t>(id) >= vocab_.pieces.size())
      throw std::out_of_range("kvcache::SentencePieceTokenizer: token id " + std::to_string(id) +
                              " is outside the vocabulary [0, " + std::to_string(vocab_.pieces.size()) + ")");
    return static_cast<std::size_t>(id);
  }

  // A stretch of the text to tokenize (token -1) or a user-defined token.
  struct Fragment {
    std::size_t begin, size;
    int token;
  };

  // The text cut at every user-defined piece, longest pieces first.
  std::vector<Fragment> fragments(std::string_view text) const {
    std::vector<Fragment> out;
    if (!text.empty()) out.push_back(Fragment{0, text.size(), -1});
    for (const int id : user_defined_) {
      const std::string& piece = vocab_.pieces[static_cast<std::size_t>(id)];
      std::vector<Fragment> cut;
      for (const Fragment& f : out) {
        if (f.token >= 0) {
          cut.push_back(f);
          continue;
        }
        const std::size_t end = f.begin + f.size;
        std::size_t at = f.begin;
        for (std::size_t hit; (hit = text.substr(0, end).find(piece, at)) != std::string_view::npos;) {
          if (hit > at) cut.push_back(Fragment{at, hit - at, -1});
          cut.push_back(Fragment{hit, piece.size(), id});
          at = hit + piece.size();
        }
        if (at < end) cut.push_back(Fragment{at, end - at, -1});
      }
      out = std::move(cut);
    }
    return out;
  }

  // Steps 3 to 5 of encoding on the escaped text. Symbols are byte ranges of
  // the text in a doubly linked list over their initial positions; merging a
  // pair keeps the left symbol (grown) and empties the right one. A queued
  // pair is stale when either symbol changed since: sizes only grow, so its
  // two symbols no longer add up to the pair's size (llama.cpp's test).
  // A merged symbol always spells a piece, so only single characters can
  // need the byte fallback.
  void append_text_tokens(const std::string& text, std::vector<int>& ids) const {
    struct Symbol {
      std::size_t begin, size;
      int prev, next;
    };
    std::vector<Symbol> symbols;
    for (std::size_t at = 0; at < text.size();) {
      const std::size_t size = std::min(detail::spm_utf8_length(text[at]), text.size() - at);
      const int index = static_cast<int>(symbols.size());
      symbols.push_back(Symbol{at, size, index - 1, at + size == text.size() ? -1 : index + 1});
      at += size;
    }
    struct Pair {
      float score;
      int left, right;
      std::size_t size;
    };
    // "a comes out after b": a lower score, or the same score further right.
    const auto after = [](const Pair& a, const Pair& b) {
      return a.score < b.score || (a.score == b.score && a.left > b.left);
    };
    std::priority_queue<Pair, std::vector<Pair>, decltype(after)> queue(after);
    const auto consider = [&](int left, int right) {
      if (left < 0 || right < 0) return;
      const Symbol& l = symbols[static_cast<std::size_t>(left)];
      const Symbol& r = symbols[static_cast<std::size_t>(right)];
      const int id = find(std::string_view(text).substr(l.begin, l.size + r.size));
      if (id >= 0) queue.push(Pair{vocab_.scores[static_cast<std::size_t>(id)], left, right, l.size + r.size});
    };
    for (int i = 1; i < static_cast<int>(symbols.size()); ++i) consider(i - 1, i);
    while (!queue.empty()) {
      const Pair best = queue.top();
      queue.pop();
      Symbol& l = symbols[static_cast<std::size_t>(best.left)];
      Symbol& r = symbols[static_cast<std::size_t>(best.right)];
      if (l.size == 0 || r.size == 0 || l.size + r.size != best.size) continue;
      l.size += r.size;
      r.size = 0;
      l.next = r.next;
      if (r.next >= 0) symbols[static_cast<std::size_t>(r.next)].prev = best.left;
      consider(l.prev, best.left);
      consider(best.left, l.next);
    }
    for (int i = symbols.empty() ? -1 : 0; i >= 0; i = symbols[static_cast<std::size_t>(i)].next) {
      const Symbol& s = symbols[static_cast<std::size_t>(i)];
      const int id = find(std::string_view(text).substr(s.begin, s.size));
      if (id >= 0) {
        ids.push_back(id);
      } else {
        for (std::size_t k = 0; k < s.size; ++k) ids.push_back(byte_token(static_cast<unsigned char>(text[s.begin + k])));
      }
    }
  }

  SentencePieceVocab vocab_;
  std::unordered_map<std::string, int> ids_;
  std::array<int, 256> byte_ids_{};
  std::vector<int> user_defined_;  // ids of user-defined pieces, longest first
};

}  // namespace kvcache
