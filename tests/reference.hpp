// tests/reference.hpp — the transformer written once more, straight from the
// formulas, in double, with loops instead of kernels and no cache: what the
// library is checked against.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include <kvcache/decoder.hpp>

namespace reference {

using Mat = kvcache::Matrix<double>;
using Vec = kvcache::Vector<double>;

template <typename T>
Mat to_double(const kvcache::Matrix<T>& m) {
  return m.template cast<double>();
}
// The values the matrix holds, whether stored as T or as bfloat16.
template <typename T>
Mat to_double(const kvcache::WeightMatrix<T>& m) {
  return m.to_dense().template cast<double>();
}
template <typename T>
Vec to_double(const kvcache::Vector<T>& v) {
  return v.template cast<double>();
}

// y = W x + b for each row x of X (W stored [out, in]).
inline Mat linear(const Mat& X, const Mat& W, const Vec& b) {
  Mat Y(X.rows(), W.rows());
  for (Eigen::Index i = 0; i < X.rows(); ++i)
    for (Eigen::Index o = 0; o < W.rows(); ++o) {
      double acc = b.size() ? b(o) : 0.0;
      for (Eigen::Index k = 0; k < X.cols(); ++k) acc += W(o, k) * X(i, k);
      Y(i, o) = acc;
    }
  return Y;
}

// Rotates pairs (2j, 2j+1) of each head by pos · base^(-2j/d_k), in double.
inline void rope(Mat& X, std::size_t d_k, double base, std::size_t first_pos) {
  for (Eigen::Index i = 0; i < X.rows(); ++i)
    for (Eigen::Index c = 0; c < X.cols(); c += 2) {
      const auto j = static_cast<double>(static_cast<std::size_t>(c) % d_k);
      const double angle = static_cast<double>(first_pos + static_cast<std::size_t>(i)) *
                           std::pow(base, -j / static_cast<double>(d_k));
      const double x0 = X(i, c), x1 = X(i, c + 1);
      X(i, c) = x0 * std::cos(angle) - x1 * std::sin(angle);
      X(i, c + 1) = x0 * std::sin(angle) + x1 * std::cos(angle);
    }
}

// Leaves the keys and values as computed.
struct Exact {
  void operator()(Mat&, std::size_t) const {}
};

// A sliding window as SessionOptions::window gives it (window = 0: none).
struct Window {
  std::size_t window = 0, sinks = 0;
};

// The tokens the query of token i attends to, and the position each is seen
// at. Without a window, and while i < W: tokens 0..i, each at its own
// position, the query at i. Past that, with a window of W tokens and S sinks,
// the query sees the S sinks (tokens 0..S−1) and the W−S most recent tokens
// (i−(W−S)+1 .. i), numbered as a sequence of their own: the sinks at
// positions 0..S−1, the recent tokens at S..W−1 in order, the query (the
// last of them) at W−1. That is how include/kvcache/attention.hpp documents
// a window ("as if they were a sequence of their own at positions 0 … W−1",
// StreamingLLM's choice), written here without its ring or re-rotation.
struct Visible {
  std::vector<std::size_t> tokens;     // indices into the sequence, oldest first
  std::vector<std::size_t> positions;  // the position each one is seen at
  std::size_t query_position = 0;
};

inline Visible visible(std::size_t i, Window w) {
  Visible v;
  const auto see = [&v](std::size_t token, std::size_t position) {
    v.tokens.push_back(token);
    v.positions.push_back(position);
  };
  if (w.window == 0 || i < w.window) {
    for (std::size_t j = 0; j <= i; ++j) see(j, j);
    v.query_position = i;
    return v;
  }
  const std::size_t recent = w.window - w.sinks;
  for (std::size_t j = 0; j < w.sinks; ++j) see(j, j);
  for (std::size_t k = 0; k < recent; ++k) see(i + 1 - recent + k, w.sinks + k);
  v.query_position = w.window - 1;
  return v;
}

// Causal attention of the whole sequence x (n × d_model) with no cache:
// token i attends to the tokens visible(i, window) gives, RoPE (if any)
// rotating its query and their keys to the positions they are seen at.
// store(M, d_k) may round the keys (after RoPE) and the values the way a
// compact cache stores them.
template <typename T, typename Store = Exact>
Mat attention(const Mat& x, const kvcache::AttentionConfig& c, const kvcache::AttentionWeights<T>& w,
              Store store = {}, Window window = {}) {
  const Mat Q = linear(x, to_double(w.W_Q), to_double(w.b_Q));
  const Mat K = linear(x, to_double(w.W_K), to_double(w.b_K));
  Mat V = linear(x, to_double(w.W_V), to_double(w.b_V));
  const std::size_t d_k = c.d_model / c.n_heads, group = c.n_heads / c.n_kv_heads;
  const bool rotary = c.positions == kvcache::PositionEncoding::rope;
  store(V, d_k);
  // Row `row` of M as seen at `position`.
  const auto at = [&](const Mat& M, Eigen::Index row, std::size_t position) {
    Mat r = M.row(row);
    if (rotary) rope(r, d_k, c.rope_base, position);
    return r;
  };
  const Eigen::Index n = x.rows();
  Mat O = Mat::Zero(n, static_cast<Eigen::Index>(c.d_model));
  for (Eigen::Index i = 0; i < n; ++i) {
    const Visible seen = visible(static_cast<std::size_t>(i), window);
    const std::size_t m = seen.tokens.size();
    const Mat q = at(Q, i, seen.query_position);
    Mat keys(static_cast<Eigen::Index>(m), K.cols());
    for (std::size_t t = 0; t < m; ++t) {
      Mat k = at(K, static_cast<Eigen::Index>(seen.tokens[t]), seen.positions[t]);
      store(k, d_k);
      keys.row(static_cast<Eigen::Index>(t)) = k;
    }
    for (std::size_t h = 0; h < c.n_heads; ++h) {
      const auto q0 = static_cast<Eigen::Index>(h * d_k), k0 = static_cast<Eigen::Index>((h / group) * d_k);
      std::vector<double> s(m);
      double max = -INFINITY, sum = 0.0;
      for (std::size_t t = 0; t < m; ++t) {
        double dot = 0.0;
        for (std::size_t k = 0; k < d_k; ++k)
          dot += q(0, q0 + static_cast<Eigen::Index>(k)) * keys(static_cast<Eigen::Index>(t), k0 + static_cast<Eigen::Index>(k));
        s[t] = dot / std::sqrt(static_cast<double>(d_k));
        max = std::max(max, s[t]);
      }
      for (double& v : s) sum += (v = std::exp(v - max));
      for (std::size_t t = 0; t < m; ++t)
        for (std::size_t k = 0; k < d_k; ++k)
          O(i, q0 + static_cast<Eigen::Index>(k)) +=
              s[t] / sum * V(static_cast<Eigen::Index>(seen.tokens[t]), k0 + static_cast<Eigen::Index>(k));
    }
  }
  return linear(O, to_double(w.W_O), to_double(w.b_O));
}

template <typename T>
Mat norm(const Mat& x, const kvcache::ModelConfig& c, const kvcache::NormWeights<T>& w) {
  Mat y(x.rows(), x.cols());
  const double n = static_cast<double>(x.cols());
  for (Eigen::Index i = 0; i < x.rows(); ++i) {
    double mean = 0.0, sq = 0.0;
    for (Eigen::Index k = 0; k < x.cols(); ++k) mean += x(i, k) / n;
    if (c.norm == kvcache::NormKind::rms_norm) mean = 0.0;
    for (Eigen::Index k = 0; k < x.cols(); ++k) sq += (x(i, k) - mean) * (x(i, k) - mean) / n;
    for (Eigen::Index k = 0; k < x.cols(); ++k) {
      y(i, k) = (x(i, k) - mean) / std::sqrt(sq + c.norm_eps) * static_cast<double>(w.gamma(k));
      if (w.beta.size()) y(i, k) += static_cast<double>(w.beta(k));
    }
  }
  return y;
}

template <typename T>
Mat mlp(const Mat& x, const kvcache::ModelConfig& c, const kvcache::MlpWeights<T>& w) {
  Mat h = linear(x, to_double(w.W_1), to_double(w.b_1));
  if (c.mlp == kvcache::MlpKind::swiglu) {
    const Mat g = linear(x, to_double(w.W_3), Vec());
    for (Eigen::Index i = 0; i < h.size(); ++i) h.data()[i] = h.data()[i] / (1.0 + std::exp(-h.data()[i])) * g.data()[i];
  } else {
    const double pi = std::acos(-1.0);
    for (Eigen::Index i = 0; i < h.size(); ++i) {
      const double a = h.data()[i];
      h.data()[i] = 0.5 * a * (1.0 + std::tanh(std::sqrt(2.0 / pi) * (a + 0.044715 * a * a * a)));
    }
  }
  return linear(h, to_double(w.W_2), to_double(w.b_2));
}

// One block's weights, wherever they are kept.
template <typename T>
struct BlockRef {
  const kvcache::NormWeights<T>& attention_norm;
  const kvcache::AttentionWeights<T>& attention;
  const kvcache::NormWeights<T>& mlp_norm;
  const kvcache::MlpWeights<T>& mlp;
};

// Logits (n × vocab) of every position of `tokens`, computed without a
// cache: embedding (+ learned position i), per block x += attention(norm(x)),
// x += mlp(norm(x)), then the final norm and the LM head.
template <typename T>
Mat logits(const kvcache::ModelConfig& c, const kvcache::WeightMatrix<T>& token_embedding,
           const kvcache::Matrix<T>& position_embedding, const std::vector<BlockRef<T>>& blocks,
           const kvcache::NormWeights<T>& final_norm, const kvcache::WeightMatrix<T>& lm_head,
           const std::vector<int>& tokens, Window window = {}) {
  Mat x(static_cast<Eigen::Index>(tokens.size()), static_cast<Eigen::Index>(c.d_model));
  const Mat E = to_double(token_embedding);
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    x.row(static_cast<Eigen::Index>(i)) = E.row(tokens[i]);
    if (c.positions == kvcache::PositionEncoding::learned)
      x.row(static_cast<Eigen::Index>(i)) +=
          position_embedding.row(static_cast<Eigen::Index>(i)).template cast<double>();
  }
  for (const BlockRef<T>& b : blocks) {
    x += attention(norm(x, c, b.attention_norm), c.attention(), b.attention, Exact{}, window);
    x += mlp(norm(x, c, b.mlp_norm), c, b.mlp);
  }
  return linear(norm(x, c, final_norm), to_double(lm_head), Vec());
}

