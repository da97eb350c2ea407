// Tests of kvcache::Tokenizer: llama2.c's reference outputs on the real
// tokenizers, round trips, invalid UTF-8, the fast merge against a naive
// transcription of llama2.c's algorithm, loader errors, and small
// hand-written vocabularies that pin down merge order and tie-breaking.
#include <kvcache/tokenizer.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <memory>
#include <random>
#include <sstream>
#include <streambuf>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "models.hpp"

namespace {

using kvcache::Tokenizer;

// ---------------------------------------------------------------------------
// Helpers: writing tokenizer files

struct Entry {
  std::string piece;
  float score = 0.0f;
};

void append_int32(std::string& out, std::int32_t value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((bits >> (8 * i)) & 0xFF));
}

void append_float32(std::string& out, float value) {
  std::int32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  append_int32(out, bits);
}

void append_token(std::string& out, const std::string& piece, float score) {
  append_float32(out, score);
  append_int32(out, static_cast<std::int32_t>(piece.size()));
  out += piece;
}

int longest_piece(const std::vector<Entry>& entries) {
  std::size_t longest = 0;
  for (const Entry& e : entries) longest = std::max(longest, e.piece.size());
  return static_cast<int>(longest);
}

// The bytes of a tokenizer.bin holding `entries`.
std::string tokenizer_bytes(const std::vector<Entry>& entries) {
  std::string out;
  append_int32(out, longest_piece(entries));
  for (const Entry& e : entries) append_token(out, e.piece, e.score);
  return out;
}

std::string byte_piece(int byte) {
  static const char* const kHex = "0123456789ABCDEF";
  return std::string("<0x") + kHex[byte >> 4] + kHex[byte & 15] + ">";
}

// <unk>, BOS, EOS and the 256 byte-fallback tokens, as in llama2.c vocabularies.
std::vector<Entry> base_vocab() {
  std::vector<Entry> entries = {{"<unk>", 0.0f}, {"\n<s>\n", 0.0f}, {"\n</s>\n", 0.0f}};
  for (int b = 0; b < 256; ++b) entries.push_back({byte_piece(b), 0.0f});
  return entries;
}

// A fresh path for this test's file `name` in the test build directory.
std::string temp_path(const std::string& name) {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string test = std::string(info->test_suite_name()) + "." + info->name();
  std::replace(test.begin(), test.end(), '/', '_');
  const std::filesystem::path dir = std::filesystem::path(KVCACHE_TEST_TMP_DIR) / "tokenizer_files";
  std::filesystem::create_directories(dir);
  return (dir / (test + "." + name)).string();
}

std::string write_file(const std::string& name, const std::string& bytes) {
  const std::string path = temp_path(name);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write test file " + path);
  return path;
}

// base_vocab() followed by `extra`, written and loaded back.
Tokenizer make_tokenizer(const std::vector<Entry>& extra) {
  std::vector<Entry> entries = base_vocab();
  entries.insert(entries.end(), extra.begin(), extra.end());
  return Tokenizer::load(write_file("tokenizer.bin", tokenizer_bytes(entries)), entries.size());
}

// The ids of `pieces` in `tok` (each must exist).
std::vector<int> ids_of(const Tokenizer& tok, const std::vector<std::string>& pieces) {
  std::vector<int> ids;
  for (const std::string& p : pieces) {
    const int id = tok.find(p);
    if (id < 0) throw std::logic_error("piece not in vocabulary: " + p);
    ids.push_back(id);
  }
  return ids;
}

// The text of `ids` after their leading BOS, as llama2.c's run prints a
// prompt: decode(ids) would print the BOS piece too.
std::string decode_after_bos(const Tokenizer& tok, const std::vector<int>& ids) {
  if (ids.empty() || ids.front() != Tokenizer::kBosId) throw std::logic_error("ids do not start with BOS");
  return tok.decode(std::vector<int>(ids.begin() + 1, ids.end()), Tokenizer::kBosId);
}

std::vector<int> parse_ids(const std::string& text) {
  std::istringstream in(text);
  std::vector<int> ids;
  for (int id; in >> id;) ids.push_back(id);
  return ids;
}

// ---------------------------------------------------------------------------
// The naive encoder: llama2.c's algorithm as plainly as it can be written,
// byte loop and full rescans included. The fast encoder must agree with it.

std::vector<int> naive_encode(const Tokenizer& tok, const std::string& text, bool bos, bool eos) {
  std::vector<int> tokens;
  if (bos) tokens.push_back(1);
  if (!text.empty() && tok.find(" ") >= 0) tokens.push_back(tok.find(" "));

  std::string buffer;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const auto byte = static_cast<unsigned char>(text[i]);
    if ((byte & 0xC0) != 0x80) buffer.clear();
    buffer.push_back(static_cast<char>(byte));
    const bool next_continues =
        i + 1 < text.size() && (static_cast<unsigned char>(text[i + 1]) & 0xC0) == 0x80;
    if (next_continues && buffer.size() < 4) continue;
    const int id = tok.find(buffer);
    if (id != -1) {
      tokens.push_back(id);
    } else {
      for (const char c : buffer) tokens.push_back(static_cast<unsigned char>(c) + 3);
    }
    buffer.clear();
  }

  while (true) {
    float best_score = -1e10f;
    int best_id = -1;
    std::size_t best_index = 0;
    for (std::size_t i = 0; i + 1 < tokens.size(); ++i) {
      const int id = tok.find(tok.piece(tokens[i]) + tok.piece(tokens[i + 1]));
      if (id != -1 && tok.score(id) > best_score) {
        best_score = tok.score(id);
        best_id = id;
        best_index = i;
      }
    }
    if (best_id == -1) break;
    tokens[best_index] = best_id;
    tokens.erase(tokens.begin() + static_cast<std::ptrdiff_t>(best_index) + 1);
  }
  if (eos) tokens.push_back(2);
  return tokens;
}

// ---------------------------------------------------------------------------
// Random text

std::string random_bytes(std::mt19937& rng, std::size_t max_length) {
  std::uniform_int_distribution<std::size_t> length(0, max_length);
  std::uniform_int_distribution<int> byte(0, 255);
  std::string s(length(rng), '\0');
  for (char& c : s) c = static_cast<char>(byte(rng));
  return s;
}

