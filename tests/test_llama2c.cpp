// Tests of kvcache/llama2c.hpp: llama2.c's reference outputs on the real
// checkpoints (including grouped-query attention), save → load round trips,
// and every way a checkpoint file or a save can go wrong.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <kvcache/generate.hpp>
#include <kvcache/llama2c.hpp>
#include <kvcache/tokenizer.hpp>
#include <limits>
#include <sstream>
#include <streambuf>
#include <thread>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "models.hpp"
#include "temp_dir.hpp"

namespace {

namespace fs = std::filesystem;
using kvcache::Decoder;
using kvcache::LoadLimits;
using kvcache::ModelConfig;

// ---------------------------------------------------------------------------
// Reference outputs, from ../shared/models/README.md (llama2.c's `run`, greedy)

std::vector<int> parse_ids(const std::string& text) {
  std::istringstream in(text);
  return {std::istream_iterator<int>(in), std::istream_iterator<int>()};
}

// aidreams260K + tok512, steps 128, prompt "The cat": the ids after BOS.
const std::vector<int> kTheCatIds = parse_ids(
    "368 430 273 268 322 260 327 446 262 263 428 434 436 451 275 280 302 450 405 403 399 422 448 429 465 438 340 431 "
    "338 353 341 325 266 386 269 293 446 299 303 266 323 434 285 362 262 263 428 434 436 451 275 280 302 450 405 403 "
    "399 448 429 465 438 340 431 338 353 341 325 266 386 269 293 446 299 303 266 451 433 307 436 265 432 456 430 446 "
    "299 303 384 467 407 446 299 303 266 432 445 439 265 325 275 429 339 315 374 446 299 303 266 323 434 285 362 262 "
    "263 428 434 436 451 275 429 339 315 374 448 2 1");
const std::string kTheCatText =
    "The catries unfold, a tapestry of probability unfolding. Classification whispers secrets, as I settle into a "
    "tapestry of probability. Classification whispers secrets, as I synchronize, as I adjust, as I siphon whispers of "
    "vectors, as I settle into a tapestry of vectors.\n</s>\n";

// aidreams260K + tok512, steps 128, BOS only.
const std::vector<int> kNoPromptIds = parse_ids(
    "319 459 355 260 275 429 339 315 374 327 446 262 421 392 275 280 269 440 270 283 446 299 303 266 358 430 312 379 "
    "441 260 446 262 421 392 275 280 269 440 270 283 446 299 303 384 467 407 360 266 291 443 435 295 448 429 465 265 "
    "434 317 431 434 289 408 326 446 262 266 437 443 434 438 451 306 295 445 434 432 339 279 432 375 410 275 280 269 "
    "440 270 283 448 429 465 265 434 317 431 434 389 437 393 446 299 303 266 432 445 439 265 325 275 429 339 315 374 "
    "448 429 465 265 434 317 431 434 289 418 321 278 416 446 262 421");
const std::string kNoPromptText =
    "\"Echoes of vectors unfold, a gentle hum of precision, as I sense the nodes, a gentle hum of precision, as I "
    "adjust my surface. Contrast emerge, a softly receptive fields of precision. Contrast bloom, as I siphon whispers "
    "of vectors. Contrast edges sharpen, a gentle";

// stories260K (GQA: 8 query heads, 4 kv heads), steps 300, BOS only.
const std::vector<int> kStoriesIds = parse_ids(
    "461 461 401 401 401 461 378 455 473 456 435 299 362 409 283 264 283 452 288 13 431 431 431 431 431 431 431 431 "
    "431 431 431 431 431 293 430 417 363 416 315 342 418 424 400 442 402 303 266 299 374 466 396 303 271 362 390 469 "
    "306 469 423 314 347 305 356 333 333 333 333 425 377 354 304 304 304 304 304 330 341 382 468 473 473 402 402 299 "
    "299 483 456 473 456 473 465 465 465 341 317 436 363 454 315 377 360 408 472 453 327 316 266 417 277 299 369 283 "
    "266 417 264 277 277 277 439 456 407 407 309 341 436 330 466 377 422 436 472 465 466 407 407 407 407 407 465 466 "
    "473 330 330 386 431 304 304 472 453 380 299 299 483 475 452 477 295 412 302 330 275 377 271 341 438 452 287 302 "
    "341 438 303 303 303 283 266 417 277 277 277 409 281 303 303 462 402 402 402 402 299 299 277 333 333 333 333 333 "
    "299 299 299 292 325 329 382 374 458 465 465 466 465 466 465 442 456 407 465 465 473 473 473 473 473 407 465 465 "
    "473 473 473 407 465 465 465 466 465 465 465 466 465 465 465 465 473 465 465 465 465 473 330 327 435 445 435 396 "
    "454 388 369 367 367 367 314 284 278 325 325 13 204 466 185 341 341 341 341 341 409 378 469 429 283 303 390 314 "
    "407 407 407 465 465 465 465 466 185 347 463 461 402 402 303 303 299 390 402 402");

// run's generation with `steps` positions: the prompt (BOS first) is fed,
// steps - P + 1 tokens are generated greedily, stopping at BOS. Returns the
// ids after BOS, prompt first, as the README lists them.
std::vector<int> run_like(const Decoder<float>& decoder, const std::vector<int>& prompt, std::size_t steps,
                          bool cached = true, std::size_t threads = 1) {
  kvcache::GenerateOptions o;
  o.max_new_tokens = steps - prompt.size() + 1;
  o.end_token = 1;
  o.temperature = 0.0f;
  const std::vector<int> out =
      cached ? kvcache::generate(decoder, prompt, o, threads) : kvcache::generate_uncached(decoder, prompt, o, threads);
  std::vector<int> ids(prompt.begin() + 1, prompt.end());
  ids.insert(ids.end(), out.begin(), out.end());
  return ids;
}

// The text run prints for `ids` (after BOS), without the final newline.
std::string run_text(const kvcache::Tokenizer& tokenizer, const std::vector<int>& ids) {
  std::string text;
  int prev = 1;
  for (const int id : ids) {
    if (id == 1) break;  // run stops before printing BOS
    const std::string piece = tokenizer.decode(prev, id);
    if (kvcache::Tokenizer::is_printable_piece(piece)) text += piece;
    prev = id;
  }
  return text;
}

TEST(Llama2cReference, AidreamsHeaderAndConfig) {
  KVCACHE_MODEL_FILE_OR_SKIP(model, "aidreams260K.bin");
  const kvcache::Llama2cHeader h = kvcache::read_llama2c_header(model);
  EXPECT_EQ(h.dim, 64u);
  EXPECT_EQ(h.hidden_dim, 172u);
  EXPECT_EQ(h.n_layers, 4u);
  EXPECT_EQ(h.n_heads, 4u);
  EXPECT_EQ(h.n_kv_heads, 4u);
  EXPECT_EQ(h.vocab_size, 512u);
  EXPECT_EQ(h.seq_len, 128u);
  EXPECT_TRUE(h.shared_classifier);
  EXPECT_EQ(h.file_bytes, fs::file_size(model));

  const Decoder<float> d = kvcache::load_llama2c(model);
  const ModelConfig& c = d.config();
  EXPECT_EQ(c.positions, kvcache::PositionEncoding::rope);
  EXPECT_EQ(c.rope_base, 10000.0);
  EXPECT_EQ(c.norm, kvcache::NormKind::rms_norm);
  EXPECT_EQ(c.norm_eps, 1e-5);
  EXPECT_EQ(c.mlp, kvcache::MlpKind::swiglu);
  EXPECT_TRUE(c.tied_lm_head);
  EXPECT_EQ(c.max_seq_len, 128u);
  EXPECT_EQ(d.weight_bytes(), h.n_parameters * sizeof(float));
}

TEST(Llama2cReference, AidreamsTheCat) {
  KVCACHE_MODEL_FILE_OR_SKIP(model, "aidreams260K.bin");
  KVCACHE_MODEL_FILE_OR_SKIP(tok, "tok512.bin");
  const Decoder<float> d = kvcache::load_llama2c(model);
  const kvcache::Tokenizer tokenizer = kvcache::Tokenizer::load(tok, d.config().vocab_size);
  const std::vector<int> prompt = tokenizer.encode("The cat", true, false);
  ASSERT_EQ(prompt, (std::vector<int>{1, 368, 430, 273, 268}));
  const std::vector<int> ids = run_like(d, prompt, 128);
  EXPECT_EQ(ids, kTheCatIds);
  EXPECT_EQ(run_text(tokenizer, ids), kTheCatText);
}

TEST(Llama2cReference, AidreamsNoPrompt) {
  KVCACHE_MODEL_FILE_OR_SKIP(model, "aidreams260K.bin");
  KVCACHE_MODEL_FILE_OR_SKIP(tok, "tok512.bin");
  const Decoder<float> d = kvcache::load_llama2c(model);
  const kvcache::Tokenizer tokenizer = kvcache::Tokenizer::load(tok, d.config().vocab_size);
  const std::vector<int> ids = run_like(d, {1}, 128);
  EXPECT_EQ(ids, kNoPromptIds);
  EXPECT_EQ(run_text(tokenizer, ids), kNoPromptText);
}

TEST(Llama2cReference, Stories260KGroupedQuery) {
  KVCACHE_MODEL_FILE_OR_SKIP(model, "stories260K.bin");
  const Decoder<float> d = kvcache::load_llama2c(model);
  EXPECT_EQ(d.config().n_heads, 8u);
  EXPECT_EQ(d.config().kv_heads(), 4u);
  EXPECT_EQ(d.config().max_seq_len, 512u);
  EXPECT_EQ(run_like(d, {1}, 300), kStoriesIds);
}

TEST(Llama2cReference, CachedEqualsUncachedAndThreads) {
  KVCACHE_MODEL_FILE_OR_SKIP(model, "aidreams260K.bin");
  const Decoder<float> d = kvcache::load_llama2c(model);
  const std::vector<int> prompt{1, 368, 430, 273, 268};
  EXPECT_EQ(run_like(d, prompt, 128, /*cached=*/false), kTheCatIds);
  EXPECT_EQ(run_like(d, prompt, 128, /*cached=*/true, /*threads=*/2), kTheCatIds);
}

TEST(Llama2cReference, Stories260KUncachedPrefix) {
  KVCACHE_MODEL_FILE_OR_SKIP(model, "stories260K.bin");
  const Decoder<float> d = kvcache::load_llama2c(model);
  const std::vector<int> expected(kStoriesIds.begin(), kStoriesIds.begin() + 40);
  EXPECT_EQ(run_like(d, {1}, 40, /*cached=*/false), expected);
}

// Weights stored as bfloat16 (rounded while loading): greedy output on the
// real models must not change for at least the first 32 generated tokens.
TEST(Llama2cReference, Bf16KeepsTheFirst32GreedyTokens) {
  KVCACHE_MODEL_FILE_OR_SKIP(aidreams, "aidreams260K.bin");
  KVCACHE_MODEL_FILE_OR_SKIP(stories, "stories260K.bin");
  const auto first = [](const std::vector<int>& ids, std::size_t n) {
    return std::vector<int>(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(n));
  };
  const Decoder<float> a = kvcache::load_llama2c(aidreams, {}, kvcache::WeightType::bf16);
  EXPECT_EQ(a.weight_type(), kvcache::WeightType::bf16);
  const std::vector<int> prompt{1, 368, 430, 273, 268};
  for (const std::size_t threads : {1u, 2u}) {
    // 4 prompt ids, then the generated ones.
    EXPECT_EQ(first(run_like(a, prompt, 36, true, threads), 36), first(kTheCatIds, 36)) << threads;
    EXPECT_EQ(first(run_like(a, {1}, 32, true, threads), 32), first(kNoPromptIds, 32)) << threads;
  }
  const Decoder<float> s = kvcache::load_llama2c(stories, {}, kvcache::WeightType::bf16);
  EXPECT_EQ(first(run_like(s, {1}, 32), 32), first(kStoriesIds, 32));
}

// Rounding while reading gives what rounding a float32 load gives, in half
// the bytes for the matrices.
TEST(Llama2cReference, Bf16LoadEqualsAConvertedFloatLoad) {
  KVCACHE_MODEL_FILE_OR_SKIP(model, "stories260K.bin");
  const Decoder<float> f32 = kvcache::load_llama2c(model);
  const Decoder<float> bf16 = kvcache::load_llama2c(model, {}, kvcache::WeightType::bf16);
  kvcache::WeightMatrix<float> E = f32.token_embedding(), W_2 = f32.block(4).mlp.W_2;
  E.convert_to(kvcache::WeightType::bf16);
  W_2.convert_to(kvcache::WeightType::bf16);
  EXPECT_EQ(bf16.token_embedding(), E);
  EXPECT_EQ(bf16.block(4).mlp.W_2, W_2);
  EXPECT_EQ(bf16.block(4).mlp_norm.gamma, f32.block(4).mlp_norm.gamma);
  EXPECT_LT(bf16.weight_bytes(), f32.weight_bytes() * 51 / 100);
}

// ---------------------------------------------------------------------------
// Files in the test's temporary folder

class Llama2cFiles : public kvcache_test::TempDirTest {
 protected:
  Llama2cFiles() : TempDirTest("llama2c_tmp") {}

