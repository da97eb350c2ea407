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
#include <limits>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "attention.hpp"
#include "detail/io.hpp"
#include "detail/parallel.hpp"
#include "detail/resize.hpp"
#include "detail/ggml_math.hpp"
#include "session.hpp"

namespace kvcache {

// Which positions a forward computes logits for. Generation needs only the
// last; the LM head costs vocab_size × d_model per row.
enum class Logits { all, last };

// The activation buffers of a forward pass, sized for the rows of a call and
// reused across calls and sessions: once grown to a step's size (the same
// number of sequences and rows), a step allocates nothing. Not part of any
// session; one per thread that runs forward passes. Only detail::Forward
// writes them; `logits` holds what the last forward returned.
template <typename T = float>
struct Workspace {
  Matrix<T> x;       // residual stream, R × d_model
  Matrix<T> normed;  // norm(x), R × d_model; at the head, of the rows that get logits
  Matrix<T> delta;   // a sublayer's output, R × d_model; at the head, each sequence's last row of x
  Matrix<T> hidden;  // MLP, R × d_ff
  Matrix<T> gate;    // SwiGLU's W_3 x, R × d_ff
  Matrix<T> logits;  // the rows that get logits × vocab_size
  AttentionScratch<T> attention;  // and the batch's plan
};

namespace detail {

// What a forward reads: a model's configuration and immutable weights (a
// Decoder's, which adds the entry points).
template <typename T>
struct Model {
  ModelConfig config;
  DecoderWeights<T> w;  // every weight matrix stored in one WeightType
  std::optional<detail::Rope<T>> rope;
  std::shared_ptr<const detail::ModelTag> tag = std::make_shared<detail::ModelTag>();

  const WeightMatrix<T>& head() const { return config.tied_lm_head ? w.token_embedding : w.lm_head; }
};

template <typename T>
class Forward {
 public:
  Forward(const Model<T>& model, Workspace<T>& w) : m_(model), c_(model.config), w_(w) {}

  // One session: a batch of one.
  const Matrix<T>& run(const std::vector<int>& tokens, Session<T>& session, Logits which, std::size_t threads) {
    check_input(m_, tokens, session, [] { return std::string(); });
    Session<T>* const sessions[] = {&session};
    return run(&tokens, sessions, 1, which, threads);
  }

  // Throws as Decoder::forward_batch.
  const Matrix<T>& run(const std::vector<std::vector<int>>& tokens, const std::vector<Session<T>*>& sessions,
                       Logits which, std::size_t threads) {
    if (sessions.empty()) io::invalid("Decoder::forward_batch: no sessions");
    if (tokens.size() != sessions.size())
      io::invalid("Decoder::forward_batch: ", tokens.size(), " token lists for ", sessions.size(), " sessions");
    if (threads == 0) io::invalid("Decoder::forward_batch: threads = 0, need at least 1");
    for (std::size_t b = 0; b < sessions.size(); ++b) {
      check_distinct(sessions, b, "kvcache: Decoder::forward_batch", "sessions", "session");
      check_input(m_, tokens[b], *sessions[b], [&] { return " (sequence " + std::to_string(b) + ")"; });
    }
    return run(tokens.data(), sessions.data(), sessions.size(), which, threads);
  }

  // ---- Inputs, checked once ------------------------------------------------

  // Throws what a forward of `tokens` into s through model m would throw for
  // its inputs, with at() appended to the message (only on error: in a
  // batch, the sequence).
  template <typename At>
  static void check_input(const Model<T>& m, const std::vector<int>& tokens, const Session<T>& s, const At& at) {
    const ModelConfig& c = m.config;
    if (s.model_ != m.tag)
      throw std::invalid_argument(std::string("kvcache: Decoder::forward: the session ") +
                                  (s.model_ == nullptr ? "was moved from; it holds no caches"
                                                       : "was made by another decoder; a session is used only with "
                                                         "the decoder that made it (or a copy of it)") + at());
    if (tokens.empty()) io::invalid("Decoder::forward: no tokens", at());
    for (std::size_t i = 0; i < tokens.size(); ++i)
      if (tokens[i] < 0 || static_cast<std::size_t>(tokens[i]) >= c.vocab_size)
        throw std::out_of_range(io::text("kvcache: token id ", tokens[i], " at index ", i,
                                         " is outside [0, vocab_size = ", c.vocab_size, ")", at()));
    // Against the session's limit, and, whatever the session says, against
    // the model's positions: learned positions have max_seq_len rows.
    std::size_t limit = s.position_limit();
    if (c.positions == PositionEncoding::learned) limit = std::min(limit, c.max_seq_len);
    if (s.position() > limit || tokens.size() > limit - s.position())
      throw std::length_error(io::text("kvcache: sequence of ", s.position() + tokens.size(), " tokens (",
                                       s.position(), " cached + ", tokens.size(), " new) exceeds the limit of ",
                                       std::min(s.max_tokens(), limit), " (max_seq_len = ", c.max_seq_len, ")", at()));
  }

