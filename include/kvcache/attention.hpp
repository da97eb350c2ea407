// kvcache/attention.hpp — causal attention over cached keys and values.
//
// For m new tokens x (m × d_model) of one sequence, at positions [p, p+m):
//   Q = x·W_Qᵀ, K = x·W_Kᵀ, V = x·W_Vᵀ        (RoPE on Q and K at their positions)
//   place K, V in the cache's slots           (it now holds n tokens)
//   for each query head h, on kv head g = h / (n_heads / n_kv_heads):
//     S = Q_h·K_gᵀ / √d_k                      (m × n)
//     row i may see keys [0, n − m + i]        (the causal mask, behind the cached prefix)
//     O_h = softmax(S)·V_g                     (m × d_k)
//   out = O·W_Oᵀ                               (m × d_model)
//
// attend() does this for a batch of sequences at once: their rows stacked in
// one x, so each weight is one product for the whole batch; RoPE, the slots
// and the scores are per sequence. Each sequence's SlotTable has already
// planned where its tokens go (slots.hpp), once for every layer.
// MultiHeadAttentionWithCache, at the bottom, is the seed articles' layer: the
// same function over a KVCache of the caller's, or one of its own.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "detail/ggml_math.hpp"
#include "detail/io.hpp"
#include "detail/parallel.hpp"
#include "detail/resize.hpp"
#include "detail/rope.hpp"
#include "kv_cache.hpp"
#include "weights.hpp"

namespace kvcache {

// One sequence of a batch, as one layer's attention sees it: the caller
// sets m, rows and table; Attention::prepare the rest. Sequences are
// stacked in x in batch order.
template <typename T>
struct AttentionSequence {
  std::size_t first_row = 0;  // its rows of the stacked x: [first_row, first_row + m)
  std::size_t m = 0;
  // The caller's tokens [0, token0) were found in a KVPool's published
  // blocks (prefix sharing) and mapped, not computed: the m rows are the rest.
  std::size_t token0 = 0;
  KVRows<T>* rows = nullptr;   // this layer's keys and values of the sequence
  SlotTable* table = nullptr;  // where its tokens live
  std::vector<SlotRun> runs;   // where its new tokens go (SlotTable::plan)
  // Where the table stands before the call (position: that of the first new
  // token) and where the call takes it.
  SlotTable::State checkpoint, end;
  // Whether its slots were written yet: a failed call that wrote none of
  // them is undone exactly.
  bool written = false;
};

// Buffers attention works in, sized for the rows of a call and reused across
// calls, layers and sessions: once grown to a step's size, decoding
// allocates nothing.
template <typename T = float>
struct AttentionScratch {
  Matrix<T> Q, K, V;  // rows × d_model, rows × kv_dim, rows × kv_dim
  Matrix<T> O;        // rows × d_model: the heads' outputs side by side, before W_O
  // Per thread, rows × n scores then probabilities (n = cache length), rows
  // padded to a multiple of 16 values. The padding makes every row start on
  // the same alignment whatever the buffer's history, so the vectorised sums
  // of the softmax add in the same order: a reused session gives bit for bit
  // what a fresh one gives.
  Vector<T> S;
  // Per thread, kTile × d_k keys or values of a compact cache converted to
  // T, then (Numerics::ggml) kValueLaneRows × d_k lanes of P · V's sums.
  Vector<T> tile;
  // Re-based sinks only: Q before RoPE (rows × d_model), a re-based run's row
  // then rotated to its place in the window.
  Matrix<T> Q_unrotated;
  // What the plan needs: one thread's scores (enough rows and columns for
  // the largest run), and whether any run re-bases its sinks.
  std::size_t region = 0;
  bool rebased = false;
  // The sequences that have a run in the current round.
  std::vector<std::size_t> active;
  // The batch, one entry per sequence (its entries keep their runs'
  // memory from call to call).
  std::vector<AttentionSequence<T>> seqs;
};

namespace detail {

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

// Rows of a compact cache converted to T at a time: 64 × d_k fits in L1.
constexpr std::size_t kTile = 64;

inline std::size_t scores_stride(std::size_t n) { return (n + 15) / 16 * 16; }

// One thread's tile: kTile rows of keys or values, then ggml's lanes.
inline std::size_t tile_size(const AttentionConfig& c) {
  return (kTile + (c.numerics == Numerics::ggml ? kValueLaneRows : 0)) * c.d_k();
}

// One layer's attention over a batch; see the top of the file.
template <typename T>
class Attention {
 public:
  Attention(const AttentionConfig& c, const AttentionWeights<T>& w, const Rope<T>* rope, AttentionScratch<T>& s)
      : c_(c), w_(w), rope_(rope), s_(s) {}