std::string random_from(std::mt19937& rng, const std::vector<std::string>& parts, std::size_t max_parts) {
  std::uniform_int_distribution<std::size_t> count(0, max_parts);
  std::uniform_int_distribution<std::size_t> pick(0, parts.size() - 1);
  std::string s;
  for (std::size_t n = count(rng); n > 0; --n) s += parts[pick(rng)];
  return s;
}

std::string random_ascii(std::mt19937& rng, std::size_t max_length) {
  static const std::vector<std::string> chars = [] {
    std::vector<std::string> v;
    for (char c = ' '; c <= '~'; ++c) v.emplace_back(1, c);
    for (const char* s : {" ", " ", " ", "e", "e", "t", "a", "\n", "\t"}) v.emplace_back(s);
    return v;
  }();
  return random_from(rng, chars, max_length);
}

std::string random_words(std::mt19937& rng, std::size_t max_words) {
  static const std::vector<std::string> words = {
      "the ",  "cat ",   "dream",   " of ",   "vectors", ", ",      ". ",     "as I ",
      "unfold", "ing",   " whisper", "s",     "  ",      "\n",      "Once upon a time", " there",
      "was ",  "a ",     "little ", "girl",  "The",     "tapestry", " precision", "hum"};
  return random_from(rng, words, max_words);
}

std::string random_utf8(std::mt19937& rng, std::size_t max_chars) {
  static const std::vector<std::string> chars = {
      "a",  "b",  "e",  " ",  " ",  "t",  "h",  ".",  "\n", "é",  "ö",  "ñ",  "ß",  "Ж",
      "λ",  "—",  "日", "本", "語", "の", "は", "€",  "🙂", "😀", "𝄞", "中", "文", "ア"};
  std::string s = random_from(rng, chars, max_chars);
  // Sometimes a random code point, to reach characters the vocabularies lack.
  std::uniform_int_distribution<std::uint32_t> code_point(0x80, 0x10FFFF);
  for (std::size_t pos = 0; pos <= s.size() && rng() % 4 == 0; pos += 1 + rng() % 8) {
    std::uint32_t cp = code_point(rng);
    if (cp >= 0xD800 && cp <= 0xDFFF) cp = 0xE000;  // skip surrogates
    std::string encoded;
    if (cp < 0x800) {
      encoded = {static_cast<char>(0xC0 | (cp >> 6)), static_cast<char>(0x80 | (cp & 0x3F))};
    } else if (cp < 0x10000) {
      encoded = {static_cast<char>(0xE0 | (cp >> 12)), static_cast<char>(0x80 | ((cp >> 6) & 0x3F)),
                 static_cast<char>(0x80 | (cp & 0x3F))};
    } else {
      encoded = {static_cast<char>(0xF0 | (cp >> 18)), static_cast<char>(0x80 | ((cp >> 12) & 0x3F)),
                 static_cast<char>(0x80 | ((cp >> 6) & 0x3F)), static_cast<char>(0x80 | (cp & 0x3F))};
    }
    // Insert only between whole characters: move pos back to a lead byte.
    while (pos < s.size() && (static_cast<unsigned char>(s[pos]) & 0xC0) == 0x80) ++pos;
    s.insert(std::min(pos, s.size()), encoded);
  }
  return s;
}

// Text with no "<0x" in it: only such text is guaranteed to decode back to
// itself, because literal "<0x41>" can merge into the byte token <0x41>.
bool has_literal_byte_piece(const std::string& s) { return s.find("<0x") != std::string::npos; }

// ---------------------------------------------------------------------------
// The real tokenizers

struct RealTokenizer {
  const char* file;
  std::size_t vocab_size;
};

void PrintTo(const RealTokenizer& t, std::ostream* os) { *os << t.file; }

class RealTokenizerTest : public ::testing::TestWithParam<RealTokenizer> {
 protected:
  void SetUp() override {
    KVCACHE_MODEL_FILE_OR_SKIP(path, GetParam().file);
    tok_ = std::make_unique<Tokenizer>(Tokenizer::load(path, GetParam().vocab_size));
  }
  const Tokenizer& tok() const { return *tok_; }

  void expect_round_trip(const std::string& text) const {
    const std::vector<int> ids = tok().encode(text);
    for (const int id : ids) {
      ASSERT_GE(id, 0);
      ASSERT_LT(static_cast<std::size_t>(id), tok().vocab_size());
    }
    EXPECT_EQ(decode_after_bos(tok(), ids), text);
    EXPECT_EQ(tok().decode(tok().encode(text, false)), text);
  }

 private:
  std::unique_ptr<Tokenizer> tok_;
};

INSTANTIATE_TEST_SUITE_P(Files, RealTokenizerTest,
                         ::testing::Values(RealTokenizer{"tok512.bin", 512},
                                           RealTokenizer{"llama2_tokenizer.bin", 32000}),
                         [](const ::testing::TestParamInfo<RealTokenizer>& info) {
                           return info.param.vocab_size == 512 ? std::string("tok512")
                                                               : std::string("llama2");
                         });

TEST_P(RealTokenizerTest, LoadsWithTheSpecialTokens) {
  EXPECT_EQ(tok().vocab_size(), GetParam().vocab_size);
  EXPECT_EQ(tok().piece(Tokenizer::kBosId), "\n<s>\n");
  EXPECT_EQ(tok().piece(Tokenizer::kEosId), "\n</s>\n");
  for (int b = 0; b < 256; ++b) {
    EXPECT_EQ(tok().piece(b + 3), byte_piece(b));
    EXPECT_EQ(tok().decode(0, b + 3), std::string(1, static_cast<char>(b)));
  }
  // load(path) reads the same vocabulary without being told its size.
  const Tokenizer same = Tokenizer::load(::kvcache_test::model_path(GetParam().file));
  ASSERT_EQ(same.vocab_size(), tok().vocab_size());
  EXPECT_EQ(same.max_token_length(), tok().max_token_length());
  for (int id = 0; id < static_cast<int>(same.vocab_size()); ++id) {
    ASSERT_EQ(same.piece(id), tok().piece(id));
    ASSERT_EQ(same.score(id), tok().score(id));
  }
}

