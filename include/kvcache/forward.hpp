// kvcache/forward.hpp — the forward pass: a batch of (session, tokens) through
// the model, and the Workspace it computes in. A single session is a batch
// of one.
//
// In llama2.c's order, for the R rows of all sequences stacked (R × d_model):
//   x = E[token] (+ P[position] with learned positions)
//   for each layer:
//     x += attention(norm(x))           plan slots once per call (slots.hpp),
//                                       Q/K/V, RoPE, place K/V, attend, W_O
//     x += mlp(norm(x))
//   logits = norm(x)·W_headᵀ           every row, or each sequence's last
//
// Everything that can throw happens first: the inputs are checked, every
// session's tokens planned and its caches grown, and every buffer sized,
// before the first slot is written. What can still fail later (an
// allocation inside a large Eigen product) rolls each session back.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "attention.hpp"
#include "config.hpp"
#include "detail/parallel.hpp"
#include "detail/resize.hpp"
#include "detail/rope.hpp"
#include "session.hpp"
#include "slots.hpp"
#include "weights.hpp"

namespace kvcache {

namespace detail {
template <typename T>
class Forward;
}  // namespace detail

// Which positions a forward computes logits for. Generation needs only the
// last; the LM head costs vocab_size × d_model per row.
enum class Logits { all, last };

// The activation buffers of a forward pass, sized for the rows of a call and
// reused across calls and sessions: once grown to a step's size (the same
// number of sequences and rows), a step allocates nothing. Not part of any
// session; one per thread that runs forward passes.
template <typename T = float>
class Workspace {
 public:
  Workspace() = default;
  // The logits of the last forward that used this workspace.
  const Matrix<T>& logits() const { return logits_; }

 private:
  template <typename>
  friend class detail::Forward;

  Matrix<T> x_;          // residual stream, R × d_model
  Matrix<T> normed_;     // norm(x), R × d_model
  Matrix<T> delta_;      // a sublayer's output, R × d_model
  Matrix<T> hidden_;     // MLP, R × d_ff
  Matrix<T> gate_;       // SwiGLU's W_3 x, R × d_ff
  Matrix<T> last_rows_;  // each sequence's last row of x, B × d_model
  Matrix<T> head_in_;    // final norm of the rows that get logits
  Matrix<T> logits_;     // those rows × vocab_size
  AttentionScratch<T> attention_;  // and the batch's plan
  std::vector<const std::vector<int>*> token_lists_;
  std::vector<Session<T>*> sessions_;
};

namespace detail {

// What a forward reads: a model's configuration and immutable weights (a
// Decoder's, which adds the entry points).
template <typename T>
struct Model {
  ModelConfig config;
  WeightType weight_type = WeightType::f32;
  WeightMatrix<T> token_embedding;  // vocab_size × d_model
  Matrix<T> position_embedding;     // max_seq_len × d_model (learned positions only)
  std::vector<BlockWeights<T>> blocks;
  NormWeights<T> final_norm;
  WeightMatrix<T> lm_head;  // empty when tied to token_embedding
  std::optional<detail::Rope<T>> rope;
  std::shared_ptr<const detail::ModelTag> tag = std::make_shared<detail::ModelTag>();

  const WeightMatrix<T>& head() const { return config.tied_lm_head ? token_embedding : lm_head; }
};

template <typename T>
class Forward {
 public:
  Forward(const Model<T>& model, Workspace<T>& w) : m_(model), c_(model.config), w_(w) {}

  // One session: a batch of one.
  const Matrix<T>& run(const std::vector<int>& tokens, Session<T>& session, Logits which, std::size_t threads) {
    w_.token_lists_.assign(1, &tokens);
    w_.sessions_.assign(1, &session);
    return run(w_.token_lists_, w_.sessions_, which, threads, false);
  }

  const Matrix<T>& run(const std::vector<std::vector<int>>& tokens, const std::vector<Session<T>*>& sessions,
                       Logits which, std::size_t threads) {
    w_.token_lists_.resize(tokens.size());
    for (std::size_t b = 0; b < tokens.size(); ++b) w_.token_lists_[b] = &tokens[b];
    return run(w_.token_lists_, sessions, which, threads, true);
  }

  // Throws what a forward of `tokens` through model m would throw for its
  // inputs, with `at` appended to the message.
  static void check_input(const Model<T>& m, const std::vector<int>& tokens, const Session<T>& s,
                          const std::string& at) {
    const auto suffix = [&] { return at; };
    check_session(m, s, suffix);
    check_tokens(m.config, tokens, s, suffix);
  }