  static void write_file(const std::string& path, const std::string& bytes) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    ASSERT_TRUE(out.good()) << path;
  }

  static std::string read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  }

};

void append_int32(std::string& out, std::int32_t value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((bits >> (8 * i)) & 0xFF));
}

std::string header(std::int32_t dim, std::int32_t hidden, std::int32_t layers, std::int32_t heads,
                   std::int32_t kv_heads, std::int32_t vocab, std::int32_t seq_len) {
  std::string h;
  for (const std::int32_t v : {dim, hidden, layers, heads, kv_heads, vocab, seq_len}) append_int32(h, v);
  return h;
}

// Floats a well-formed file holds after its header (RoPE tables included).
std::size_t float_count(std::size_t dim, std::size_t hidden, std::size_t layers, std::size_t heads,
                        std::size_t kv_heads, std::size_t vocab, std::size_t seq_len, bool shared) {
  const std::size_t head = dim / heads, kv = kv_heads * head;
  return vocab * dim + layers * (2 * dim + 2 * dim * dim + 2 * kv * dim + 3 * hidden * dim) + dim + seq_len * head +
         (shared ? 0 : vocab * dim);
}

// A well-formed file of a tiny model whose weights are all 0.01.
std::string tiny_file(bool shared = true) {
  std::string bytes = header(8, 12, 2, 2, 1, shared ? 10 : -10, 4);
  const std::size_t n = float_count(8, 12, 2, 2, 1, 10, 4, shared);
  const float value = 0.01f;
  for (std::size_t i = 0; i < n; ++i) bytes.append(reinterpret_cast<const char*>(&value), sizeof value);
  return bytes;
}