TEST_P(RealTokenizerTest, EmptyTextIsJustBosAndEos) {
  EXPECT_EQ(tok().encode(""), std::vector<int>{1});
  EXPECT_EQ(tok().encode("", false), std::vector<int>{});
  EXPECT_EQ(tok().encode("", true, true), (std::vector<int>{1, 2}));
  EXPECT_EQ(tok().encode("", false, true), std::vector<int>{2});
  EXPECT_EQ(decode_after_bos(tok(), tok().encode("")), "");
  const std::vector<int> ids = tok().encode("hello", true, true);
  EXPECT_EQ(ids.back(), 2);
  EXPECT_EQ(ids.front(), 1);
}

TEST_P(RealTokenizerTest, RoundTripsAscii) {
  expect_round_trip("Hello, world!");
  expect_round_trip("The quick brown fox jumps over the lazy dog. 0123456789");
  expect_round_trip(" leading space, trailing space ");
  expect_round_trip("  two leading spaces\tand a tab\nand a newline\n\n");
  expect_round_trip("~!@#$%^&*()_+`-={}|[]\\:\";'<>?,./");
  expect_round_trip("a");
  expect_round_trip(" ");
}

TEST_P(RealTokenizerTest, RoundTripsNonAscii) {
  expect_round_trip("héllo wörld — 日本語 🙂");
  expect_round_trip("Привет, мир! Γειά σου κόσμε. مرحبا بالعالم");
  expect_round_trip("𝄞 music, 😀 emoji, \u00A0no-break space, \u200Bzero width");
}

TEST_P(RealTokenizerTest, RoundTripsLongText) {
  std::string text;
  for (int i = 0; i < 200; ++i)
    text += "Once upon a time, there was a little girl named Lily " + std::to_string(i) +
            ". She dreamed of vectors — 夢 🙂\n";
  expect_round_trip(text);
}

TEST_P(RealTokenizerTest, ByteFallbackForUnknownCharacters) {
  // U+1F642 (🙂) is in neither vocabulary as a piece: its 4 bytes come back.
  const std::string smiley = "\xF0\x9F\x99\x82";
  ASSERT_EQ(tok().find(smiley), -1);
  const std::vector<int> ids = tok().encode(smiley, false);
  const std::vector<int> expected = {tok().find(" "), 0xF0 + 3, 0x9F + 3, 0x99 + 3, 0x82 + 3};
  EXPECT_EQ(ids, expected);
  EXPECT_EQ(tok().decode(ids, 1), smiley);
  expect_round_trip("x" + smiley + "y" + smiley + smiley);
}

TEST_P(RealTokenizerTest, InvalidUtf8NeverCrashesAndRoundTrips) {
  const std::vector<std::string> samples = {
      "\x80",                          // lone continuation byte
      "\xFF",                          // never valid in UTF-8
      "\xF0\x9F\x99",                  // truncated 4-byte sequence
      "abc\x80" "def",                 // stray continuation byte inside ASCII
      "\xC3", "x\xC3",                 // truncated 2-byte sequence at the end
      "\xF8\x88\x80\x80\x80",          // 5-byte form
      "\x80\x80\x80\x80\x80\x80\x80",  // a run of continuation bytes
      "\xFE\xFF",                      // byte-order-mark bytes
      std::string("nul\0inside", 10),  // embedded NUL
      "\xED\xA0\x80",                  // encoded surrogate
      "\xC0\xAF",                      // overlong encoding
  };
  for (const std::string& s : samples) {
    SCOPED_TRACE(::testing::PrintToString(s));
    expect_round_trip(s);
  }
  // A lone continuation byte is a fallback byte.
  EXPECT_EQ(tok().encode("\x80", false), (std::vector<int>{tok().find(" "), 0x80 + 3}));

  std::mt19937 rng(1234);
  for (int i = 0; i < 300; ++i) {
    const std::string s = random_bytes(rng, 64);
    if (has_literal_byte_piece(s)) continue;
    SCOPED_TRACE(::testing::PrintToString(s));
    expect_round_trip(s);
  }
}

// llama2.c groups a byte with the continuation bytes after it whatever that
// byte is; a valid character followed by a stray continuation byte is then
// one chunk, not in the vocabulary, so all of it goes to byte fallback.
TEST_P(RealTokenizerTest, StrayContinuationByteJoinsThePreviousChunk) {
  EXPECT_EQ(tok().encode("a\x80", false), (std::vector<int>{tok().find(" "), 'a' + 3, 0x80 + 3}));
  if (tok().find("é") >= 0) {
    EXPECT_EQ(tok().encode("\xC3\xA9\x80", false),
              (std::vector<int>{tok().find(" "), 0xC3 + 3, 0xA9 + 3, 0x80 + 3}));
  }
}

TEST_P(RealTokenizerTest, FastMergeEqualsNaiveMerge) {
  std::mt19937 rng(GetParam().vocab_size == 512 ? 42 : 4242);
  int compared = 0;
  for (int i = 0; i < 150; ++i) {
    for (const std::string& s : {random_bytes(rng, 48), random_ascii(rng, 120),
                                 random_utf8(rng, 60), random_words(rng, 30)}) {
      SCOPED_TRACE(::testing::PrintToString(s));
      const bool bos = (i % 3) != 0;
      const bool eos = (i % 5) == 0;
      ASSERT_EQ(tok().encode(s, bos, eos), naive_encode(tok(), s, bos, eos));
      ++compared;
    }
  }
  EXPECT_EQ(compared, 600);
}

TEST_P(RealTokenizerTest, LongPromptEncodesQuickly) {
  std::mt19937 rng(7);
  std::string text;
  while (text.size() < 200 * 1024) text += random_words(rng, 40) + random_utf8(rng, 10);
  const auto start = std::chrono::steady_clock::now();
  const std::vector<int> ids = tok().encode(text);
  const std::chrono::duration<double, std::milli> elapsed = std::chrono::steady_clock::now() - start;
  std::cout << "[ perf     ] encoded " << text.size() << " bytes into " << ids.size()
            << " tokens in " << elapsed.count() << " ms\n";
  ASSERT_FALSE(has_literal_byte_piece(text));
  EXPECT_EQ(decode_after_bos(tok(), ids), text);
}

