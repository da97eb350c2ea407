// kvcache/attention.hpp — MultiHeadAttentionWithCache: one causal attention
// layer whose keys and values of past tokens come from a KVCache.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

#include <Eigen/Core>

#include "config.hpp"
#include "detail/parallel.hpp"
#include "detail/rope.hpp"
#include "kv_cache.hpp"

namespace kvcache {

// The parameters of one attention layer, each of shape [out, in]:
//   W_Q: d_model × d_model     W_K, W_V: kv_dim × d_model     W_O: d_model × d_model
// with kv_dim = n_kv_heads · d_k. A bias left empty is no bias.
template <typename T = float>
struct AttentionWeights {
  WeightMatrix<T> W_Q, W_K, W_V, W_O;
  Vector<T> b_Q, b_K, b_V, b_O;
};

// Buffers one forward call works in. Keep one per session (or per thread) and
// reuse it: once it has grown to a step's size, decoding allocates nothing.
template <typename T = float>
struct AttentionScratch {
  Matrix<T> Q, K, V;  // m × d_model, m × kv_dim, m × kv_dim
  Matrix<T> O;        // m × d_model: the heads' outputs side by side, before W_O
  // Per thread, m × n scores then probabilities (n = cache length), rows
  // padded to a multiple of 16 values. The padding makes every row start on
  // the same alignment whatever the buffer's history, so the vectorised sums
  // of the softmax add in the same order: a reused session gives bit for bit
  // what a fresh one gives.
  Vector<T> S;
};

namespace detail {

inline std::string shape(Eigen::Index rows, Eigen::Index cols) {
  return std::to_string(rows) + " x " + std::to_string(cols);
}

template <typename Derived>
void check_weight(const char* name, const Eigen::EigenBase<Derived>& W, std::size_t rows, std::size_t cols) {
  if (static_cast<std::size_t>(W.rows()) != rows || static_cast<std::size_t>(W.cols()) != cols)
    fail_config(std::string(name) + " is " + shape(W.rows(), W.cols()) + ", expected " +
                shape(static_cast<Eigen::Index>(rows), static_cast<Eigen::Index>(cols)));
}

template <typename T>
void check_bias(const char* name, const Vector<T>& b, std::size_t size) {
  if (b.size() != 0 && static_cast<std::size_t>(b.size()) != size)
    fail_config(std::string(name) + " has " + std::to_string(b.size()) + " entries, expected " +
                std::to_string(size) + " (or none)");
}

// Softmax of row[0, n_valid) in place, subtracting the maximum so exp never
// overflows; entries at and past n_valid (masked: the future) become 0.
template <typename Row>
void masked_softmax(Row&& row, Eigen::Index n_valid) {
  using T = typename std::decay_t<Row>::Scalar;
  auto valid = row.head(n_valid);
  const T max = valid.maxCoeff();
  valid = (valid.array() - max).exp();
  valid /= valid.sum();
  row.tail(row.size() - n_valid).setZero();
}

}  // namespace detail

// One attention layer: immutable weights, and the cache passed in by the
// caller, so one layer serves many sessions at once (forward is const and
// touches only its arguments).
//
// For m new tokens x (m × d_model) at positions [p, p+m), p = cache.size():
//   Q = x·W_Qᵀ, K = x·W_Kᵀ, V = x·W_Vᵀ        (RoPE on Q and K at their positions)
//   append K, V to the cache                   (it now holds n = p + m tokens)
//   for each query head h, on kv head g = h / (n_heads / n_kv_heads):
//     S = Q_h·K_gᵀ / √d_k                      (m × n)
//     row i may see keys [0, p + i]            (the causal mask, offset by p)
//     O_h = softmax(S)·V_g                     (m × d_k)
//   out = O·W_Oᵀ                               (m × d_model)
template <typename T = float>
class MultiHeadAttentionWithCache {
 public:
  using Scalar = T;

