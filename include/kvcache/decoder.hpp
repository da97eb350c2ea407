// kvcache/decoder.hpp — Decoder: a decoder-only transformer with immutable
// weights, and Session: the per-request state (one KVCache per layer).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "attention.hpp"
#include "config.hpp"
#include "detail/parallel.hpp"
#include "detail/resize.hpp"
#include "kv_cache.hpp"
#include "weight_matrix.hpp"

namespace kvcache {

// ============================================================================
// Weights
// ============================================================================

// gamma (and for LayerNorm an optional beta), d_model entries each.
template <typename T = float>
struct NormWeights {
  Vector<T> gamma;
  Vector<T> beta;  // empty: no shift (always empty for RMSNorm)
};

// GELU:   out = W_2 · gelu(W_1 x + b_1) + b_2
// SwiGLU: out = W_2 · (silu(W_1 x) ⊙ W_3 x)
// W_1, W_3: d_ff × d_model; W_2: d_model × d_ff. Empty biases are none.
template <typename T = float>
struct MlpWeights {
  WeightMatrix<T> W_1, W_2, W_3;
  Vector<T> b_1, b_2;
};

// One pre-norm block: x += attention(norm(x)); x += mlp(norm(x)).
template <typename T = float>
struct BlockWeights {
  NormWeights<T> attention_norm;
  AttentionWeights<T> attention;
  NormWeights<T> mlp_norm;
  MlpWeights<T> mlp;
};

template <typename T = float>
struct DecoderWeights {
  WeightMatrix<T> token_embedding;  // vocab_size × d_model (also the LM head when tied)
  Matrix<T> position_embedding;     // max_seq_len × d_model (learned positions only)
  std::vector<BlockWeights<T>> blocks;
  NormWeights<T> final_norm;
  WeightMatrix<T> lm_head;  // vocab_size × d_model; empty when tied to token_embedding
};

namespace detail {

// SplitMix64: a tiny, portable generator, so that "seed 42" means the same
// weights on every platform and standard library.
class SplitMix64 {
 public:
  explicit SplitMix64(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform in [-1, 1).
  double symmetric() { return static_cast<double>(next() >> 11) * 0x1.0p-52 - 1.0; }

 private:
  std::uint64_t state_;
};

template <typename T>
Matrix<T> random_matrix(SplitMix64& rng, std::size_t rows, std::size_t cols, double stddev) {
  // A uniform in [-a, a] has standard deviation a / √3.
  const double a = stddev * std::sqrt(3.0);
  Matrix<T> M(static_cast<Eigen::Index>(rows), static_cast<Eigen::Index>(cols));
  for (Eigen::Index i = 0; i < M.size(); ++i) M.data()[i] = static_cast<T>(a * rng.symmetric());
  return M;
}

}  // namespace detail

// Seeded random weights of the configured shape: linear layers with standard
// deviation 1/√fan_in (activations keep their scale through the depth),
// embeddings with 1 (so logits are decisive and greedy picks are stable),
// norms at identity. For demos, tests and benchmarks.
template <typename T = float>
DecoderWeights<T> random_weights(const ModelConfig& c, std::uint64_t seed) {
  c.validate();
  detail::SplitMix64 rng(seed);
  const std::size_t d = c.d_model, kv = c.kv_dim();
  const double s_d = 1.0 / std::sqrt(static_cast<double>(d));
  const double s_ff = 1.0 / std::sqrt(static_cast<double>(c.d_ff));
  auto norm = [&] {
    NormWeights<T> n;
    n.gamma = Vector<T>::Ones(static_cast<Eigen::Index>(d));
    if (c.norm == NormKind::layer_norm) n.beta = Vector<T>::Zero(static_cast<Eigen::Index>(d));
    return n;
  };
  DecoderWeights<T> w;
  w.token_embedding = detail::random_matrix<T>(rng, c.vocab_size, d, 1.0);
  if (c.positions == PositionEncoding::learned)
    w.position_embedding = detail::random_matrix<T>(rng, c.max_seq_len, d, 1.0);
  for (std::size_t l = 0; l < c.n_layers; ++l) {
    BlockWeights<T> b;
    b.attention_norm = norm();
    b.attention.W_Q = detail::random_matrix<T>(rng, d, d, s_d);
    b.attention.W_K = detail::random_matrix<T>(rng, kv, d, s_d);
    b.attention.W_V = detail::random_matrix<T>(rng, kv, d, s_d);
    b.attention.W_O = detail::random_matrix<T>(rng, d, d, s_d);
    b.mlp_norm = norm();
    b.mlp.W_1 = detail::random_matrix<T>(rng, c.d_ff, d, s_d);
    b.mlp.W_2 = detail::random_matrix<T>(rng, d, c.d_ff, s_ff);
    if (c.mlp == MlpKind::swiglu) b.mlp.W_3 = detail::random_matrix<T>(rng, c.d_ff, d, s_d);
    w.blocks.push_back(std::move(b));
  }
  w.final_norm = norm();
  if (!c.tied_lm_head) w.lm_head = detail::random_matrix<T>(rng, c.vocab_size, d, s_d);
  return w;
}

template <typename T>
class Decoder;

// How a new session stores its tokens (see KVCache).
struct SessionOptions {
  std::size_t max_tokens = 0;      // 0: the model's max_seq_len (ignored with a window)
  std::size_t reserve_tokens = 0;  // preallocate the caches (0: they grow as needed)
  KVType kv_type = KVType::full;   // what keys and values are stored as
  SlidingWindow window;            // window = 0: no window, the default
};

// ============================================================================
// Session: the state of one request
// ============================================================================

// One KVCache per layer plus the buffers a forward pass works in. Create it
// with Decoder::new_session(); one session per concurrent request. A session
// is used by one thread at a time; different sessions may run concurrently
// on one Decoder.
template <typename T = float>
class Session {
 public:
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
  Session(Session&&) noexcept = default;
  Session& operator=(Session&&) noexcept = default;
  ~Session() = default;