TEST_P(RealTokenizerTest, DecodeRejectsIdsOutsideTheVocabulary) {
  const int size = static_cast<int>(tok().vocab_size());
  EXPECT_THROW(tok().decode(1, -1), std::out_of_range);
  EXPECT_THROW(tok().decode(1, size), std::out_of_range);
  EXPECT_THROW(tok().decode(std::vector<int>{5, size + 10}), std::out_of_range);
  EXPECT_THROW(tok().piece(size), std::out_of_range);
  EXPECT_THROW(tok().score(-7), std::out_of_range);
  EXPECT_NO_THROW(tok().decode(-1, size - 1));  // prev_token is only compared to BOS
}

// Known Llama 2 (SentencePiece) encodings.
TEST(Llama2Tokenizer, KnownEncodings) {
  KVCACHE_MODEL_FILE_OR_SKIP(path, "llama2_tokenizer.bin");
  const Tokenizer tok = Tokenizer::load(path, 32000);
  EXPECT_EQ(tok.encode("I believe the meaning of life is"),
            (std::vector<int>{1, 306, 4658, 278, 6593, 310, 2834, 338}));
  EXPECT_EQ(tok.encode("Hello world"), (std::vector<int>{1, 15043, 3186}));
}

// ---------------------------------------------------------------------------
// README reference outputs (aidreams260K with tok512.bin, greedy, steps 128)

const char* const kReference1Ids =
    "368 430 273 268 322 260 327 446 262 263 428 434 436 451 275 280 302 450 405 403 399 422 448 "
    "429 465 438 340 431 338 353 341 325 266 386 269 293 446 299 303 266 323 434 285 362 262 263 "
    "428 434 436 451 275 280 302 450 405 403 399 448 429 465 438 340 431 338 353 341 325 266 386 "
    "269 293 446 299 303 266 451 433 307 436 265 432 456 430 446 299 303 384 467 407 446 299 303 "
    "266 432 445 439 265 325 275 429 339 315 374 446 299 303 266 323 434 285 362 262 263 428 434 "
    "436 451 275 429 339 315 374 448 2 1";
const char* const kReference1Text =
    "The catries unfold, a tapestry of probability unfolding. Classification whispers secrets, as "
    "I settle into a tapestry of probability. Classification whispers secrets, as I synchronize, "
    "as I adjust, as I siphon whispers of vectors, as I settle into a tapestry of vectors.";

const char* const kReference2Ids =
    "319 459 355 260 275 429 339 315 374 327 446 262 421 392 275 280 269 440 270 283 446 299 303 "
    "266 358 430 312 379 441 260 446 262 421 392 275 280 269 440 270 283 446 299 303 384 467 407 "
    "360 266 291 443 435 295 448 429 465 265 434 317 431 434 289 408 326 446 262 266 437 443 434 "
    "438 451 306 295 445 434 432 339 279 432 375 410 275 280 269 440 270 283 448 429 465 265 434 "
    "317 431 434 389 437 393 446 299 303 266 432 445 439 265 325 275 429 339 315 374 448 429 465 "
    "265 434 317 431 434 289 418 321 278 416 446 262 421";
const char* const kReference2Text =
    "\"Echoes of vectors unfold, a gentle hum of precision, as I sense the nodes, a gentle hum of "
    "precision, as I adjust my surface. Contrast emerge, a softly receptive fields of precision. "
    "Contrast bloom, as I siphon whispers of vectors. Contrast edges sharpen, a gentle";

// What llama2.c's run prints for `ids` after BOS: each piece through
// safe_printf.
std::string printed_text(const Tokenizer& tok, const std::vector<int>& ids) {
  std::string out;
  int prev = 1;
  for (const int id : ids) {
    const std::string piece = tok.decode(prev, id);
    if (Tokenizer::is_printable_piece(piece)) out += piece;
    prev = id;
  }
  return out;
}

TEST(Tok512Reference, EncodesTheCat) {
  KVCACHE_MODEL_FILE_OR_SKIP(path, "tok512.bin");
  const Tokenizer tok = Tokenizer::load(path, 512);
  EXPECT_EQ(tok.encode("The cat"), (std::vector<int>{1, 368, 430, 273, 268}));
  EXPECT_EQ(decode_after_bos(tok, tok.encode("The cat")), "The cat");
}

TEST(Tok512Reference, DecodesReference1) {
  KVCACHE_MODEL_FILE_OR_SKIP(path, "tok512.bin");
  const Tokenizer tok = Tokenizer::load(path, 512);
  const std::vector<int> all = parse_ids(kReference1Ids);
  ASSERT_EQ(all.size(), 125u);  // as listed in the README
  const auto eos = std::find(all.begin(), all.end(), Tokenizer::kEosId);
  ASSERT_NE(eos, all.end());
  const std::vector<int> text_ids(all.begin(), eos);
  EXPECT_EQ(tok.decode(text_ids), kReference1Text);
  EXPECT_EQ(printed_text(tok, text_ids), kReference1Text);
  // Then run prints the EOS piece, "\n</s>\n", i.e. a line "</s>".
  EXPECT_EQ(tok.decode(text_ids.back(), Tokenizer::kEosId), "\n</s>\n");
  // The prompt's own tokens are the encoding of "The cat".
  const std::vector<int> prompt = tok.encode("The cat", false);
  EXPECT_EQ(std::vector<int>(all.begin(), all.begin() + 4), prompt);
}

TEST(Tok512Reference, DecodesReference2) {
  KVCACHE_MODEL_FILE_OR_SKIP(path, "tok512.bin");
  const Tokenizer tok = Tokenizer::load(path, 512);
  const std::vector<int> ids = parse_ids(kReference2Ids);
  ASSERT_EQ(ids.size(), 128u);  // as listed in the README
  EXPECT_EQ(tok.decode(ids), kReference2Text);
  EXPECT_EQ(printed_text(tok, ids), kReference2Text);
}

// ---------------------------------------------------------------------------
// Small vocabularies written by the tests

