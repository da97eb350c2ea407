// kvcache/decoder.hpp — Decoder: a decoder-only transformer's configuration
// and immutable weights, the sessions it makes, and the entry points of the
// forward pass (forward.hpp).
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "detail/io.hpp"
#include "forward.hpp"

namespace kvcache {

// The buffers of Decoder::forward_batch: its older name.
template <typename T = float>
using BatchScratch = Workspace<T>;

// Immutable once built, so one Decoder serves any number of sessions on any
// number of threads at once.
template <typename T = float>
class Decoder {
 public:
  using Scalar = T;

  // Validates every size and shape, and throws std::invalid_argument naming
  // the field and the values on the first that is wrong. Every weight matrix
  // (embeddings, W_Q, W_K, W_V, W_O, W_1, W_2, W_3, LM head) is then stored as
  // `weight_type`, converted one at a time (f32 → bf16: round to nearest even,
  // the T values freed); norms, biases and learned positions stay T. A matrix
  // over external memory (WeightMatrix::external(): a mapped GGUF file) is
  // kept where and as it is stored, whatever `weight_type` says.
  Decoder(ModelConfig config, DecoderWeights<T> weights, WeightType weight_type = WeightType::f32) {
    check_weights(config, weights);
    store(weights, weight_type);
    m_.config = config;
    m_.w = std::move(weights);
    if (config.positions == PositionEncoding::rope) m_.rope.emplace(config.d_k(), config.rope_base, config.numerics);
  }

  const ModelConfig& config() const { return m_.config; }
  // How the weight matrices are stored (all alike).
  WeightType weight_type() const { return m_.w.token_embedding.type(); }
  const BlockWeights<T>& block(std::size_t l) const { return m_.w.blocks.at(l); }
  const WeightMatrix<T>& token_embedding() const { return m_.w.token_embedding; }
  const Matrix<T>& position_embedding() const { return m_.w.position_embedding; }
  const NormWeights<T>& final_norm() const { return m_.w.final_norm; }
  const WeightMatrix<T>& lm_head() const { return m_.head(); }

  // Bytes of all parameters, as stored (a bfloat16 weight takes 2).
  std::size_t weight_bytes() const {
    std::size_t n = bytes(m_.w.position_embedding) + bytes(m_.w.final_norm);
    for (const WeightMatrix<T>* W : matrices(m_.w)) n += W->bytes();
    for (const auto& b : m_.w.blocks) {
      const auto& a = b.attention;
      n += bytes(b.attention_norm) + bytes(b.mlp_norm) + bytes(a.b_Q) + bytes(a.b_K) + bytes(a.b_V) + bytes(a.b_O) +
           bytes(b.mlp.b_1) + bytes(b.mlp.b_2);
    }
    return n;
  }

  // A new, empty session. max_tokens = 0 means the model's max_seq_len;
  // reserve_tokens preallocates the caches (0: they grow as needed).
  Session<T> new_session(std::size_t max_tokens = 0, std::size_t reserve_tokens = 0) const {
    return new_session(SessionOptions{max_tokens, reserve_tokens, KVType::f32, {}});
  }

