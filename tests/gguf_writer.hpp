// tests/gguf_writer.hpp — a small GGUF v3 writer for the tests (as
// save_llama2c is for checkpoints): metadata of every value type, tensors of
// any ggml type from their bytes, the encoders of f32, bf16, f16, q8_0 and q4_0 as
// ggml's reference code writes them, and a whole `llama` model from a
// Decoder<float>.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include <kvcache/decoder.hpp>
#include <kvcache/detail/io.hpp>
#include <kvcache/gguf.hpp>
#include <kvcache/tokenizer.hpp>

namespace kvcache_test {

using kvcache::GgufType;

// ---- Encoders: float32 values to a tensor's bytes ----------------------------

inline std::string f32_bytes(const std::vector<float>& x) {
  std::string out(4 * x.size(), '\0');
  for (std::size_t i = 0; i < x.size(); ++i)
    kvcache::detail::io::put_le(x[i], reinterpret_cast<unsigned char*>(&out[4 * i]));
  return out;
}

inline void put_u16(std::string& out, std::uint16_t v) {
  out.push_back(static_cast<char>(v & 0xFF));
  out.push_back(static_cast<char>(v >> 8));
}

inline std::string bf16_bytes(const std::vector<float>& x) {
  std::string out;
  for (const float v : x) put_u16(out, kvcache::detail::float_to_bf16(v));
  return out;
}

// IEEE binary16, round to nearest even (ggml_compute_fp32_to_fp16).
inline std::uint16_t f32_to_f16(float f) {
  const std::uint32_t x = kvcache::detail::float_bits(f);
  const auto sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
  const std::uint32_t a = x & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return static_cast<std::uint16_t>(sign | 0x7E00u);  // NaN
  if (a >= 0x477FF000u) return static_cast<std::uint16_t>(sign | 0x7C00u);  // rounds past 65504: inf
  if (a < 0x38800000u) {  // below 2^-14: a subnormal half, in units of 2^-24 (exact scaling)
    const float units = kvcache::detail::bits_float(a) * 16777216.0f;
    return static_cast<std::uint16_t>(sign | static_cast<std::uint16_t>(std::nearbyint(units)));
  }
  std::uint32_t m = a - 0x38000000u;  // exponent rebiased from 127 to 15
  m += 0xFFFu + ((m >> 13) & 1u);     // round the 13 dropped bits to nearest even
  return static_cast<std::uint16_t>(sign | (m >> 13));
}

inline std::string f16_bytes(const std::vector<float>& x) {
  std::string out;
  for (const float v : x) put_u16(out, f32_to_f16(v));
  return out;
}

// ggml's quantize_row_q8_0_ref: per block of 32, d = max|x| / 127 (stored
// as f16), q = roundf(x · (1/d)) with the float32 d (0 when d = 0).
inline std::string q8_0_bytes(const std::vector<float>& x) {
  std::string out;
  for (std::size_t b = 0; b + 32 <= x.size(); b += 32) {
    float amax = 0.0f;
    for (std::size_t j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[b + j]));
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    put_u16(out, f32_to_f16(d));
    for (std::size_t j = 0; j < 32; ++j) {
      const float x0 = x[b + j] * id;  // ±inf or NaN when 1/d overflows: 0, as ggml on x86 and the peer's converter
      out.push_back(static_cast<char>(std::isfinite(x0) ? static_cast<std::int8_t>(std::roundf(x0)) : 0));
    }
  }
  return out;
}

// ggml's quantize_row_q4_0_ref: per block of 32, m = the value of largest
// magnitude (with its sign; the first of equals), d = m / -8 (stored as
// f16), q = min(15, (int8)(x · (1/d) + 8.5)) with the float32 d (1/d = 0
// when d = 0); byte j: q[j] | q[j + 16] << 4.
inline std::string q4_0_bytes(const std::vector<float>& x) {
  std::string out;
  for (std::size_t b = 0; b + 32 <= x.size(); b += 32) {
    float amax = 0.0f, max = 0.0f;
    for (std::size_t j = 0; j < 32; ++j)
      if (amax < std::fabs(x[b + j])) {
        amax = std::fabs(x[b + j]);
        max = x[b + j];
      }
    const float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    put_u16(out, f32_to_f16(d));
    int q[32];
    for (std::size_t j = 0; j < 32; ++j) {
      const float v = x[b + j] * id + 8.5f;  // finite for finite x: |x · id| <= 8
      q[j] = std::isfinite(v) ? std::min(15, static_cast<int>(static_cast<std::int8_t>(v))) : 8;
    }
    for (std::size_t j = 0; j < 16; ++j) out.push_back(static_cast<char>(q[j] | q[j + 16] << 4));
  }
  return out;
}