  // Plans the batch in s.seqs (m and table set), changing no table, and
  // sizes every buffer of s for it: the only step that allocates, so that
  // nothing can throw once slots are written.
  static void prepare(const AttentionConfig& c, bool rope, AttentionScratch<T>& s, std::size_t threads) {
    std::size_t rows = 0;
    s.region = 0;
    s.rebased = false;
    for (AttentionSequence<T>& q : s.seqs) {
      q.first_row = rows;
      rows += q.m;
      q.checkpoint = q.table->state();
      q.written = false;
      q.runs.clear();
      q.end = q.table->plan(q.m, rope, [&](const SlotRun& run) {
        q.runs.push_back(run);
        s.region = std::max(s.region, std::max(q.m, c.group_size()) * scores_stride(run.n));
        s.rebased = s.rebased || run.rebased;
      });
    }
    const auto R = static_cast<Eigen::Index>(rows), d = static_cast<Eigen::Index>(c.d_model);
    for (Matrix<T>* M : {&s.Q, &s.O}) resize_buffer(*M, R, d);
    for (Matrix<T>* M : {&s.K, &s.V}) resize_buffer(*M, R, static_cast<Eigen::Index>(c.kv_dim()));
    if (s.rebased) resize_buffer(s.Q_unrotated, R, d);
    // Grown, never shrunk, so that a decode step, whose n grows by one,
    // reallocates only when the size doubles.
    const auto needed = static_cast<Eigen::Index>(threads * s.region);
    if (s.S.size() < needed) resize_buffer(s.S, std::max(needed, 2 * s.S.size()), 1);
    resize_buffer(s.tile, static_cast<Eigen::Index>(threads * tile_size(c)), 1);
    s.active.reserve(s.seqs.size());
  }

  // Commits the plan of every sequence of s and calls run(); if that throws,
  // puts every table back at its checkpoint (SlotTable::roll_back).
  template <typename F>
  static void commit_then(AttentionScratch<T>& s, F&& run) {
    for (const AttentionSequence<T>& q : s.seqs) q.table->commit(q.end);
    try {
      run();
    } catch (...) {
      for (const AttentionSequence<T>& q : s.seqs) q.table->roll_back(q.checkpoint, !q.written);
      throw;
    }
  }