  // A new, empty session storing keys and values as options.kv_type, with an
  // optional sliding window. Throws std::invalid_argument on a limit past
  // max_seq_len, a window longer than max_seq_len or with sinks >= window,
  // or a window on a model with learned positions (whose positions cannot
  // go past max_seq_len).
  //
  // With a pool (made by make_pool, storing options.kv_type) the session is
  // paged: its keys and values live in the pool's blocks, which the sessions
  // of the pool share (forks, common prompts) under the pool's budget, and
  // reserve_tokens is ignored. Without one (null) each layer keeps
  // contiguous rows of its own.
  Session<T> new_session(const SessionOptions& options, std::shared_ptr<KVPool> pool = nullptr) const {
    const ModelConfig& c = m_.config;
    const std::size_t W = options.window.window;
    if (W > c.max_seq_len)
      detail::io::invalid("new_session: sliding window of ", W, " tokens is longer than max_seq_len = ", c.max_seq_len);
    if (W != 0 && c.positions == PositionEncoding::learned)
      detail::io::invalid("new_session: a sliding window needs RoPE or no position encoding; learned positions stop "
                          "at max_seq_len");
    const std::size_t max_tokens = options.max_tokens == 0 ? c.max_seq_len : options.max_tokens;
    if (max_tokens > c.max_seq_len)
      detail::io::invalid("new_session: max_tokens = ", max_tokens, " exceeds max_seq_len = ", c.max_seq_len);
    const SlotTable table(W != 0 ? 0 : max_tokens, options.window);  // the window is the limit
    std::vector<KVRows<T>> layers;
    layers.reserve(c.n_layers);
    std::unique_ptr<detail::BlockTable> blocks;
    if (pool) {
      check_pool(*pool, options.kv_type);
      blocks = std::make_unique<detail::BlockTable>(std::move(pool));
    }
    const std::size_t reserve = std::min(options.reserve_tokens, table.max_tokens());
    for (std::size_t l = 0; l < c.n_layers; ++l) {
      if (blocks)
        layers.emplace_back(c.kv_heads(), c.d_k(), options.kv_type, blocks.get(), l);
      else
        layers.emplace_back(c.kv_heads(), c.d_k(), options.kv_type);
      if (reserve != 0) layers.back().reallocate(reserve, 0);
    }
    return Session<T>(m_.tag, table, std::move(layers), std::move(blocks));
  }

  // A pool of paged key/value blocks for this decoder's sessions (pass it to
  // new_session, with the same kv_type): blocks of
  // options.block_tokens tokens in every layer, stored as `kv_type`, under
  // options.budget_bytes (0: no limit), with prefix sharing unless
  // options.prefix_sharing is false. Throws std::invalid_argument on a bad
  // kv_type, block_tokens = 0 or a budget under one block.
  std::shared_ptr<KVPool> make_pool(KVType kv_type = KVType::f32, const KVPoolOptions& options = {}) const {
    const ModelConfig& c = m_.config;
    KVRows<T>(c.kv_heads(), c.d_k(), kv_type);  // checks the type
    return std::make_shared<KVPool>(m_.tag.get(), c.n_layers, c.kv_heads(), c.d_k(), kv_type,
                                    row_bytes<T>(kv_type, c.d_k()), options);
  }

  // Feeds tokens at positions [session.position(), session.position() + m) and
  // returns their logits (m × vocab_size, or 1 × vocab_size for the last
  // position only), computed in `workspace`, where the reference points until
  // its next use. The session's threads() are used.
  //
  // Throws std::invalid_argument (no tokens, a session of another decoder or
  // moved from), std::out_of_range (a token id outside [0, vocab_size)) or
  // std::length_error (past max_seq_len or the session's limit); on any
  // exception the session is as it was before the call, with one exception:
  // running out of memory inside a large product after a full sliding window
  // has overwritten tokens clears the session (Session::roll_back).
  const Matrix<T>& forward(const std::vector<int>& tokens, Session<T>& session, Workspace<T>& workspace,
                           Logits which = Logits::all) const {
    return detail::Forward<T>(m_, workspace).run(tokens, session, which, session.threads());
  }

  // The same in a workspace the session keeps for this call (made on first
  // use): the reference stays valid until the session's next forward.
  const Matrix<T>& forward(const std::vector<int>& tokens, Session<T>& session, Logits which = Logits::all) const {
    if (!session.workspace_) session.workspace_ = std::make_unique<Workspace<T>>();
    return forward(tokens, session, *session.workspace_, which);
  }

