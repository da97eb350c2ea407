// Tests of kvcache::SentencePieceTokenizer and kvcache::Tokenizer built from a
// SentencePieceVocab: llama.cpp's own tokenization of 36 texts and 18 byte
// strings that are not all UTF-8 on the two shared tokenizers
// (tests/sentencepiece_fixture.hpp), round trips, small
// hand-written vocabularies that pin down merge order, ties, duplicates, byte
// fallback and decoding by token type, and the vocabulary's validation.
#include <kvcache/sentencepiece.hpp>
#include <kvcache/tokenizer.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "models.hpp"
#include "sentencepiece_fixture.hpp"

namespace {

using kvcache::SentencePieceTokenizer;
using kvcache::SentencePieceVocab;
using kvcache::Tokenizer;

// ---------------------------------------------------------------------------
// A GGUF vocabulary from a llama2.c tokenizer.bin, as the peer's
// llama2c_to_gguf.py makes it (read_tokenizer): id 0 unknown (2), ids 1 and
// 2 control (3) with surrounding whitespace stripped ("\n<s>\n" -> "<s>"),
// 6-byte pieces "<0x..>" byte tokens (6), the rest normal (1) with every
// space written as U+2581.

std::string strip_ascii_whitespace(const std::string& s) {
  const char* const ws = " \t\n\r\v\f";
  const std::size_t begin = s.find_first_not_of(ws);
  if (begin == std::string::npos) return "";
  return s.substr(begin, s.find_last_not_of(ws) - begin + 1);
}

SentencePieceVocab vocab_from_llama2c(const Tokenizer& bin) {
  SentencePieceVocab v;
  for (std::size_t i = 0; i < bin.vocab_size(); ++i) {
    const int id = static_cast<int>(i);
    std::string piece = bin.piece(id);
    std::int32_t type = 1;
    if (id == 0) {
      type = 2;
    } else if (id == 1 || id == 2) {
      type = 3;
      piece = strip_ascii_whitespace(piece);
    } else if (piece.size() == 6 && piece.compare(0, 3, "<0x") == 0 && piece.back() == '>') {
      type = 6;
    }
    if (type == 1) {
      std::string escaped;
      for (const char c : piece) escaped += c == ' ' ? std::string("\xE2\x96\x81") : std::string(1, c);
      piece = escaped;
    }
    v.pieces.push_back(piece);
    v.scores.push_back(bin.score(id));
    v.types.push_back(type);
  }
  return v;
}

std::vector<int> parse_ids(const std::string& text) {
  std::istringstream in(text);
  std::vector<int> ids;
  for (int id; in >> id;) ids.push_back(id);
  return ids;
}

std::vector<int> with_bos(std::vector<int> ids) {
  ids.insert(ids.begin(), 1);
  return ids;
}

// Every fixture case: kvcache's ids and texts equal llama.cpp's.
template <std::size_t N>
void expect_matches_llama_cpp(const char* file, const kvcache_test::SpmCase (&cases)[N]) {
  KVCACHE_MODEL_FILE_OR_SKIP(path, file);
  const SentencePieceVocab vocab = vocab_from_llama2c(Tokenizer::load(path));
  const SentencePieceTokenizer spm(vocab);
  const Tokenizer tok(vocab);
  for (const kvcache_test::SpmCase& c : cases) {
    SCOPED_TRACE(std::string(file) + ", text '" + c.text + "'");
    const std::vector<int> ids = parse_ids(c.ids);
    EXPECT_EQ(spm.encode(c.text, false), ids);
    EXPECT_EQ(spm.encode(c.text, true), with_bos(ids));
    EXPECT_EQ(tok.encode(c.text, false), ids);
    EXPECT_EQ(tok.encode(c.text), with_bos(ids));
    EXPECT_EQ(spm.detokenize(ids), c.text_back);
    EXPECT_EQ(spm.detokenize(with_bos(ids)), c.text_back_bos);
    // Tokenizer::decode drops the space after BOS (prev_token defaults to BOS),
    // which is llama_detokenize of the ids without BOS.
    EXPECT_EQ(tok.decode(ids), c.text_back);
  }
}

TEST(SentencePieceLlamaCpp, Tok512MatchesLlamaCpp) { expect_matches_llama_cpp("tok512.bin", kvcache_test::kTok512Cases); }

TEST(SentencePieceLlamaCpp, Llama2MatchesLlamaCpp) {
  expect_matches_llama_cpp("llama2_tokenizer.bin", kvcache_test::kLlama2Cases);
}

std::string from_hex(const std::string& hex) {
  std::string bytes;
  for (std::size_t i = 0; i + 1 < hex.size(); i += 2)
    bytes += static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16));
  return bytes;
}