  // Tokens each cache holds (at most the window, with a sliding window).
  std::size_t size() const { return caches_.empty() ? 0 : caches_.front().size(); }
  // Tokens fed since the last clear(): the position the next token takes.
  // Equal to size() unless a sliding window has dropped tokens.
  std::size_t position() const { return caches_.empty() ? 0 : caches_.front().position(); }
  std::size_t max_tokens() const { return caches_.empty() ? 0 : caches_.front().max_tokens(); }
  // The most positions the session can reach: max_tokens(), or no limit
  // with a sliding window.
  std::size_t position_limit() const {
    return window().window != 0 ? std::numeric_limits<std::size_t>::max() : max_tokens();
  }
  KVType kv_type() const { return caches_.empty() ? KVType::full : caches_.front().type(); }
  SlidingWindow window() const { return caches_.empty() ? SlidingWindow{} : caches_.front().window(); }
  std::size_t n_layers() const { return caches_.size(); }
  const KVCache<T>& cache(std::size_t layer) const { return caches_.at(layer); }

  // Memory held by the caches: 2 × n_layers × n_kv_heads × capacity × row bytes
  // (d_k × sizeof(T) for KVType::full).
  std::size_t kv_bytes() const {
    std::size_t total = 0;
    for (const auto& c : caches_) total += c.bytes();
    return total;
  }

  // Threads a forward pass may use (1 = the calling thread only).
  std::size_t threads() const { return threads_; }
  void set_threads(std::size_t threads) {
    if (threads == 0) throw std::invalid_argument("kvcache: Session::set_threads(0): need at least 1 thread");
    threads_ = threads;
  }

  // Forgets all tokens, so the next forward starts a new, independent
  // sequence; memory is kept for reuse.
  void clear() noexcept {
    for (auto& c : caches_) c.clear();
  }

  // Rolls every layer back to the first n tokens held.
  void truncate(std::size_t n) {
    if (n > size())
      throw std::out_of_range("kvcache: Session::truncate(" + std::to_string(n) + ") past size() = " +
                              std::to_string(size()));
    for (auto& c : caches_) c.truncate(n);
  }

  // A deep copy of the cached tokens (O(size) memory copy, no recompute):
  // fork a prefix and continue it in several ways.
  Session copy() const {
    std::vector<KVCache<T>> caches;
    caches.reserve(caches_.size());
    for (const auto& c : caches_) caches.push_back(c.copy());
    Session s(std::move(caches));
    s.threads_ = threads_;
    return s;
  }

  // ---- Raw state, for session files (session_file.hpp) ----------------------
  // Every layer's cache is in the same state: size(), position() and
  // ring_start() describe them all.

  std::size_t ring_start() const { return caches_.empty() ? 0 : caches_.front().ring_start(); }

  // Puts every layer in the state given (see KVCache::restore_state), slot
  // contents unspecified until write_raw fills them. Throws as
  // KVCache::restore_state; on any exception the session is unchanged.
  void restore_state(std::size_t size, std::size_t position, std::size_t ring_start) {
    for (const auto& c : caches_) c.check_state(size, position, ring_start);
    for (auto& c : caches_) c.reserve(size);  // all allocations before any change
    for (auto& c : caches_) c.restore_state(size, position, ring_start);
  }

  // KVCache::read_raw / write_raw of layer 0, then layer 1, …
  template <typename F>
  void read_raw(F&& f) const {
    for (const auto& c : caches_) c.read_raw(f);
  }
  template <typename F>
  void write_raw(F&& f) {
    for (auto& c : caches_) c.write_raw(f);
  }

