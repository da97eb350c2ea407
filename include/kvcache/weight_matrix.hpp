// kvcache/weight_matrix.hpp — WeightMatrix: the [out, in] matrix of a linear
// layer, stored row by row as T or as bfloat16, and the bfloat16 conversions.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include <Eigen/Core>

#include "config.hpp"

namespace kvcache {

// How a WeightMatrix stores its values.
enum class WeightType {
  f32,   // as T itself (float32 for the usual Decoder<float>)
  bf16,  // as bfloat16: half of float32's bytes, 8 significant bits; the
         // products still run in T
};

inline const char* to_string(WeightType t) { return t == WeightType::bf16 ? "bf16" : "f32"; }

// ============================================================================
// bfloat16: the top 16 bits of a float32 (sign, 8-bit exponent, 7 stored
// significand bits)
// ============================================================================

namespace detail {

inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Exact: a bfloat16 is a float32 whose low 16 bits are zero.
inline float bf16_to_float(std::uint16_t h) { return bits_float(static_cast<std::uint32_t>(h) << 16); }

// Round to nearest, ties to even. A NaN stays a NaN (its top bits could
// otherwise read as infinity); values past the largest bfloat16 become ±inf.
inline std::uint16_t float_to_bf16(float f) {
  const std::uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((u >> 16) | 0x0040u);
  const std::uint32_t round = 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>((u + round) >> 16);
}

// Any other T goes through float rounded to odd (truncate, and set the last
// bit when anything was cut): float keeps 16 more bits than bfloat16, so the
// second rounding then lands where rounding v directly would have.
template <typename T>
std::uint16_t to_bf16(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return float_to_bf16(v);
  } else {
    if (std::isnan(v)) return float_to_bf16(std::numeric_limits<float>::quiet_NaN());
    float f = static_cast<float>(v);
    if (std::isinf(f) && !std::isinf(v)) f = std::copysign(std::numeric_limits<float>::max(), f);
    if (static_cast<T>(f) != v) {
      if (std::fabs(static_cast<T>(f)) > std::fabs(v)) f = std::nextafter(f, 0.0f);
      f = bits_float(float_bits(f) | 1u);
    }
    return float_to_bf16(f);
  }
}

}  // namespace detail

// ============================================================================
// WeightMatrix
// ============================================================================

// The weights of a linear layer, shape [out, in] as in PyTorch and llama2.c:
// y = W·x reads row i of W for output feature i. Stored row by row, so that a
// matrix-vector product (a decode step) streams through W once with one dot
// product per row, and so that llama2.c's files read straight into it.
//
// Built as T (WeightType::f32) from any Eigen matrix; to_bf16() converts it in
// place, rounding to nearest even, and frees the T values. Reading a value
// (operator(), row_to, to_dense) works in either type and gives T.
template <typename T>
class WeightMatrix {
 public:
  using Scalar = T;
  using Dense = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Bf16 = Eigen::Matrix<std::uint16_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  WeightMatrix() = default;
  // rows × cols values of type T, uninitialised (as Eigen's constructor).
  WeightMatrix(Eigen::Index rows, Eigen::Index cols) : dense_(rows, cols) {}
  // A copy of any Eigen matrix or expression, as T.
  template <typename Derived>
  WeightMatrix(const Eigen::EigenBase<Derived>& m) : dense_(m) {}  // NOLINT: implicit, like Eigen's own
  template <typename Derived>
  WeightMatrix& operator=(const Eigen::EigenBase<Derived>& m) {
    dense_ = m;
    bf16_.resize(0, 0);
    type_ = WeightType::f32;
    return *this;
  }

  Eigen::Index rows() const { return type_ == WeightType::f32 ? dense_.rows() : bf16_.rows(); }
  Eigen::Index cols() const { return type_ == WeightType::f32 ? dense_.cols() : bf16_.cols(); }
  Eigen::Index size() const { return rows() * cols(); }
  WeightType type() const { return type_; }
  // Bytes the values take: size() × (sizeof(T) or 2).
  std::size_t bytes() const {
    return static_cast<std::size_t>(size()) * (type_ == WeightType::f32 ? sizeof(T) : sizeof(std::uint16_t));
  }

