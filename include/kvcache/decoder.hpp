// kvcache/decoder.hpp — Decoder: a decoder-only transformer with immutable
// weights, and Session: the per-request state (one KVCache per layer).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "attention.hpp"
#include "config.hpp"
#include "detail/parallel.hpp"
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

  // Tokens seen so far: the position the next token will take.
  std::size_t size() const { return caches_.empty() ? 0 : caches_.front().size(); }
  std::size_t max_tokens() const { return caches_.empty() ? 0 : caches_.front().max_tokens(); }
  std::size_t n_layers() const { return caches_.size(); }
  const KVCache<T>& cache(std::size_t layer) const { return caches_.at(layer); }

  // Memory held by the caches: 2 × n_layers × n_kv_heads × d_k × capacity × sizeof(T).
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

  // Rolls every layer back to the first n tokens.
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
  Matrix<T> logits_;  // rows × vocab_size
  AttentionScratch<T> attention_;
};

// Which positions Decoder::forward computes logits for. Generation needs only
// the last; the LM head costs vocab_size × d_model per row.
enum class Logits { all, last };

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
    if (max_tokens == 0) max_tokens = config_.max_seq_len;
    if (max_tokens > config_.max_seq_len)
      throw std::invalid_argument("kvcache: new_session: max_tokens = " + std::to_string(max_tokens) +
                                  " exceeds max_seq_len = " + std::to_string(config_.max_seq_len));
    std::vector<KVCache<T>> caches;
    caches.reserve(config_.n_layers);
    for (std::size_t l = 0; l < config_.n_layers; ++l) {
      caches.emplace_back(config_.kv_heads(), config_.d_k(), max_tokens);
      caches.back().reserve(reserve_tokens);
    }
    return Session<T>(std::move(caches));
  }

  // Feeds tokens at positions [session.size(), session.size() + m) and
  // returns their logits (m × vocab_size, or 1 × vocab_size for the last
  // position only). The reference points into the session and stays valid
  // until its next forward.
  //
  // Throws std::invalid_argument (no tokens, a session of another model),
  // std::out_of_range (a token id outside [0, vocab_size)) or
  // std::length_error (past max_seq_len or the session's limit); on any
  // exception every cache is as it was before the call.
  const Matrix<T>& forward(const std::vector<int>& tokens, Session<T>& session, Logits which = Logits::all) const {
    check_tokens(tokens, session);
    const std::size_t p = session.size();
    try {
      for (auto& c : session.caches_) c.reserve_more(tokens.size());
      embed(tokens, p, session);
      for (const auto& b : blocks_) run_block(b, session, &b - blocks_.data());
      head(session, which);
    } catch (...) {
      for (auto& c : session.caches_) c.truncate(p);  // every cache holds at least the p tokens it had
      throw;
    }
    return session.logits_;
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
    const std::size_t end = session.size() + tokens.size();
    if (end > session.max_tokens())
      throw std::length_error("kvcache: sequence of " + std::to_string(end) + " tokens (" +
                              std::to_string(session.size()) + " cached + " + std::to_string(tokens.size()) +
                              " new) exceeds the limit of " + std::to_string(session.max_tokens()) +
                              " (max_seq_len = " + std::to_string(config_.max_seq_len) + ")");
  }

  // x_i = E[token_i] (+ P[p + i] with learned positions).
  void embed(const std::vector<int>& tokens, std::size_t p, Session<T>& s) const {
    s.x_.resize(static_cast<Eigen::Index>(tokens.size()), static_cast<Eigen::Index>(config_.d_model));
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
    out.resize(x.rows(), x.cols());
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
    s.hidden_.resize(m, ff);
    if (swiglu) s.gate_.resize(m, ff);
    s.delta_.resize(m, static_cast<Eigen::Index>(config_.d_model));
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
    normalize(s.x_.bottomRows(rows), final_norm_, s.normed_);
    s.logits_.resize(rows, static_cast<Eigen::Index>(config_.vocab_size));
    detail::linear<T>(s.normed_, lm_head(), Vector<T>(), s.logits_, s.threads_);
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