// ggml type ids.
constexpr std::uint32_t kGgmlF32 = 0, kGgmlF16 = 1, kGgmlQ4_0 = 2, kGgmlQ8_0 = 8, kGgmlBf16 = 30;

inline std::string encode(std::uint32_t ggml_type, const std::vector<float>& x) {
  switch (ggml_type) {
    case kGgmlF16: return f16_bytes(x);
    case kGgmlQ8_0: return q8_0_bytes(x);
    case kGgmlQ4_0: return q4_0_bytes(x);
    case kGgmlBf16: return bf16_bytes(x);
    default: return f32_bytes(x);
  }
}

// ---- The file ---------------------------------------------------------------

class GgufWriter {
 public:
  std::uint32_t version = 3;
  std::uint32_t alignment = 32;  // the padding used; write general.alignment yourself to change it

  // A scalar of a fixed-size type, from its value's bytes (little-endian).
  template <typename V>
  void add(const std::string& key, GgufType type, V value) {
    key_(key, type);
    raw(kv_, value);
  }
  void add_u32(const std::string& key, std::uint32_t v) { add(key, GgufType::u32, v); }
  void add_f32(const std::string& key, float v) { add(key, GgufType::f32, v); }
  void add_bool(const std::string& key, bool v) { add(key, GgufType::boolean, static_cast<std::uint8_t>(v)); }
  void add_string(const std::string& key, const std::string& v) {
    key_(key, GgufType::string);
    str(kv_, v);
  }
  // An array of fixed-size values, or of strings.
  template <typename V>
  void add_array(const std::string& key, GgufType element, const std::vector<V>& values) {
    key_(key, GgufType::array);
    raw(kv_, static_cast<std::uint32_t>(element));
    raw(kv_, static_cast<std::uint64_t>(values.size()));
    for (const V& v : values) raw(kv_, v);
  }
  void add_strings(const std::string& key, const std::vector<std::string>& values) {
    key_(key, GgufType::array);
    raw(kv_, static_cast<std::uint32_t>(GgufType::string));
    raw(kv_, static_cast<std::uint64_t>(values.size()));
    for (const std::string& v : values) str(kv_, v);
  }
  // Bytes appended to the metadata as they are (for malformed files), counted as `keys` keys.
  void add_raw_metadata(const std::string& bytes, std::uint64_t keys) {
    kv_ += bytes;
    n_kv_ += keys;
  }

  // A tensor: ne in GGUF order (row length first), its bytes. Placed after
  // the previous one at the next multiple of the alignment, unless `offset` is given.
  void add_tensor(const std::string& name, std::vector<std::uint64_t> ne, std::uint32_t type, std::string bytes,
                  std::uint64_t offset = UINT64_MAX) {
    if (offset == UINT64_MAX) offset = next_offset_;
    next_offset_ = std::max(next_offset_, pad(offset + bytes.size()));
    tensors_.push_back({name, std::move(ne), type, offset, std::move(bytes)});
  }

  std::string bytes() const {
    std::string out = "GGUF";
    raw(out, version);
    raw(out, static_cast<std::uint64_t>(tensors_.size()));
    raw(out, n_kv_);
    out += kv_;
    for (const Tensor& t : tensors_) {
      str(out, t.name);
      raw(out, static_cast<std::uint32_t>(t.ne.size()));
      for (const std::uint64_t n : t.ne) raw(out, n);
      raw(out, t.type);
      raw(out, t.offset);
    }
    out.resize(pad(out.size()), '\0');
    const std::size_t data = out.size();
    for (const Tensor& t : tensors_) {
      if (out.size() < data + t.offset + t.bytes.size()) out.resize(data + t.offset + t.bytes.size(), '\0');
      std::memcpy(&out[data + t.offset], t.bytes.data(), t.bytes.size());
    }
    out.resize(pad(out.size() - data) + data, '\0');
    return out;
  }

