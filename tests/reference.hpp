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

// Causal attention of the whole sequence x (n × d_model) with no cache:
// position i attends to positions 0..i. store(M, d_k) may round the keys and
// values (after RoPE) the way a compact cache stores them.
template <typename T, typename Store = Exact>
Mat attention(const Mat& x, const kvcache::AttentionConfig& c, const kvcache::AttentionWeights<T>& w,
              Store store = {}) {
  Mat Q = linear(x, to_double(w.W_Q), to_double(w.b_Q));
  Mat K = linear(x, to_double(w.W_K), to_double(w.b_K));
  Mat V = linear(x, to_double(w.W_V), to_double(w.b_V));
  const std::size_t d_k = c.d_model / c.n_heads, group = c.n_heads / c.n_kv_heads;
  if (c.positions == kvcache::PositionEncoding::rope) {
    rope(Q, d_k, c.rope_base, 0);
    rope(K, d_k, c.rope_base, 0);
  }
  store(K, d_k);
  store(V, d_k);
  const Eigen::Index n = x.rows();
  Mat O = Mat::Zero(n, static_cast<Eigen::Index>(c.d_model));
  for (std::size_t h = 0; h < c.n_heads; ++h) {
    const auto q0 = static_cast<Eigen::Index>(h * d_k), k0 = static_cast<Eigen::Index>((h / group) * d_k);
    for (Eigen::Index i = 0; i < n; ++i) {
      std::vector<double> s(static_cast<std::size_t>(i + 1));
      double max = -INFINITY, sum = 0.0;
      for (Eigen::Index j = 0; j <= i; ++j) {
        double dot = 0.0;
        for (std::size_t k = 0; k < d_k; ++k)
          dot += Q(i, q0 + static_cast<Eigen::Index>(k)) * K(j, k0 + static_cast<Eigen::Index>(k));
        s[static_cast<std::size_t>(j)] = dot / std::sqrt(static_cast<double>(d_k));
        max = std::max(max, s[static_cast<std::size_t>(j)]);
      }
      for (double& v : s) sum += (v = std::exp(v - max));
      for (Eigen::Index j = 0; j <= i; ++j)
        for (std::size_t k = 0; k < d_k; ++k)
          O(i, q0 + static_cast<Eigen::Index>(k)) +=
              s[static_cast<std::size_t>(j)] / sum * V(j, k0 + static_cast<Eigen::Index>(k));
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

// Logits (n × vocab) of every position of `tokens`, computed without a cache.
template <typename T>
Mat decoder_logits(const kvcache::Decoder<T>& d, const std::vector<int>& tokens) {
  const auto& c = d.config();
  Mat x(static_cast<Eigen::Index>(tokens.size()), static_cast<Eigen::Index>(c.d_model));
  const Mat E = to_double(d.token_embedding());
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    x.row(static_cast<Eigen::Index>(i)) = E.row(tokens[i]);
    if (c.positions == kvcache::PositionEncoding::learned)
      x.row(static_cast<Eigen::Index>(i)) +=
          d.position_embedding().row(static_cast<Eigen::Index>(i)).template cast<double>();
  }
  for (std::size_t l = 0; l < c.n_layers; ++l) {
    const auto& b = d.block(l);
    x += attention(norm(x, c, b.attention_norm), c.attention(), b.attention.weights());
    x += mlp(norm(x, c, b.mlp_norm), c, b.mlp);
  }
  return linear(norm(x, c, d.final_norm()), to_double(d.lm_head()), Vec());
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
