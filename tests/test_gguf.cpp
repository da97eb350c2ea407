// tests/test_gguf.cpp — the GGUF reader and the llama loader (gguf.hpp):
// round trips of random models of every attention shape and both kinds of
// LM head, bit for bit against the same weights built directly; the shared
// models through GGUF giving llama2.c's reference ids; the vocabulary; and
// malformed files, each one clear error without a large allocation.
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <new>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <kvcache/generate.hpp>
#include <kvcache/gguf.hpp>
#include <kvcache/llama2c.hpp>

#include "fixtures.hpp"
#include "gguf_writer.hpp"
#include "models.hpp"

// ---- The largest single allocation while `g_watch` is set -------------------
namespace {
std::atomic<bool> g_watch{false};
std::atomic<std::size_t> g_largest{0};
}  // namespace

// Not inlined, and the warning off at the definitions, as in test_no_alloc.cpp:
// g++ would otherwise warn about the pairing the replacement makes correct.
#if defined(__GNUC__)
#define KVCACHE_TEST_NOINLINE __attribute__((noinline))
#else
#define KVCACHE_TEST_NOINLINE
#endif
KVCACHE_TEST_NOINLINE void* operator new(std::size_t n) {
  if (g_watch.load(std::memory_order_relaxed) && n > g_largest.load(std::memory_order_relaxed)) g_largest = n;
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
KVCACHE_TEST_NOINLINE void operator delete(void* p) noexcept { std::free(p); }
KVCACHE_TEST_NOINLINE void operator delete(void* p, std::size_t) noexcept { std::free(p); }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

namespace {

namespace fs = std::filesystem;
using kvcache::Decoder;
using kvcache::GgufFile;
using kvcache::ModelConfig;
using kvcache::WeightType;
using kvcache_test::GgufWriter;
using kvcache_test::GgufType;

class GgufFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::path(KVCACHE_TEST_TMP_DIR) / "gguf_tmp" / (std::string(info->test_suite_name()) + "." + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ignored;
    if (!HasFailure()) fs::remove_all(dir_, ignored);
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  std::string write(const std::string& name, const std::string& bytes) const {
    std::ofstream out(path(name), std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    return path(name);
  }

  // Loading `bytes` throws std::runtime_error naming the file and every one
  // of `parts`, and allocates no single block over 1 MB on the way.
  void expect_error(const std::string& bytes, const std::vector<std::string>& parts, const kvcache::LoadLimits& limits = {}) {
    const std::string file = write("bad.gguf", bytes);
    g_largest = 0;
    g_watch = true;
    std::string message;
    try {
      (void)kvcache::load_gguf(file, limits);
    } catch (const std::runtime_error& e) {
      message = e.what();
    }
    g_watch = false;
    EXPECT_LT(g_largest.load(), std::size_t{1} << 20) << message;
    ASSERT_FALSE(message.empty()) << "loaded; expected an error naming " << parts.front();
    EXPECT_NE(message.find(file), std::string::npos) << message;
    for (const std::string& part : parts) EXPECT_NE(message.find(part), std::string::npos) << message << "\n  lacks: " << part;
  }

  fs::path dir_;
};

ModelConfig llama_config(std::size_t heads, std::size_t kv_heads, bool tied, std::size_t d_ff = 48) {
  ModelConfig c = fixtures::model({"", heads, kv_heads, kvcache::PositionEncoding::rope});
  c.tied_lm_head = tied;
  c.d_ff = d_ff;
  return c;
}

// Logits of every position of `prompt`, and the greedy continuation.
void expect_same_outputs(const Decoder<float>& a, const Decoder<float>& b, std::size_t prompt_length) {
  const std::vector<int> prompt = fixtures::random_tokens(prompt_length, a.config().vocab_size, 7);
  auto sa = a.new_session(), sb = b.new_session();
  const kvcache::Matrix<float> la = a.forward(prompt, sa);
  const kvcache::Matrix<float> lb = b.forward(prompt, sb);
  ASSERT_EQ(la.rows(), lb.rows());
  for (Eigen::Index i = 0; i < la.size(); ++i) ASSERT_EQ(la.data()[i], lb.data()[i]) << "logit " << i;
  kvcache::GenerateOptions o;
  o.max_new_tokens = 10;
  EXPECT_EQ(kvcache::generate(a, prompt, o), kvcache::generate(b, prompt, o));
}

// ---------------------------------------------------------------------------
// Round trips

struct Shape {
  const char* name;
  std::size_t heads, kv_heads;
  bool tied;
};

class GgufRoundTrip : public GgufFiles, public ::testing::WithParamInterface<Shape> {};

TEST_P(GgufRoundTrip, F32AndBf16InPlaceBitIdentical) {
  const Shape s = GetParam();
  const ModelConfig c = llama_config(s.heads, s.kv_heads, s.tied);
  for (const auto& [type, ggml] : {std::pair{WeightType::f32, kvcache_test::kGgmlF32},
                                   std::pair{WeightType::bf16, kvcache_test::kGgmlBf16}}) {
    SCOPED_TRACE(kvcache::to_string(type));
    const Decoder<float> direct(c, kvcache::random_weights<float>(c, 11), type);
    const std::string file = write("m.gguf", kvcache_test::llama_gguf(direct, ggml));
    const Decoder<float> loaded = kvcache::load_gguf(file);
    const ModelConfig& g = loaded.config();
    EXPECT_EQ(g.vocab_size, c.vocab_size);
    EXPECT_EQ(g.d_model, c.d_model);
    EXPECT_EQ(g.n_layers, c.n_layers);
    EXPECT_EQ(g.n_heads, c.n_heads);
    EXPECT_EQ(g.kv_heads(), c.kv_heads());
    EXPECT_EQ(g.d_ff, c.d_ff);
    EXPECT_EQ(g.max_seq_len, c.max_seq_len);
    EXPECT_EQ(g.tied_lm_head, s.tied);
    EXPECT_EQ(g.rope_base, 10000.0);
    EXPECT_EQ(static_cast<float>(g.norm_eps), 1e-5f);
    EXPECT_EQ(loaded.weight_type(), type);
    EXPECT_EQ(loaded.weight_bytes(), direct.weight_bytes());
    // Used where they are in the file.
    EXPECT_TRUE(loaded.token_embedding().external());
    EXPECT_TRUE(loaded.block(1).mlp.W_2.external());
    EXPECT_EQ(loaded.block(1).attention.W_K, direct.block(1).attention.W_K);
    EXPECT_EQ(loaded.lm_head(), direct.lm_head());
    expect_same_outputs(direct, loaded, 5);   // the decode kernel
    expect_same_outputs(direct, loaded, 20);  // prefill
    fs::remove(file);  // the mapping stays: the decoder still works
    expect_same_outputs(direct, loaded, 3);
  }
}

TEST_P(GgufRoundTrip, ConvertedOnLoad) {
  const Shape s = GetParam();
  const ModelConfig c = llama_config(s.heads, s.kv_heads, s.tied);
  const Decoder<float> f32(c, kvcache::random_weights<float>(c, 12));
  const Decoder<float> bf16(c, kvcache::random_weights<float>(c, 12), WeightType::bf16);
  const std::string file = write("m.gguf", kvcache_test::llama_gguf(f32));
  const Decoder<float> loaded = kvcache::load_gguf(file, {}, WeightType::bf16);
  EXPECT_EQ(loaded.weight_type(), WeightType::bf16);
  EXPECT_FALSE(loaded.block(0).attention.W_Q.external());
  expect_same_outputs(bf16, loaded, 5);
  // As double: converted from the file's floats.
  const Decoder<double> d = kvcache::load_gguf<double>(file);
  EXPECT_EQ(d.block(0).attention.W_V(3, 4), static_cast<double>(f32.block(0).attention.W_V(3, 4)));
}

INSTANTIATE_TEST_SUITE_P(Shapes, GgufRoundTrip,
                         ::testing::Values(Shape{"MHA_tied", 4, 4, true}, Shape{"MHA_separate", 4, 4, false},
                                           Shape{"GQA_tied", 4, 2, true}, Shape{"GQA_separate", 4, 2, false},
                                           Shape{"MQA_tied", 4, 1, true}, Shape{"MQA_separate", 4, 1, false}),
                         [](const ::testing::TestParamInfo<Shape>& i) { return std::string(i.param.name); });

// f16 and q8_0: loaded as such once kvcache computes with them (the table
// in gguf_weight_type), refused naming the tensor and the type until then.
TEST_F(GgufFiles, F16AndQ8_0) {
  const ModelConfig c = llama_config(4, 2, false, 64);  // rows of 32 and 64: q8_0 blocks fit
  for (const std::uint32_t ggml : {kvcache_test::kGgmlF16, kvcache_test::kGgmlQ8_0}) {
    const std::string name = kvcache::ggml_type_name(ggml);
    SCOPED_TRACE(name);
    const Decoder<float> f32(c, kvcache::random_weights<float>(c, 13));
    const std::string file = write(name + ".gguf", kvcache_test::llama_gguf(f32, ggml));
    if (const std::optional<WeightType> type = kvcache::gguf_weight_type(ggml)) {
      const Decoder<float> direct(c, kvcache::random_weights<float>(c, 13), *type);
      const Decoder<float> loaded = kvcache::load_gguf(file);
      EXPECT_EQ(loaded.weight_type(), *type);
      expect_same_outputs(direct, loaded, 5);
    } else {
      expect_error(kvcache_test::llama_gguf(f32, ggml), {"tensor 'token_embd.weight'", "ggml type " + name, "not supported"});
    }
  }
}

// ---------------------------------------------------------------------------
// The shared models through GGUF: llama2.c's reference ids

std::vector<int> parse_ids(const std::string& text) {
  std::istringstream in(text);
  return {std::istream_iterator<int>(in), std::istream_iterator<int>()};
}

std::vector<int> run_like(const Decoder<float>& d, const std::vector<int>& prompt, std::size_t steps) {
  kvcache::GenerateOptions o;
  o.max_new_tokens = steps - prompt.size() + 1;
  o.end_token = 1;
  std::vector<int> ids(prompt.begin() + 1, prompt.end());
  const std::vector<int> out = kvcache::generate(d, prompt, o);
  ids.insert(ids.end(), out.begin(), out.end());
  return ids;
}

TEST_F(GgufFiles, SharedModelsGiveTheReferenceIds) {
  KVCACHE_MODEL_FILE_OR_SKIP(aidreams, "aidreams260K.bin");
  KVCACHE_MODEL_FILE_OR_SKIP(stories, "stories260K.bin");
  const std::string a = write("aidreams.gguf", kvcache_test::llama_gguf(kvcache::load_llama2c(aidreams)));
  EXPECT_EQ(run_like(kvcache::load_gguf(a), {1, 368, 430, 273, 268}, 128),
            parse_ids("368 430 273 268 322 260 327 446 262 263 428 434 436 451 275 280 302 450 405 403 399 422 448 429 "
                      "465 438 340 431 338 353 341 325 266 386 269 293 446 299 303 266 323 434 285 362 262 263 428 434 "
                      "436 451 275 280 302 450 405 403 399 448 429 465 438 340 431 338 353 341 325 266 386 269 293 446 "
                      "299 303 266 451 433 307 436 265 432 456 430 446 299 303 384 467 407 446 299 303 266 432 445 439 "
                      "265 325 275 429 339 315 374 446 299 303 266 323 434 285 362 262 263 428 434 436 451 275 429 339 "
                      "315 374 448 2 1"));
  const std::string s = write("stories.gguf", kvcache_test::llama_gguf(kvcache::load_llama2c(stories)));
  const std::vector<int> ids = run_like(kvcache::load_gguf(s), {1}, 40);
  EXPECT_EQ(ids, parse_ids("461 461 401 401 401 461 378 455 473 456 435 299 362 409 283 264 283 452 288 13 431 431 431 "
                           "431 431 431 431 431 431 431 431 431 431 293 430 417 363 416 315 342"));
}

// ---------------------------------------------------------------------------
// Metadata and the vocabulary

TEST_F(GgufFiles, EveryValueType) {
  GgufWriter w;
  w.add("u8", GgufType::u8, std::uint8_t{200});
  w.add("i8", GgufType::i8, std::int8_t{-3});
  w.add("u16", GgufType::u16, std::uint16_t{60000});
  w.add("i16", GgufType::i16, std::int16_t{300});
  w.add("u32", GgufType::u32, std::uint32_t{4000000000u});
  w.add("i32", GgufType::i32, std::int32_t{-5});
  w.add("f32", GgufType::f32, 0.25f);
  w.add_bool("bool", true);
  w.add_string("string", "h\xC3\xA9llo");
  w.add("u64", GgufType::u64, std::uint64_t{1} << 40);
  w.add("i64", GgufType::i64, std::int64_t{7});
  w.add("f64", GgufType::f64, 0.125);
  w.add_strings("strings", {"a", "", "\xE2\x96\x81the"});
  w.add_array("f32s", GgufType::f32, std::vector<float>{1.5f, -2.0f});
  w.add_array("i32s", GgufType::i32, std::vector<std::int32_t>{6, -1});
  w.add_array("u8s", GgufType::u8, std::vector<std::uint8_t>{1, 2, 3});
  w.add_array("empty", GgufType::boolean, std::vector<std::uint8_t>{});
  const GgufFile f = GgufFile::open(write("kv.gguf", w.bytes()));
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.metadata().size(), 17u);
  EXPECT_EQ(*f.get_uint("u8"), 200u);
  EXPECT_EQ(*f.get_uint("u16"), 60000u);
  EXPECT_EQ(*f.get_uint("i16"), 300u);
  EXPECT_EQ(*f.get_uint("u32"), 4000000000u);
  EXPECT_EQ(*f.get_uint("u64"), std::uint64_t{1} << 40);
  EXPECT_EQ(*f.get_uint("i64"), 7u);
  EXPECT_EQ(*f.get_float("f32"), 0.25);
  EXPECT_EQ(*f.get_float("f64"), 0.125);
  EXPECT_TRUE(*f.get_bool("bool"));
  EXPECT_EQ(*f.get_string("string"), "h\xC3\xA9llo");
  EXPECT_EQ(f.get_strings("strings"), (std::vector<std::string>{"a", "", "\xE2\x96\x81the"}));
  EXPECT_EQ(f.get_f32s("f32s"), (std::vector<float>{1.5f, -2.0f}));
  EXPECT_EQ(f.get_i32s("i32s"), (std::vector<std::int32_t>{6, -1}));
  EXPECT_EQ(f.find("u8s")->count, 3u);
  EXPECT_EQ(f.find("empty")->count, 0u);
  EXPECT_FALSE(f.get_uint("absent"));
  fixtures::expect_throw_naming<std::runtime_error>([&] { (void)f.get_uint("i8"); }, "'i8' = -3, must be >= 0");
  fixtures::expect_throw_naming<std::runtime_error>([&] { (void)f.get_string("u8"); }, "'u8' is a u8, expected a string");
  fixtures::expect_throw_naming<std::runtime_error>([&] { (void)f.get_f32s("i32s"); }, "'i32s' is an array of i32");
  fixtures::expect_throw_naming<std::runtime_error>([&] { (void)f.get_strings("absent"); }, "'absent' is missing");
}

TEST_F(GgufFiles, Vocabulary) {
  const ModelConfig c = llama_config(4, 2, true);
  std::vector<std::string> pieces;
  for (std::size_t i = 0; i < c.vocab_size; ++i) pieces.push_back(i == 3 ? "<0x0A>" : "\xE2\x96\x81w" + std::to_string(i));
  const Decoder<float> d(c, kvcache::random_weights<float>(c, 1));
  const GgufFile f = GgufFile::open(write("v.gguf", kvcache_test::llama_gguf(d, kvcache_test::kGgmlF32, pieces)));
  const kvcache::SentencePieceVocab v = kvcache::read_gguf_vocab(f);
  EXPECT_EQ(v.pieces, pieces);
  EXPECT_EQ(v.scores, std::vector<float>(pieces.size(), 0.0f));
  EXPECT_EQ(v.types, std::vector<std::int32_t>(pieces.size(), 1));
  EXPECT_EQ(v.bos_id, 1);
  EXPECT_EQ(v.eos_id, 2);
  EXPECT_EQ(v.unknown_id, 0);
  EXPECT_TRUE(v.add_bos);
  EXPECT_TRUE(v.add_space_prefix);

  GgufWriter w;
  w.add_string("tokenizer.ggml.model", "gpt2");
  fixtures::expect_throw_naming<std::runtime_error>(
      [&] { (void)kvcache::read_gguf_vocab(GgufFile::open(write("g.gguf", w.bytes()))); }, "'gpt2'");
  GgufWriter x;
  x.add_string("tokenizer.ggml.model", "llama");
  x.add_strings("tokenizer.ggml.tokens", {"a", "b"});
  x.add_u32("tokenizer.ggml.eos_token_id", 2);
  fixtures::expect_throw_naming<std::runtime_error>(
      [&] { (void)kvcache::read_gguf_vocab(GgufFile::open(write("e.gguf", x.bytes()))); },
      "'tokenizer.ggml.eos_token_id' = 2, outside the vocabulary of 2 tokens");
  GgufWriter y;
  y.add_string("tokenizer.ggml.model", "llama");
  y.add_strings("tokenizer.ggml.tokens", {"a", "b"});
  y.add_array("tokenizer.ggml.scores", GgufType::f32, std::vector<float>{1.0f});
  fixtures::expect_throw_naming<std::runtime_error>(
      [&] { (void)kvcache::read_gguf_vocab(GgufFile::open(write("s.gguf", y.bytes()))); }, "as many entries as tokens");
}

}  // namespace