 private:
  // Feeds *tokens[b] to *sessions[b] for every b; returns the logits (all
  // rows stacked, or one row per sequence). Throws as Decoder::forward_batch.
  const Matrix<T>& run(const std::vector<const std::vector<int>*>& tokens, const std::vector<Session<T>*>& sessions,
                       Logits which, std::size_t threads, bool batch) {
    check(tokens, sessions, threads, batch);
    const std::size_t B = sessions.size();
    plan(tokens, sessions, threads, which);
    commit_batch(w_.attention_);
    try {
      embed(tokens);
      for (std::size_t l = 0; l < m_.blocks.size(); ++l) {
        for (std::size_t b = 0; b < B; ++b) seqs()[b].rows = &sessions[b]->layers_[l];
        block(m_.blocks[l], threads);
      }
      head(which, threads);
    } catch (...) {
      roll_back_batch(w_.attention_);
      throw;
    }
    return w_.logits_;
  }

  // ---- Inputs, checked once ------------------------------------------------

  void check(const std::vector<const std::vector<int>*>& tokens, const std::vector<Session<T>*>& sessions,
             std::size_t threads, bool batch) const {
    if (sessions.empty()) throw std::invalid_argument("kvcache: Decoder::forward_batch: no sessions");
    if (tokens.size() != sessions.size())
      throw std::invalid_argument("kvcache: Decoder::forward_batch: " + std::to_string(tokens.size()) +
                                  " token lists for " + std::to_string(sessions.size()) + " sessions");
    if (threads == 0) throw std::invalid_argument("kvcache: Decoder::forward_batch: threads = 0, need at least 1");
    for (std::size_t b = 0; b < sessions.size(); ++b) {
      // The sequence is named only in a batch, and only on error.
      const auto at = [&] { return batch ? " (sequence " + std::to_string(b) + ")" : std::string(); };
      check_distinct(sessions, b, "kvcache: Decoder::forward_batch", "sessions", "session");
      check_session(m_, *sessions[b], at);
      check_tokens(c_, *tokens[b], *sessions[b], at);
    }
  }

  template <typename At>
  static void check_session(const Model<T>& m, const Session<T>& s, const At& at) {
    if (s.model_ == nullptr)
      throw std::invalid_argument("kvcache: Decoder::forward: the session was moved from; it holds no caches" + at());
    if (s.model_ != m.tag)
      throw std::invalid_argument("kvcache: Decoder::forward: the session was made by another decoder; a session "
                                  "is used only with the decoder that made it (or a copy of it)" + at());
  }

  template <typename At>
  static void check_tokens(const ModelConfig& c, const std::vector<int>& tokens, const Session<T>& s, const At& at) {
    if (tokens.empty()) throw std::invalid_argument("kvcache: Decoder::forward: no tokens" + at());
    for (std::size_t i = 0; i < tokens.size(); ++i)
      if (tokens[i] < 0 || static_cast<std::size_t>(tokens[i]) >= c.vocab_size)
        throw std::out_of_range("kvcache: token id " + std::to_string(tokens[i]) + " at index " + std::to_string(i) +
                                " is outside [0, vocab_size = " + std::to_string(c.vocab_size) + ")" + at());
    // Against the session's limit, and, whatever the session says, against
    // the model's positions: learned positions have max_seq_len rows.
    std::size_t limit = s.position_limit();
    if (c.positions == PositionEncoding::learned) limit = std::min(limit, c.max_seq_len);
    if (s.position() > limit || tokens.size() > limit - s.position())
      throw std::length_error("kvcache: sequence of " + std::to_string(s.position() + tokens.size()) + " tokens (" +
                              std::to_string(s.position()) + " cached + " + std::to_string(tokens.size()) +
                              " new) exceeds the limit of " + std::to_string(std::min(s.max_tokens(), limit)) +
                              " (max_seq_len = " + std::to_string(c.max_seq_len) + ")" + at());
  }

  // ---- Everything that allocates ---------------------------------------------

  // Plans every sequence's slots, grows its caches and sizes every buffer.
  void plan(const std::vector<const std::vector<int>*>& tokens, const std::vector<Session<T>*>& sessions,
            std::size_t threads, Logits which) {
    const std::size_t B = sessions.size();
    AttentionScratch<T>& a = w_.attention_;
    a.seqs.resize(B);
    a.tables.resize(B);
    std::size_t R = 0;
    for (std::size_t b = 0; b < B; ++b) {
      a.seqs[b].first_row = R;
      a.seqs[b].m = tokens[b]->size();
      a.tables[b] = &sessions[b]->table_;
      R += tokens[b]->size();
    }
    plan_batch(a, m_.rope.has_value());
    for (std::size_t b = 0; b < B; ++b)
      for (auto& l : sessions[b]->layers_) l.grow(a.ends[b].size, sessions[b]->size(), sessions[b]->max_tokens());
    const auto rows = static_cast<Eigen::Index>(R), d = static_cast<Eigen::Index>(c_.d_model);
    const auto ff = static_cast<Eigen::Index>(c_.d_ff);
    resize_buffer(w_.x_, rows, d);
    resize_buffer(w_.normed_, rows, d);
    resize_buffer(w_.delta_, rows, d);
    resize_buffer(w_.hidden_, rows, ff);
    if (c_.mlp == MlpKind::swiglu) resize_buffer(w_.gate_, rows, ff);
    const Eigen::Index head_rows = which == Logits::last ? static_cast<Eigen::Index>(B) : rows;
    if (which == Logits::last) resize_buffer(w_.last_rows_, head_rows, d);
    resize_buffer(w_.head_in_, head_rows, d);
    resize_buffer(w_.logits_, head_rows, static_cast<Eigen::Index>(c_.vocab_size));
    Attention<T>::prepare(c_.attention(), a, a.seqs, threads);
  }

