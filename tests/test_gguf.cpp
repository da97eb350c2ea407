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
#include "reference.hpp"
#include "temp_dir.hpp"

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

class GgufFiles : public kvcache_test::TempDirTest {
 protected:
  GgufFiles() : TempDirTest("gguf_tmp") {}
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

};

ModelConfig llama_config(std::size_t heads, std::size_t kv_heads, bool tied, std::size_t d_ff = 48) {
  ModelConfig c = fixtures::model({"", heads, kv_heads, kvcache::PositionEncoding::rope});
  c.tied_lm_head = tied;
  c.d_ff = d_ff;
  c.numerics = kvcache::Numerics::ggml;  // as load_gguf sets it: a Decoder of the same weights gives its bits
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

// A matrix of `type` over memory of its own, marked external as a file's
// would be (a Decoder keeps it as it is: how a mixed-type model is built).
kvcache::WeightMatrix<float> external_copy(const kvcache::WeightMatrix<float>& W, WeightType type) {
  kvcache::WeightMatrix<float> converted = W;
  converted.convert_to(type);
  std::shared_ptr<void> bytes = kvcache::detail::allocate_weights(converted.bytes());
  const void* from = type == WeightType::q8_0  ? static_cast<const void*>(converted.q8_0())
                     : type == WeightType::bf16 ? static_cast<const void*>(converted.bf16().data())
                     : type == WeightType::f16  ? static_cast<const void*>(converted.f16().data())
                                                : static_cast<const void*>(converted.f32().data());
  std::memcpy(bytes.get(), from, converted.bytes());
  return kvcache::WeightMatrix<float>(W.rows(), W.cols(), type, std::move(bytes));
}

// random_weights(c, seed) with every matrix external_copy'd as `type`
// (W_2 as `w2_type`): the decoder a GGUF file of them loads.
kvcache::DecoderWeights<float> external_weights(const ModelConfig& c, std::uint64_t seed, WeightType type,
                                                WeightType w2_type) {
  kvcache::DecoderWeights<float> w = kvcache::random_weights<float>(c, seed);
  w.token_embedding = external_copy(w.token_embedding, type);
  if (w.lm_head.size() != 0) w.lm_head = external_copy(w.lm_head, type);
  for (auto& b : w.blocks) {
    for (auto* W : {&b.attention.W_Q, &b.attention.W_K, &b.attention.W_V, &b.attention.W_O, &b.mlp.W_1, &b.mlp.W_3})
      *W = external_copy(*W, type);
    b.mlp.W_2 = external_copy(b.mlp.W_2, w2_type);
  }
  return w;
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
    // bf16 in a file computes as llama.cpp does (x rounded to bf16): as
    // external bf16 matrices do, not as those converted by a Decoder.
    const Decoder<float> direct(c, external_weights(c, 11, type, type), type);
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
    EXPECT_EQ(g.numerics, kvcache::Numerics::ggml);
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

// Matrix W as the test writer's q4_0 encoder writes it, read back by hand
// from the bytes: value j of a block is d · (its nibble − 8), byte j % 16's
// low nibble for j < 16, its high one above.
kvcache::WeightMatrix<float> q4_0_by_hand(const kvcache::WeightMatrix<float>& W) {
  const std::string bytes = kvcache_test::q4_0_bytes(kvcache_test::values_of(W));
  kvcache::Matrix<float> M(W.rows(), W.cols());
  for (Eigen::Index e = 0; e < W.size(); ++e) {
    const auto* block = reinterpret_cast<const unsigned char*>(bytes.data()) + e / 32 * 18;
    const Eigen::Index j = e % 32;
    const unsigned char byte = block[2 + j % 16];
    const int nibble = j < 16 ? byte & 15 : byte >> 4;
    const float d = kvcache::detail::from_f16(static_cast<std::uint16_t>(block[0] | block[1] << 8));
    M(e / W.cols(), e % W.cols()) = d * static_cast<float>(nibble - 8);
  }
  return M;
}

// q4_0 files of every shape: the test writer's encoder (ggml's reference
// quantizer, written apart from kvcache's) gives the bytes of kvcache's
// codec, used in place; the model computes as a Decoder converted to q4_0,
// bit for bit, and its logits are those of the file's values read by hand
// and run in double by tests/reference.hpp, within the q8_0 rounding of
// the products' inputs (~1% of the largest logit, at most 1.5% here; with
// the nibbles of a byte swapped, 67% to 119%).
TEST_P(GgufRoundTrip, Q4_0InPlace) {
  const Shape s = GetParam();
  const ModelConfig c = llama_config(s.heads, s.kv_heads, s.tied, 64);
  const Decoder<float> f32(c, kvcache::random_weights<float>(c, 15));
  const Decoder<float> loaded = kvcache::load_gguf(write("q4.gguf", kvcache_test::llama_gguf(f32, kvcache_test::kGgmlQ4_0)));
  EXPECT_EQ(loaded.weight_type(), WeightType::q4_0);
  EXPECT_TRUE(loaded.block(0).attention.W_Q.external());
  EXPECT_EQ(loaded.block(1).mlp.W_2.type(), WeightType::q4_0);
  const Decoder<float> direct(c, kvcache::random_weights<float>(c, 15), WeightType::q4_0);
  EXPECT_EQ(loaded.weight_bytes(), direct.weight_bytes());
  EXPECT_EQ(loaded.block(1).mlp.W_2, direct.block(1).mlp.W_2);
  EXPECT_EQ(loaded.block(0).attention.W_K, direct.block(0).attention.W_K);
  EXPECT_EQ(loaded.token_embedding(), direct.token_embedding());
  EXPECT_EQ(loaded.lm_head(), direct.lm_head());
  expect_same_outputs(direct, loaded, 5);   // decode kernels
  expect_same_outputs(direct, loaded, 20);  // prefill
  kvcache::DecoderWeights<float> w = kvcache::random_weights<float>(c, 15);
  w.token_embedding = q4_0_by_hand(w.token_embedding);
  if (!s.tied) w.lm_head = q4_0_by_hand(w.lm_head);
  for (auto& b : w.blocks)
    for (auto* W : {&b.attention.W_Q, &b.attention.W_K, &b.attention.W_V, &b.attention.W_O, &b.mlp.W_1, &b.mlp.W_2,
                    &b.mlp.W_3})
      *W = q4_0_by_hand(*W);
  for (const std::size_t n : {std::size_t{1}, std::size_t{5}, std::size_t{20}}) {
    const std::vector<int> prompt = fixtures::random_tokens(n, c.vocab_size, 8);
    auto session = loaded.new_session();
    const kvcache::Matrix<float> got = loaded.forward(prompt, session);
    EXPECT_LT(reference::relative_error(got, reference::logits(c, w, prompt)), 3e-2) << n;
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, GgufRoundTrip,
                         ::testing::Values(Shape{"MHA_tied", 4, 4, true}, Shape{"MHA_separate", 4, 4, false},
                                           Shape{"GQA_tied", 4, 2, true}, Shape{"GQA_separate", 4, 2, false},
                                           Shape{"MQA_tied", 4, 1, true}, Shape{"MQA_separate", 4, 1, false}),
                         [](const ::testing::TestParamInfo<Shape>& i) { return std::string(i.param.name); });

// f16 and q8_0 files (written by the test writer, whose encoders give the
// bytes of llama.cpp's converter): used in place, and byte for byte the
// matrices kvcache's own codecs make (WeightMatrix::convert_to), so a
// Decoder over either computes the same logits, bit for bit.
TEST_F(GgufFiles, F16AndQ8_0InPlaceBitIdentical) {
  const ModelConfig c = llama_config(4, 2, false, 64);  // rows of 32 and 64: q8_0 blocks fit
  for (const std::uint32_t ggml : {kvcache_test::kGgmlF16, kvcache_test::kGgmlQ8_0}) {
    const std::string name = kvcache::ggml_type_name(ggml);
    SCOPED_TRACE(name);
    const std::optional<WeightType> type = kvcache::gguf_weight_type(ggml);
    ASSERT_TRUE(type.has_value());
    const Decoder<float> f32(c, kvcache::random_weights<float>(c, 13));
    const std::string file = write(name + ".gguf", kvcache_test::llama_gguf(f32, ggml));
    const Decoder<float> direct(c, kvcache::random_weights<float>(c, 13), *type);
    const Decoder<float> loaded = kvcache::load_gguf(file);
    EXPECT_EQ(loaded.weight_type(), *type);
    EXPECT_EQ(loaded.weight_bytes(), direct.weight_bytes());
    EXPECT_TRUE(loaded.block(0).attention.W_Q.external());
    EXPECT_EQ(loaded.block(0).attention.W_Q.type(), *type);
    EXPECT_EQ(loaded.block(1).mlp.W_2, direct.block(1).mlp.W_2);
    EXPECT_EQ(loaded.token_embedding(), direct.token_embedding());
    EXPECT_EQ(loaded.lm_head(), direct.lm_head());
    expect_same_outputs(direct, loaded, 5);   // decode kernels
    expect_same_outputs(direct, loaded, 20);  // prefill
  }
}

// A q8_0 file whose ffn_down rows (48 values) are not whole blocks: written
// as f16, as llama.cpp's converters do; loaded with each matrix in its own
// type, computing as a Decoder built with the same types.
TEST_F(GgufFiles, MixedQ8_0AndF16) {
  const ModelConfig c = llama_config(4, 1, true, 48);
  const Decoder<float> f32(c, kvcache::random_weights<float>(c, 14));
  const Decoder<float> loaded = kvcache::load_gguf(write("mixed.gguf", kvcache_test::llama_gguf(f32, kvcache_test::kGgmlQ8_0)));
  EXPECT_EQ(loaded.weight_type(), WeightType::q8_0);
  EXPECT_EQ(loaded.block(0).mlp.W_2.type(), WeightType::f16);
  EXPECT_EQ(loaded.block(0).mlp.W_1.type(), WeightType::q8_0);
  const Decoder<float> direct(c, external_weights(c, 14, WeightType::q8_0, WeightType::f16), WeightType::q8_0);
  EXPECT_EQ(loaded.block(1).mlp.W_2, direct.block(1).mlp.W_2);
  EXPECT_EQ(loaded.weight_bytes(), direct.weight_bytes());
  expect_same_outputs(direct, loaded, 5);
  expect_same_outputs(direct, loaded, 20);
  // Converting on load to q8_0 cannot hold those rows: an error naming the tensor.
  try {
    (void)kvcache::load_gguf(path("mixed.gguf"), {}, WeightType::q8_0);
    ADD_FAILURE() << "loaded";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("tensor 'blk.0.ffn_down.weight'"), std::string::npos) << e.what();
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

// ---------------------------------------------------------------------------
// Malformed files: one clear error each, no large allocation

std::string small_model(std::uint32_t ggml = kvcache_test::kGgmlF32) {
  const ModelConfig c = llama_config(4, 2, true);
  return kvcache_test::llama_gguf(Decoder<float>(c, kvcache::random_weights<float>(c, 3)), ggml);
}

// The offset where the data section starts in `bytes`.
std::size_t data_offset_of(const std::string& bytes) {
  return static_cast<std::size_t>(
      GgufFile(std::shared_ptr<const unsigned char>(reinterpret_cast<const unsigned char*>(bytes.data()), [](auto*) {}),
               bytes.size(), "m")
          .data_offset());
}

TEST_F(GgufFiles, TruncatedAtEveryByte) {
  const std::string good = small_model();
  const std::size_t data = data_offset_of(good);
  for (std::size_t n = 0; n < good.size(); n += n < data ? 1 : 97) {
    const std::string file = write("t.gguf", good.substr(0, n));
    try {
      (void)kvcache::load_gguf(file);
      ADD_FAILURE() << "a file cut at " << n << " of " << good.size() << " bytes loaded";
    } catch (const std::runtime_error& e) {
      const std::string m = e.what();
      ASSERT_NE(m.find(file), std::string::npos) << m;
      ASSERT_TRUE(m.find("truncated") != std::string::npos || m.find("too short") != std::string::npos ||
                  m.find("past the end") != std::string::npos ||
                  m.find("left in the file") != std::string::npos)
          << "cut at " << n << ": " << m;
    }
  }
}

// A file of the header and `rest`, declaring n_tensors and n_kv.
std::string raw_file(std::uint64_t n_tensors, std::uint64_t n_kv, const std::string& rest, std::uint32_t version = 3) {
  std::string out = "GGUF";
  const auto put = [&](auto v) { out.append(reinterpret_cast<const char*>(&v), sizeof v); };
  put(version);
  put(n_tensors);
  put(n_kv);
  return out + rest;
}
std::string str(const std::string& s) {
  const std::uint64_t n = s.size();
  return std::string(reinterpret_cast<const char*>(&n), 8) + s;
}
std::string u32(std::uint32_t v) { return std::string(reinterpret_cast<const char*>(&v), 4); }
std::string u64(std::uint64_t v) { return std::string(reinterpret_cast<const char*>(&v), 8); }

TEST_F(GgufFiles, BadHeadersAndMetadata) {
  const std::uint64_t huge = std::uint64_t{1} << 62;
  expect_error("GGUG" + raw_file(0, 0, "").substr(4), {"not a GGUF file"});
  expect_error(raw_file(0, 0, "", 1), {"GGUF version 1 is not supported"});
  expect_error(raw_file(0, 0, "", 0x03000000), {"big-endian"});
  expect_error(raw_file(huge, 0, std::string(64, '\0')), {"the tensor count = " + std::to_string(huge)});
  expect_error(raw_file(0, huge, std::string(64, '\0')), {"the metadata key count = " + std::to_string(huge)});
  expect_error(raw_file(0, 1, u64(huge) + std::string(20, 'x')), {"metadata key 0", "truncated"});
  expect_error(raw_file(0, 1, str("k") + u32(13) + "xxxx"), {"metadata key 'k'", "unknown value type 13"});
  expect_error(raw_file(0, 1, str("k") + u32(9) + u32(9) + u64(1) + "xxxxxxxxxx"), {"'k'", "array of arrays"});
  expect_error(raw_file(0, 1, str("k") + u32(9) + u32(6) + u64(huge) + "xxxxxxxxxx"),
               {"'k'", std::to_string(huge) + " elements of type f32 do not fit"});
  expect_error(raw_file(0, 1, str("k") + u32(9) + u32(8) + u64(3) + str("a") + str("") + u64(huge) + std::string(9, 'x')),
               {"'k'[2]", "truncated"});
  expect_error(raw_file(0, 1, str("k") + u32(7) + "\x02" + "xxxxxxxxxx"), {"'k'", "bool value 2"});
  expect_error(raw_file(0, 2, str("k") + u32(4) + u32(1) + str("k") + u32(4) + u32(1)), {"'k' appears twice"});
  expect_error(raw_file(0, 1, str("") + u32(4) + u32(1) + "xxxxxxxxxx"), {"metadata key 0", "must be 1 to 65535"});
  for (const std::uint32_t a : {0u, 3u, 48u})
    expect_error(raw_file(0, 1, str("general.alignment") + u32(4) + u32(a)),
                 {"'general.alignment' = " + std::to_string(a), "power of 2"});
  expect_error(raw_file(0, 1, str("general.alignment") + u32(10) + u64(32)), {"'general.alignment' is a u64"});
}

// One tensor "t" of `dims` and `type` at `offset`, after a 32-byte header
// pad, with `data` bytes of data.
std::string tensor_file(const std::vector<std::uint64_t>& ne, std::uint32_t type, std::uint64_t offset,
                        std::size_t data, const std::string& name = "t") {
  std::string infos = str(name) + u32(static_cast<std::uint32_t>(ne.size()));
  for (const std::uint64_t n : ne) infos += u64(n);
  infos += u32(type) + u64(offset);
  std::string f = raw_file(1, 0, infos);
  f.resize((f.size() + 31) / 32 * 32 + data, '\0');
  return f;
}

TEST_F(GgufFiles, BadTensorInfos) {
  expect_error(tensor_file({}, 0, 0, 64), {"tensor 't'", "0 dimensions"});
  expect_error(tensor_file({1, 1, 1, 1, 1}, 0, 0, 64), {"tensor 't'", "5 dimensions"});
  expect_error(tensor_file({4, 0}, 0, 0, 64), {"tensor 't'", "dimension 1 = 0"});
  expect_error(tensor_file({4}, 99, 0, 64), {"tensor 't'", "unknown ggml type 99"});
  expect_error(tensor_file({48}, 8, 0, 64), {"tensor 't'", "rows of 48 values", "q8_0's block of 32"});
  expect_error(tensor_file({48, 2}, 2, 0, 64), {"tensor 't'", "rows of 48 values", "q4_0's block of 32"});
  expect_error(tensor_file({64, 2}, 2, 0, 64), {"tensor 't'", "72 bytes at offset 0 go past the end"});
  expect_error(tensor_file({4}, 0, 8, 64), {"tensor 't'", "offset 8 is not a multiple of the alignment 32"});
  expect_error(tensor_file({32}, 0, 0, 64), {"tensor 't'", "128 bytes at offset 0 go past the end"});
  expect_error(tensor_file({4}, 0, std::uint64_t{1} << 63, 64), {"tensor 't'", "go past the end"});
  const std::uint64_t big = std::uint64_t{1} << 40;
  expect_error(tensor_file({big, big, big}, 0, 0, 64), {"tensor 't'", "more than 2^64 bytes"});
  expect_error(tensor_file({4}, 0, 0, 64, std::string(70000, 'n')), {"must be 1 to 65535"});
  GgufWriter w;
  w.add_tensor("a", {16}, 0, std::string(64, '\1'), 0);
  w.add_tensor("b", {16}, 0, std::string(64, '\2'), 32);
  expect_error(w.bytes(), {"tensors 'a' and 'b' overlap"});
  GgufWriter twice;
  twice.add_tensor("a", {16}, 0, std::string(64, '\1'));
  twice.add_tensor("a", {16}, 0, std::string(64, '\1'));
  expect_error(twice.bytes(), {"tensor 'a' appears twice"});
}

// Well-formed files whose model kvcache cannot run, or whose shapes are wrong.
TEST_F(GgufFiles, BadModels) {
  const ModelConfig c = llama_config(4, 2, false);
  const Decoder<float> d(c, kvcache::random_weights<float>(c, 3));
  const auto file_with = [&](auto&& change_metadata, auto&& change_tensors) {
    GgufWriter w;
    change_metadata(w);
    kvcache_test::add_llama_metadata(w, c);
    change_tensors(w);
    kvcache_test::add_llama_tensors(w, d, kvcache_test::kGgmlF32);
    return w.bytes();
  };
  const auto none = [](GgufWriter&) {};
  expect_error(file_with([](GgufWriter& w) { w.add_u32("llama.expert_count", 8); }, none), {"'llama.expert_count'"});
  expect_error(file_with([](GgufWriter& w) { w.add_u32("llama.rope.dimension_count", 4); }, none),
               {"'llama.rope.dimension_count' appears twice"});
  expect_error(file_with([](GgufWriter& w) { w.add_string("llama.rope.scaling.type", "yarn"); }, none),
               {"'llama.rope.scaling.type' = 'yarn'"});
  expect_error(file_with(none, [](GgufWriter& w) { w.add_tensor("rope_freqs.weight", {4}, 0, std::string(16, '\0')); }),
               {"tensor 'rope_freqs.weight' is not part of a llama model"});
  // A k-quant tensor: named with its type. A transposed one: its shape.
  GgufWriter k;
  ModelConfig wide = c;
  wide.d_model = 256;
  kvcache_test::add_llama_metadata(k, wide);
  k.add_tensor("token_embd.weight", {256, c.vocab_size}, 12, std::string(144 * c.vocab_size, '\0'));
  expect_error(k.bytes(), {"tensor 'token_embd.weight'", "ggml type q4_K", "not supported"});
  GgufWriter t;
  kvcache_test::add_llama_metadata(t, c);
  t.add_tensor("token_embd.weight", {c.vocab_size, c.d_model}, 0, std::string(4 * c.vocab_size * c.d_model, '\0'));
  expect_error(t.bytes(), {"'tokenizer.ggml.tokens' lists 37 tokens, token_embd.weight has 32"});
  GgufWriter a;
  a.add_string("general.architecture", "gpt2");
  expect_error(a.bytes(), {"'general.architecture' = 'gpt2'", "'llama' models only"});
  GgufWriter m;
  m.add_string("general.architecture", "llama");
  expect_error(m.bytes(), {"'llama.embedding_length' is missing"});
  // Shapes: a block's matrix stored transposed.
  std::string bytes = small_model();
  GgufWriter s;
  const ModelConfig sc = llama_config(4, 2, true);
  kvcache_test::add_llama_metadata(s, sc);
  Decoder<float> sd(sc, kvcache::random_weights<float>(sc, 3));
  s.add_tensor("blk.0.ffn_down.weight", {sc.d_model, sc.d_ff}, 0, std::string(4 * sc.d_model * sc.d_ff, '\0'));
  kvcache_test::add_llama_tensors(s, sd, kvcache_test::kGgmlF32);
  expect_error(s.bytes(), {"tensor 'blk.0.ffn_down.weight' appears twice"});
  // Limits: the context's cache, the parameters.
  kvcache::LoadLimits tight;
  tight.max_parameters = 1000;
  expect_error(bytes, {"LoadLimits::max_parameters"}, tight);
  kvcache::LoadLimits small_kv;
  small_kv.max_kv_cache_bytes = 1000;
  expect_error(bytes, {"LoadLimits::max_kv_cache_bytes"}, small_kv);
  // A NaN weight.
  const std::size_t at = data_offset_of(bytes) + 8;
  bytes.replace(at, 4, u32(0x7FC00000u));
  expect_error(bytes, {"tensor 'token_embd.weight' holds a non-finite value at element 2"});
}

TEST_F(GgufFiles, ShapeMismatch) {
  const ModelConfig c = llama_config(4, 2, true);
  const Decoder<float> d(c, kvcache::random_weights<float>(c, 3));
  GgufWriter w;
  kvcache_test::add_llama_metadata(w, c);
  w.add_u32("llama.feed_forward_length", 40);  // appears twice: refused first
  expect_error(w.bytes(), {"'llama.feed_forward_length' appears twice"});
  ModelConfig other = c;
  other.d_ff = 40;
  GgufWriter x;
  kvcache_test::add_llama_metadata(x, other);
  kvcache_test::add_llama_tensors(x, d, kvcache_test::kGgmlF32);
  expect_error(x.bytes(), {"tensor 'blk.0.ffn_gate.weight' has shape [32, 48], expected [32, 40]"});
}

TEST_F(GgufFiles, NotAFile) {
  fixtures::expect_throw_naming<std::runtime_error>([&] { (void)kvcache::load_gguf(path("absent.gguf")); }, "no such file");
  fixtures::expect_throw_naming<std::runtime_error>([&] { (void)kvcache::load_gguf(dir_.string()); }, "is a directory");
  EXPECT_FALSE(kvcache::is_gguf_file(path("absent.gguf")));
  EXPECT_TRUE(kvcache::is_gguf_file(write("m.gguf", small_model())));
}

}  // namespace