 private:
  friend class Decoder<T>;
  explicit Session(std::vector<KVCache<T>> caches) : caches_(std::move(caches)) {}

  std::vector<KVCache<T>> caches_;
  std::size_t threads_ = 1;

  // Scratch, m × width for the m tokens of the current call.
  Matrix<T> x_;       // residual stream, m × d_model
  Matrix<T> normed_;  // norm(x), m × d_model
  Matrix<T> delta_;   // a sublayer's output, m × d_model
  Matrix<T> hidden_;  // MLP, m × d_ff
  Matrix<T> gate_;    // SwiGLU's W_3 x, m × d_ff
  Matrix<T> head_in_;  // final norm of the rows that get logits, rows × d_model
  Matrix<T> logits_;   // rows × vocab_size
  AttentionScratch<T> attention_;
};

// Which positions Decoder::forward computes logits for. Generation needs only
// the last; the LM head costs vocab_size × d_model per row.
enum class Logits { all, last };

// The buffers of Decoder::forward_batch. Keep one per batch loop and reuse
// it: once it has grown to a step's size (the same sequences, the same
// number of rows), a batched step allocates nothing.
template <typename T = float>
class BatchScratch {
 public:
  BatchScratch() = default;

 private:
  friend class Decoder<T>;
  // The stacked rows of all sequences live in the buffers of a session
  // without caches, so they go through the very norm, MLP and head code a
  // single session's rows do.
  std::optional<Session<T>> rows_;
  Matrix<T> last_rows_;                 // each sequence's last row of x, B × d_model
  std::vector<std::size_t> first_row_;  // sequence b owns rows [first_row_[b], first_row_[b + 1])
  std::vector<std::size_t> position_;   // each session's position before the call (for rollback)
  std::vector<std::size_t> held_;       // and the tokens it held
  std::vector<KVCache<T>*> caches_;     // one layer's caches, one per sequence
};

// ============================================================================
// Decoder
// ============================================================================

template <typename T = float>
class Decoder {
 public:
  using Scalar = T;

  struct Block {
    NormWeights<T> attention_norm;
    MultiHeadAttentionWithCache<T> attention;
    NormWeights<T> mlp_norm;
    MlpWeights<T> mlp;
  };

  // Validates every size and shape, and throws std::invalid_argument naming
  // the field and the values on the first that is wrong. Every weight matrix
  // (embeddings, W_Q, W_K, W_V, W_O, W_1, W_2, W_3, LM head) is then stored as
  // `weight_type`, converted one at a time (f32 → bf16: round to nearest even,
  // the T values freed); norms, biases and learned positions stay T.
  Decoder(ModelConfig config, DecoderWeights<T> weights, WeightType weight_type = WeightType::f32)
      : config_(config), weight_type_(weight_type) {
    config_.validate();
    const std::size_t d = config_.d_model, V = config_.vocab_size;
    detail::check_weight("token_embedding", weights.token_embedding, V, d);
    if (config_.positions == PositionEncoding::learned)
      detail::check_weight("position_embedding", weights.position_embedding, config_.max_seq_len, d);
    else if (weights.position_embedding.size() != 0)
      detail::fail_config(std::string("position_embedding given but positions = ") + to_string(config_.positions));
    if (weights.blocks.size() != config_.n_layers)
      detail::fail_config("weights have " + std::to_string(weights.blocks.size()) + " blocks but n_layers = " +
                          std::to_string(config_.n_layers));
    check_norm("final_norm", weights.final_norm);
    if (config_.tied_lm_head && weights.lm_head.size() != 0)
      detail::fail_config("lm_head given but tied_lm_head = true");
    if (!config_.tied_lm_head) detail::check_weight("lm_head", weights.lm_head, V, d);

    // Each matrix is converted to weight_type in turn; those then under 2 MB
    // move side by side into one arena, so that together they fill huge
    // pages (bigger ones have huge pages of their own: see WeightArena).
    const std::size_t value_bytes = weight_type == WeightType::f32 ? sizeof(T) : sizeof(std::uint16_t);
    const auto in_arena = [&](const WeightMatrix<T>& W) {
      const std::size_t bytes = static_cast<std::size_t>(W.size()) * value_bytes;
      return bytes != 0 && bytes < detail::kHugePage;
    };
    std::size_t arena_bytes = 0;
    for (WeightMatrix<T>* W : matrices(weights))
      if (in_arena(*W)) arena_bytes += detail::WeightArena::slice_bytes(static_cast<std::size_t>(W->size()) * value_bytes);
    detail::WeightArena arena(arena_bytes);
    const auto store = [&](WeightMatrix<T>& W) {
      W.convert_to(weight_type);
      if (in_arena(W)) W.move_into(arena);
    };

    blocks_.reserve(config_.n_layers);
    for (std::size_t l = 0; l < config_.n_layers; ++l) {
      auto& b = weights.blocks[l];
      const std::string at = "blocks[" + std::to_string(l) + "].";
      check_norm((at + "attention_norm").c_str(), b.attention_norm);
      check_norm((at + "mlp_norm").c_str(), b.mlp_norm);
      check_mlp(at, b.mlp);
      for (auto* W : {&b.attention.W_Q, &b.attention.W_K, &b.attention.W_V, &b.attention.W_O, &b.mlp.W_1, &b.mlp.W_2,
                      &b.mlp.W_3})
        store(*W);
      try {
        blocks_.push_back(Block{std::move(b.attention_norm),
                                MultiHeadAttentionWithCache<T>(config_.attention(), std::move(b.attention)),
                                std::move(b.mlp_norm), std::move(b.mlp)});
      } catch (const std::invalid_argument& e) {
        throw std::invalid_argument(std::string(e.what()) + " (in " + at + "attention)");
      }
    }
    store(weights.token_embedding);
    store(weights.lm_head);
    token_embedding_ = std::move(weights.token_embedding);
    position_embedding_ = std::move(weights.position_embedding);
    final_norm_ = std::move(weights.final_norm);
    lm_head_ = std::move(weights.lm_head);
  }

