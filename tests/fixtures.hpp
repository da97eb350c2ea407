// tests/fixtures.hpp — small models of every kind the tests run through.
#pragma once

#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <kvcache/config.hpp>
#include <kvcache/decoder.hpp>

namespace fixtures {

// The attention variants × the two model families the library supports.
struct Variant {
  std::string name;
  std::size_t n_heads, n_kv_heads;
  kvcache::PositionEncoding positions;
};

inline std::vector<Variant> variants() {
  using kvcache::PositionEncoding;
  return {
      {"MHA_learned", 4, 4, PositionEncoding::learned}, {"GQA_learned", 4, 2, PositionEncoding::learned},
      {"MQA_learned", 4, 1, PositionEncoding::learned}, {"MHA_rope", 4, 4, PositionEncoding::rope},
      {"GQA_rope", 4, 2, PositionEncoding::rope},       {"MQA_rope", 4, 1, PositionEncoding::rope},
  };
}

// GPT-style (learned positions, LayerNorm, GELU) or Llama-style (RoPE,
// RMSNorm, SwiGLU), following the position encoding of the variant.
inline kvcache::ModelConfig model(const Variant& v, std::size_t max_seq_len = 48) {
  kvcache::ModelConfig c;
  c.vocab_size = 37;
  c.d_model = 32;
  c.n_layers = 2;
  c.n_heads = v.n_heads;
  c.n_kv_heads = v.n_kv_heads;
  c.d_ff = 48;
  c.max_seq_len = max_seq_len;
  c.positions = v.positions;
  const bool llama = v.positions == kvcache::PositionEncoding::rope;
  c.norm = llama ? kvcache::NormKind::rms_norm : kvcache::NormKind::layer_norm;
  c.mlp = llama ? kvcache::MlpKind::swiglu : kvcache::MlpKind::gelu;
  c.tied_lm_head = !llama;
  return c;
}

// A decoder of that shape with seeded random weights.
template <typename T>
kvcache::Decoder<T> make_decoder(const kvcache::ModelConfig& c, std::uint64_t seed = 42) {
  return kvcache::Decoder<T>(c, kvcache::random_weights<T>(c, seed));
}

inline std::vector<int> random_tokens(std::size_t n, std::size_t vocab, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> pick(0, static_cast<int>(vocab) - 1);
  std::vector<int> t(n);
  for (int& x : t) x = pick(rng);
  return t;
}

// Expects `call` to throw E with a message containing `part`.
template <typename E, typename F>
void expect_throw_naming(F&& call, const std::string& part) {
  try {
    call();
    ADD_FAILURE() << "no exception; expected one naming '" << part << "'";
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
  }
}

// The ways a session can store its tokens: every KV type, without a window
// and with `window` (which the tests then fill past wrapping).
struct Storage {
  kvcache::KVType type;
  kvcache::SlidingWindow window;
  std::string name() const {
    return std::string(kvcache::to_string(type)) + (window.window != 0 ? "_window" : "");
  }
  kvcache::SessionOptions options() const {
    kvcache::SessionOptions o;
    o.kv_type = type;
    o.window = window;
    return o;
  }
};

inline std::vector<Storage> storages(kvcache::SlidingWindow window) {
  std::vector<Storage> all;
  for (kvcache::KVType t : {kvcache::KVType::f32, kvcache::KVType::bf16, kvcache::KVType::int8}) {
    all.push_back({t, {}});
    all.push_back({t, window});
  }
  return all;
}

}  // namespace fixtures