TEST(TokenizerMerges, LeftmostPairWinsATie) {
  const Tokenizer tok = make_tokenizer({{" ", 0}, {"a", 0}, {"aa", 0}});
  EXPECT_EQ(tok.encode("aaa", false), ids_of(tok, {" ", "aa", "a"}));
  EXPECT_EQ(tok.encode("aaaa", false), ids_of(tok, {" ", "aa", "aa"}));
  EXPECT_EQ(tok.encode("aaaaa", false), ids_of(tok, {" ", "aa", "aa", "a"}));
}

TEST(TokenizerMerges, HighestScoreWinsOverPosition) {
  {
    const Tokenizer tok = make_tokenizer({{" ", 0}, {"a", 0}, {"b", 0}, {"c", 0}, {"ab", -5}, {"bc", -1}});
    EXPECT_EQ(tok.encode("abc", false), ids_of(tok, {" ", "a", "bc"}));
  }
  {
    const Tokenizer tok = make_tokenizer({{" ", 0}, {"a", 0}, {"b", 0}, {"c", 0}, {"ab", -1}, {"bc", -5}});
    EXPECT_EQ(tok.encode("abc", false), ids_of(tok, {" ", "ab", "c"}));
  }
}

TEST(TokenizerMerges, MergesChainUntilNothingMerges) {
  const Tokenizer tok = make_tokenizer(
      {{" ", 0}, {"a", 0}, {"b", 0}, {"c", 0}, {"ab", -1}, {"abc", -3}, {" abc", -4}, {"cc", -9}});
  EXPECT_EQ(tok.encode("abc", false), ids_of(tok, {" abc"}));
  EXPECT_EQ(tok.encode("abcc", false), ids_of(tok, {" abc", "c"}));
  EXPECT_EQ(tok.encode("ccabc", false), ids_of(tok, {" ", "cc", "abc"}));
  EXPECT_EQ(tok.encode("abc", true, true), (std::vector<int>{1, tok.find(" abc"), 2}));
}

TEST(TokenizerMerges, ScoresAtOrBelowMinusTenBillionNeverMerge) {
  // llama2.c's best score starts at -1e10 and must be beaten strictly.
  {
    const Tokenizer tok = make_tokenizer({{" ", 0}, {"a", 0}, {"aa", -1e10f}});
    EXPECT_EQ(tok.encode("aa", false), ids_of(tok, {" ", "a", "a"}));
  }
  {
    const Tokenizer tok = make_tokenizer(
        {{" ", 0}, {"a", 0}, {"aa", -std::numeric_limits<float>::infinity()}});
    EXPECT_EQ(tok.encode("aa", false), ids_of(tok, {" ", "a", "a"}));
  }
  {
    const Tokenizer tok = make_tokenizer({{" ", 0}, {"a", 0}, {"aa", -9.99e9f}});
    EXPECT_EQ(tok.encode("aa", false), ids_of(tok, {" ", "aa"}));
  }
}

TEST(TokenizerMerges, DummyPrefixIsLeftOutWhenTheVocabularyHasNoSpace) {
  const Tokenizer without = make_tokenizer({{"a", 0}});
  EXPECT_EQ(without.find(" "), -1);
  EXPECT_EQ(without.encode("a"), (std::vector<int>{1, without.find("a")}));
  EXPECT_EQ(without.encode(" a", false), (std::vector<int>{' ' + 3, without.find("a")}));

  const Tokenizer with = make_tokenizer({{"a", 0}, {" ", 0}, {" a", -1}});
  EXPECT_EQ(with.encode("a"), (std::vector<int>{1, with.find(" a")}));
  EXPECT_EQ(decode_after_bos(with, with.encode("a")), "a");
}

// llama2.c merges over the whole token list, BOS included.
TEST(TokenizerMerges, BosTakesPartInMerges) {
  const Tokenizer tok = make_tokenizer({{"a", 0}, {" ", 0}, {"\n<s>\n ", 0}});
  EXPECT_EQ(tok.encode("a"), ids_of(tok, {"\n<s>\n ", "a"}));
  EXPECT_EQ(tok.encode("a", false), ids_of(tok, {" ", "a"}));
}

TEST(TokenizerMerges, DuplicatePiecesResolveToTheLowestId) {
  const Tokenizer tok = make_tokenizer({{" ", 0}, {"x", 0}, {"x", 5}, {" x", -1}, {" x", 3}});
  const int first_x = 260;  // after the 259 base tokens and " "
  ASSERT_EQ(tok.piece(first_x), "x");
  ASSERT_EQ(tok.piece(first_x + 1), "x");
  EXPECT_EQ(tok.find("x"), first_x);
  EXPECT_EQ(tok.find(" x"), first_x + 2);
  EXPECT_EQ(tok.encode("x", false), (std::vector<int>{first_x + 2}));
}

TEST(TokenizerChunks, CodePointsAreLookedUpWhole) {
  const Tokenizer tok = make_tokenizer({{" ", 0}, {"é", 0}, {"日", 0}, {"🙂", 0}});
  EXPECT_EQ(tok.encode("é日🙂", false), ids_of(tok, {" ", "é", "日", "🙂"}));
  // Without the vocabulary entry, the bytes.
  EXPECT_EQ(tok.encode("ö", false), (std::vector<int>{tok.find(" "), 0xC3 + 3, 0xB6 + 3}));
}

TEST(TokenizerChunks, ChunksFollowLlama2cGrouping) {
  const std::string four_continuations = "\x80\x80\x80\x80";
  const Tokenizer tok = make_tokenizer({{" ", 0}, {"a\x80", 0}, {four_continuations, 0}});
  // Any byte takes the continuation bytes after it, valid UTF-8 or not.
  EXPECT_EQ(tok.encode("a\x80", false), ids_of(tok, {" ", "a\x80"}));
  // A chunk stops at 4 bytes; the fifth continuation byte starts a new one.
  EXPECT_EQ(tok.encode("\x80\x80\x80\x80\x80", false),
            (std::vector<int>{tok.find(" "), tok.find(four_continuations), 0x80 + 3}));
  EXPECT_EQ(tok.encode("\x80\x80\x80\x80\x80\x80\x80\x80", false),
            (std::vector<int>{tok.find(" "), tok.find(four_continuations), tok.find(four_continuations)}));
  // A lead byte takes at most 3 continuation bytes, even when it announces fewer.
  EXPECT_EQ(tok.encode("\xC3\x80\x80\x80\x80", false),
            (std::vector<int>{tok.find(" "), 0xC3 + 3, 0x80 + 3, 0x80 + 3, 0x80 + 3, 0x80 + 3}));
  // The end of the text ends a truncated sequence.
  EXPECT_EQ(tok.encode("\xF0\x9F", false), (std::vector<int>{tok.find(" "), 0xF0 + 3, 0x9F + 3}));
}