  MultiHeadAttentionWithCache(AttentionConfig config, AttentionWeights<T> weights)
      : config_(config), weights_(std::move(weights)) {
    config_.validate();
    const std::size_t d = config_.d_model, kv = config_.kv_dim();
    detail::check_weight("W_Q", weights_.W_Q, d, d);
    detail::check_weight("W_K", weights_.W_K, kv, d);
    detail::check_weight("W_V", weights_.W_V, kv, d);
    detail::check_weight("W_O", weights_.W_O, d, d);
    detail::check_bias("b_Q", weights_.b_Q, d);
    detail::check_bias("b_K", weights_.b_K, kv);
    detail::check_bias("b_V", weights_.b_V, kv);
    detail::check_bias("b_O", weights_.b_O, d);
    if (config_.positions == PositionEncoding::rope) rope_ = detail::Rope<T>(config_.d_k(), config_.rope_base);
  }

  const AttentionConfig& config() const { return config_; }
  const AttentionWeights<T>& weights() const { return weights_; }

  // An empty cache of this layer's shape, limited to max_seq_len tokens.
  KVCache<T> make_cache() const { return KVCache<T>(config_.n_kv_heads, config_.d_k(), config_.max_seq_len); }

  // Attends m new tokens over the cache and the tokens themselves, appending
  // their keys and values to the cache; out becomes m × d_model and must not
  // alias x. Throws, leaving the cache unchanged, when x is empty or of the
  // wrong width, the cache is of another shape, or the positions would pass
  // max_seq_len or the cache's limit.
  template <typename Derived>
  void forward(const Eigen::MatrixBase<Derived>& x, KVCache<T>& cache, Matrix<T>& out,
               AttentionScratch<T>& scratch, std::size_t threads = 1) const {
    check_input(x.rows(), x.cols(), cache);
    const std::size_t p = cache.size(), m = static_cast<std::size_t>(x.rows());
    threads = std::max<std::size_t>(threads, 1);

    // Everything that can throw (the limit, allocations) happens before the
    // cache changes: from the append on, nothing allocates.
    cache.reserve_more(m);
    resize_scratch(scratch, out, m, p + m, threads);

    project(x, scratch, threads);
    if (rope_) {
      rope_->apply(scratch.Q, p);
      rope_->apply(scratch.K, p);
    }
    cache.append(scratch.K, scratch.V);
    attend(cache, p, scratch, threads);
    detail::linear<T>(scratch.O, weights_.W_O, weights_.b_O, out, threads);
  }

  // The same, returning a new matrix (allocates; convenient outside hot loops).
  template <typename Derived>
  Matrix<T> forward(const Eigen::MatrixBase<Derived>& x, KVCache<T>& cache, std::size_t threads = 1) const {
    AttentionScratch<T> scratch;
    Matrix<T> out;
    forward(x, cache, out, scratch, threads);
    return out;
  }

  // ---- The seed articles' API: a layer that owns one cache. -------------
  // use_cache = true appends x to the owned cache and attends over all of it;
  // use_cache = false attends over x alone, as a fresh sequence, and leaves
  // the owned cache untouched. Not for sharing between threads.
  template <typename Derived>
  Matrix<T> forward(const Eigen::MatrixBase<Derived>& x, bool use_cache) {
    if (!use_cache) {
      KVCache<T> fresh = make_cache();
      return forward(x, fresh);
    }
    if (!own_cache_) own_cache_.emplace(make_cache());
    return forward(x, *own_cache_);
  }
  void reset_cache() {
    if (own_cache_) own_cache_->clear();
  }
  std::size_t cache_size() const { return own_cache_ ? own_cache_->size() : 0; }

 private:
  void check_input(Eigen::Index rows, Eigen::Index cols, const KVCache<T>& cache) const {
    if (rows == 0) throw std::invalid_argument("kvcache: attention input has no rows (no tokens)");
    if (static_cast<std::size_t>(cols) != config_.d_model)
      throw std::invalid_argument("kvcache: attention input is " + detail::shape(rows, cols) +
                                  ", expected m x d_model = m x " + std::to_string(config_.d_model));
    if (cache.n_kv_heads() != config_.n_kv_heads || cache.d_k() != config_.d_k())
      throw std::invalid_argument("kvcache: cache holds " + std::to_string(cache.n_kv_heads()) + " kv heads of " +
                                  std::to_string(cache.d_k()) + ", the layer needs " +
                                  std::to_string(config_.n_kv_heads) + " of " + std::to_string(config_.d_k()));
    const std::size_t end = cache.size() + static_cast<std::size_t>(rows);
    if (end > config_.max_seq_len)
      throw std::length_error("kvcache: positions up to " + std::to_string(end) + " pass max_seq_len = " +
                              std::to_string(config_.max_seq_len));
  }