// The same for a model given as its configuration and weights (what
// kvcache::random_weights returns): nothing of a Decoder is used.
template <typename T>
Mat logits(const kvcache::ModelConfig& c, const kvcache::DecoderWeights<T>& w, const std::vector<int>& tokens,
           Window window = {}) {
  std::vector<BlockRef<T>> blocks;
  for (const auto& b : w.blocks) blocks.push_back({b.attention_norm, b.attention, b.mlp_norm, b.mlp});
  return logits(c, w.token_embedding, w.position_embedding, blocks, w.final_norm,
                c.tied_lm_head ? w.token_embedding : w.lm_head, tokens, window);
}

// The same for the weights a Decoder holds.
template <typename T>
Mat decoder_logits(const kvcache::Decoder<T>& d, const std::vector<int>& tokens, Window window = {}) {
  std::vector<BlockRef<T>> blocks;
  for (std::size_t l = 0; l < d.config().n_layers; ++l) {
    const auto& b = d.block(l);
    blocks.push_back({b.attention_norm, b.attention, b.mlp_norm, b.mlp});
  }
  return logits(d.config(), d.token_embedding(), d.position_embedding(), blocks, d.final_norm(), d.lm_head(), tokens,
                window);
}

// ---- Comparing results --------------------------------------------------------
// Every helper returns +infinity when either argument holds a NaN or an
// infinity anywhere (or when their shapes differ): no tolerance accepts it,
// a "these differ" check (EXPECT_GT) still sees a number, and a running
// maximum over steps keeps it. Eigen's maxCoeff() cannot be trusted with
// this: it skips a NaN that is not the first entry it looks at.