// Expects load_llama2c(path) to throw std::runtime_error whose message names
// the path and contains every one of `parts`.
void expect_load_error(const std::string& path, const std::vector<std::string>& parts, const LoadLimits& limits = {}) {
  try {
    (void)kvcache::load_llama2c(path, limits);
    ADD_FAILURE() << "load_llama2c(" << path << ") did not throw";
  } catch (const std::runtime_error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(path), std::string::npos) << message;
    for (const auto& part : parts)
      EXPECT_NE(message.find(part), std::string::npos) << "'" << part << "' not in: " << message;
  }
}

TEST_F(Llama2cFiles, TinyFileLoads) {
  write_file(path("tiny.bin"), tiny_file(true));
  const Decoder<float> d = kvcache::load_llama2c(path("tiny.bin"));
  EXPECT_EQ(d.config().d_model, 8u);
  EXPECT_EQ(d.config().kv_heads(), 1u);
  EXPECT_TRUE(d.config().tied_lm_head);
  write_file(path("untied.bin"), tiny_file(false));
  const Decoder<float> u = kvcache::load_llama2c(path("untied.bin"));
  EXPECT_FALSE(u.config().tied_lm_head);
  EXPECT_EQ(u.lm_head().rows(), 10);
  EXPECT_EQ(u.lm_head()(3, 4), 0.01f);
}

TEST_F(Llama2cFiles, MissingFile) {
  expect_load_error(path("absent.bin"), {"no such file"});
  EXPECT_THROW((void)kvcache::read_llama2c_header(path("absent.bin")), std::runtime_error);
}