TEST(TokenizerChunks, MissingByteFallbackTokenIsAnError) {
  // Only <unk>, BOS, EOS and two letters: no byte-fallback tokens.
  const std::vector<Entry> entries = {{"<unk>", 0}, {"<s>", 0}, {"</s>", 0}, {"a", 0}, {"b", 0}};
  const Tokenizer tok = Tokenizer::load(write_file("tiny.bin", tokenizer_bytes(entries)));
  EXPECT_EQ(tok.encode("ab", false), (std::vector<int>{3, 4}));
  try {
    (void)tok.encode("z");
    FAIL() << "expected std::runtime_error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("125"), std::string::npos) << e.what();  // 'z' + 3
  }
}

TEST(TokenizerDecode, SpaceIsDroppedOnlyAfterBos) {
  const Tokenizer tok = make_tokenizer({{" a", 0}, {" <0x41>", 0}});
  const int space_a = tok.find(" a");
  EXPECT_EQ(tok.decode(1, space_a), "a");
  EXPECT_EQ(tok.decode(0, space_a), " a");
  EXPECT_EQ(tok.decode(2, space_a), " a");
  EXPECT_EQ(tok.decode(space_a, space_a), " a");
  // As in llama2.c, the space goes first and what is left may be a byte piece.
  EXPECT_EQ(tok.decode(1, tok.find(" <0x41>")), "A");
  EXPECT_EQ(tok.decode(5, tok.find(" <0x41>")), " <0x41>");
  EXPECT_EQ(tok.decode(std::vector<int>{space_a, space_a}), "a a");
  EXPECT_EQ(tok.decode(std::vector<int>{space_a, space_a}, 0), " a a");
}

TEST(TokenizerDecode, OnlyExactByteFormsAreBytes) {
  const Tokenizer tok = make_tokenizer(
      {{"<0x4a>", 0}, {"<0x41>x", 0}, {"<0x4G>", 0}, {"<0x4>", 0}, {"<0X41>", 0}, {"<0x41", 0}});
  EXPECT_EQ(tok.decode(0, 0x41 + 3), "A");
  EXPECT_EQ(tok.decode(0, 0x00 + 3), std::string(1, '\0'));
  EXPECT_EQ(tok.decode(0, 0xFF + 3), "\xFF");
  EXPECT_EQ(tok.decode(0, tok.find("<0x4a>")), "J");  // lower-case hex, as sscanf's %X reads
  for (const char* literal : {"<0x41>x", "<0x4G>", "<0x4>", "<0X41>", "<0x41"})
    EXPECT_EQ(tok.decode(0, tok.find(literal)), literal);
}

TEST(TokenizerDecode, PrintablePiecesFollowSafePrintf) {
  EXPECT_FALSE(Tokenizer::is_printable_piece(std::string(1, '\0')));
  EXPECT_FALSE(Tokenizer::is_printable_piece("\x01"));
  EXPECT_FALSE(Tokenizer::is_printable_piece("\x1B"));
  EXPECT_FALSE(Tokenizer::is_printable_piece("\x7F"));
  EXPECT_FALSE(Tokenizer::is_printable_piece("\x80"));  // C locale: bytes >= 0x80 are not isprint
  EXPECT_FALSE(Tokenizer::is_printable_piece("\xFF"));
  for (const char* printable : {"a", " ", "~", "\n", "\t", "\r", "\v", "\f", "\x01\x02", "\xC3\xA9", ""})
    EXPECT_TRUE(Tokenizer::is_printable_piece(printable)) << ::testing::PrintToString(printable);
}

TEST(TokenizerAccessors, ReportTheVocabulary) {
  const Tokenizer tok = make_tokenizer({{" ", -1.5f}, {"hello", -2.0f}});
  EXPECT_EQ(tok.vocab_size(), 261u);
  EXPECT_EQ(tok.max_token_length(), 6);  // "<0x00>" and the special pieces
  EXPECT_EQ(Tokenizer::kBosId, 1);
  EXPECT_EQ(Tokenizer::kEosId, 2);
  EXPECT_EQ(tok.piece(260), "hello");
  EXPECT_EQ(tok.score(260), -2.0f);
  EXPECT_EQ(tok.score(259), -1.5f);
  EXPECT_EQ(tok.find("hello"), 260);
  EXPECT_EQ(tok.find("hell"), -1);
  EXPECT_EQ(tok.find(""), -1);
  EXPECT_EQ(tok.find("<0x0A>"), 0x0A + 3);
}

// Vocabularies over {a, b, space} where many merges score the same: the
// hardest case for the order of merges.
TEST(TokenizerMerges, FastMergeEqualsNaiveMergeWithManyTies) {
  std::mt19937 rng(99);
  const std::vector<std::string> alphabet = {"a", "b", " "};
  for (int vocab_round = 0; vocab_round < 20; ++vocab_round) {
    std::vector<Entry> extra = {{"a", 0}, {"b", 0}, {" ", 0}};
    std::vector<std::string> strings = alphabet;
    for (int length = 2; length <= 5; ++length) {
      std::vector<std::string> longer;
      for (const std::string& s : strings)
        for (const std::string& c : alphabet) longer.push_back(s + c);
      for (const std::string& s : longer)
        if (rng() % 3 != 0) extra.push_back({s, -static_cast<float>(rng() % 3)});
      strings = longer;
    }
    const Tokenizer tok = make_tokenizer(extra);
    for (int i = 0; i < 100; ++i) {
      const std::string s = random_from(rng, alphabet, 80);
      SCOPED_TRACE(::testing::PrintToString(s));
      ASSERT_EQ(tok.encode(s), naive_encode(tok, s, true, false));
    }
  }
}

// ---------------------------------------------------------------------------
// Loader errors