 private:
  // Feeds tokens[b] to *sessions[b] for every b < B; returns the logits (all
  // rows stacked, or one row per sequence).
  // A failure gives back the blocks of paged sessions that the call took.
  const Matrix<T>& run(const std::vector<int>* tokens, Session<T>* const* sessions, std::size_t B, Logits which,
                       std::size_t threads) {
    tokens_ = tokens;
    sessions_ = sessions;
    seqs().resize(B);
    for (auto& q : seqs()) q.token0 = 0;
    try {
      plan(B, which, threads);
      Attention<T>::commit_then(w_.attention, [&] {
        embed();
        for (std::size_t l = 0; l < m_.w.blocks.size(); ++l) {
          for (std::size_t b = 0; b < B; ++b) seqs()[b].rows = &sessions[b]->layers_[l];
          block(m_.w.blocks[l], threads);
        }
        head(which, threads);
      });
    } catch (...) {
      for (std::size_t b = 0; b < B; ++b) give_back(*sessions[b], seqs()[b]);
      throw;
    }
    for (std::size_t b = 0; b < B; ++b)
      if (sessions[b]->blocks_) {
        const auto [lo, hi] = written(seqs()[b]);
        const SlotTable& t = sessions[b]->table_;
        sessions[b]->blocks_->after_step(tokens[b].data() + seqs()[b].token0, seqs()[b].m, lo, hi, t.size(),
                                         t.position());
      }
    return w_.logits;
  }

  // ---- Paged sessions ----------------------------------------------------------

  // The slots [lo, hi] a sequence's runs write (lo > hi: none).
  static std::pair<std::size_t, std::size_t> written(const AttentionSequence<T>& q) {
    std::size_t lo = std::numeric_limits<std::size_t>::max(), hi = 0;
    for (const SlotRun& r : q.runs) {
      lo = std::min(lo, r.slot);
      hi = std::max(hi, r.slot + r.rows - 1);
    }
    return {lo, hi};
  }

  // Maps the published blocks that hold the first tokens of an empty paged
  // session's prompt (prefix sharing), leaving at least its last token to
  // compute, and within a window; only for Logits::last, as the mapped
  // tokens get no logits.
  void map_prefix(Session<T>& s, AttentionSequence<T>& q, const std::vector<int>& tokens, Logits which) {
    if (which != Logits::last) return;
    q.token0 = s.map_prefix(tokens);
    q.m = tokens.size() - q.token0;
  }

  // Undoes what plan and the layers did to a paged session's blocks: the
  // mapped prefix, the blocks taken for new slots (the tables are already
  // back at their checkpoints).
  static void give_back(Session<T>& s, AttentionSequence<T>& q) noexcept {
    if (!s.blocks_) return;
    if (q.token0 != 0) {
      s.blocks_->pool().unhit(q.token0);
      s.clear();
      q.token0 = 0;
    }
    s.blocks_->trim(s.size());
  }

  // ---- Everything that allocates ---------------------------------------------

  // Plans every sequence's slots, grows its caches and sizes every buffer.
  void plan(std::size_t B, Logits which, std::size_t threads) {
    for (std::size_t b = 0; b < B; ++b) {
      seqs()[b].m = tokens_[b].size();
      seqs()[b].table = &sessions_[b]->table_;
      map_prefix(*sessions_[b], seqs()[b], tokens_[b], which);
    }
    Attention<T>::prepare(c_.attention(), m_.rope.has_value(), w_.attention, threads);
    for (std::size_t b = 0; b < B; ++b) {
      Session<T>& s = *sessions_[b];
      const auto [lo, hi] = written(seqs()[b]);
      if (s.blocks_)
        s.blocks_->prepare(seqs()[b].end.size, lo, hi);
      else
        for (auto& l : s.layers_) l.grow(seqs()[b].end.size, s.size(), s.max_tokens());
    }
    const auto rows = static_cast<Eigen::Index>(seqs().back().first_row + seqs().back().m);
    const auto d = static_cast<Eigen::Index>(c_.d_model), ff = static_cast<Eigen::Index>(c_.d_ff);
    for (Matrix<T>* M : {&w_.x, &w_.normed, &w_.delta}) resize_buffer(*M, rows, d);
    resize_buffer(w_.hidden, rows, ff);
    if (c_.mlp == MlpKind::swiglu) resize_buffer(w_.gate, rows, ff);
    const Eigen::Index head_rows = which == Logits::last ? static_cast<Eigen::Index>(B) : rows;
    resize_buffer(w_.logits, head_rows, static_cast<Eigen::Index>(c_.vocab_size));
  }