// Byte strings that are not valid UTF-8: symbols are cut by the lead byte
// alone, and what is no piece falls back to byte tokens.
template <std::size_t N>
void expect_bytes_match_llama_cpp(const char* file, const kvcache_test::SpmBytesCase (&cases)[N]) {
  KVCACHE_MODEL_FILE_OR_SKIP(path, file);
  const Tokenizer tok(vocab_from_llama2c(Tokenizer::load(path)));
  for (const kvcache_test::SpmBytesCase& c : cases) {
    const std::string bytes = from_hex(c.hex);
    EXPECT_EQ(tok.encode(bytes, false), parse_ids(c.ids)) << file << ", bytes " << c.hex;
    if (bytes.find("\xE2\x96\x81") == std::string::npos) {  // U+2581 comes back as a space
      EXPECT_EQ(tok.decode(tok.encode(bytes, false)), bytes) << file << ", bytes " << c.hex;
    }
  }
}

TEST(SentencePieceLlamaCpp, Tok512BytesMatchLlamaCpp) {
  expect_bytes_match_llama_cpp("tok512.bin", kvcache_test::kTok512BytesCases);
}

TEST(SentencePieceLlamaCpp, Llama2BytesMatchLlamaCpp) {
  expect_bytes_match_llama_cpp("llama2_tokenizer.bin", kvcache_test::kLlama2BytesCases);
}

// Every text of the fixture comes back from its ids, except one that holds
// U+2581 itself (it comes back as a space, in llama.cpp too).
TEST(SentencePieceLlamaCpp, RoundTrips) {
  for (const char* file : {"tok512.bin", "llama2_tokenizer.bin"}) {
    KVCACHE_MODEL_FILE_OR_SKIP(path, file);
    const Tokenizer tok(vocab_from_llama2c(Tokenizer::load(path)));
    for (const kvcache_test::SpmCase& c : kvcache_test::kTok512Cases) {
      const std::string text = c.text;
      if (text.find("\xE2\x96\x81") != std::string::npos) continue;
      EXPECT_EQ(tok.decode(tok.encode(text, false)), text) << file;
      const std::vector<int> ids = tok.encode(text);
      EXPECT_EQ(tok.decode(std::vector<int>(ids.begin() + 1, ids.end())), text) << file;
    }
  }
}

// tok512 with user-defined pieces, as scripts/record_sentencepiece_fixture.sh
// makes it for llama.cpp: ids 264 "ing", 267 "en", 313 "ent", 300 renamed
// "<|user|>" and 325 ("\u2581whispers") of type 4.
TEST(SentencePieceLlamaCpp, UserDefinedPiecesMatchLlamaCpp) {
  KVCACHE_MODEL_FILE_OR_SKIP(path, "tok512.bin");
  SentencePieceVocab vocab = vocab_from_llama2c(Tokenizer::load(path));
  vocab.pieces[300] = "<|user|>";
  for (const std::size_t id : {264, 267, 300, 313, 325}) vocab.types[id] = 4;
  const Tokenizer tok(vocab);
  for (const kvcache_test::SpmBytesCase& c : kvcache_test::kTok512UserDefinedCases) {
    const std::string text = from_hex(c.hex);
    EXPECT_EQ(tok.encode(text, false), parse_ids(c.ids)) << "text '" << text << "'";
  }
  // A user-defined piece decodes as it is spelled, U+2581 included.
  EXPECT_EQ(tok.decode(tok.encode("hi <|user|>", false)), "hi <|user|>");
  EXPECT_EQ(tok.decode(0, 325), "\xE2\x96\x81whispers");
}

