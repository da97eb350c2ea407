// kvcache/detail/rope.hpp — rotary position embeddings. Not API.
#pragma once

#include <cmath>
#include <cstddef>
#include <vector>

#include <Eigen/Core>

#include "../config.hpp"
#include "ggml_math.hpp"

namespace kvcache::detail {

// Rotates consecutive pairs (2j, 2j+1) of every d_k-wide head by the angle
// pos · base^(-2j / d_k).
//
// Numerics::kvcache computes it as llama2.c does: the angles in the compute
// type T, not in double: for float this is bit for bit what llama2.c, and
// the PyTorch models its checkpoints come from, compute, so greedy outputs
// match theirs exactly. Numerics::ggml as ggml does: pos · s^j with s =
// base^(-2 / d_k), the powers by repeated multiplication, and the rotation
// of rotate_like_ggml.
template <typename T>
class Rope {
 public:
  Rope(std::size_t d_k, double base, Numerics numerics = Numerics::kvcache)
      : inv_freq_(d_k / 2),
        ggml_(numerics == Numerics::ggml),
        ggml_scale_(std::pow(static_cast<T>(base), T(-2) / static_cast<T>(d_k))) {
    for (std::size_t j = 0; j < inv_freq_.size(); ++j)
      inv_freq_[j] = T(1) / std::pow(static_cast<T>(base), static_cast<T>(2 * j) / static_cast<T>(d_k));
  }

  // X: m × (n_heads·d_k), row i holds the token at position first_pos + i.
  template <typename Derived>
  void apply(Eigen::MatrixBase<Derived>& X, std::size_t first_pos) const {
    const std::size_t half = inv_freq_.size(), d_k = 2 * half;
    const auto n_heads = static_cast<std::size_t>(X.cols()) / d_k;
    for (Eigen::Index i = 0; i < X.rows(); ++i) {
      const T pos = static_cast<T>(first_pos + static_cast<std::size_t>(i));
      T ggml_angle = pos;
      for (std::size_t j = 0; j < half; ++j) {
        const T angle = ggml_ ? ggml_angle : pos * inv_freq_[j];
        const T c = std::cos(angle), s = std::sin(angle);
        ggml_angle *= ggml_scale_;
        for (std::size_t h = 0; h < n_heads; ++h) {
          const auto col = static_cast<Eigen::Index>(h * d_k + 2 * j);
          if (ggml_) {
            rotate_like_ggml(&X(i, col), c, s);
            continue;
          }
          const T x0 = X(i, col), x1 = X(i, col + 1);
          X(i, col) = x0 * c - x1 * s;
          X(i, col + 1) = x0 * s + x1 * c;
        }
      }
    }
  }

 private:
  std::vector<T> inv_freq_;
  bool ggml_;
  T ggml_scale_;
};

}  // namespace kvcache::detail