  const ModelConfig& config() const { return config_; }
  // How the weight matrices are stored.
  WeightType weight_type() const { return weight_type_; }
  const Block& block(std::size_t l) const { return blocks_.at(l); }
  const WeightMatrix<T>& token_embedding() const { return token_embedding_; }
  const Matrix<T>& position_embedding() const { return position_embedding_; }
  const NormWeights<T>& final_norm() const { return final_norm_; }
  const WeightMatrix<T>& lm_head() const { return config_.tied_lm_head ? token_embedding_ : lm_head_; }

  // Bytes of all parameters, as stored (a bfloat16 weight takes 2).
  std::size_t weight_bytes() const {
    std::size_t n = bytes(token_embedding_) + bytes(position_embedding_) + bytes(final_norm_) + bytes(lm_head_);
    for (const auto& b : blocks_) {
      const auto& a = b.attention.weights();
      n += bytes(b.attention_norm) + bytes(b.mlp_norm) + bytes(a.W_Q) + bytes(a.W_K) + bytes(a.W_V) + bytes(a.W_O) +
           bytes(a.b_Q) + bytes(a.b_K) + bytes(a.b_V) + bytes(a.b_O) + bytes(b.mlp.W_1) + bytes(b.mlp.W_2) +
           bytes(b.mlp.W_3) + bytes(b.mlp.b_1) + bytes(b.mlp.b_2);
    }
    return n;
  }

  // A new, empty session. max_tokens = 0 means the model's max_seq_len;
  // reserve_tokens preallocates the caches (0: they grow as needed).
  Session<T> new_session(std::size_t max_tokens = 0, std::size_t reserve_tokens = 0) const {
    SessionOptions options;
    options.max_tokens = max_tokens;
    options.reserve_tokens = reserve_tokens;
    return new_session(options);
  }

  // A new, empty session storing keys and values as options.kv_type, with an
  // optional sliding window. Throws std::invalid_argument on a limit past
  // max_seq_len, a window longer than max_seq_len or with sinks >= window,
  // or a window on a model with learned positions (whose positions cannot
  // go past max_seq_len).
  Session<T> new_session(const SessionOptions& options) const {
    const std::size_t W = options.window.window;
    KVCache<T>::check_window(options.window);
    if (W > config_.max_seq_len)
      throw std::invalid_argument("kvcache: new_session: sliding window of " + std::to_string(W) +
                                  " tokens is longer than max_seq_len = " + std::to_string(config_.max_seq_len));
    if (W != 0 && config_.positions == PositionEncoding::learned)
      throw std::invalid_argument("kvcache: new_session: a sliding window needs RoPE or no position encoding; "
                                  "learned positions stop at max_seq_len");
    std::size_t max_tokens = options.max_tokens == 0 ? config_.max_seq_len : options.max_tokens;
    if (max_tokens > config_.max_seq_len)
      throw std::invalid_argument("kvcache: new_session: max_tokens = " + std::to_string(max_tokens) +
                                  " exceeds max_seq_len = " + std::to_string(config_.max_seq_len));
    if (W != 0) max_tokens = 0;  // the window is the limit
    std::vector<KVCache<T>> caches;
    caches.reserve(config_.n_layers);
    for (std::size_t l = 0; l < config_.n_layers; ++l) {
      caches.emplace_back(config_.kv_heads(), config_.d_k(), max_tokens, options.kv_type, options.window);
      caches.back().reserve(options.reserve_tokens);
    }
    return Session<T>(std::move(caches));
  }