  // ---- The steps, in the order data flows -------------------------------------

  // x_i = E[token_i] (+ P[p + i] with learned positions).
  void embed(const std::vector<const std::vector<int>*>& tokens) {
    for (std::size_t b = 0; b < tokens.size(); ++b) {
      const AttentionSequence<T>& q = seqs()[b];
      for (std::size_t i = 0; i < q.m; ++i) {
        const auto row = static_cast<Eigen::Index>(q.first_row + i);
        m_.token_embedding.row_to((*tokens[b])[i], w_.x_.row(row).data());
        if (c_.positions == PositionEncoding::learned)
          w_.x_.row(row) += m_.position_embedding.row(static_cast<Eigen::Index>(q.position + i));
      }
    }
  }

  void block(const BlockWeights<T>& b, std::size_t threads) {
    normalize(w_.x_, b.attention_norm, w_.normed_);
    Attention<T>(c_.attention(), b.attention, m_.rope ? &*m_.rope : nullptr, w_.attention_)
        .run(w_.normed_, seqs(), w_.delta_, threads);
    w_.x_ += w_.delta_;
    normalize(w_.x_, b.mlp_norm, w_.normed_);
    mlp(b.mlp, threads);
    w_.x_ += w_.delta_;
  }

  // LayerNorm: (x − mean) / √(var + eps) · gamma + beta.
  // RMSNorm:   x / √(mean(x²) + eps) · gamma, in llama2.c's order of operations.
  template <typename Derived>
  void normalize(const Eigen::MatrixBase<Derived>& x, const NormWeights<T>& w, Matrix<T>& out) const {
    const T eps = static_cast<T>(c_.norm_eps);
    const T n = static_cast<T>(x.cols());
    for (Eigen::Index i = 0; i < x.rows(); ++i) {
      if (c_.norm == NormKind::rms_norm) {
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
  void mlp(const MlpWeights<T>& w, std::size_t threads) {
    const bool swiglu = c_.mlp == MlpKind::swiglu;
    const Vector<T> no_bias;
    const std::size_t widest = std::max(c_.d_ff, c_.d_model);
    parallel_team(team_size(threads, widest, 16), [&](const Team& team) {
      const auto [f0, f1] = team.slice(c_.d_ff, 16);
      const auto h0 = static_cast<Eigen::Index>(f0), hn = static_cast<Eigen::Index>(f1 - f0);
      linear_rows<T>(w_.normed_, w.W_1, w.b_1, w_.hidden_, h0, h0 + hn);
      auto a = w_.hidden_.middleCols(h0, hn).array();
      if (swiglu) {
        linear_rows<T>(w_.normed_, w.W_3, no_bias, w_.gate_, h0, h0 + hn);
        // silu(a) · g = a · σ(a) · g
        a = a * (T(1) / (T(1) + (-a).exp())) * w_.gate_.middleCols(h0, hn).array();
      } else {
        // GELU, tanh approximation (GPT-2): ½a(1 + tanh(√(2/π)(a + 0.044715a³)))
        const T k = static_cast<T>(0.7978845608028654);
        a = T(0.5) * a * (T(1) + (k * (a + T(0.044715) * a.cube())).tanh());
      }
      team.barrier();
      const auto [d0, d1] = team.slice(c_.d_model, 16);
      linear_rows<T>(w_.hidden_, w.W_2, w.b_2, w_.delta_, static_cast<Eigen::Index>(d0), static_cast<Eigen::Index>(d1));
    });
  }

  void head(Logits which, std::size_t threads) {
    if (which == Logits::all) {
      normalize(w_.x_, m_.final_norm, w_.head_in_);
    } else {
      // Each sequence's last row, gathered so that the final norm reads
      // contiguous rows.
      for (std::size_t b = 0; b < seqs().size(); ++b)
        w_.last_rows_.row(static_cast<Eigen::Index>(b)) =
            w_.x_.row(static_cast<Eigen::Index>(seqs()[b].first_row + seqs()[b].m - 1));
      normalize(w_.last_rows_, m_.final_norm, w_.head_in_);
    }
    linear<T>(w_.head_in_, m_.head(), Vector<T>(), w_.logits_, threads);
  }

  std::vector<AttentionSequence<T>>& seqs() { return w_.attention_.seqs; }

  const Model<T>& m_;
  const ModelConfig& c_;
  Workspace<T>& w_;
};

}  // namespace detail
}  // namespace kvcache