TEST_F(Llama2cFiles, Directory) { expect_load_error(dir_.string(), {"directory"}); }

TEST_F(Llama2cFiles, EmptyAndShortFiles) {
  write_file(path("empty.bin"), "");
  expect_load_error(path("empty.bin"), {"too short", "0 vs 28"});
  write_file(path("short.bin"), header(8, 12, 2, 2, 1, 10, 4).substr(0, 27));
  expect_load_error(path("short.bin"), {"too short", "27 vs 28"});
}

TEST_F(Llama2cFiles, TruncatedAndPadded) {
  const std::string good = tiny_file();
  const std::string expected = std::to_string(good.size());
  write_file(path("truncated.bin"), good.substr(0, good.size() - 4));
  expect_load_error(path("truncated.bin"), {"truncated", expected, std::to_string(good.size() - 4)});
  write_file(path("header_only.bin"), good.substr(0, 28));
  expect_load_error(path("header_only.bin"), {"truncated", expected, "28"});
  write_file(path("padded.bin"), good + "x");
  expect_load_error(path("padded.bin"), {"trailing", expected, std::to_string(good.size() + 1)});
}

TEST_F(Llama2cFiles, NonPositiveFields) {
  const char* names[7] = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"};
  for (int field = 0; field < 7; ++field)
    for (const std::int32_t bad : {0, -1, std::numeric_limits<std::int32_t>::min()}) {
      std::int32_t v[7] = {8, 12, 2, 2, 1, 10, 4};
      v[field] = bad;
      if (field == 5 && bad != 0) continue;  // a negative vocab_size is the untied flag
      write_file(path("bad.bin"), header(v[0], v[1], v[2], v[3], v[4], v[5], v[6]) + std::string(4096, '\0'));
      SCOPED_TRACE(std::string(names[field]) + " = " + std::to_string(bad));
      expect_load_error(path("bad.bin"), {names[field], std::to_string(bad)});
    }
}

TEST_F(Llama2cFiles, InconsistentHeads) {
  write_file(path("heads.bin"), header(10, 12, 2, 3, 1, 10, 4) + std::string(4096, '\0'));
  expect_load_error(path("heads.bin"), {"dim is not a multiple of n_heads", "10 vs 3"});
  write_file(path("kv.bin"), header(8, 12, 2, 2, 4, 10, 4) + std::string(4096, '\0'));
  expect_load_error(path("kv.bin"), {"n_heads is not a multiple of n_kv_heads", "2 vs 4"});
  write_file(path("kv3.bin"), header(12, 12, 2, 4, 3, 10, 4) + std::string(4096, '\0'));
  expect_load_error(path("kv3.bin"), {"n_heads is not a multiple of n_kv_heads", "4 vs 3"});
  write_file(path("odd.bin"), header(6, 12, 2, 2, 2, 10, 4) + std::string(4096, '\0'));
  expect_load_error(path("odd.bin"), {"odd", "RoPE"});
}

// Headers whose sizes would need gigabytes or overflow 64 bits fail on the
// header alone: the file is a few bytes, and nothing big is allocated.
TEST_F(Llama2cFiles, AbsurdHeaders) {
  const std::int32_t max = std::numeric_limits<std::int32_t>::max();
  write_file(path("dim.bin"), header(1 << 30, 12, 2, 2, 1, 10, 4) + std::string(64, '\0'));
  expect_load_error(path("dim.bin"), {"too many parameters", "LoadLimits::max_parameters", "8589934592"});
  write_file(path("max.bin"), header(max - 3, max, max, 2, 1, -max, max));
  expect_load_error(path("max.bin"), {"too many parameters", "more than 2^64"});
  write_file(path("vocab.bin"), header(8, 12, 2, 2, 1, std::numeric_limits<std::int32_t>::min(), 4));
  expect_load_error(path("vocab.bin"), {"too many parameters"});
  // Few parameters but an enormous context: its KV cache is past the limit,
  // and without that limit the file length (RoPE tables) is wrong.
  write_file(path("seq.bin"), header(8, 12, 2, 2, 1, 10, max) + std::string(64, '\0'));
  expect_load_error(path("seq.bin"), {"LoadLimits::max_kv_cache_bytes"});
  LoadLimits no_kv_limit;
  no_kv_limit.max_kv_cache_bytes = std::numeric_limits<std::uint64_t>::max();
  expect_load_error(path("seq.bin"), {"truncated"}, no_kv_limit);
  EXPECT_THROW((void)kvcache::read_llama2c_header(path("seq.bin")), std::runtime_error);
}

TEST_F(Llama2cFiles, ParameterLimit) {
  write_file(path("tiny.bin"), tiny_file());
  LoadLimits limits;
  limits.max_parameters = 100;
  const std::size_t params = float_count(8, 12, 2, 2, 1, 10, 4, true) - 4 * 4;
  expect_load_error(path("tiny.bin"), {"too many parameters", std::to_string(params) + " vs 100"}, limits);
  limits.max_parameters = params;
  EXPECT_NO_THROW((void)kvcache::load_llama2c(path("tiny.bin"), limits));
}