  // Feeds tokens at positions [session.position(), session.position() + m) and
  // returns their logits (m × vocab_size, or 1 × vocab_size for the last
  // position only). The reference points into the session and stays valid
  // until its next forward.
  //
  // Throws std::invalid_argument (no tokens, a session of another model),
  // std::out_of_range (a token id outside [0, vocab_size)) or
  // std::length_error (past max_seq_len or the session's limit); on any
  // exception every cache is as it was before the call, with one exception:
  // running out of memory inside a large product after a full sliding window
  // has overwritten tokens clears the session (see undo_appends).
  const Matrix<T>& forward(const std::vector<int>& tokens, Session<T>& session, Logits which = Logits::all) const {
    check_tokens(tokens, session);
    const std::size_t p = session.position(), held = session.size();
    try {
      // Every allocation of ours comes before the first layer changes its
      // cache (a sliding window could not bring back the tokens it drops);
      // afterwards only Eigen's own, inside large products (undo_appends).
      for (auto& c : session.caches_) c.reserve_more(tokens.size());
      prepare(session, tokens.size(), which);
      embed(tokens, p, session);
      for (const auto& b : blocks_) run_block(b, session, &b - blocks_.data());
      head(session, which);
    } catch (...) {
      undo_appends(session, p, held);
      throw;
    }
    return session.logits_;
  }

  // Several sessions stepped together: sequence b feeds tokens[b] (at least
  // one) to *sessions[b], at that session's own positions. The rows of all
  // sequences are stacked into one (Σ m_b × d_model) matrix, so each weight
  // (W_Q, W_K, W_V, W_O, the MLP, the LM head) is one matrix-matrix product
  // per step, read once for the whole batch; RoPE or learned positions, the
  // cache append and attention are per session. The sessions must be
  // distinct, of this model's shape; their kv types and windows may differ.
  //
  // Returns logits: with Logits::last one row per sequence (B × vocab_size,
  // row b for the last token of sequence b), with Logits::all the rows of
  // all tokens stacked in the same order. The reference points into scratch
  // and stays valid until its next use. Products and attention use
  // `threads` (the sessions' own thread counts are not consulted).
  //
  // Each sequence's logits are those Decoder::forward gives it alone, up to
  // the rounding of a matrix-matrix product against a matrix-vector one.
  // Throws as forward() does, naming the sequence, and on no sequences, a
  // different number of token lists and sessions, a null or repeated
  // session, or threads = 0; on any exception every cache is as it was
  // (but for the sliding-window case of forward(): that session is cleared).
  const Matrix<T>& forward_batch(const std::vector<std::vector<int>>& tokens, const std::vector<Session<T>*>& sessions,
                                 BatchScratch<T>& scratch, Logits which = Logits::last, std::size_t threads = 1) const {
    check_batch(tokens, sessions, threads);
    const std::size_t B = sessions.size();
    auto& first_row = scratch.first_row_;
    first_row.resize(B + 1);
    scratch.position_.resize(B);
    scratch.held_.resize(B);
    scratch.caches_.resize(B);
    first_row[0] = 0;
    for (std::size_t b = 0; b < B; ++b) {
      first_row[b + 1] = first_row[b] + tokens[b].size();
      scratch.position_[b] = sessions[b]->position();
      scratch.held_[b] = sessions[b]->size();
    }
    if (!scratch.rows_) scratch.rows_.emplace(Session<T>(std::vector<KVCache<T>>{}));
    Session<T>& rows = *scratch.rows_;
    rows.threads_ = threads;
    try {
      // Every allocation of ours comes before the first cache changes (as in
      // forward()).
      for (std::size_t b = 0; b < B; ++b)
        for (auto& c : sessions[b]->caches_) c.reserve_more(tokens[b].size());
      prepare_batch(scratch, which);
      for (std::size_t b = 0; b < B; ++b)
        embed_rows(tokens[b], scratch.position_[b], rows.x_, static_cast<Eigen::Index>(first_row[b]));
      for (std::size_t l = 0; l < blocks_.size(); ++l) {
        for (std::size_t b = 0; b < B; ++b) scratch.caches_[b] = &sessions[b]->caches_[l];
        const Block& block = blocks_[l];
        normalize(rows.x_, block.attention_norm, rows.normed_);
        block.attention.forward_batch(rows.normed_, first_row, scratch.caches_, rows.delta_, rows.attention_, threads);
        rows.x_ += rows.delta_;
        normalize(rows.x_, block.mlp_norm, rows.normed_);
        mlp(block.mlp, rows);
        rows.x_ += rows.delta_;
      }
      if (which == Logits::all) {
        head(rows, Logits::all);
      } else {
        // The last row of each sequence, gathered so that the final norm
        // reads contiguous rows as it does for a single session.
        for (std::size_t b = 0; b < B; ++b)
          scratch.last_rows_.row(static_cast<Eigen::Index>(b)) =
              rows.x_.row(static_cast<Eigen::Index>(first_row[b + 1] - 1));
        normalize(scratch.last_rows_, final_norm_, rows.head_in_);
        detail::linear<T>(rows.head_in_, lm_head(), Vector<T>(), rows.logits_, threads);
      }
    } catch (...) {
      for (std::size_t b = 0; b < B; ++b) undo_appends(*sessions[b], scratch.position_[b], scratch.held_[b]);
      throw;
    }
    return rows.logits_;
  }