  // out = attention(x) (rows × d_model) for the batch prepare() planned,
  // placing every sequence's keys and values.
  template <typename Derived>
  void run(const Eigen::MatrixBase<Derived>& x, Matrix<T>& out, std::size_t threads) {
    std::vector<AttentionSequence<T>>& seqs = s_.seqs;
    // Q, K and V read the same x: one parallel region computes all three, its
    // threads splitting the d_model + 2·kv_dim output features between them.
    linear<T>(x, {{w_.W_Q, w_.b_Q, s_.Q}, {w_.W_K, w_.b_K, s_.K}, {w_.W_V, w_.b_V, s_.V}}, threads);
    if (s_.rebased) s_.Q_unrotated = s_.Q;
    if (rope_ != nullptr)
      for (const auto& q : seqs)
        for (Matrix<T>* M : {&s_.Q, &s_.K}) {
          auto M_b = M->middleRows(static_cast<Eigen::Index>(q.first_row), static_cast<Eigen::Index>(q.m));
          rope_->apply(M_b, q.checkpoint.position);
        }
    // Round k takes the k-th run of every sequence: runs of one sequence
    // must follow each other (a later one may overwrite slots an earlier one
    // reads); runs of different sequences are independent.
    for (std::size_t k = 0;; ++k) {
      s_.active.clear();
      for (std::size_t b = 0; b < seqs.size(); ++b)
        if (k < seqs[b].runs.size()) {
          s_.active.push_back(b);
          place(seqs[b], seqs[b].runs[k]);
        }
      if (s_.active.empty()) break;
      attend_round(k, threads);
    }
    linear<T>(s_.O, {{w_.W_O, w_.b_O, out}}, threads);
  }

 private:
  // Writes the run's keys and values into its slots; a re-based run's query
  // is rotated to its place in the window (its row of Q_unrotated).
  void place(AttentionSequence<T>& q, const SlotRun& run) {
    q.written = true;
    for (std::size_t i = 0; i < run.rows; ++i) {
      const auto r = static_cast<Eigen::Index>(q.first_row + run.first + i);
      q.rows->write(run.slot + i, s_.K.row(r).data(), s_.V.row(r).data());
    }
    if (run.rebased) {
      auto Q_w = s_.Q_unrotated.row(static_cast<Eigen::Index>(q.first_row + run.first));
      rope_->apply(Q_w, run.n - 1);
    }
  }

  // The k-th run of every active sequence, split across threads by
  // (sequence, query head): unit u is head u % H of active sequence u / H.
  void attend_round(std::size_t k, std::size_t threads) {
    const std::size_t H = c_.n_heads;
    parallel_slices(s_.active.size() * H, threads, 1, [&](std::size_t begin, std::size_t end, std::size_t slot) {
      T* scores = s_.S.data() + slot * s_.region;
      T* tile = s_.tile.data() + slot * tile_size(c_);
      for (std::size_t u = begin; u < end;) {
        const std::size_t b = s_.active[u / H], h_begin = u % H, h_end = std::min(H, h_begin + (end - u));
        attend_heads(s_.seqs[b], s_.seqs[b].runs[k], h_begin, h_end, scores, tile);
        u += h_end - h_begin;
      }
    });
  }

  using ConstStridedMap = Eigen::Map<const Matrix<T>, 0, Eigen::OuterStride<>>;
  using StridedMap = Eigen::Map<Matrix<T>, 0, Eigen::OuterStride<>>;