  void write(const std::string& path) const {
    const std::string b = bytes();
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(b.data(), static_cast<std::streamsize>(b.size()));
  }

 private:
  struct Tensor {
    std::string name;
    std::vector<std::uint64_t> ne;
    std::uint32_t type;
    std::uint64_t offset;
    std::string bytes;
  };

  template <typename V>
  static void raw(std::string& out, V v) {
    char b[sizeof(V)];
    std::memcpy(b, &v, sizeof(V));
    out.append(b, sizeof(V));
  }
  static void str(std::string& out, const std::string& s) {
    raw(out, static_cast<std::uint64_t>(s.size()));
    out += s;
  }
  void key_(const std::string& key, GgufType type) {
    str(kv_, key);
    raw(kv_, static_cast<std::uint32_t>(type));
    ++n_kv_;
  }
  std::uint64_t pad(std::uint64_t n) const { return (n + alignment - 1) / alignment * alignment; }

  std::string kv_;
  std::uint64_t n_kv_ = 0;
  std::vector<Tensor> tensors_;
  std::uint64_t next_offset_ = 0;
};

// ---- A llama model ------------------------------------------------------------

inline std::vector<float> values_of(const kvcache::WeightMatrix<float>& W) {
  const auto dense = W.to_dense();
  return std::vector<float>(dense.data(), dense.data() + dense.size());
}
inline std::vector<float> values_of(const kvcache::Vector<float>& v) { return std::vector<float>(v.data(), v.data() + v.size()); }

// The vocabulary llama2c_to_gguf.py writes for a llama2.c tokenizer: id 0
// unknown, 1 and 2 control (their pieces without llama2.c's newlines),
// "<0xAB>" pieces bytes, the others normal with each space as U+2581.
inline kvcache::SentencePieceVocab llama2c_vocab(const kvcache::Tokenizer& t) {
  kvcache::SentencePieceVocab v;
  for (int id = 0; id < static_cast<int>(t.vocab_size()); ++id) {
    std::string piece = t.piece(id);
    std::int32_t type = 1;
    if (id == 0) {
      type = 2;
    } else if (id <= 2) {
      type = 3;
      piece.erase(0, piece.find_first_not_of(" \t\n\r"));
      piece.erase(piece.find_last_not_of(" \t\n\r") + 1);
    } else if (piece.size() == 6 && piece.compare(0, 3, "<0x") == 0 && piece.back() == '>') {
      type = 6;
    } else {
      for (std::size_t at; (at = piece.find(' ')) != std::string::npos;) piece.replace(at, 1, "\xE2\x96\x81");
    }
    v.pieces.push_back(piece);
    v.scores.push_back(t.score(id));
    v.types.push_back(type);
  }
  return v;
}

// The metadata of a llama model with config c and vocabulary v.
inline void add_llama_metadata(GgufWriter& w, const kvcache::ModelConfig& c, const kvcache::SentencePieceVocab& v) {
  w.add_string("general.architecture", "llama");
  w.add_string("general.name", "test");
  w.add_u32("llama.context_length", static_cast<std::uint32_t>(c.max_seq_len));
  w.add_u32("llama.embedding_length", static_cast<std::uint32_t>(c.d_model));
  w.add_u32("llama.feed_forward_length", static_cast<std::uint32_t>(c.d_ff));
  w.add_u32("llama.block_count", static_cast<std::uint32_t>(c.n_layers));
  w.add_u32("llama.attention.head_count", static_cast<std::uint32_t>(c.n_heads));
  w.add_u32("llama.attention.head_count_kv", static_cast<std::uint32_t>(c.kv_heads()));
  w.add_f32("llama.attention.layer_norm_rms_epsilon", static_cast<float>(c.norm_eps));
  w.add_u32("llama.rope.dimension_count", static_cast<std::uint32_t>(c.d_k()));
  w.add_f32("llama.rope.freq_base", static_cast<float>(c.rope_base));
  w.add_string("tokenizer.ggml.model", "llama");
  w.add_strings("tokenizer.ggml.tokens", v.pieces);
  w.add_array("tokenizer.ggml.scores", GgufType::f32, v.scores);
  w.add_array("tokenizer.ggml.token_type", GgufType::i32, v.types);
  w.add_u32("tokenizer.ggml.bos_token_id", static_cast<std::uint32_t>(v.bos_id));
  w.add_u32("tokenizer.ggml.eos_token_id", static_cast<std::uint32_t>(v.eos_id));
  w.add_bool("tokenizer.ggml.add_bos_token", v.add_bos);
}