// True when every entry of m is finite.
template <typename M>
bool all_finite(const M& m) {
  const Mat x = m.template cast<double>();
  for (Eigen::Index i = 0; i < x.size(); ++i)
    if (!std::isfinite(x.data()[i])) return false;
  return true;
}

// max |a − b| over all entries.
template <typename A, typename B>
double max_abs_diff(const A& a, const B& b) {
  const Mat x = a.template cast<double>(), y = b.template cast<double>();
  if (x.rows() != y.rows() || x.cols() != y.cols()) return INFINITY;
  double worst = 0.0;
  for (Eigen::Index i = 0; i < x.size(); ++i) {
    const double u = x.data()[i], v = y.data()[i];
    if (!std::isfinite(u) || !std::isfinite(v)) return INFINITY;
    worst = std::max(worst, std::abs(u - v));
  }
  return worst;
}

// max |a − b| / max |b|: the error relative to the size of the values (to
// the difference itself when b is all zeros).
template <typename A, typename B>
double relative_error(const A& a, const B& b) {
  const double diff = max_abs_diff(a, b);
  if (!std::isfinite(diff)) return INFINITY;
  const Mat y = b.template cast<double>();
  double scale = 0.0;
  for (Eigen::Index i = 0; i < y.size(); ++i) scale = std::max(scale, std::abs(y.data()[i]));
  return diff / (scale > 0 ? scale : 1.0);
}

}  // namespace reference