  // O_h = softmax(Q_h·K_gᵀ/√d_k, causal)·V_g for the run's rows and the
  // query heads [h_begin, h_end), with one thread's scores (max(rows, group
  // size) × scores_stride(n)) and tile.
  //
  // A decode step (one row) takes the heads that share a kv head together,
  // as a (heads × d_k) matrix, so each cached key and value is read once per
  // kv head, not once per query head.
  void attend_heads(const AttentionSequence<T>& q, const SlotRun& run, std::size_t h_begin, std::size_t h_end,
                    T* scores, T* tile) const {
    const std::size_t d_k = c_.d_k(), G = c_.group_size(), n = run.n, rows = run.rows;
    const auto ld_Q = static_cast<Eigen::Index>(c_.d_model);
    const T sqrt_d_k = std::sqrt(static_cast<T>(d_k));
    const auto ld = static_cast<Eigen::Index>(scores_stride(n));
    for (std::size_t h = h_begin; h < h_end;) {
      const std::size_t g = h / G;
      // Decode: the heads [h, h_end_g) of kv head g, one row each. Prefill: head h, `rows` rows.
      const std::size_t heads = rows == 1 ? std::min(h_end, (g + 1) * G) - h : 1;
      const auto q_rows = static_cast<Eigen::Index>(rows == 1 ? heads : rows);
      const auto q_stride = rows == 1 ? static_cast<Eigen::Index>(d_k) : ld_Q;
      const auto at = static_cast<Eigen::Index>(q.first_row + run.first) * ld_Q + static_cast<Eigen::Index>(h * d_k);
      const ConstStridedMap Q_h(s_.Q.data() + at, q_rows, static_cast<Eigen::Index>(d_k), Eigen::OuterStride<>(q_stride));
      StridedMap O_h(s_.O.data() + at, q_rows, static_cast<Eigen::Index>(d_k), Eigen::OuterStride<>(q_stride));
      StridedMap S(scores, q_rows, static_cast<Eigen::Index>(n), Eigen::OuterStride<>(ld));

      // Divided after the product, as the formula reads: a scaled Q_h
      // would make Eigen copy it into a temporary on every decode step.
      // Row i sees the slots [0, first_masked + i) (all of them in decode).
      const std::size_t first_masked = rows == 1 ? SIZE_MAX : n - rows + 1;
      key_products(Q_h, *q.rows, g, 0, n, S, tile, first_masked);
      if (run.rebased) {
        // The sinks sit at the start of the window: their scores use the
        // query rotated to its place in the window, not in the sequence.
        const ConstStridedMap Q_w(s_.Q_unrotated.data() + at, q_rows, static_cast<Eigen::Index>(d_k),
                                  Eigen::OuterStride<>(q_stride));
        key_products(Q_w, *q.rows, g, 0, q.table->window().sinks, S, tile, first_masked);
      }
      const auto n_valid = [&](Eigen::Index i) { return static_cast<Eigen::Index>(n - rows) + (rows == 1 ? 0 : i) + 1; };
      if constexpr (std::is_same_v<T, float>)
        if (ggml()) {
          for (Eigen::Index i = 0; i < q_rows; ++i)
            softmax_like_ggml(&S(i, 0), static_cast<std::size_t>(n_valid(i)), n, 1.0f / sqrt_d_k);
          // ggml's P · V: ggml_vec_dot_f32's lanes for one token, tinyBLAS's for more.
          value_sums_like_ggml(S, *q.rows, g, n, O_h, tile, rows == 1 ? 64 : 16, first_masked);
          h += heads;
          continue;
        }
      S /= sqrt_d_k;
      for (Eigen::Index i = 0; i < q_rows; ++i) masked_softmax(S.row(i), n_valid(i));
      value_sums(S, *q.rows, g, n, O_h, tile);
      h += heads;
    }
  }

  // S[:, j] = Q_h · k_j for the slots j in [begin, end) of kv head g. The
  // slots are read where they are, a run of contiguous slots at a time (all
  // of them in one product for a contiguous f32 cache; a block of a paged
  // one); compact types a tile of at most kTile slots at a time. One query
  // row (decode without grouped heads) takes a dot product per slot: setting
  // up Eigen's gemv for each 16-slot block of a paged cache took 13% of a
  // batch-8 decode step (perf, stories15M shape); value_sums likewise.
  // Numerics::ggml: one product per row and slot, none for the masked ones
  // (row r's slots from first_masked + r on; softmax sets them to 0).
  void key_products(const ConstStridedMap& Q_h, const KVRows<T>& kv, std::size_t g, std::size_t begin,
                    std::size_t end, StridedMap& S, T* tile, std::size_t first_masked) const {
    const auto d_k = static_cast<Eigen::Index>(c_.d_k());
    for_each_run(kv, KVRows<T>::kKeys, g, begin, end, tile, [&](std::size_t j, std::size_t count, const T* K) {
      const Eigen::Map<const Matrix<T>> K_run(K, static_cast<Eigen::Index>(count), d_k);
      auto S_run = S.middleCols(static_cast<Eigen::Index>(j), static_cast<Eigen::Index>(count));
      if constexpr (std::is_same_v<T, float>)
        if (ggml()) {
          for (Eigen::Index r = 0; r < Q_h.rows(); ++r) {
            const std::size_t valid = first_masked == SIZE_MAX ? SIZE_MAX : first_masked + static_cast<std::size_t>(r);
            const auto c_end = static_cast<Eigen::Index>(valid <= j ? 0 : std::min(count, valid - j));
            for (Eigen::Index c = 0; c < c_end; ++c)
              S_run(r, c) = dot_like_ggml(K_run.row(c).data(), Q_h.row(r).data(), static_cast<std::size_t>(d_k));
          }
          return;
        }
      if (Q_h.rows() == 1)
        for (Eigen::Index c = 0; c < K_run.rows(); ++c) S_run(0, c) = Q_h.row(0).dot(K_run.row(c));
      else
        S_run.noalias() = Q_h * K_run.transpose();
    });
  }

