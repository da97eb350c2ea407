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
#include <vector>

#include <Eigen/Core>

#include "config.hpp"
#include "detail/parallel.hpp"
#include "detail/resize.hpp"
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
  // Per thread, rows × n scores then probabilities (n = cache length), rows
  // padded to a multiple of 16 values. The padding makes every row start on
  // the same alignment whatever the buffer's history, so the vectorised sums
  // of the softmax add in the same order: a reused session gives bit for bit
  // what a fresh one gives.
  Vector<T> S;
  // Per thread, kTile × d_k keys or values of a compact cache converted to T.
  Vector<T> tile;
  // Sliding window with sinks only: Q before RoPE (m × d_model), and one
  // query re-rotated to its position within the window (1 × d_model).
  Matrix<T> Q_unrotated, Q_in_window;
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

  // An empty cache of this layer's shape, limited to max_seq_len tokens (or
  // holding a sliding window of them), storing keys and values as `type`.
  KVCache<T> make_cache(KVType type = KVType::full, SlidingWindow window = {}) const {
    return KVCache<T>(config_.n_kv_heads, config_.d_k(), window.window != 0 ? 0 : config_.max_seq_len, type, window);
  }

  // Attends m new tokens over the cache and the tokens themselves, appending
  // their keys and values to the cache; out becomes m × d_model and must not
  // alias x. Throws, leaving the cache unchanged, when x is empty or of the
  // wrong width, the cache is of another shape, or the positions would pass
  // max_seq_len or the cache's limit.
  //
  // With a sliding window the positions go on past max_seq_len: each query
  // sees the sinks and the most recent tokens, W in all, as if they were a
  // sequence of their own at positions 0 … W−1 (StreamingLLM's choice, which
  // keeps every position the model sees inside the range it was trained on).
  template <typename Derived>
  void forward(const Eigen::MatrixBase<Derived>& x, KVCache<T>& cache, Matrix<T>& out,
               AttentionScratch<T>& scratch, std::size_t threads = 1) const {
    check_input(x.rows(), x.cols(), cache);
    const std::size_t p = cache.position(), m = static_cast<std::size_t>(x.rows());
    threads = std::max<std::size_t>(threads, 1);

    // Everything that can throw (the limit, allocations) happens before the
    // cache changes: from the first append on, nothing allocates.
    cache.reserve_more(m);
    // With RoPE, the sinks' scores need the query at its position in the window.
    const bool rebase_sinks = rope_ && cache.window().sinks != 0 && p + m > cache.window().window;
    const std::size_t window = cache.window().window;
    const std::size_t n_max = window != 0 ? std::min(cache.size() + m, window) : cache.size() + m;
    resize_scratch(scratch, out, m, n_max, threads, rebase_sinks);

    project(x, scratch, threads);
    if (rope_) {
      if (rebase_sinks) scratch.Q_unrotated = scratch.Q;
      rope_->apply(scratch.Q, p);
      rope_->apply(scratch.K, p);
    }
    for (std::size_t first = 0; first < m;) {
      const std::size_t rows = rows_without_eviction(cache, m - first);
      const auto i0 = static_cast<Eigen::Index>(first), r = static_cast<Eigen::Index>(rows);
      cache.append(scratch.K.middleRows(i0, r), scratch.V.middleRows(i0, r));
      const bool in_window = rebase_sinks && cache.evicted() != 0;
      if (in_window) {
        scratch.Q_in_window = scratch.Q_unrotated.row(i0);
        rope_->apply(scratch.Q_in_window, cache.size() - 1);
      }
      attend(cache, first, rows, in_window ? scratch.Q_in_window.data() : nullptr, scratch, threads);
      first += rows;
    }
    detail::linear<T>(scratch.O, weights_.W_O, weights_.b_O, out, threads);
  }

  // Several sequences at once. x stacks their new tokens: sequence b owns
  // the rows [first_row[b], first_row[b + 1]) of x (at least one) and the
  // cache caches[b], so first_row has one entry more than caches, starting
  // at 0 and ending at x.rows(). Each weight is applied once, as one
  // matrix-matrix product over all the rows; RoPE, the append and attention
  // are done per sequence, at its own positions and over its own cache.
  // Row for row this is forward() on each sequence alone, up to the rounding
  // of a matrix-matrix product against a matrix-vector one.
  //
  // Attention is split across threads by (sequence, query head). Throws,
  // leaving every cache unchanged, on a malformed first_row, a null or
  // repeated cache, or anything forward() would reject for a sequence.
  template <typename Derived>
  void forward_batch(const Eigen::MatrixBase<Derived>& x, const std::vector<std::size_t>& first_row,
                     const std::vector<KVCache<T>*>& caches, Matrix<T>& out, AttentionScratch<T>& scratch,
                     std::size_t threads = 1) const {
    check_batch(x.rows(), x.cols(), first_row, caches);
    threads = std::max<std::size_t>(threads, 1);
    // As in forward(): everything that can throw (the limits, allocations)
    // happens before the first cache changes.
    const BatchPlan plan = reserve_batch(first_row, caches);
    resize_batch_scratch(scratch, out, first_row, caches.size(), plan, threads);

    project(x, scratch, threads);
    if (plan.rebase_sinks) scratch.Q_unrotated = scratch.Q;
    if (rope_) {
      for (std::size_t b = 0; b < caches.size(); ++b) {
        const auto i0 = static_cast<Eigen::Index>(first_row[b]);
        const auto m = static_cast<Eigen::Index>(first_row[b + 1] - first_row[b]);
        auto Q_b = scratch.Q.middleRows(i0, m);
        auto K_b = scratch.K.middleRows(i0, m);
        rope_->apply(Q_b, caches[b]->position());
        rope_->apply(K_b, caches[b]->position());
      }
    }
    if (plan.chunked)
      append_and_attend_each(first_row, caches, scratch, threads);
    else
      append_and_attend_together(first_row, caches, plan.region, scratch, threads);
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
    const std::size_t window = cache.window().window;
    if (window > config_.max_seq_len)
      throw std::invalid_argument("kvcache: sliding window of " + std::to_string(window) +
                                  " tokens is longer than max_seq_len = " + std::to_string(config_.max_seq_len));
    const std::size_t end = cache.position() + static_cast<std::size_t>(rows);
    if (window == 0 && end > config_.max_seq_len)
      throw std::length_error("kvcache: positions up to " + std::to_string(end) + " pass max_seq_len = " +
                              std::to_string(config_.max_seq_len));
  }

  // How many of `left` new tokens can be appended at once without the window
  // dropping a token that one of them still sees: all of them while they
  // fit, then the rest one at a time. Once a window with RoPE and sinks has
  // dropped tokens (it may have been truncated since), every query needs the
  // sinks rotated to its own position in the window: one at a time too.
  std::size_t rows_without_eviction(const KVCache<T>& cache, std::size_t left) const {
    const std::size_t window = cache.window().window, n = cache.size();
    if (window == 0) return left;
    if (sinks_rebased(cache, cache.position() + left) && cache.evicted() != 0) return 1;
    if (n + left <= window) return left;
    return n < window ? window - n : 1;
  }

  // forward()'s rebase_sinks for new tokens that end at position `end`:
  // with RoPE and sinks, a query past the window sees the sinks re-rotated.
  bool sinks_rebased(const KVCache<T>& cache, std::size_t end) const {
    return rope_ && cache.window().sinks != 0 && end > cache.window().window;
  }
  // After an append: whether the new tokens' query needs that re-rotation now.
  bool in_window(const KVCache<T>& cache) const {
    return sinks_rebased(cache, cache.position()) && cache.evicted() != 0;
  }

  // What a batch needs beyond its rows: whether some sequence's queries
  // see re-rotated sinks, whether some sequence must be taken chunk by chunk
  // (its window fills up within the step, so a token one of its own new
  // rows sees would be dropped), and one thread's share of the scores
  // buffer, enough for the largest sequence.
  struct BatchPlan {
    bool rebase_sinks = false;
    bool chunked = false;
    std::size_t region = 0;
  };

  BatchPlan reserve_batch(const std::vector<std::size_t>& first_row, const std::vector<KVCache<T>*>& caches) const {
    BatchPlan plan;
    for (std::size_t b = 0; b < caches.size(); ++b) {
      KVCache<T>& cache = *caches[b];
      const std::size_t m = first_row[b + 1] - first_row[b], window = cache.window().window;
      cache.reserve_more(m);
      plan.rebase_sinks = plan.rebase_sinks || sinks_rebased(cache, cache.position() + m);
      plan.chunked = plan.chunked || rows_without_eviction(cache, m) < m;
      const std::size_t n_max = window != 0 ? std::min(cache.size() + m, window) : cache.size() + m;
      plan.region = std::max(plan.region, std::max(m, config_.group_size()) * scores_stride(n_max));
    }
    return plan;
  }

  void resize_batch_scratch(AttentionScratch<T>& s, Matrix<T>& out, const std::vector<std::size_t>& first_row,
                            std::size_t B, const BatchPlan& plan, std::size_t threads) const {
    const auto rows = static_cast<Eigen::Index>(first_row.back());
    const auto d = static_cast<Eigen::Index>(config_.d_model);
    detail::resize_buffer(s.Q, rows, d);
    detail::resize_buffer(s.K, rows, static_cast<Eigen::Index>(config_.kv_dim()));
    detail::resize_buffer(s.V, rows, static_cast<Eigen::Index>(config_.kv_dim()));
    detail::resize_buffer(s.O, rows, d);
    if (plan.rebase_sinks) {
      detail::resize_buffer(s.Q_unrotated, rows, d);
      detail::resize_buffer(s.Q_in_window, static_cast<Eigen::Index>(B), d);  // a row per sequence
    }
    const auto needed = static_cast<Eigen::Index>(threads * plan.region);
    if (s.S.size() < needed) detail::resize_buffer(s.S, std::max(needed, 2 * s.S.size()), 1);
    detail::resize_buffer(s.tile, static_cast<Eigen::Index>(threads * kTile * config_.d_k()), 1);
    detail::resize_buffer(out, rows, d);
  }

  // Row b of Q_in_window = the query in row `row` of the batch (sequence
  // b's) rotated to its position in sequence b's window.
  const T* rotate_into_window(AttentionScratch<T>& s, std::size_t b, std::size_t row, const KVCache<T>& cache) const {
    auto Q_w = s.Q_in_window.row(static_cast<Eigen::Index>(b));
    Q_w = s.Q_unrotated.row(static_cast<Eigen::Index>(row));
    rope_->apply(Q_w, cache.size() - 1);
    return Q_w.data();
  }

  // The common case: every sequence appends all its rows, then attention
  // runs over (sequence, query head) units, split across threads; sequence
  // b's heads are the units [b·n_heads, (b+1)·n_heads).
  void append_and_attend_together(const std::vector<std::size_t>& first_row, const std::vector<KVCache<T>*>& caches,
                                  std::size_t region, AttentionScratch<T>& s, std::size_t threads) const {
    const std::size_t B = caches.size(), H = config_.n_heads, d = config_.d_model;
    for (std::size_t b = 0; b < B; ++b) {
      const auto i0 = static_cast<Eigen::Index>(first_row[b]);
      const auto m = static_cast<Eigen::Index>(first_row[b + 1] - first_row[b]);
      caches[b]->append(s.K.middleRows(i0, m), s.V.middleRows(i0, m));
      if (in_window(*caches[b])) rotate_into_window(s, b, first_row[b], *caches[b]);
    }
    detail::parallel_slices(B * H, threads, 1, [&](std::size_t begin, std::size_t end, std::size_t slot) {
      T* scores = s.S.data() + slot * region;
      T* tile = s.tile.data() + slot * kTile * config_.d_k();
      for (std::size_t u = begin; u < end;) {
        const std::size_t b = u / H, h_begin = u % H, h_end = std::min(H, h_begin + (end - u));
        const KVCache<T>& cache = *caches[b];
        const T* Q_window = in_window(cache) ? s.Q_in_window.data() + b * d : nullptr;
        attend_heads(cache, first_row[b], first_row[b + 1] - first_row[b], Q_window, s, h_begin, h_end, scores, tile);
        u += h_end - h_begin;
      }
    });
  }

  // The rare case (rows that fill a window): each sequence as forward()
  // takes it, chunk by chunk, its heads split across threads.
  void append_and_attend_each(const std::vector<std::size_t>& first_row, const std::vector<KVCache<T>*>& caches,
                              AttentionScratch<T>& s, std::size_t threads) const {
    for (std::size_t b = 0; b < caches.size(); ++b) {
      KVCache<T>& cache = *caches[b];
      const std::size_t m = first_row[b + 1] - first_row[b];
      const bool rebase = sinks_rebased(cache, cache.position() + m);
      for (std::size_t first = 0; first < m;) {
        const std::size_t rows = rows_without_eviction(cache, m - first), i0 = first_row[b] + first;
        const auto at = static_cast<Eigen::Index>(i0), r = static_cast<Eigen::Index>(rows);
        cache.append(s.K.middleRows(at, r), s.V.middleRows(at, r));
        const T* Q_window = rebase && cache.evicted() != 0 ? rotate_into_window(s, b, i0, cache) : nullptr;
        attend(cache, i0, rows, Q_window, s, threads);
        first += rows;
      }
    }
  }

  // forward_batch's checks, before anything changes.
  void check_batch(Eigen::Index rows, Eigen::Index cols, const std::vector<std::size_t>& first_row,
                   const std::vector<KVCache<T>*>& caches) const {
    const std::size_t B = caches.size();
    if (B == 0) throw std::invalid_argument("kvcache: forward_batch: no sequences (no caches)");
    if (first_row.size() != B + 1)
      throw std::invalid_argument("kvcache: forward_batch: first_row has " + std::to_string(first_row.size()) +
                                  " entries, expected caches + 1 = " + std::to_string(B + 1));
    if (first_row.front() != 0 || first_row.back() != static_cast<std::size_t>(rows))
      throw std::invalid_argument("kvcache: forward_batch: first_row runs from " + std::to_string(first_row.front()) +
                                  " to " + std::to_string(first_row.back()) + ", expected 0 to the rows of x = " +
                                  std::to_string(rows));
    for (std::size_t b = 0; b < B; ++b) {
      if (first_row[b + 1] <= first_row[b])
        throw std::invalid_argument("kvcache: forward_batch: sequence " + std::to_string(b) +
                                    " has no rows (first_row[" + std::to_string(b) + "] = " +
                                    std::to_string(first_row[b]) + ", first_row[" + std::to_string(b + 1) +
                                    "] = " + std::to_string(first_row[b + 1]) + ")");
      if (caches[b] == nullptr)
        throw std::invalid_argument("kvcache: forward_batch: caches[" + std::to_string(b) + "] is null");
      for (std::size_t c = 0; c < b; ++c)
        if (caches[c] == caches[b])
          throw std::invalid_argument("kvcache: forward_batch: caches[" + std::to_string(c) + "] and caches[" +
                                      std::to_string(b) + "] are the same cache");
      // The sequence is named only on error: a batch step builds no strings.
      const auto at = [b] { return " (sequence " + std::to_string(b) + ")"; };
      try {
        check_input(static_cast<Eigen::Index>(first_row[b + 1] - first_row[b]), cols, *caches[b]);
      } catch (const std::length_error& e) {
        throw std::length_error(e.what() + at());
      } catch (const std::invalid_argument& e) {
        throw std::invalid_argument(e.what() + at());
      }
    }
  }

  // n: the most tokens the cache holds during this call.
  void resize_scratch(AttentionScratch<T>& s, Matrix<T>& out, std::size_t m, std::size_t n, std::size_t threads,
                      bool rebase_sinks) const {
    const auto rows = static_cast<Eigen::Index>(m);
    const auto d = static_cast<Eigen::Index>(config_.d_model);
    detail::resize_buffer(s.Q, rows, d);
    detail::resize_buffer(s.K, rows, static_cast<Eigen::Index>(config_.kv_dim()));
    detail::resize_buffer(s.V, rows, static_cast<Eigen::Index>(config_.kv_dim()));
    detail::resize_buffer(s.O, rows, d);
    if (rebase_sinks) {
      detail::resize_buffer(s.Q_unrotated, rows, d);
      detail::resize_buffer(s.Q_in_window, 1, d);
    }
    // Grown, never shrunk, so that a decode step, whose n grows by one,
    // reallocates only when the size doubles. A thread's scores hold the
    // rows of one head, or, in a decode step, one row per head of a group.
    const std::size_t score_rows = std::max(m, config_.group_size());
    const auto needed = static_cast<Eigen::Index>(threads * score_rows * scores_stride(n));
    if (s.S.size() < needed) detail::resize_buffer(s.S, std::max(needed, 2 * s.S.size()), 1);
    detail::resize_buffer(s.tile, static_cast<Eigen::Index>(threads * kTile * config_.d_k()), 1);
    detail::resize_buffer(out, rows, d);
  }

  static std::size_t scores_stride(std::size_t n) { return (n + 15) / 16 * 16; }

  // Rows of a compact cache converted to T at a time: 64 × d_k fits in L1.
  static constexpr std::size_t kTile = 64;

  // Q, K and V read the same x: one parallel region computes all three, its
  // threads splitting the d_model + 2·kv_dim output features between them.
  template <typename Derived>
  void project(const Eigen::MatrixBase<Derived>& x, AttentionScratch<T>& s, std::size_t threads) const {
    const std::array<detail::LinearTerm<T>, 3> qkv{{{weights_.W_Q, weights_.b_Q, s.Q},
                                                    {weights_.W_K, weights_.b_K, s.K},
                                                    {weights_.W_V, weights_.b_V, s.V}}};
    detail::linear<T>(x, qkv, threads);
  }

  using ConstStridedMap = Eigen::Map<const Matrix<T>, 0, Eigen::OuterStride<>>;
  using StridedMap = Eigen::Map<Matrix<T>, 0, Eigen::OuterStride<>>;

  // O_h = softmax(Q_h·K_gᵀ/√d_k, causal)·V_g for the query rows [first,
  // first + rows) of every query head, whose keys and values were just
  // appended: row i sees the cache's slots [0, n − rows + i]. Split across
  // threads by query head; each thread has its own scores and tile.
  // Q_window: the query rotated to its position in the window (1 × d_model),
  // or nullptr when the sinks need no re-rotation.
  void attend(const KVCache<T>& cache, std::size_t first, std::size_t rows, const T* Q_window,
              AttentionScratch<T>& s, std::size_t threads) const {
    const std::size_t G = config_.group_size();
    const std::size_t region = std::max(rows, G) * scores_stride(cache.size());
    detail::parallel_slices(config_.n_heads, threads, 1, [&](std::size_t h_begin, std::size_t h_end, std::size_t slot) {
      attend_heads(cache, first, rows, Q_window, s, h_begin, h_end, s.S.data() + slot * region,
                   s.tile.data() + slot * kTile * config_.d_k());
    });
  }

  // attend() for the query heads [h_begin, h_end) only, with one thread's
  // scores (max(rows, group size) × scores_stride(n)) and tile.
  //
  // A decode step (rows == 1) takes the heads that share a kv head together,
  // as a (heads × d_k) matrix, so each cached key and value is read once per
  // kv head, not once per query head.
  void attend_heads(const KVCache<T>& cache, std::size_t first, std::size_t rows, const T* Q_window,
                    AttentionScratch<T>& s, std::size_t h_begin, std::size_t h_end, T* scores, T* tile) const {
    const std::size_t d_k = config_.d_k(), G = config_.group_size(), n = cache.size();
    const auto ld_Q = static_cast<Eigen::Index>(config_.d_model);
    const T sqrt_d_k = std::sqrt(static_cast<T>(d_k));
    const auto ld = static_cast<Eigen::Index>(scores_stride(n));
    for (std::size_t h = h_begin; h < h_end;) {
      const std::size_t g = h / G;
      // Decode: the heads [h, h_end_g) of kv head g, one row each. Prefill: head h, `rows` rows.
      const std::size_t heads = rows == 1 ? std::min(h_end, (g + 1) * G) - h : 1;
      const auto q_rows = static_cast<Eigen::Index>(rows == 1 ? heads : rows);
      const auto q_stride = rows == 1 ? static_cast<Eigen::Index>(d_k) : ld_Q;
      const auto at = static_cast<Eigen::Index>(first) * ld_Q + static_cast<Eigen::Index>(h * d_k);
      const ConstStridedMap Q_h(s.Q.data() + at, q_rows, static_cast<Eigen::Index>(d_k), Eigen::OuterStride<>(q_stride));
      StridedMap O_h(s.O.data() + at, q_rows, static_cast<Eigen::Index>(d_k), Eigen::OuterStride<>(q_stride));
      StridedMap S(scores, q_rows, static_cast<Eigen::Index>(n), Eigen::OuterStride<>(ld));

      // Divided after the product, as the formula reads: a scaled Q_h
      // would make Eigen copy it into a temporary on every decode step.
      key_products(Q_h, cache, g, 0, n, S, tile);
      if (Q_window != nullptr) {
        // The sinks sit at the start of the window: their scores use the
        // query rotated to its position in the window, not in the sequence.
        const ConstStridedMap Q_w(Q_window + h * d_k, q_rows, static_cast<Eigen::Index>(d_k),
                                  Eigen::OuterStride<>(static_cast<Eigen::Index>(d_k)));
        key_products(Q_w, cache, g, 0, cache.window().sinks, S, tile);
      }
      S /= sqrt_d_k;
      for (Eigen::Index i = 0; i < q_rows; ++i)
        detail::masked_softmax(S.row(i), static_cast<Eigen::Index>(n - rows) + (rows == 1 ? 0 : i) + 1);
      value_sums(S, cache, g, O_h, tile);
      h += heads;
    }
  }

  // S[:, j] = Q_h · k_j for the cache slots j in [begin, end) of kv head g.
  void key_products(const ConstStridedMap& Q_h, const KVCache<T>& cache, std::size_t g, std::size_t begin,
                    std::size_t end, StridedMap& S, T* tile) const {
    const auto d_k = static_cast<Eigen::Index>(config_.d_k());
    if (cache.type() == KVType::full) {
      const auto b = static_cast<Eigen::Index>(begin), count = static_cast<Eigen::Index>(end - begin);
      S.middleCols(b, count).noalias() = Q_h * cache.keys(g).middleRows(b, count).transpose();
      return;
    }
    for (std::size_t j = begin; j < end; j += kTile) {
      const std::size_t count = std::min(kTile, end - j);
      cache.load_keys(g, j, count, tile);
      const Eigen::Map<const Matrix<T>> K_tile(tile, static_cast<Eigen::Index>(count), d_k);
      S.middleCols(static_cast<Eigen::Index>(j), static_cast<Eigen::Index>(count)).noalias() = Q_h * K_tile.transpose();
    }
  }

  // O_h = P · V_g over all cached slots of kv head g (P: probabilities).
  void value_sums(const StridedMap& P, const KVCache<T>& cache, std::size_t g, StridedMap& O_h, T* tile) const {
    const auto d_k = static_cast<Eigen::Index>(config_.d_k());
    if (cache.type() == KVType::full) {
      O_h.noalias() = P * cache.values(g);
      return;
    }
    O_h.setZero();
    for (std::size_t j = 0; j < cache.size(); j += kTile) {
      const std::size_t count = std::min(kTile, cache.size() - j);
      cache.load_values(g, j, count, tile);
      const Eigen::Map<const Matrix<T>> V_tile(tile, static_cast<Eigen::Index>(count), d_k);
      O_h.noalias() += P.middleCols(static_cast<Eigen::Index>(j), static_cast<Eigen::Index>(count)) * V_tile;
    }
  }

  AttentionConfig config_;
  AttentionWeights<T> weights_;
  std::optional<detail::Rope<T>> rope_;
  std::optional<KVCache<T>> own_cache_;  // only for the seed API
};

}  // namespace kvcache
