// kvcache/config.hpp — what a model is: sizes, position encoding, norm and
// MLP kinds, and the validation that rejects an impossible configuration
// before anything is allocated.
#pragma once

#include <cstddef>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "detail/io.hpp"

namespace kvcache {

// Activations are row-major, a row per token, so that one token's vector is
// contiguous.
template <typename T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
// Weights are WeightMatrix<T> (weights.hpp): [out, in], row by row.
template <typename T>
using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;
template <typename T>
using RowVector = Eigen::Matrix<T, 1, Eigen::Dynamic>;

// How a token learns where it is.
enum class PositionEncoding {
  none,     // no positional signal (a bag of tokens; useful in tests)
  learned,  // absolute position embeddings added to the token embedding
  rope,     // rotary embeddings applied to Q and K inside attention
};

enum class NormKind { layer_norm, rms_norm };
enum class MlpKind {
  gelu,    // W_2 · gelu(W_1 x)           (GPT-2)
  swiglu,  // W_2 · (silu(W_1 x) ⊙ W_3 x)  (Llama)
};

// The order of the floating-point operations between the matrix products
// (norms, RoPE, attention's scores, softmax and sums, SwiGLU), which decides
// the last bits of every value. kvcache: its own (for RMSNorm and RoPE,
// llama2.c's, so a llama2.c checkpoint gives llama2.c's bits). ggml: as
// llama.cpp's CPU backend computes them (detail/ggml_math.hpp; float models
// only): what load_gguf sets, so that a GGUF file's greedy ids are
// llama.cpp's. Both are the same math; ggml's is slower in attention.
enum class Numerics { kvcache, ggml };

inline const char* to_string(PositionEncoding p) {
  const char* const names[] = {"none", "learned", "rope"};  // in the enum's order
  const auto i = static_cast<std::size_t>(p);
  return i < std::size(names) ? names[i] : "?";
}

namespace detail {

// std::invalid_argument "kvcache: invalid config: <what>", put together as
// io::text does.
template <typename... Parts>
[[noreturn]] void fail_config(const Parts&... what) {
  io::invalid("invalid config: ", what...);
}

// Fails on the first field that is 0.
inline void require_positive(std::initializer_list<std::pair<const char*, std::size_t>> fields) {
  for (const auto& [field, value] : fields)
    if (value == 0) fail_config(field, " = 0, must be > 0");
}

// Throws std::invalid_argument ("<where>: <name>[i] is null", "<where>:
// <name>[i] and <name>[j] are the same <what>") unless items[b] is non-null
// and distinct from every item before it: a batch's sessions or caches.
template <typename P>
void check_distinct(const std::vector<P*>& items, std::size_t b, const char* where, const char* name,
                    const char* what) {
  if (items[b] == nullptr) throw std::invalid_argument(io::text(where, ": ", name, "[", b, "] is null"));
  for (std::size_t c = 0; c < b; ++c)
    if (items[c] == items[b])
      throw std::invalid_argument(io::text(where, ": ", name, "[", c, "] and ", name, "[", b, "] are the same ", what));
}

}  // namespace detail

// One attention layer's shape. d_k = d_model / n_heads; n_heads query heads
// share n_kv_heads key/value heads (n_kv_heads == n_heads: multi-head;
// 1 < n_kv_heads < n_heads: grouped-query; n_kv_heads == 1: multi-query).
struct AttentionConfig {
  std::size_t d_model = 0;
  std::size_t n_heads = 0;
  std::size_t n_kv_heads = 0;
  PositionEncoding positions = PositionEncoding::none;  // only rope matters here
  double rope_base = 10000.0;
  std::size_t max_seq_len = 0;  // positions are in [0, max_seq_len)
  Numerics numerics = Numerics::kvcache;

  std::size_t d_k() const { return d_model / n_heads; }
  std::size_t kv_dim() const { return n_kv_heads * d_k(); }
  std::size_t group_size() const { return n_heads / n_kv_heads; }

  void validate() const {
    detail::require_positive(
        {{"d_model", d_model}, {"n_heads", n_heads}, {"n_kv_heads", n_kv_heads}, {"max_seq_len", max_seq_len}});
    if (d_model % n_heads != 0)
      detail::fail_config("d_model % n_heads != 0 (d_model = ", d_model, ", n_heads = ", n_heads, ")");
    if (n_heads % n_kv_heads != 0)
      detail::fail_config("n_heads % n_kv_heads != 0 (n_heads = ", n_heads, ", n_kv_heads = ", n_kv_heads, ")");
    const bool rope = positions == PositionEncoding::rope;
    if (rope && d_k() % 2 != 0) detail::fail_config("rope needs an even d_k, got d_k = ", d_k());
    if (rope && !(rope_base > 1.0)) detail::fail_config("rope_base = ", rope_base, ", must be > 1");
  }
};

// A decoder-only transformer: embedding, n_layers pre-norm blocks, final
// norm, LM head.
struct ModelConfig {
  std::size_t vocab_size = 0;
  std::size_t d_model = 0;
  std::size_t n_layers = 0;
  std::size_t n_heads = 0;
  std::size_t n_kv_heads = 0;  // 0 means n_heads (plain multi-head attention)
  std::size_t d_ff = 0;        // hidden width of the MLP
  std::size_t max_seq_len = 0;
  PositionEncoding positions = PositionEncoding::learned;
  double rope_base = 10000.0;
  NormKind norm = NormKind::layer_norm;
  double norm_eps = 1e-5;
  MlpKind mlp = MlpKind::gelu;
  bool tied_lm_head = true;  // logits = E · x with the token embedding E
  Numerics numerics = Numerics::kvcache;

  std::size_t kv_heads() const { return n_kv_heads == 0 ? n_heads : n_kv_heads; }
  std::size_t d_k() const { return d_model / n_heads; }
  std::size_t kv_dim() const { return kv_heads() * d_k(); }

  AttentionConfig attention() const {
    return {d_model, n_heads, kv_heads(), positions, rope_base, max_seq_len, numerics};
  }

  void validate() const {
    // d_model, n_heads and max_seq_len: by attention().validate().
    detail::require_positive({{"vocab_size", vocab_size}, {"n_layers", n_layers}, {"d_ff", d_ff}});
    attention().validate();
    if (!(norm_eps > 0.0)) detail::fail_config("norm_eps = ", norm_eps, ", must be > 0");
  }

  // Bytes of K and V that one token adds across all layers:
  // 2 × n_layers × n_kv_heads × d_k × sizeof(T).
  template <typename T>
  std::size_t kv_bytes_per_token() const {
    return 2 * n_layers * kv_dim() * sizeof(T);
  }
};

}  // namespace kvcache