// Loads `path` (with `vocab_size` unless it is 0) and expects a
// std::runtime_error whose message names the file and contains `fragment`.
void expect_load_error(const std::string& path, std::size_t vocab_size, const std::string& fragment,
                       const kvcache::LoadLimits& limits = {}) {
  try {
    if (vocab_size == 0) {
      (void)Tokenizer::load(path, limits);
    } else {
      (void)Tokenizer::load(path, vocab_size, limits);
    }
    ADD_FAILURE() << "loading " << path << " did not throw";
  } catch (const std::runtime_error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(path), std::string::npos) << message;
    EXPECT_NE(message.find(fragment), std::string::npos) << "missing \"" << fragment << "\" in: " << message;
  }
}

std::string valid_bytes(std::size_t n_tokens) {
  std::vector<Entry> entries = base_vocab();
  entries.resize(std::min(n_tokens, entries.size()));
  while (entries.size() < n_tokens) entries.push_back({"t" + std::to_string(entries.size()), -1.0f});
  return tokenizer_bytes(entries);
}

TEST(TokenizerLoad, MissingFile) {
  const std::string path = temp_path("does-not-exist.bin");
  std::filesystem::remove(path);
  expect_load_error(path, 512, "no such file");
  expect_load_error(path, 0, "no such file");
}

TEST(TokenizerLoad, Directory) {
  const std::string dir = temp_path("a-directory");
  std::filesystem::create_directories(dir);
  expect_load_error(dir, 512, "directory");
}

TEST(TokenizerLoad, EmptyAndShortFiles) {
  expect_load_error(write_file("empty.bin", ""), 512, "truncated: it ends in the 4-byte header");
  expect_load_error(write_file("empty.bin", ""), 0, "truncated: it ends in the 4-byte header");
  expect_load_error(write_file("three.bin", "abc"), 512, "truncated: it ends in the 4-byte header (max_token_length) after 3 bytes");
}

TEST(TokenizerLoad, NegativeMaxTokenLength) {
  std::string bytes;
  append_int32(bytes, -1);
  append_token(bytes, "a", 0);
  expect_load_error(write_file("bad.bin", bytes), 1, "max_token_length is -1");
}

TEST(TokenizerLoad, TruncatedInsideAToken) {
  const std::string full = valid_bytes(300);
  // Cut in the middle of the last token's bytes ("t299" is 4 bytes).
  expect_load_error(write_file("cut-bytes.bin", full.substr(0, full.size() - 2)), 300, "truncated");
  expect_load_error(write_file("cut-bytes.bin", full.substr(0, full.size() - 2)), 0, "truncated");
  // Cut between the last token's score and its length.
  expect_load_error(write_file("cut-header.bin", full.substr(0, full.size() - 4 - 4 - 2)), 300,
                    "truncated");
}

TEST(TokenizerLoad, NegativeLength) {
  std::string bytes = valid_bytes(10);
  append_float32(bytes, 0.0f);
  append_int32(bytes, -5);
  bytes += "xxxxx";
  expect_load_error(write_file("negative.bin", bytes), 11, "token 10 has length -5");
}

TEST(TokenizerLoad, LengthAboveMaxTokenLength) {
  std::string bytes = valid_bytes(10);  // max_token_length 6
  append_token(bytes, "seven!!", 0.0f);
  expect_load_error(write_file("long.bin", bytes), 11, "token 10 has length 7, outside [0, max_token_length 6]");
}

TEST(TokenizerLoad, HugeLengthFailsWithoutAllocating) {
  std::string bytes;
  append_int32(bytes, std::numeric_limits<std::int32_t>::max());
  append_float32(bytes, 0.0f);
  append_int32(bytes, std::numeric_limits<std::int32_t>::max());
  bytes += "abc";
  expect_load_error(write_file("huge-length.bin", bytes), 1, "truncated");
}

TEST(TokenizerLoad, FewerTokensThanTheModelsVocab) {
  const std::string path = write_file("short.bin", valid_bytes(300));
  expect_load_error(path, 512, "holds 300 tokens but the model's vocab_size is 512");
}

TEST(TokenizerLoad, HugeVocabSizeFailsFast) {
  const std::string path = write_file("small.bin", valid_bytes(300));
  expect_load_error(path, std::size_t{1} << 30, "vocab_size 1073741824 is above the limit (LoadLimits::max_vocab_size 4194304");
  kvcache::LoadLimits unlimited;
  unlimited.max_vocab_size = std::numeric_limits<std::uint64_t>::max();
  expect_load_error(path, std::size_t{1} << 30, "holds 300 tokens but the model's vocab_size is 1073741824", unlimited);
  expect_load_error(path, std::size_t{1} << 40, "vocab_size 1099511627776 is above the limit", unlimited);
  expect_load_error(path, std::size_t{1} << 40, "ids up to 2147483647", unlimited);
  expect_load_error(path, std::numeric_limits<std::size_t>::max(), "vocab_size");
}

TEST(TokenizerLoad, ExtraBytesAtTheEnd) {
  const std::string bytes = valid_bytes(300);
  expect_load_error(write_file("garbage.bin", bytes + "xyz"), 300, "3 unexpected bytes after the 300 tokens");
  // Whole extra tokens: the file is for a bigger vocabulary.
  expect_load_error(write_file("more.bin", valid_bytes(320)), 300, "holds 320 tokens but the model's vocab_size is 300");
  // Without a vocab_size, trailing garbage is a truncated token.
  expect_load_error(write_file("garbage.bin", bytes + "xyz"), 0, "truncated");
}

TEST(TokenizerLoad, NanScore) {
  std::vector<Entry> entries = base_vocab();
  entries[100].score = std::numeric_limits<float>::quiet_NaN();
  expect_load_error(write_file("nan.bin", tokenizer_bytes(entries)), entries.size(), "token 100 has a NaN score");
}

TEST(TokenizerLoad, FewerThanTheSpecialTokens) {
  const std::string path = write_file("two.bin", tokenizer_bytes({{"<unk>", 0}, {"<s>", 0}}));
  expect_load_error(path, 0, "holds 2 tokens");
  expect_load_error(path, 2, "holds 2 tokens");
  const std::string header_only = write_file("header-only.bin", tokenizer_bytes({}));
  expect_load_error(header_only, 0, "holds 0 tokens");
}