// The KV cache a model's context needs is bounded too: a header of tiny
// layers (dim 2) but many of them and a long context is a few MB of file
// that promises a cache of tens of GB (fuzzing finding: kvcache-generate -n 0
// reserved 65 GB of address space for a 34 MB file). It fails on the header.
TEST_F(Llama2cFiles, KvCacheLimit) {
  write_file(path("context.bin"), header(2, 1, 13000, 1, 1, 3, 167000) + std::string(64, '\0'));
  expect_load_error(path("context.bin"),
                    {"seq_len = 167000", "LoadLimits::max_kv_cache_bytes (34736000000 vs 34359738368 bytes)"});
  EXPECT_THROW((void)kvcache::read_llama2c_header(path("context.bin")), std::runtime_error);
  LoadLimits larger;
  larger.max_kv_cache_bytes = std::uint64_t{1} << 36;
  expect_load_error(path("context.bin"), {"truncated"}, larger);

  // tiny_file: 2 layers × kv_dim 4 × seq_len 4 × 8 bytes = 256 bytes.
  write_file(path("tiny.bin"), tiny_file());
  LoadLimits limits;
  limits.max_kv_cache_bytes = 255;
  expect_load_error(path("tiny.bin"), {"(256 vs 255 bytes)"}, limits);
  limits.max_kv_cache_bytes = 256;
  EXPECT_NO_THROW((void)kvcache::load_llama2c(path("tiny.bin"), limits));
}

TEST_F(Llama2cFiles, NonFiniteWeight) {
  std::string bytes = tiny_file();
  // The first element of wq[layer 0]: after the embedding (10 × 8) and the
  // two layers' attention RMSNorm weights (2 × 8).
  const std::size_t offset = 28 + 4 * (10 * 8 + 2 * 8);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(&bytes[offset], &nan, sizeof nan);
  write_file(path("nan.bin"), bytes);
  expect_load_error(path("nan.bin"), {"wq[layer 0]", "non-finite"});
  LoadLimits unchecked;
  unchecked.check_finite = false;
  const Decoder<float> d = kvcache::load_llama2c(path("nan.bin"), unchecked);
  EXPECT_TRUE(std::isnan(d.block(0).attention.W_Q(0, 0)));

  bytes = tiny_file(false);
  const float inf = std::numeric_limits<float>::infinity();
  std::memcpy(&bytes[bytes.size() - 4], &inf, sizeof inf);  // last element of wcls
  write_file(path("inf.bin"), bytes);
  expect_load_error(path("inf.bin"), {"wcls", "non-finite"});

  // Loading as bfloat16 checks the same floats, and names the same element.
  try {
    (void)kvcache::load_llama2c(path("inf.bin"), {}, kvcache::WeightType::bf16);
    ADD_FAILURE() << "no exception";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("wcls holds a non-finite value (inf) at element 79"), std::string::npos)
        << e.what();
  }
  const Decoder<float> b = kvcache::load_llama2c(path("nan.bin"), unchecked, kvcache::WeightType::bf16);
  EXPECT_TRUE(std::isnan(b.block(0).attention.W_Q(0, 0)));
}

// ---------------------------------------------------------------------------
// Round trips

Decoder<float> random_decoder(bool tied, std::uint64_t seed) {
  const ModelConfig c = kvcache::llama2c_config(32, 48, 2, 4, 2, 37, 16, tied);
  kvcache::DecoderWeights<float> w = kvcache::random_weights<float>(c, seed);
  // Non-trivial norm weights, so that a swapped norm tensor would show.
  kvcache::detail::SplitMix64 rng(seed + 1);
  for (auto& b : w.blocks) {
    for (Eigen::Index i = 0; i < b.attention_norm.gamma.size(); ++i)
      b.attention_norm.gamma[i] = static_cast<float>(1.0 + 0.5 * rng.symmetric());
    for (Eigen::Index i = 0; i < b.mlp_norm.gamma.size(); ++i)
      b.mlp_norm.gamma[i] = static_cast<float>(1.0 + 0.5 * rng.symmetric());
  }
  for (Eigen::Index i = 0; i < w.final_norm.gamma.size(); ++i)
    w.final_norm.gamma[i] = static_cast<float>(1.0 + 0.5 * rng.symmetric());
  return Decoder<float>(c, std::move(w));
}

void expect_same_config(const ModelConfig& a, const ModelConfig& b) {
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.d_model, b.d_model);
  EXPECT_EQ(a.n_layers, b.n_layers);
  EXPECT_EQ(a.n_heads, b.n_heads);
  EXPECT_EQ(a.kv_heads(), b.kv_heads());
  EXPECT_EQ(a.d_ff, b.d_ff);
  EXPECT_EQ(a.max_seq_len, b.max_seq_len);
  EXPECT_EQ(a.positions, b.positions);
  EXPECT_EQ(a.rope_base, b.rope_base);
  EXPECT_EQ(a.norm, b.norm);
  EXPECT_EQ(a.norm_eps, b.norm_eps);
  EXPECT_EQ(a.mlp, b.mlp);
  EXPECT_EQ(a.tied_lm_head, b.tied_lm_head);
}

void expect_same_weights(const Decoder<float>& a, const Decoder<float>& b) {
  EXPECT_EQ(a.token_embedding(), b.token_embedding());
  EXPECT_EQ(a.lm_head(), b.lm_head());
  EXPECT_EQ(a.final_norm().gamma, b.final_norm().gamma);
  for (std::size_t l = 0; l < a.config().n_layers; ++l) {
    SCOPED_TRACE("layer " + std::to_string(l));
    const auto &x = a.block(l), &y = b.block(l);
    EXPECT_EQ(x.attention_norm.gamma, y.attention_norm.gamma);
    EXPECT_EQ(x.mlp_norm.gamma, y.mlp_norm.gamma);
    EXPECT_EQ(x.attention.W_Q, y.attention.W_Q);
    EXPECT_EQ(x.attention.W_K, y.attention.W_K);
    EXPECT_EQ(x.attention.W_V, y.attention.W_V);
    EXPECT_EQ(x.attention.W_O, y.attention.W_O);
    EXPECT_EQ(x.mlp.W_1, y.mlp.W_1);
    EXPECT_EQ(x.mlp.W_2, y.mlp.W_2);
    EXPECT_EQ(x.mlp.W_3, y.mlp.W_3);
  }
}