  // O_h = P · V_g over the first n slots of kv head g (P: probabilities),
  // read as key_products reads keys.
  void value_sums(const StridedMap& P, const KVRows<T>& kv, std::size_t g, std::size_t n, StridedMap& O_h,
                  T* tile) const {
    const auto d_k = static_cast<Eigen::Index>(c_.d_k());
    for_each_run(kv, KVRows<T>::kValues, g, 0, n, tile, [&](std::size_t j, std::size_t count, const T* V) {
      const Eigen::Map<const Matrix<T>> V_run(V, static_cast<Eigen::Index>(count), d_k);
      const auto P_run = P.middleCols(static_cast<Eigen::Index>(j), static_cast<Eigen::Index>(count));
      if (P.rows() == 1) {
        if (j == 0) O_h.setZero();
        for (Eigen::Index c = 0; c < V_run.rows(); ++c) O_h.row(0) += P_run(0, c) * V_run.row(c);
      } else if (j == 0) {
        O_h.noalias() = P_run * V_run;
      } else {
        O_h.noalias() += P_run * V_run;
      }
    });
  }

  // O_h = P · V_g as ggml sums it (ValueLanes, L lanes), up to
  // rows_at_once() rows of P at a time, each reading the slots as
  // value_sums does. Masked slots (P = 0) are skipped: ggml's
  // fma(0, v, acc) leaves acc as it is.
  void value_sums_like_ggml(const StridedMap& P, const KVRows<T>& kv, std::size_t g, std::size_t n, StridedMap& O_h,
                            T* tile, std::size_t L, std::size_t first_masked) const {
    const std::size_t d_k = c_.d_k();
    ValueLanes lanes(tile + kTile * d_k, L, d_k);
    for (Eigen::Index r0 = 0; r0 < P.rows(); r0 += static_cast<Eigen::Index>(lanes.rows_at_once())) {
      const Eigen::Index r1 = std::min(P.rows(), r0 + static_cast<Eigen::Index>(lanes.rows_at_once()));
      lanes.clear(static_cast<std::size_t>(r1 - r0));
      for_each_run(kv, KVRows<T>::kValues, g, 0, n, tile, [&](std::size_t j, std::size_t count, const T* V) {
        for (Eigen::Index r = r0; r < r1; ++r) {
          const std::size_t valid = first_masked == SIZE_MAX ? n : first_masked + static_cast<std::size_t>(r);
          for (std::size_t c = 0; c < count && j + c < valid; ++c)
            lanes.add(static_cast<std::size_t>(r - r0), j + c, P(r, static_cast<Eigen::Index>(j + c)), V + c * d_k);
        }
      });
      for (Eigen::Index r = r0; r < r1; ++r) lanes.fold_into(static_cast<std::size_t>(r - r0), &O_h(r, 0));
    }
  }