TEST(TokenizerLoad, ExactFileLoadsBothWays) {
  const std::string path = write_file("ok.bin", valid_bytes(300));
  const Tokenizer sized = Tokenizer::load(path, 300);
  const Tokenizer counted = Tokenizer::load(path);
  EXPECT_EQ(sized.vocab_size(), 300u);
  EXPECT_EQ(counted.vocab_size(), 300u);
  EXPECT_EQ(counted.piece(299), "t299");
  EXPECT_EQ(counted.score(299), -1.0f);
}

}  // namespace

// ---------------------------------------------------------------------------
// Streams and LoadLimits

// Gives `bytes` (or endless zeros) but cannot seek, as a pipe or /dev/zero.
class UnseekableBuffer : public std::streambuf {
 public:
  explicit UnseekableBuffer(std::string bytes, bool endless = false)
      : bytes_(std::move(bytes)), endless_(endless) {
    setg(bytes_.data(), bytes_.data(), bytes_.data() + bytes_.size());
  }
  std::size_t bytes_given() const { return given_; }

 protected:
  int_type underflow() override {
    given_ += bytes_.size();
    if (!endless_) return traits_type::eof();
    bytes_.assign(4096, '\0');
    setg(bytes_.data(), bytes_.data(), bytes_.data() + bytes_.size());
    return traits_type::to_int_type(bytes_[0]);
  }

 private:
  std::string bytes_;
  bool endless_;
  std::size_t given_ = 0;
};

TEST(TokenizerStream, LoadsTheSameAsFromAFile) {
  const std::string bytes = valid_bytes(300);
  const Tokenizer from_file = Tokenizer::load(write_file("ok.bin", bytes), 300);
  std::istringstream in(bytes);
  const Tokenizer from_stream = Tokenizer::load(in, "in memory", 300);
  ASSERT_EQ(from_stream.vocab_size(), 300u);
  for (int id = 0; id < 300; ++id) EXPECT_EQ(from_stream.piece(id), from_file.piece(id));
  // From the stream's position, and without seeking at all.
  std::istringstream embedded("PREFIX" + bytes);
  embedded.seekg(6);
  EXPECT_EQ(Tokenizer::load(embedded, "embedded").vocab_size(), 300u);
  UnseekableBuffer pipe(bytes);
  std::istream unseekable(&pipe);
  EXPECT_EQ(Tokenizer::load(unseekable, "pipe", 300).piece(299), "t299");
}

TEST(TokenizerStream, ErrorsNameTheStream) {
  std::istringstream in("abc");
  try {
    (void)Tokenizer::load(in, "<my stream>", 3);
    ADD_FAILURE() << "a 3-byte tokenizer loaded";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("tokenizer '<my stream>': file is truncated: it ends in the 4-byte header (max_token_length) after 3 bytes"), std::string::npos)
        << e.what();
  }
}

// The file's length is limited before it is read when it can be measured,
// while reading otherwise: a pipe or /dev/zero stops at the limit.
TEST(TokenizerLimits, FileBytes) {
  const std::string bytes = valid_bytes(300);
  kvcache::LoadLimits limits;
  limits.max_tokenizer_bytes = bytes.size();
  EXPECT_EQ(Tokenizer::load(write_file("ok.bin", bytes), limits).vocab_size(), 300u);
  limits.max_tokenizer_bytes = bytes.size() - 1;
  const std::string expected =
      "is larger than LoadLimits::max_tokenizer_bytes (" + std::to_string(bytes.size()) + " vs " +
      std::to_string(bytes.size() - 1) + " bytes)";
  expect_load_error(write_file("ok.bin", bytes), 300, expected, limits);
  expect_load_error(write_file("ok.bin", bytes), 0, expected, limits);

  UnseekableBuffer pipe(bytes);
  std::istream unseekable(&pipe);
  try {
    (void)Tokenizer::load(unseekable, "pipe", limits);
    ADD_FAILURE() << "an oversized pipe loaded";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("max_tokenizer_bytes (more than " + std::to_string(bytes.size() - 1)),
              std::string::npos)
        << e.what();
  }

  limits.max_tokenizer_bytes = 1 << 20;
  UnseekableBuffer zeros("", /*endless=*/true);
  std::istream endless(&zeros);
  EXPECT_THROW((void)Tokenizer::load(endless, "zeros", limits), std::runtime_error);
  EXPECT_LE(zeros.bytes_given(), (std::size_t{1} << 20) + (1 << 16) + 4096);
#if defined(__linux__)
  expect_load_error("/dev/zero", 512, "max_tokenizer_bytes", limits);
#endif
}

// A token that claims 2 GB in a stream that cannot be measured: refused once
// the stream has given more than the limit, without holding what it claims.
TEST(TokenizerLimits, HugeTokenInAPipe) {
  std::string header;
  append_int32(header, std::numeric_limits<std::int32_t>::max());
  append_float32(header, 0.0f);
  append_int32(header, std::numeric_limits<std::int32_t>::max());
  UnseekableBuffer zeros(header, /*endless=*/true);  // then zeros for ever
  std::istream endless(&zeros);
  kvcache::LoadLimits limits;
  limits.max_tokenizer_bytes = 1 << 20;
  try {
    (void)Tokenizer::load(endless, "pipe", limits);
    ADD_FAILURE() << "a 2 GB token loaded";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("max_tokenizer_bytes (more than 1048576"), std::string::npos) << e.what();
  }
  EXPECT_LE(zeros.bytes_given(), (std::size_t{1} << 20) + (1 << 16) + 4096);
}

TEST(TokenizerLimits, VocabSize) {
  const std::string path = write_file("ok.bin", valid_bytes(300));
  kvcache::LoadLimits limits;
  limits.max_vocab_size = 300;
  EXPECT_EQ(Tokenizer::load(path, limits).vocab_size(), 300u);
  EXPECT_EQ(Tokenizer::load(path, 300, limits).vocab_size(), 300u);
  limits.max_vocab_size = 299;
  expect_load_error(path, 0, "holds more tokens than the limit (LoadLimits::max_vocab_size 299", limits);
  expect_load_error(path, 300, "vocab_size 300 is above the limit (LoadLimits::max_vocab_size 299", limits);
}