TEST_F(Llama2cFiles, RoundTripTiedAndUntied) {
  for (const bool tied : {true, false}) {
    SCOPED_TRACE(tied ? "tied" : "untied");
    const Decoder<float> original = random_decoder(tied, tied ? 7 : 8);
    const std::string file = path(tied ? "tied.bin" : "untied.bin");
    kvcache::save_llama2c(original, file);
    EXPECT_FALSE(fs::exists(file + ".tmp"));

    const kvcache::Llama2cHeader h = kvcache::read_llama2c_header(file);
    EXPECT_EQ(h.shared_classifier, tied);
    EXPECT_EQ(h.file_bytes, fs::file_size(file));
    EXPECT_EQ(h.n_parameters * sizeof(float), original.weight_bytes());

    const Decoder<float> loaded = kvcache::load_llama2c(file);
    expect_same_config(original.config(), loaded.config());
    expect_same_weights(original, loaded);

    const std::vector<int> tokens{1, 5, 36, 0, 17, 17, 2, 30, 11};
    auto s1 = original.new_session();
    auto s2 = loaded.new_session();
    const kvcache::Matrix<float> a = original.forward(tokens, s1);
    const kvcache::Matrix<float> b = loaded.forward(tokens, s2);
    EXPECT_EQ(a, b);  // bit for bit

    // Saving what was loaded gives the same bytes.
    kvcache::save_llama2c(loaded, path("again.bin"));
    EXPECT_EQ(read_file(path("again.bin")), read_file(file));
  }
}

// A stream that gives `bytes` but cannot seek, as a pipe.
class UnseekableBuffer : public std::streambuf {
 public:
  explicit UnseekableBuffer(std::string bytes) : bytes_(std::move(bytes)) {
    setg(bytes_.data(), bytes_.data(), bytes_.data() + bytes_.size());
  }

 private:
  std::string bytes_;
};

// The stream overloads read the same bytes as the path ones, from the
// stream's position to its end, and name the stream as the caller says.
TEST_F(Llama2cFiles, StreamLoadEqualsFileLoad) {
  for (const bool tied : {true, false}) {
    SCOPED_TRACE(tied ? "tied" : "untied");
    const Decoder<float> original = random_decoder(tied, 5);
    kvcache::save_llama2c(original, path("model.bin"));
    const std::string bytes = read_file(path("model.bin"));

    std::istringstream in(bytes);
    const kvcache::Llama2cHeader h = kvcache::read_llama2c_header(in, "in memory");
    EXPECT_EQ(h.file_bytes, bytes.size());
    EXPECT_EQ(in.tellg(), std::streampos(28));  // left after the header

    std::istringstream again(bytes);
    const Decoder<float> loaded = kvcache::load_llama2c(again, "in memory");
    expect_same_config(original.config(), loaded.config());
    expect_same_weights(original, loaded);

    // From the middle of a larger stream: the checkpoint is what follows.
    std::istringstream embedded("PREFIX" + bytes);
    embedded.seekg(6);
    expect_same_weights(original, kvcache::load_llama2c(embedded, "embedded"));
  }
}

TEST_F(Llama2cFiles, StreamErrorsNameTheStream) {
  const std::string good = tiny_file();
  const auto expect_error = [](const std::string& bytes, const std::string& part, const LoadLimits& limits = {}) {
    std::istringstream in(bytes);
    try {
      (void)kvcache::load_llama2c(in, "<my stream>", limits);
      ADD_FAILURE() << "no error for " << part;
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find("kvcache: <my stream>: "), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  expect_error("", "too short");
  expect_error(good.substr(0, good.size() - 1), "truncated");
  expect_error(good + "x", "trailing bytes");
  LoadLimits small;
  small.max_parameters = 10;
  expect_error(good, "LoadLimits::max_parameters", small);
  // A stream whose length cannot be known has no length to check against.
  UnseekableBuffer pipe(good);
  std::istream unseekable(&pipe);
  EXPECT_THROW((void)kvcache::load_llama2c(unseekable, "pipe"), std::runtime_error);
  UnseekableBuffer pipe2(good);
  std::istream unseekable2(&pipe2);
  try {
    (void)kvcache::read_llama2c_header(unseekable2, "pipe");
    ADD_FAILURE() << "an unseekable stream was read";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot determine the file's length"), std::string::npos) << e.what();
  }
}

// A bfloat16 decoder is saved as the float32 values it holds: loading that
// file as bfloat16 gives the same decoder back, as float32 its values.
TEST_F(Llama2cFiles, RoundTripBf16) {
  for (const bool tied : {true, false}) {
    SCOPED_TRACE(tied ? "tied" : "untied");
    const Decoder<float> f32 = random_decoder(tied, 9);
    const Decoder<float> bf16(f32.config(), kvcache::random_weights<float>(f32.config(), 9), kvcache::WeightType::bf16);
    const std::string file = path("bf16.bin");
    kvcache::save_llama2c(bf16, file);
    expect_same_weights(bf16, kvcache::load_llama2c(file, {}, kvcache::WeightType::bf16));
    const Decoder<float> widened = kvcache::load_llama2c(file);
    EXPECT_EQ(widened.weight_type(), kvcache::WeightType::f32);
    EXPECT_EQ(widened.block(1).mlp.W_2.f32(), bf16.block(1).mlp.W_2.to_dense());
    EXPECT_EQ(widened.lm_head().f32(), bf16.lm_head().to_dense());
    EXPECT_NE(widened.lm_head().f32(), f32.lm_head().f32());  // rounded, not the originals
  }
}

TEST_F(Llama2cFiles, SaveOverwritesAtomically) {
  const std::string file = path("model.bin");
  kvcache::save_llama2c(random_decoder(false, 7), file);
  const Decoder<float> d = random_decoder(true, 3);
  kvcache::save_llama2c(d, file);  // a checkpoint may be replaced
  EXPECT_TRUE(kvcache::load_llama2c(file).config().tied_lm_head);
  EXPECT_EQ(kvcache::load_llama2c(file).token_embedding().f32(), d.token_embedding().f32());
  EXPECT_EQ(fs::directory_iterator(dir_)->path().filename(), "model.bin");
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_), fs::directory_iterator()), 1);
}