// ---------------------------------------------------------------------------
// Small vocabularies

// A vocabulary of the given pieces, scores and types, plus <unk>, <s>, </s>
// at ids 0..2 (type 2, 3, 3).
SentencePieceVocab small_vocab(const std::vector<std::pair<std::string, float>>& entries,
                               std::vector<std::int32_t> types = {}) {
  SentencePieceVocab v;
  v.pieces = {"<unk>", "<s>", "</s>"};
  v.scores = {0, 0, 0};
  v.types = {2, 3, 3};
  for (std::size_t i = 0; i < entries.size(); ++i) {
    v.pieces.push_back(entries[i].first);
    v.scores.push_back(entries[i].second);
    v.types.push_back(i < types.size() ? types[i] : 1);
  }
  return v;
}

const std::string kSp = "\xE2\x96\x81";  // U+2581

TEST(SentencePieceMerges, HighestScoreFirst) {
  // "abc": "ab" (-2) and "bc" (-1): bc wins, then "a" + "bc" -> "abc"? only if a piece.
  const SentencePieceTokenizer spm(small_vocab({{"a", -5}, {"b", -5}, {"c", -5}, {"ab", -2}, {"bc", -1}, {kSp, -5}}));
  // ids: a 3, b 4, c 5, ab 6, bc 7, ▁ 8
  EXPECT_EQ(spm.encode("abc", false), (std::vector<int>{8, 3, 7}));
  SentencePieceVocab v = spm.vocab();
  v.scores[6] = 0;  // now "ab" scores higher
  EXPECT_EQ(SentencePieceTokenizer(v).encode("abc", false), (std::vector<int>{8, 6, 5}));
}

TEST(SentencePieceMerges, TiesGoToTheLeftmostPair) {
  const SentencePieceTokenizer spm(small_vocab({{"a", -5}, {"aa", -1}}));
  // "aaa": pairs (0,1) and (1,2) tie; the left one merges.
  SentencePieceVocab v = spm.vocab();
  v.add_space_prefix = false;
  EXPECT_EQ(SentencePieceTokenizer(v).encode("aaa", false), (std::vector<int>{4, 3}));
}

TEST(SentencePieceMerges, MergesPassThroughStringsThatAreNoTokensOfTheirOwn) {
  // "x" is not a piece, but "xy" is: llama.cpp merges characters, not tokens.
  SentencePieceVocab v = small_vocab({{"y", -5}, {"xy", -1}});
  v.add_space_prefix = false;
  EXPECT_EQ(SentencePieceTokenizer(v).encode("xy", false), (std::vector<int>{4}));
}

TEST(SentencePieceMerges, DuplicatedPiecesMapToTheHighestId) {
  SentencePieceVocab v = small_vocab({{"a", -5}, {"b", -5}, {"a", -5}});
  v.add_space_prefix = false;
  const SentencePieceTokenizer spm(v);
  EXPECT_EQ(spm.find("a"), 5);
  EXPECT_EQ(spm.encode("ab", false), (std::vector<int>{5, 4}));
  EXPECT_EQ(Tokenizer(v).find("a"), 5);
}

TEST(SentencePieceBytes, FallbackLooksUpTheBytePiece) {
  // Byte pieces at arbitrary ids, in a different order: found by their text.
  SentencePieceVocab v = small_vocab({{"<0xA9>", 0}, {"<0xC3>", 0}, {"z", 0}}, {6, 6, 1});
  v.add_space_prefix = false;
  const SentencePieceTokenizer spm(v);
  EXPECT_EQ(spm.encode("\xC3\xA9z", false), (std::vector<int>{4, 3, 5}));
  EXPECT_EQ(spm.detokenize({4, 3, 5}), "\xC3\xA9z");
  // A byte with no byte piece: the one-byte piece when there is one ("z"),
  // else unknown_id.
  EXPECT_EQ(spm.byte_token('z'), 5);
  EXPECT_EQ(spm.encode("\xF0\x9F\x98\x80", false), (std::vector<int>{0, 0, 0, 0}));
}