 private:
  // Every weight matrix of `w`, in the order the constructor stores them.
  static std::vector<WeightMatrix<T>*> matrices(DecoderWeights<T>& w) {
    std::vector<WeightMatrix<T>*> all;
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
  static std::size_t bytes(const WeightMatrix<T>& W) { return W.bytes(); }
  static std::size_t bytes(const NormWeights<T>& n) { return bytes(n.gamma) + bytes(n.beta); }

  // Puts `s` back as it was before a failed call found it at position p
  // holding `held` tokens. Every allocation of a forward pass is meant to
  // come before the first append, so usually nothing was appended, and then
  // nothing is touched (truncate would put a wrapped ring back in token
  // order: the same tokens in other slots, so other rounding later). Eigen
  // can still allocate inside a large product (its GEMM blocks above 128
  // KiB): appends made before that are removed, unless a full sliding window
  // has already overwritten its oldest tokens; those cannot be brought back,
  // and the session is then cleared, a state it can be in, rather than left
  // holding a mix of old and new tokens.
  static void undo_appends(Session<T>& s, std::size_t p, std::size_t held) {
    bool appended = false, evicted = false;
    for (const auto& c : s.caches_) {
      appended |= c.position() != p;
      evicted |= c.position() - p != c.size() - held;
    }
    if (evicted) {
      s.clear();
    } else if (appended) {
      for (auto& c : s.caches_)
        if (c.position() != p) c.truncate(held);
    }
  }

  void check_norm(const char* name, const NormWeights<T>& n) const {
    const auto d = static_cast<Eigen::Index>(config_.d_model);
    if (n.gamma.size() != d)
      detail::fail_config(std::string(name) + ".gamma has " + std::to_string(n.gamma.size()) +
                          " entries, expected d_model = " + std::to_string(d));
    if (config_.norm == NormKind::rms_norm && n.beta.size() != 0)
      detail::fail_config(std::string(name) + ".beta given but RMSNorm has no shift");
    if (n.beta.size() != 0 && n.beta.size() != d)
      detail::fail_config(std::string(name) + ".beta has " + std::to_string(n.beta.size()) +
                          " entries, expected d_model = " + std::to_string(d));
  }

  void check_mlp(const std::string& at, const MlpWeights<T>& w) const {
    const std::size_t d = config_.d_model, ff = config_.d_ff;
    detail::check_weight((at + "mlp.W_1").c_str(), w.W_1, ff, d);
    detail::check_weight((at + "mlp.W_2").c_str(), w.W_2, d, ff);
    if (config_.mlp == MlpKind::swiglu)
      detail::check_weight((at + "mlp.W_3").c_str(), w.W_3, ff, d);
    else if (w.W_3.size() != 0)
      detail::fail_config(at + "mlp.W_3 given but the MLP is GELU");
    detail::check_bias((at + "mlp.b_1").c_str(), w.b_1, ff);
    detail::check_bias((at + "mlp.b_2").c_str(), w.b_2, d);
  }

  void check_tokens(const std::vector<int>& tokens, const Session<T>& session) const {
    if (tokens.empty()) throw std::invalid_argument("kvcache: Decoder::forward: no tokens");
    for (std::size_t i = 0; i < tokens.size(); ++i)
      if (tokens[i] < 0 || static_cast<std::size_t>(tokens[i]) >= config_.vocab_size)
        throw std::out_of_range("kvcache: token id " + std::to_string(tokens[i]) + " at index " + std::to_string(i) +
                                " is outside [0, vocab_size = " + std::to_string(config_.vocab_size) + ")");
    if (session.caches_.size() != config_.n_layers || session.caches_.front().n_kv_heads() != config_.kv_heads() ||
        session.caches_.front().d_k() != config_.d_k())
      throw std::invalid_argument("kvcache: Decoder::forward: the session was made for another model shape");
    const std::size_t end = session.position() + tokens.size();
    if (end > session.position_limit())
      throw std::length_error("kvcache: sequence of " + std::to_string(end) + " tokens (" +
                              std::to_string(session.position()) + " cached + " + std::to_string(tokens.size()) +
                              " new) exceeds the limit of " + std::to_string(session.max_tokens()) +
                              " (max_seq_len = " + std::to_string(config_.max_seq_len) + ")");
  }

  void check_batch(const std::vector<std::vector<int>>& tokens, const std::vector<Session<T>*>& sessions,
                   std::size_t threads) const {
    if (sessions.empty()) throw std::invalid_argument("kvcache: Decoder::forward_batch: no sessions");
    if (tokens.size() != sessions.size())
      throw std::invalid_argument("kvcache: Decoder::forward_batch: " + std::to_string(tokens.size()) +
                                  " token lists for " + std::to_string(sessions.size()) + " sessions");
    if (threads == 0) throw std::invalid_argument("kvcache: Decoder::forward_batch: threads = 0, need at least 1");
    for (std::size_t b = 0; b < sessions.size(); ++b) {
      // The sequence is named only on error: a batch step builds no strings.
      const auto at = [b] { return " (sequence " + std::to_string(b) + ")"; };
      if (sessions[b] == nullptr)
        throw std::invalid_argument("kvcache: Decoder::forward_batch: sessions[" + std::to_string(b) + "] is null");
      for (std::size_t c = 0; c < b; ++c)
        if (sessions[c] == sessions[b])
          throw std::invalid_argument("kvcache: Decoder::forward_batch: sessions[" + std::to_string(c) +
                                      "] and sessions[" + std::to_string(b) + "] are the same session");
      if (tokens[b].empty())
        throw std::invalid_argument("kvcache: Decoder::forward_batch: sequence " + std::to_string(b) +
                                    " has no tokens");
      try {
        check_tokens(tokens[b], *sessions[b]);
      } catch (const std::out_of_range& e) {
        throw std::out_of_range(e.what() + at());
      } catch (const std::length_error& e) {
        throw std::length_error(e.what() + at());
      } catch (const std::invalid_argument& e) {
        throw std::invalid_argument(e.what() + at());
      }
    }
  }

  // Sizes the stacked buffers of a batch, as prepare() does for one session.
  void prepare_batch(BatchScratch<T>& scratch, Logits which) const {
    const auto B = static_cast<Eigen::Index>(scratch.caches_.size());
    const auto R = static_cast<Eigen::Index>(scratch.first_row_.back());
    const auto d = static_cast<Eigen::Index>(config_.d_model), ff = static_cast<Eigen::Index>(config_.d_ff);
    Session<T>& s = *scratch.rows_;
    detail::resize_buffer(s.x_, R, d);
    detail::resize_buffer(s.normed_, R, d);
    detail::resize_buffer(s.delta_, R, d);
    detail::resize_buffer(s.hidden_, R, ff);
    if (config_.mlp == MlpKind::swiglu) detail::resize_buffer(s.gate_, R, ff);
    const Eigen::Index head_rows = which == Logits::last ? B : R;
    if (which == Logits::last) detail::resize_buffer(scratch.last_rows_, B, d);
    detail::resize_buffer(s.head_in_, head_rows, d);
    detail::resize_buffer(s.logits_, head_rows, static_cast<Eigen::Index>(config_.vocab_size));
  }

  // Rows [first, first + m) of x = the embeddings of tokens at positions p, p + 1, ...
  void embed_rows(const std::vector<int>& tokens, std::size_t p, Matrix<T>& x, Eigen::Index first) const {
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      const auto row = first + static_cast<Eigen::Index>(i);
      token_embedding_.row_to(tokens[i], x.row(row).data());
      if (config_.positions == PositionEncoding::learned)
        x.row(row) += position_embedding_.row(static_cast<Eigen::Index>(p + i));
    }
  }