// save_llama2c never writes over a file it could not have written: anything
// but a well-formed checkpoint (a sane header and exactly its length) is
// refused, named, and left exactly as it was; a symbolic link is refused,
// even to a checkpoint, and never followed.
TEST_F(Llama2cFiles, SaveRefusesToReplaceAnythingButACheckpoint) {
  const Decoder<float> d = random_decoder(true, 3);
  const auto refused = [&](const std::string& file, const std::string& what) {
    const std::string before = fs::is_regular_file(fs::symlink_status(file)) ? read_file(file) : "";
    const auto type = fs::symlink_status(file).type();
    try {
      kvcache::save_llama2c(d, file);
      ADD_FAILURE() << "save_llama2c replaced " << file;
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find(file + ": " + what), std::string::npos) << e.what();
    }
    EXPECT_EQ(fs::symlink_status(file).type(), type) << file;
    if (type == fs::file_type::regular) {
      EXPECT_EQ(read_file(file), before) << file;
    }
  };
  write_file(path("notes.txt"), "my notes\n");
  refused(path("notes.txt"), "exists and is not a llama2.c checkpoint; refusing to replace it");
  write_file(path("empty.bin"), "");
  refused(path("empty.bin"), "exists and is not a llama2.c checkpoint");
  write_file(path("truncated.bin"), tiny_file().substr(0, 100));
  refused(path("truncated.bin"), "exists and is not a llama2.c checkpoint");
  write_file(path("tiny.bin"), tiny_file());
  fs::create_symlink(path("tiny.bin"), path("link.bin"));
  refused(path("link.bin"), "is a symbolic link, not a llama2.c checkpoint; refusing to replace it");
  fs::create_directories(path("dir.bin"));
  refused(path("dir.bin"), "is a directory, not a llama2.c checkpoint");
  // A device node of its own (a copy of /dev/null; root only): never a real
  // /dev path, which a broken save would destroy for the whole machine.
  if (::mknod(path("null").c_str(), S_IFCHR | 0666, ::makedev(1, 3)) == 0) {
    refused(path("null"), "is a device, not a llama2.c checkpoint");
  }
  ASSERT_EQ(::mkfifo(path("fifo").c_str(), 0600), 0);
  refused(path("fifo"), "is a FIFO, not a llama2.c checkpoint");
  EXPECT_EQ(read_file(path("tiny.bin")), tiny_file());
  kvcache::save_llama2c(d, path("tiny.bin"));  // a checkpoint, of another model: replaced
  EXPECT_EQ(kvcache::load_llama2c(path("tiny.bin")).token_embedding().f32(), d.token_embedding().f32());
}

// Defect 12.5: writers saving to one path at once. Every save succeeds, and
// after each round the file is byte for byte one writer's checkpoint.
TEST_F(Llama2cFiles, ConcurrentSavesLeaveExactlyOneWritersFile) {
  constexpr int kWriters = 4, kRounds = 25;
  std::vector<Decoder<float>> decoders;
  std::vector<std::string> expected;
  for (int w = 0; w < kWriters; ++w) {
    decoders.push_back(random_decoder(w % 2 == 0, 100 + static_cast<std::uint64_t>(w)));
    kvcache::save_llama2c(decoders.back(), path("expected" + std::to_string(w) + ".bin"));
    expected.push_back(read_file(path("expected" + std::to_string(w) + ".bin")));
  }
  const std::string shared = path("shared.bin");
  for (int round = 0; round < kRounds; ++round) {
    if (round % 2 == 0) fs::remove(shared);  // half the rounds start without the file
    std::vector<std::string> errors(kWriters);
    std::vector<std::thread> threads;
    for (int w = 0; w < kWriters; ++w)
      threads.emplace_back([&, w] {
        try {
          kvcache::save_llama2c(decoders[static_cast<std::size_t>(w)], shared);
        } catch (const std::exception& e) {
          errors[static_cast<std::size_t>(w)] = e.what();
        }
      });
    for (auto& t : threads) t.join();
    for (int w = 0; w < kWriters; ++w) EXPECT_EQ(errors[static_cast<std::size_t>(w)], "") << "round " << round;
    const std::string got = read_file(shared);
    EXPECT_NE(std::find(expected.begin(), expected.end(), got), expected.end())
        << "round " << round << ": the file (" << got.size() << " bytes) is no writer's checkpoint";
  }
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_), fs::directory_iterator()), kWriters + 1)
      << "a temporary file was left";
}