TEST(SentencePieceBytes, LowerCaseBytePiecesDecodeButAreNotFoundByFallback) {
  SentencePieceVocab v = small_vocab({{"<0xe9>", 0}}, {6});
  v.add_space_prefix = false;
  const SentencePieceTokenizer spm(v);
  EXPECT_EQ(spm.token_to_piece(3), "\xE9");
  EXPECT_EQ(spm.byte_token(0xE9), 0);  // llama.cpp looks up "<0xE9>" only
}

TEST(SentencePieceBytes, CharactersAreCutByTheirLeadByteAlone) {
  SentencePieceVocab v = small_vocab({{"\xC3" "a", 0}, {"<0x80>", 0}, {"<0xC3>", 0}}, {1, 6, 6});
  v.add_space_prefix = false;
  const SentencePieceTokenizer spm(v);
  // "\xC3a" is one symbol (the lead byte says 2 bytes), a piece here.
  EXPECT_EQ(spm.encode("\xC3" "a", false), (std::vector<int>{3}));
  // A stray continuation byte is a symbol of its own; a lead byte at the end
  // is cut short.
  EXPECT_EQ(spm.encode("\x80\xC3", false), (std::vector<int>{4, 5}));
}

TEST(SentencePieceSpaces, PrefixAndEscapes) {
  SentencePieceVocab v = small_vocab({{kSp, -5}, {"a", -5}, {kSp + "a", -1}});
  const SentencePieceTokenizer spm(v);
  EXPECT_EQ(spm.encode("a a", false), (std::vector<int>{5, 5}));
  EXPECT_EQ(spm.encode("", true), (std::vector<int>{1}));
  EXPECT_EQ(spm.encode("", false), (std::vector<int>{}));
  EXPECT_EQ(spm.detokenize({5, 5}), "a a");
  EXPECT_EQ(spm.detokenize({1, 5, 5}), " a a");
  v.add_space_prefix = false;
  v.add_bos = false;
  const SentencePieceTokenizer plain(v);
  EXPECT_EQ(plain.encode("a a", true), (std::vector<int>{4, 5}));
  EXPECT_EQ(plain.detokenize({5, 5}), " a a");
}

TEST(SentencePieceMerges, UserDefinedPiecesAreCutOutFirst) {
  // "ab" (user-defined) and "abc", "bc" (normal, scoring higher); no prefix
  // space.
  SentencePieceVocab v = small_vocab({{"a", 0}, {"b", 0}, {"c", 0}, {"ab", 0}, {"bc", 5}, {"abc", 9}, {kSp, 0},
                                      {kSp + "c", 9}, {"cab", 0}},
                                     {1, 1, 1, 4, 1, 1, 1, 1, 4});
  v.add_space_prefix = false;
  const SentencePieceTokenizer spm(v);
  // ids: a 3, b 4, c 5, ab 6, bc 7, abc 8, ▁ 9, ▁c 10, cab 11
  EXPECT_EQ(spm.encode("abc", false), (std::vector<int>{6, 5}));
  EXPECT_EQ(spm.encode("cabab", false), (std::vector<int>{11, 6}));  // longest first
  EXPECT_EQ(spm.encode("a b", false), (std::vector<int>{3, 9, 4}));
  v.add_space_prefix = true;
  const SentencePieceTokenizer prefixed(v);
  // The space prefix goes at the start and after each user-defined token.
  EXPECT_EQ(prefixed.encode("abc", false), (std::vector<int>{6, 10}));
  EXPECT_EQ(prefixed.encode("c", false), (std::vector<int>{10}));
}