  // Sizes every buffer a forward of m tokens writes, so that the layers
  // allocate nothing.
  void prepare(Session<T>& s, std::size_t m, Logits which) const {
    const auto rows = static_cast<Eigen::Index>(m), d = static_cast<Eigen::Index>(config_.d_model);
    const auto ff = static_cast<Eigen::Index>(config_.d_ff);
    detail::resize_buffer(s.x_, rows, d);
    detail::resize_buffer(s.normed_, rows, d);
    detail::resize_buffer(s.delta_, rows, d);
    detail::resize_buffer(s.hidden_, rows, ff);
    if (config_.mlp == MlpKind::swiglu) detail::resize_buffer(s.gate_, rows, ff);
    const Eigen::Index head_rows = which == Logits::last ? 1 : rows;
    detail::resize_buffer(s.head_in_, head_rows, d);
    detail::resize_buffer(s.logits_, head_rows, static_cast<Eigen::Index>(config_.vocab_size));
  }

  // x_i = E[token_i] (+ P[p + i] with learned positions).
  void embed(const std::vector<int>& tokens, std::size_t p, Session<T>& s) const {
    detail::resize_buffer(s.x_, static_cast<Eigen::Index>(tokens.size()), static_cast<Eigen::Index>(config_.d_model));
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      const auto row = static_cast<Eigen::Index>(i);
      token_embedding_.row_to(tokens[i], s.x_.row(row).data());
      if (config_.positions == PositionEncoding::learned)
        s.x_.row(row) += position_embedding_.row(static_cast<Eigen::Index>(p + i));
    }
  }