  // f(j, count, rows) for the slots [begin, end) of kv head g's keys or
  // values (`array`), a run of contiguous slots at a time, rows their count
  // × d_k values where they lie (f32) or converted into `tile` (compact
  // types, at most kTile slots at a time).
  template <typename F>
  static void for_each_run(const KVRows<T>& kv, std::size_t array, std::size_t g, std::size_t begin,
                           std::size_t end, T* tile, F&& f) {
    const bool f32 = kv.type() == StorageType::f32;
    for (std::size_t j = begin; j < end;) {
      std::size_t count = std::min(end - j, kv.contiguous(j));
      if (!f32) {
        count = std::min(count, kTile);
        kv.load(array, g, j, count, tile);
      }
      f(j, count, f32 ? reinterpret_cast<const T*>(kv.at(array, g, j)) : tile);
      j += count;
    }
  }

  bool ggml() const { return c_.numerics == Numerics::ggml; }

  const AttentionConfig c_;
  const AttentionWeights<T>& w_;
  const Rope<T>* rope_;
  AttentionScratch<T>& s_;
};

}  // namespace detail

// One attention layer with immutable weights, over a cache the caller passes
// (forward is const and touches only its arguments, so one layer serves many
// caches at once), or, for the seed articles' API, a cache of its own.
template <typename T = float>
class MultiHeadAttentionWithCache {
 public:
  using Scalar = T;

  MultiHeadAttentionWithCache(AttentionConfig config, AttentionWeights<T> weights)
      : config_(config), weights_(std::move(weights)) {
    config_.validate();
    check_weights(config_, weights_);
    if (config_.positions == PositionEncoding::rope) rope_ = detail::Rope<T>(config_.d_k(), config_.rope_base, config_.numerics);
  }

  const AttentionConfig& config() const { return config_; }
  const AttentionWeights<T>& weights() const { return weights_; }

  // An empty cache of this layer's shape, limited to max_seq_len tokens (or
  // holding a sliding window of them), storing keys and values as `type`.
  KVCache<T> make_cache(KVType type = KVType::f32, SlidingWindow window = {}) const {
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
    check_input(x.rows(), x.cols(), cache, [] { return std::string(); });
    const std::size_t first_row[] = {0, static_cast<std::size_t>(x.rows())};
    KVCache<T>* const caches[] = {&cache};
    run(x, 1, first_row, caches, out, scratch, threads);
  }

  // Several sequences at once. x stacks their new tokens: sequence b owns
  // the rows [first_row[b], first_row[b + 1]) of x (at least one) and the
  // cache caches[b], so first_row has one entry more than caches, starting
  // at 0 and ending at x.rows(). Each weight is applied once, as one
  // matrix-matrix product over all the rows; RoPE, the cache and attention
  // are per sequence, at its own positions. Row for row this is forward() on
  // each sequence alone, up to the rounding of a matrix-matrix product
  // against a matrix-vector one. Throws, leaving every cache unchanged, on a
  // malformed first_row, a null or repeated cache, or anything forward()
  // would reject for a sequence (naming it).
  template <typename Derived>
  void forward_batch(const Eigen::MatrixBase<Derived>& x, const std::vector<std::size_t>& first_row,
                     const std::vector<KVCache<T>*>& caches, Matrix<T>& out, AttentionScratch<T>& scratch,
                     std::size_t threads = 1) const {
    const std::size_t B = caches.size();
    if (B == 0) detail::io::invalid("forward_batch: no sequences (no caches)");
    if (first_row.size() != B + 1)
      detail::io::invalid("forward_batch: first_row has ", first_row.size(), " entries, expected caches + 1 = ", B + 1);
    if (first_row.front() != 0 || first_row.back() != static_cast<std::size_t>(x.rows()))
      detail::io::invalid("forward_batch: first_row runs from ", first_row.front(), " to ", first_row.back(),
                          ", expected 0 to the rows of x = ", x.rows());
    for (std::size_t b = 0; b < B; ++b) {
      const auto at = [&] { return " (sequence " + std::to_string(b) + ")"; };
      if (first_row[b + 1] <= first_row[b])
        detail::io::invalid("forward_batch: sequence ", b, " has no rows (first_row[", b, "] = ", first_row[b],
                            ", first_row[", b + 1, "] = ", first_row[b + 1], ")");
      detail::check_distinct(caches, b, "kvcache: forward_batch", "caches", "cache");
      check_input(static_cast<Eigen::Index>(first_row[b + 1] - first_row[b]), x.cols(), *caches[b], at);
    }
    run(x, B, first_row.data(), caches.data(), out, scratch, threads);
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
    if (use_cache && !own_cache_) own_cache_.emplace(make_cache());
    KVCache<T> fresh = make_cache();  // empty until used: use_cache = false
    return forward(x, use_cache ? *own_cache_ : fresh);
  }
  void reset_cache() {
    if (own_cache_) own_cache_->clear();
  }
  std::size_t cache_size() const { return own_cache_ ? own_cache_->size() : 0; }