  // ---- The steps, in the order data flows -------------------------------------

  // x_i = E[token_i] (+ P[p + i] with learned positions).
  void embed() {
    for (std::size_t b = 0; b < seqs().size(); ++b) {
      const AttentionSequence<T>& q = seqs()[b];
      for (std::size_t i = 0; i < q.m; ++i) {
        const auto row = static_cast<Eigen::Index>(q.first_row + i);
        m_.w.token_embedding.row_to(tokens_[b][q.token0 + i], w_.x.row(row).data());
        if (c_.positions == PositionEncoding::learned)
          w_.x.row(row) += m_.w.position_embedding.row(static_cast<Eigen::Index>(q.checkpoint.position + i));
      }
    }
  }

  void block(const BlockWeights<T>& b, std::size_t threads) {
    normalize(w_.x, b.attention_norm, w_.normed);
    Attention<T>(c_.attention(), b.attention, m_.rope ? &*m_.rope : nullptr, w_.attention)
        .run(w_.normed, w_.delta, threads);
    w_.x += w_.delta;
    normalize(w_.x, b.mlp_norm, w_.normed);
    mlp(b.mlp, threads);
    w_.x += w_.delta;
  }

  // LayerNorm: (x − mean) / √(var + eps) · gamma + beta.
  // RMSNorm:   x / √(mean(x²) + eps) · gamma, in llama2.c's order of operations.
  template <typename Derived>
  void normalize(const Eigen::MatrixBase<Derived>& x, const NormWeights<T>& w, Matrix<T>& out) const {
    const T eps = static_cast<T>(c_.norm_eps);
    const T n = static_cast<T>(x.cols());
    for (Eigen::Index i = 0; i < x.rows(); ++i) {
      if constexpr (std::is_same_v<T, float>)
        if (c_.numerics == Numerics::ggml && c_.norm == NormKind::rms_norm) {
          rms_norm_like_ggml(&x(i, 0), w.gamma.data(), out.row(i).data(), static_cast<std::size_t>(x.cols()), eps);
          continue;
        }
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
      linear_rows<T>(w_.normed, w.W_1, w.b_1, w_.hidden, h0, h0 + hn);
      auto a = w_.hidden.middleCols(h0, hn).array();
      if (swiglu) {
        linear_rows<T>(w_.normed, w.W_3, no_bias, w_.gate, h0, h0 + hn);
        const auto g = w_.gate.middleCols(h0, hn).array();
        if (c_.numerics == Numerics::ggml)
          for (Eigen::Index t = 0; t < a.rows(); ++t)
            swiglu_like_ggml(w_.hidden.row(t).data() + h0, w_.gate.row(t).data() + h0, h0, hn, w.W_1.rows());
        else  // silu(a) · g = a · σ(a) · g
          a = a * (T(1) / (T(1) + (-a).exp())) * g;
      } else {
        // GELU, tanh approximation (GPT-2): ½a(1 + tanh(√(2/π)(a + 0.044715a³)))
        const T k = static_cast<T>(0.7978845608028654);
        a = T(0.5) * a * (T(1) + (k * (a + T(0.044715) * a.cube())).tanh());
      }
      team.barrier();
      const auto [d0, d1] = team.slice(c_.d_model, 16);
      linear_rows<T>(w_.hidden, w.W_2, w.b_2, w_.delta, static_cast<Eigen::Index>(d0), static_cast<Eigen::Index>(d1));
    });
  }

  void head(Logits which, std::size_t threads) {
    Eigen::Index rows = w_.x.rows();
    if (which == Logits::all) {
      normalize(w_.x, m_.w.final_norm, w_.normed);
    } else {
      // Each sequence's last row, gathered so that the final norm reads
      // contiguous rows.
      rows = static_cast<Eigen::Index>(seqs().size());
      for (Eigen::Index b = 0; b < rows; ++b)
        w_.delta.row(b) = w_.x.row(static_cast<Eigen::Index>(seqs()[b].first_row + seqs()[b].m - 1));
      normalize(w_.delta.topRows(rows), m_.w.final_norm, w_.normed);
    }
    linear<T>(w_.normed.topRows(rows), {{m_.head(), Vector<T>(), w_.logits}}, threads);
  }

  std::vector<AttentionSequence<T>>& seqs() { return w_.attention.seqs; }

  const Model<T>& m_;
  const ModelConfig& c_;
  Workspace<T>& w_;
  const std::vector<int>* tokens_ = nullptr;  // the batch of the current run
  Session<T>* const* sessions_ = nullptr;
};

}  // namespace detail
}  // namespace kvcache