// A real checkpoint, loaded and saved again, gives the same bytes except for
// the RoPE tables, which nothing reads (and which kvcache computes in double).
TEST_F(Llama2cFiles, RealCheckpointRoundTrip) {
  KVCACHE_MODEL_FILE_OR_SKIP(model, "stories260K.bin");
  const Decoder<float> d = kvcache::load_llama2c(model);
  kvcache::save_llama2c(d, path("copy.bin"));
  const std::string a = read_file(model), b = read_file(path("copy.bin"));
  ASSERT_EQ(a.size(), b.size());
  const kvcache::Llama2cHeader h = kvcache::read_llama2c_header(model);
  const std::size_t weights_end = 28 + 4 * (h.n_parameters - (h.shared_classifier ? 0 : h.vocab_size * h.dim));
  const std::size_t rope_end = weights_end + 4 * h.seq_len * h.head_size();
  EXPECT_TRUE(a.compare(0, weights_end, b, 0, weights_end) == 0) << "weights differ";
  EXPECT_TRUE(a.compare(rope_end, std::string::npos, b, rope_end, std::string::npos) == 0) << "classifier differs";
  // The tables hold the same angles to float precision.
  for (std::size_t off = weights_end; off < rope_end; off += 4) {
    float x, y;
    std::memcpy(&x, &a[off], 4);
    std::memcpy(&y, &b[off], 4);
    ASSERT_NEAR(x, y, 1e-3f) << "at byte " << off;
  }
}

// ---------------------------------------------------------------------------
// Save errors

void expect_save_rejects(const Decoder<float>& d, const std::string& file, const std::string& field) {
  try {
    kvcache::save_llama2c(d, file);
    ADD_FAILURE() << "save_llama2c did not reject " << field;
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(file));
  EXPECT_FALSE(fs::exists(file + ".tmp"));
}

TEST_F(Llama2cFiles, SaveRejectsWhatTheFormatCannotSay) {
  const std::string file = path("rejected.bin");
  const ModelConfig llama = kvcache::llama2c_config(16, 24, 1, 2, 2, 11, 8);
  const auto decoder = [](ModelConfig c) { return Decoder<float>(c, kvcache::random_weights<float>(c, 1)); };

  ModelConfig c = llama;
  c.positions = kvcache::PositionEncoding::learned;
  expect_save_rejects(decoder(c), file, "positions");
  c = llama;
  c.positions = kvcache::PositionEncoding::none;
  expect_save_rejects(decoder(c), file, "positions");
  c = llama;
  c.rope_base = 500000.0;
  expect_save_rejects(decoder(c), file, "rope_base");
  c = llama;
  c.norm = kvcache::NormKind::layer_norm;
  expect_save_rejects(decoder(c), file, "norm");
  c = llama;
  c.norm_eps = 1e-6;
  expect_save_rejects(decoder(c), file, "norm_eps");
  c = llama;
  c.mlp = kvcache::MlpKind::gelu;
  expect_save_rejects(decoder(c), file, "mlp");

  kvcache::DecoderWeights<float> w = kvcache::random_weights<float>(llama, 1);
  w.blocks[0].attention.b_Q = kvcache::Vector<float>::Ones(16);
  expect_save_rejects(Decoder<float>(llama, std::move(w)), file, "blocks[0].attention.b_Q");
  w = kvcache::random_weights<float>(llama, 1);
  w.blocks[0].mlp.b_2 = kvcache::Vector<float>::Ones(16);
  expect_save_rejects(Decoder<float>(llama, std::move(w)), file, "blocks[0].mlp.b_2");
}

TEST_F(Llama2cFiles, SaveToMissingDirectory) {
  const std::string file = path("no_such_dir/model.bin");
  try {
    kvcache::save_llama2c(random_decoder(true, 1), file);
    ADD_FAILURE() << "no exception";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(file), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(file + ".tmp"));
}

TEST_F(Llama2cFiles, SaveOntoDirectoryFailsAndCleansUp) {
  const std::string target = path("occupied");
  fs::create_directories(fs::path(target) / "inside");
  EXPECT_THROW(kvcache::save_llama2c(random_decoder(true, 1), target), std::runtime_error);
  EXPECT_TRUE(fs::is_directory(fs::path(target) / "inside"));
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_), fs::directory_iterator()), 1);
}

TEST(Llama2cConfig, StoriesShapes) {
  const ModelConfig s15 = kvcache::llama2c_stories15M_config();
  EXPECT_EQ(s15.d_model, 288u);
  EXPECT_EQ(s15.d_ff, 768u);
  EXPECT_EQ(s15.n_layers, 6u);
  EXPECT_EQ(s15.n_heads, 6u);
  EXPECT_EQ(s15.kv_heads(), 6u);
  EXPECT_EQ(s15.vocab_size, 32000u);
  EXPECT_EQ(s15.max_seq_len, 256u);
  const ModelConfig s42 = kvcache::llama2c_stories42M_config();
  EXPECT_EQ(s42.d_model, 512u);
  EXPECT_EQ(s42.d_ff, 1376u);
  EXPECT_EQ(s42.max_seq_len, 1024u);
  const ModelConfig s110 = kvcache::llama2c_stories110M_config();
  EXPECT_EQ(s110.d_model, 768u);
  EXPECT_EQ(s110.n_layers, 12u);
  EXPECT_THROW((void)kvcache::llama2c_config(10, 12, 1, 3, 3, 10, 4), std::invalid_argument);
}

}  // namespace