  // Several sessions stepped together: sequence b feeds tokens[b] (at least
  // one) to *sessions[b], at that session's own positions. The rows of all
  // sequences are stacked into one (Σ m_b × d_model) matrix, so each weight
  // (W_Q, W_K, W_V, W_O, the MLP, the LM head) is read once per step for the
  // whole batch; positions, the cache and attention are per session. The
  // sessions must be distinct and made by this decoder; their kv types and
  // windows may differ.
  //
  // Returns logits: with Logits::last one row per sequence (B × vocab_size,
  // row b for the last token of sequence b), with Logits::all the rows of
  // all tokens stacked in the same order. The reference points into
  // `workspace` and stays valid until its next use. Products and attention
  // use `threads` (the sessions' own thread counts are not consulted).
  //
  // Each sequence's logits are those forward() gives it alone, up to the
  // rounding of a matrix-matrix product against a matrix-vector one. Throws
  // as forward() does, naming the sequence, and on no sequences, a different
  // number of token lists and sessions, a null or repeated session, or
  // threads = 0; on any exception every session is as it was (but for the
  // sliding-window case of forward(): that session is cleared).
  const Matrix<T>& forward_batch(const std::vector<std::vector<int>>& tokens, const std::vector<Session<T>*>& sessions,
                                 Workspace<T>& workspace, Logits which = Logits::last, std::size_t threads = 1) const {
    return detail::Forward<T>(m_, workspace).run(tokens, sessions, which, threads);
  }

  // Throws what forward(tokens, session) would throw for its inputs (with
  // `at` appended to the message), without running it.
  void check_input(const std::vector<int>& tokens, const Session<T>& session, const std::string& at = "") const {
    detail::Forward<T>::check_input(m_, tokens, session, [&] { return at; });
  }

 private:
  // Converts every weight matrix to `type` in turn; those then under 2 MB
  // move side by side into one arena, so that together they fill huge pages
  // (bigger ones have huge pages of their own: see WeightArena).
  // A matrix over external memory (a mapped GGUF file) stays where and as it is.
  static void store(DecoderWeights<T>& weights, WeightType type) {
    // Bytes W takes once converted, counted by 32-value blocks (q8_0's); 0
    // for a matrix over external memory, which stays where it is.
    const std::size_t block_bytes = row_bytes<T>(type, 32);
    const auto stored = [&](const WeightMatrix<T>& W) {
      return W.external() ? 0 : static_cast<std::size_t>(W.size()) * block_bytes / 32;
    };
    const auto in_arena = [&](const WeightMatrix<T>& W) { return stored(W) != 0 && stored(W) < detail::kHugePage; };
    std::size_t arena_bytes = 0;
    for (WeightMatrix<T>* W : matrices(weights))
      if (in_arena(*W)) arena_bytes += detail::WeightArena::slice_bytes(stored(*W));
    detail::WeightArena arena(arena_bytes);
    for (WeightMatrix<T>* W : matrices(weights)) {
      if (W->external()) continue;
      W->convert_to(type);
      if (in_arena(*W)) W->move_into(arena);
    }
  }

  // Every weight matrix of `w` (a DecoderWeights<T>, const or not), in the
  // order they are stored.
  template <typename Weights>
  static auto matrices(Weights& w) {
    std::vector<decltype(&w.lm_head)> all;
    for (auto& b : w.blocks)
      all.insert(all.end(), {&b.attention.W_Q, &b.attention.W_K, &b.attention.W_V, &b.attention.W_O, &b.mlp.W_1,
                             &b.mlp.W_2, &b.mlp.W_3});
    all.insert(all.end(), {&w.token_embedding, &w.lm_head});
    return all;
  }

  template <typename Derived>
  static std::size_t bytes(const Eigen::EigenBase<Derived>& m) {
    return static_cast<std::size_t>(m.size()) * sizeof(typename Derived::Scalar);
  }
  static std::size_t bytes(const NormWeights<T>& n) { return bytes(n.gamma) + bytes(n.beta); }

  // Throws std::invalid_argument unless sessions storing kv_type may use pool.
  void check_pool(const KVPool& pool, KVType kv_type) const {
    const ModelConfig& c = m_.config;
    if (pool.model() != m_.tag.get())
      detail::io::invalid("new_session: the KV pool was made by another decoder (Decoder::make_pool)");
    if (pool.type() != kv_type)
      detail::io::invalid("new_session: kv_type ", to_string(kv_type), " but the KV pool stores ", to_string(pool.type()));
    if (pool.n_layers() != c.n_layers || pool.n_kv_heads() != c.kv_heads() || pool.d_k() != c.d_k())
      detail::io::invalid("new_session: the KV pool's blocks are shaped for another model");
  }

  detail::Model<T> m_;
};

}  // namespace kvcache