// The same with a vocabulary of `pieces` (placeholders "<tN>" when empty),
// scores 0, all normal, BOS 1, EOS 2.
inline void add_llama_metadata(GgufWriter& w, const kvcache::ModelConfig& c, std::vector<std::string> pieces = {}) {
  if (pieces.empty())
    for (std::size_t i = 0; i < c.vocab_size; ++i) pieces.push_back("<t" + std::to_string(i) + ">");
  kvcache::SentencePieceVocab v;
  v.scores.assign(pieces.size(), 0.0f);
  v.types.assign(pieces.size(), 1);
  v.pieces = std::move(pieces);
  add_llama_metadata(w, c, v);
}

// The tensors of `d` in llama.cpp's names, in the converter's order: 2-D
// matrices as `matrix_type`, norms as f32. A q8_0 (q4_0) matrix whose rows are not
// whole blocks of 32 is written as f16, as llama2c_to_gguf.py and llama.cpp's
// convert_hf_to_gguf.py fall back.
inline void add_llama_tensors(GgufWriter& w, const kvcache::Decoder<float>& d, std::uint32_t matrix_type) {
  const kvcache::ModelConfig& c = d.config();
  const auto matrix = [&](const std::string& name, const kvcache::WeightMatrix<float>& W) {
    const bool blocks = matrix_type == kGgmlQ8_0 || matrix_type == kGgmlQ4_0;
    const std::uint32_t type = blocks && W.cols() % 32 != 0 ? kGgmlF16 : matrix_type;
    w.add_tensor(name, {static_cast<std::uint64_t>(W.cols()), static_cast<std::uint64_t>(W.rows())}, type,
                 encode(type, values_of(W)));
  };
  const auto norm = [&](const std::string& name, const kvcache::Vector<float>& v) {
    w.add_tensor(name, {static_cast<std::uint64_t>(v.size())}, kGgmlF32, f32_bytes(values_of(v)));
  };
  matrix("token_embd.weight", d.token_embedding());
  for (std::size_t l = 0; l < c.n_layers; ++l) {
    const auto& b = d.block(l);
    const std::string at = "blk." + std::to_string(l) + ".";
    norm(at + "attn_norm.weight", b.attention_norm.gamma);
    matrix(at + "attn_q.weight", b.attention.W_Q);
    matrix(at + "attn_k.weight", b.attention.W_K);
    matrix(at + "attn_v.weight", b.attention.W_V);
    matrix(at + "attn_output.weight", b.attention.W_O);
    norm(at + "ffn_norm.weight", b.mlp_norm.gamma);
    matrix(at + "ffn_gate.weight", b.mlp.W_1);
    matrix(at + "ffn_down.weight", b.mlp.W_2);
    matrix(at + "ffn_up.weight", b.mlp.W_3);
  }
  norm("output_norm.weight", d.final_norm().gamma);
  if (!c.tied_lm_head) matrix("output.weight", d.lm_head());
}

// A whole GGUF file of decoder `d` (a llama model: RoPE, RMSNorm, SwiGLU)
// with vocabulary v.
inline std::string llama_gguf(const kvcache::Decoder<float>& d, std::uint32_t matrix_type,
                              const kvcache::SentencePieceVocab& v) {
  GgufWriter w;
  add_llama_metadata(w, d.config(), v);
  add_llama_tensors(w, d, matrix_type);
  return w.bytes();
}

// The same with the vocabulary of `pieces` (see add_llama_metadata).
inline std::string llama_gguf(const kvcache::Decoder<float>& d, std::uint32_t matrix_type = kGgmlF32,
                              const std::vector<std::string>& pieces = {}) {
  GgufWriter w;
  add_llama_metadata(w, d.config(), pieces);
  add_llama_tensors(w, d, matrix_type);
  return w.bytes();
}

}  // namespace kvcache_test