  void resize_scratch(AttentionScratch<T>& s, Matrix<T>& out, std::size_t m, std::size_t n,
                      std::size_t threads) const {
    const auto rows = static_cast<Eigen::Index>(m);
    s.Q.resize(rows, static_cast<Eigen::Index>(config_.d_model));
    s.K.resize(rows, static_cast<Eigen::Index>(config_.kv_dim()));
    s.V.resize(rows, static_cast<Eigen::Index>(config_.kv_dim()));
    s.O.resize(rows, static_cast<Eigen::Index>(config_.d_model));
    // Grown, never shrunk, so that a decode step, whose n grows by one,
    // reallocates only when the size doubles.
    const auto needed = static_cast<Eigen::Index>(threads * m * scores_stride(n));
    if (s.S.size() < needed) s.S.resize(std::max(needed, 2 * s.S.size()));
    out.resize(rows, static_cast<Eigen::Index>(config_.d_model));
  }

  static std::size_t scores_stride(std::size_t n) { return (n + 15) / 16 * 16; }

  // Q, K and V read the same x: one parallel region computes all three, its
  // threads splitting the d_model + 2·kv_dim output features between them.
  template <typename Derived>
  void project(const Eigen::MatrixBase<Derived>& x, AttentionScratch<T>& s, std::size_t threads) const {
    const std::array<detail::LinearTerm<T>, 3> qkv{{{weights_.W_Q, weights_.b_Q, s.Q},
                                                    {weights_.W_K, weights_.b_K, s.K},
                                                    {weights_.W_V, weights_.b_V, s.V}}};
    detail::linear<T>(x, qkv, threads);
  }

  // O_h = softmax(Q_h·K_gᵀ/√d_k, causal from offset p)·V_g for every query
  // head, split across threads by head; each thread has its own rows of S.
  void attend(const KVCache<T>& cache, std::size_t p, AttentionScratch<T>& s, std::size_t threads) const {
    const auto d_k = static_cast<Eigen::Index>(config_.d_k());
    const auto m = s.Q.rows();
    const auto n = static_cast<Eigen::Index>(cache.size());
    const T sqrt_d_k = std::sqrt(static_cast<T>(config_.d_k()));
    detail::parallel_slices(config_.n_heads, threads, 1, [&](std::size_t h_begin, std::size_t h_end, std::size_t slot) {
      const auto ld = static_cast<Eigen::Index>(scores_stride(static_cast<std::size_t>(n)));
      Eigen::Map<Matrix<T>, 0, Eigen::OuterStride<>> S(s.S.data() + static_cast<Eigen::Index>(slot) * m * ld, m, n,
                                                       Eigen::OuterStride<>(ld));
      for (std::size_t h = h_begin; h < h_end; ++h) {
        const std::size_t g = h / config_.group_size();
        const auto K_g = cache.keys(g);
        const auto V_g = cache.values(g);
        const auto col = static_cast<Eigen::Index>(h) * d_k;
        // Divided after the product, as the formula reads: a scaled Q_h
        // would make Eigen copy it into a temporary on every decode step.
        S.noalias() = s.Q.middleCols(col, d_k) * K_g.transpose();
        S /= sqrt_d_k;
        for (Eigen::Index i = 0; i < m; ++i) detail::masked_softmax(S.row(i), static_cast<Eigen::Index>(p) + i + 1);
        s.O.middleCols(col, d_k).noalias() = S * V_g;
      }
    });
  }

  AttentionConfig config_;
  AttentionWeights<T> weights_;
  std::optional<detail::Rope<T>> rope_;
  std::optional<KVCache<T>> own_cache_;  // only for the seed API
};

}  // namespace kvcache