  // rows × cols values of `type`, uninitialised; the old values are freed.
  void resize(Eigen::Index rows, Eigen::Index cols, WeightType type = WeightType::f32) {
    if (type == WeightType::f32) {
      bf16_.resize(0, 0);
      dense_.resize(rows, cols);
    } else {
      dense_.resize(0, 0);
      bf16_.resize(rows, cols);
    }
    type_ = type;
  }

  // The values as stored; each throws std::logic_error when they are stored
  // in the other type.
  const Dense& f32() const {
    require(WeightType::f32);
    return dense_;
  }
  Dense& f32() {
    require(WeightType::f32);
    return dense_;
  }
  const Bf16& bf16() const {
    require(WeightType::bf16);
    return bf16_;
  }
  Bf16& bf16() {
    require(WeightType::bf16);
    return bf16_;
  }

  // W(i, j) as T (exact: a bfloat16 converts to any wider type without loss).
  T operator()(Eigen::Index i, Eigen::Index j) const {
    return type_ == WeightType::f32 ? dense_(i, j) : static_cast<T>(detail::bf16_to_float(bf16_(i, j)));
  }

  // Row i (cols() values, as T) into out, which must hold cols() values.
  void row_to(Eigen::Index i, T* out) const {
    if (type_ == WeightType::f32) {
      std::memcpy(out, dense_.row(i).data(), static_cast<std::size_t>(cols()) * sizeof(T));
    } else {
      const std::uint16_t* h = bf16_.row(i).data();
      for (Eigen::Index j = 0; j < cols(); ++j) out[j] = static_cast<T>(detail::bf16_to_float(h[j]));
    }
  }

  // A copy of all values as T (allocates rows × cols).
  Dense to_dense() const {
    if (type_ == WeightType::f32) return dense_;
    Dense m(rows(), cols());
    for (Eigen::Index i = 0; i < rows(); ++i) row_to(i, m.row(i).data());
    return m;
  }

  // Converts to `type` in place and frees the old values. To bfloat16: round
  // to nearest even. To T: exact. The peak memory is both copies of this one
  // matrix.
  void convert_to(WeightType type) {
    if (type == type_) return;
    if (type == WeightType::bf16) {
      Bf16 h(dense_.rows(), dense_.cols());
      for (Eigen::Index k = 0; k < h.size(); ++k) h.data()[k] = detail::to_bf16(dense_.data()[k]);
      dense_.resize(0, 0);
      bf16_.swap(h);
    } else {
      Dense m = to_dense();
      bf16_.resize(0, 0);
      dense_.swap(m);
    }
    type_ = type;
  }

  // Same shape, type and stored values.
  friend bool operator==(const WeightMatrix& a, const WeightMatrix& b) {
    if (a.type_ != b.type_ || a.rows() != b.rows() || a.cols() != b.cols()) return false;
    return a.type_ == WeightType::f32 ? a.dense_ == b.dense_ : a.bf16_ == b.bf16_;
  }
  friend bool operator!=(const WeightMatrix& a, const WeightMatrix& b) { return !(a == b); }

 private:
  void require(WeightType t) const {
    if (t != type_)
      throw std::logic_error(std::string("kvcache: WeightMatrix holds ") + to_string(type_) + " values, not " +
                             to_string(t));
  }

  Dense dense_;  // rows × cols when type_ == f32, else empty
  Bf16 bf16_;    // rows × cols bfloat16 bit patterns when type_ == bf16, else empty
  WeightType type_ = WeightType::f32;
};

namespace detail {

// As check_weight for Eigen matrices (attention.hpp): the same message.
template <typename T>
void check_weight(const char* name, const WeightMatrix<T>& W, std::size_t rows, std::size_t cols) {
  if (static_cast<std::size_t>(W.rows()) != rows || static_cast<std::size_t>(W.cols()) != cols)
    fail_config(std::string(name) + " is " + std::to_string(W.rows()) + " x " + std::to_string(W.cols()) +
                ", expected " + std::to_string(rows) + " x " + std::to_string(cols));
}

}  // namespace detail

}  // namespace kvcache