 private:
  // Sequence b: rows [first_row[b], first_row[b + 1]) of x and *caches[b].
  // Everything that can throw (the limits, allocations) happens before the
  // first cache changes; a failure after that rolls every cache back.
  template <typename Derived>
  void run(const Eigen::MatrixBase<Derived>& x, std::size_t B, const std::size_t* first_row, KVCache<T>* const* caches,
           Matrix<T>& out, AttentionScratch<T>& s, std::size_t threads) const {
    threads = std::max<std::size_t>(threads, 1);
    s.seqs.resize(B);
    for (std::size_t b = 0; b < B; ++b) {
      AttentionSequence<T>& q = s.seqs[b];
      q.m = first_row[b + 1] - first_row[b];
      q.rows = &caches[b]->kv_rows();
      q.table = &caches[b]->slot_table();
      caches[b]->reserve_more(q.m);
    }
    detail::Attention<T>::prepare(config_, rope_.has_value(), s, threads);
    detail::resize_buffer(out, x.rows(), static_cast<Eigen::Index>(config_.d_model));
    detail::Attention<T>::commit_then(s, [&] {
      detail::Attention<T>(config_, weights_, rope_ ? &*rope_ : nullptr, s).run(x, out, threads);
    });
  }

  // Throws for an input of rows × cols to append to `cache`, with at()
  // appended to the message.
  template <typename At>
  void check_input(Eigen::Index rows, Eigen::Index cols, const KVCache<T>& cache, const At& at) const {
    if (rows == 0) detail::io::invalid("attention input has no rows (no tokens)", at());
    if (static_cast<std::size_t>(cols) != config_.d_model)
      detail::io::invalid("attention input is ", detail::shape(rows, cols), ", expected m x d_model = m x ",
                          config_.d_model, at());
    if (cache.n_kv_heads() != config_.n_kv_heads || cache.d_k() != config_.d_k())
      detail::io::invalid("cache holds ", cache.n_kv_heads(), " kv heads of ", cache.d_k(), ", the layer needs ",
                          config_.n_kv_heads, " of ", config_.d_k(), at());
    const std::size_t window = cache.window().window;
    if (window > config_.max_seq_len)
      detail::io::invalid("sliding window of ", window, " tokens is longer than max_seq_len = ", config_.max_seq_len,
                          at());
    const std::size_t end = cache.position() + static_cast<std::size_t>(rows);
    if (window == 0 && end > config_.max_seq_len)
      throw std::length_error(
          detail::io::text("kvcache: positions up to ", end, " pass max_seq_len = ", config_.max_seq_len, at()));
  }

  AttentionConfig config_;
  AttentionWeights<T> weights_;
  std::optional<detail::Rope<T>> rope_;
  std::optional<KVCache<T>> own_cache_;  // only for the seed API
};

}  // namespace kvcache