TEST(SentencePieceDecode, ByTokenType) {
  // types: normal, unknown, control, user-defined, unused, undefined, byte
  const SentencePieceVocab v =
      small_vocab({{kSp + "n", 0}, {"<u>", 0}, {"<c>", 0}, {kSp + "ud", 0}, {"un", 0}, {"ud", 0}, {"<0x20>", 0}},
                  {1, 2, 3, 4, 5, 0, 6});
  const SentencePieceTokenizer spm(v);
  EXPECT_EQ(spm.token_to_piece(3), " n");
  EXPECT_EQ(spm.token_to_piece(3, true), "n");
  EXPECT_EQ(spm.token_to_piece(4), "");
  EXPECT_EQ(spm.token_to_piece(5), "");
  EXPECT_EQ(spm.token_to_piece(6), kSp + "ud");
  EXPECT_EQ(spm.token_to_piece(7), "");
  EXPECT_EQ(spm.token_to_piece(8), "");
  EXPECT_EQ(spm.token_to_piece(9), " ");
  EXPECT_EQ(spm.token_to_piece(9, true), "");
  EXPECT_EQ(spm.token_to_piece(1), "");
  EXPECT_THROW(spm.token_to_piece(10), std::out_of_range);
  EXPECT_THROW(spm.token_to_piece(-1), std::out_of_range);
  EXPECT_EQ(spm.decode(1, 3), "n");
  EXPECT_EQ(spm.decode(3, 3), " n");
  const Tokenizer tok(v);
  EXPECT_EQ(tok.decode(1, 3), "n");
  EXPECT_EQ(tok.decode(std::vector<int>{3, 3}), "n n");
  EXPECT_EQ(tok.piece(3), kSp + "n");
  EXPECT_EQ(tok.vocab_size(), 10u);
  EXPECT_EQ(tok.encode("", true, true), (std::vector<int>{1, 2}));
}

// ---------------------------------------------------------------------------
// Validation

void expect_invalid(const SentencePieceVocab& v, const std::string& message_part) {
  try {
    SentencePieceTokenizer spm(v);
    ADD_FAILURE() << "no exception, expected one mentioning '" << message_part << "'";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(message_part), std::string::npos) << e.what();
  }
}

TEST(SentencePieceVocabCheck, RefusesInconsistentVocabularies) {
  const SentencePieceVocab good = small_vocab({{"a", 0}, {"<0x41>", 0}}, {1, 6});
  EXPECT_NO_THROW(SentencePieceTokenizer{good});
  SentencePieceVocab v = good;
  v.scores.pop_back();
  expect_invalid(v, "5 pieces but 4 scores and 5 types");
  v = good;
  v.types.push_back(1);
  expect_invalid(v, "5 pieces but 5 scores and 6 types");
  expect_invalid(SentencePieceVocab{}, "no pieces");
  v = good;
  v.bos_id = 5;
  expect_invalid(v, "bos_id 5 is outside the vocabulary [0, 5)");
  v = good;
  v.eos_id = -1;
  expect_invalid(v, "eos_id -1");
  v = good;
  v.unknown_id = 7;
  expect_invalid(v, "unknown_id 7");
  v = good;
  v.pieces[3].clear();
  expect_invalid(v, "token 3 has an empty piece");
  v = good;
  v.scores[3] = std::numeric_limits<float>::quiet_NaN();
  expect_invalid(v, "token 3 has a NaN score");
  v = good;
  v.types[3] = 7;
  expect_invalid(v, "token 3 has type 7");
  for (const char* bad : {"<0x4>", "<0x4G>", "<0X41>", "<0x41>x", "A"}) {
    v = good;
    v.pieces[4] = bad;
    expect_invalid(v, "token 4 is a byte token (type 6) but its piece");
  }
}

// Any BOS and EOS ids: a Tokenizer encodes and decodes with the vocabulary's.
TEST(SentencePieceVocabCheck, TokenizerUsesTheVocabularysSpecialIds) {
  SentencePieceVocab v = small_vocab({{"a", 0}, {"b", 0}, {kSp + "a", 1}});
  v.bos_id = 3;
  v.eos_id = 4;
  const Tokenizer tok{v};
  ASSERT_NE(tok.sentencepiece(), nullptr);
  EXPECT_EQ(tok.sentencepiece()->vocab().bos_id, 3);
  EXPECT_EQ(tok.encode("a", /*bos=*/true, /*eos=*/true), (std::vector<int>{3, 5, 4}));
  EXPECT_EQ(tok.decode(3, 5), "a");    // after BOS: no leading space
  EXPECT_EQ(tok.decode(1, 5), " a");   // 1 is no BOS here
  v.pieces[3].clear();
  EXPECT_THROW(Tokenizer{v}, std::invalid_argument);
}

}  // namespace