  void run_block(const Block& b, Session<T>& s, std::ptrdiff_t layer) const {
    normalize(s.x_, b.attention_norm, s.normed_);
    b.attention.forward(s.normed_, s.caches_[static_cast<std::size_t>(layer)], s.delta_, s.attention_, s.threads_);
    s.x_ += s.delta_;
    normalize(s.x_, b.mlp_norm, s.normed_);
    mlp(b.mlp, s);
    s.x_ += s.delta_;
  }

  // LayerNorm: (x − mean) / √(var + eps) · gamma + beta.
  // RMSNorm:   x / √(mean(x²) + eps) · gamma, in llama2.c's order of operations.
  template <typename Derived>
  void normalize(const Eigen::MatrixBase<Derived>& x, const NormWeights<T>& w, Matrix<T>& out) const {
    detail::resize_buffer(out, x.rows(), x.cols());
    const T eps = static_cast<T>(config_.norm_eps);
    const T n = static_cast<T>(x.cols());
    for (Eigen::Index i = 0; i < x.rows(); ++i) {
      if (config_.norm == NormKind::rms_norm) {
        const T inv_rms = T(1) / std::sqrt(x.row(i).squaredNorm() / n + eps);
        out.row(i) = w.gamma.transpose().cwiseProduct(inv_rms * x.row(i));
      } else {
        const T mean = x.row(i).mean();
        const T var = (x.row(i).array() - mean).square().sum() / n;
        out.row(i) = ((x.row(i).array() - mean) / std::sqrt(var + eps)).matrix().cwiseProduct(w.gamma.transpose());
        if (w.beta.size() != 0) out.row(i) += w.beta.transpose();
      }
    }
  }

  // The whole MLP in one parallel region: each thread computes its slice of
  // the d_ff hidden features (W_1 and W_3 rows together, so the activation
  // needs nothing from other threads), then, once all of hidden is there,
  // its slice of the d_model outputs of W_2.
  void mlp(const MlpWeights<T>& w, Session<T>& s) const {
    const Eigen::Index m = s.x_.rows(), ff = static_cast<Eigen::Index>(config_.d_ff);
    const bool swiglu = config_.mlp == MlpKind::swiglu;
    detail::resize_buffer(s.hidden_, m, ff);
    if (swiglu) detail::resize_buffer(s.gate_, m, ff);
    detail::resize_buffer(s.delta_, m, static_cast<Eigen::Index>(config_.d_model));
    const Vector<T> no_bias;
    const std::size_t widest = std::max(config_.d_ff, config_.d_model);
    detail::parallel_team(detail::team_size(s.threads_, widest, 16), [&](const detail::Team& team) {
      const auto [f0, f1] = team.slice(config_.d_ff, 16);
      const auto h0 = static_cast<Eigen::Index>(f0), hn = static_cast<Eigen::Index>(f1 - f0);
      detail::linear_rows<T>(s.normed_, w.W_1, w.b_1, s.hidden_, h0, h0 + hn);
      auto a = s.hidden_.middleCols(h0, hn).array();
      if (swiglu) {
        detail::linear_rows<T>(s.normed_, w.W_3, no_bias, s.gate_, h0, h0 + hn);
        // silu(a) · g = a · σ(a) · g
        a = a * (T(1) / (T(1) + (-a).exp())) * s.gate_.middleCols(h0, hn).array();
      } else {
        // GELU, tanh approximation (GPT-2): ½a(1 + tanh(√(2/π)(a + 0.044715a³)))
        const T c = static_cast<T>(0.7978845608028654);
        a = T(0.5) * a * (T(1) + (c * (a + T(0.044715) * a.cube())).tanh());
      }
      team.barrier();
      const auto [d0, d1] = team.slice(config_.d_model, 16);
      detail::linear_rows<T>(s.hidden_, w.W_2, w.b_2, s.delta_, static_cast<Eigen::Index>(d0),
                             static_cast<Eigen::Index>(d1));
    });
  }

  void head(Session<T>& s, Logits which) const {
    const Eigen::Index m = s.x_.rows();
    const Eigen::Index rows = which == Logits::last ? 1 : m;
    normalize(s.x_.bottomRows(rows), final_norm_, s.head_in_);
    detail::linear<T>(s.head_in_, lm_head(), Vector<T>(), s.logits_, s.threads_);
  }

  ModelConfig config_;
  WeightType weight_type_;
  WeightMatrix<T> token_embedding_;
  Matrix<T> position_embedding_;
  std::vector<Block> blocks_;
  NormWeights<T> final_norm_;
  WeightMatrix<T> lm_head_;
};

}  // namespace kvcache
