// kvcache/weight_matrix.hpp — WeightMatrix: the [out, in] matrix of a linear
// layer, stored row by row as T or as bfloat16.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include <Eigen/Core>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "config.hpp"
#include "storage.hpp"

namespace kvcache {

// ============================================================================
// Weight memory
// ============================================================================

namespace detail {

constexpr std::size_t kHugePage = std::size_t{2} << 20;

// `bytes` of memory for weights. A decode step streams through every weight,
// and with 4 KB pages every 4 KB read is a TLB miss: a block of 2 MB or more
// starts on a 2 MB boundary and, on Linux, asks the kernel to back it with
// 2 MB pages (madvise MADV_HUGEPAGE, before any page is touched; where
// transparent huge pages are off it changes nothing). Only the whole 2 MB
// pages inside the block are asked for, so it takes no more memory than
// `bytes`. Smaller blocks are aligned to 64 bytes. Freed with the last copy
// of the pointer.
inline std::shared_ptr<void> allocate_weights(std::size_t bytes) {
  const std::size_t alignment = bytes >= kHugePage ? kHugePage : 64;
  void* p = ::operator new(bytes, std::align_val_t(alignment));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes >= kHugePage) (void)madvise(p, bytes / kHugePage * kHugePage, MADV_HUGEPAGE);
#endif
  // (Should the control block fail to allocate, shared_ptr frees p itself.)
  return std::shared_ptr<void>(p, [alignment](void* q) { ::operator delete(q, std::align_val_t(alignment)); });
}

// n values of a weight matrix: its own memory (allocate_weights), or a slice
// of a WeightArena shared with other matrices. A copy always gets memory of
// its own; a move keeps the memory.
template <typename S>
class WeightBuffer {
 public:
  WeightBuffer() = default;
  explicit WeightBuffer(std::size_t n) : n_(n) {
    if (n_ == 0) return;
    if (n_ > std::numeric_limits<std::size_t>::max() / sizeof(S)) throw std::bad_alloc();
    owner_ = allocate_weights(n_ * sizeof(S));
    data_ = static_cast<S*>(owner_.get());
  }
  // n values at `data`, inside memory that `owner` keeps alive.
  WeightBuffer(std::shared_ptr<void> owner, S* data, std::size_t n) : owner_(std::move(owner)), data_(data), n_(n) {}
  WeightBuffer(const WeightBuffer& other) : WeightBuffer(other.n_) {
    if (n_ != 0) std::memcpy(data_, other.data_, n_ * sizeof(S));
  }
  WeightBuffer(WeightBuffer&& other) noexcept { swap(other); }
  WeightBuffer& operator=(WeightBuffer other) noexcept {
    swap(other);
    return *this;
  }
  ~WeightBuffer() = default;

  void swap(WeightBuffer& other) noexcept {
    owner_.swap(other.owner_);
    std::swap(data_, other.data_);
    std::swap(n_, other.n_);
  }
  S* data() { return data_; }
  const S* data() const { return data_; }
  std::size_t size() const { return n_; }

 private:
  std::shared_ptr<void> owner_;
  S* data_ = nullptr;
  std::size_t n_ = 0;
};

// One block of memory for many small weight matrices side by side (each
// slice 64-byte aligned). The matrices of a model below 2 MB each (all of a
// stories15M's layers) would otherwise each sit in 4 KB pages; together they
// fill whole 2 MB pages. Matrices keep the block alive.
class WeightArena {
 public:
  static std::size_t slice_bytes(std::size_t bytes) { return (bytes + 63) / 64 * 64; }

  explicit WeightArena(std::size_t bytes) : capacity_(bytes) {
    if (bytes != 0) memory_ = allocate_weights(bytes);
  }

  // A slice of n values; throws std::length_error past the capacity.
  template <typename S>
  WeightBuffer<S> take(std::size_t n) {
    const std::size_t bytes = slice_bytes(n * sizeof(S));
    if (bytes > capacity_ - used_)
      throw std::length_error("kvcache: WeightArena: " + std::to_string(bytes) + " more bytes do not fit in " +
                              std::to_string(capacity_ - used_));
    S* data = reinterpret_cast<S*>(static_cast<unsigned char*>(memory_.get()) + used_);
    used_ += bytes;
    return WeightBuffer<S>(memory_, data, n);
  }

  std::size_t used() const { return used_; }

 private:
  std::shared_ptr<void> memory_;
  std::size_t capacity_ = 0, used_ = 0;
};

}  // namespace detail

// ============================================================================
// WeightMatrix
// ============================================================================

// The weights of a linear layer, shape [out, in] as in PyTorch and llama2.c:
// y = W·x reads row i of W for output feature i. Stored row by row, so that a
// matrix-vector product (a decode step) streams through W once with one dot
// product per row, and so that llama2.c's files read straight into it.
//
// Built as T (WeightType::f32) from any Eigen matrix; convert_to(bf16)
// converts it in place, rounding to nearest even, and frees the T values.
// f32() and bf16() view the values as stored (Eigen maps); reading a value
// (operator(), row_to, to_dense) works in either type and gives T.
template <typename T>
class WeightMatrix {
 public:
  using Scalar = T;
  using Dense = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Bf16 = Eigen::Matrix<std::uint16_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  WeightMatrix() = default;
  // rows × cols values of `type`, uninitialised (as Eigen's constructor).
  WeightMatrix(Eigen::Index rows, Eigen::Index cols, WeightType type = WeightType::f32) { resize(rows, cols, type); }
  // A copy of any Eigen matrix or expression, as T.
  template <typename Derived>
  WeightMatrix(const Eigen::EigenBase<Derived>& m) {  // NOLINT: implicit, like Eigen's own
    *this = m;
  }
  template <typename Derived>
  WeightMatrix& operator=(const Eigen::EigenBase<Derived>& m) {
    WeightMatrix w(m.rows(), m.cols());
    w.f32() = m.derived();
    swap(w);
    return *this;
  }

  Eigen::Index rows() const { return rows_; }
  Eigen::Index cols() const { return cols_; }
  Eigen::Index size() const { return rows_ * cols_; }
  WeightType type() const { return type_; }
  // Bytes the values take: size() × (sizeof(T) or 2).
  std::size_t bytes() const { return row_bytes<T>(type_, static_cast<std::size_t>(size())); }

  // rows × cols values of `type`, uninitialised; the old values are freed.
  void resize(Eigen::Index rows, Eigen::Index cols, WeightType type = WeightType::f32) {
    if (rows < 0 || cols < 0)
      throw std::invalid_argument("kvcache: WeightMatrix::resize(" + std::to_string(rows) + ", " +
                                  std::to_string(cols) + "): negative size");
    const auto r = static_cast<std::size_t>(rows), c = static_cast<std::size_t>(cols);
    if (c != 0 && r > std::numeric_limits<std::size_t>::max() / c) throw std::bad_alloc();
    const std::size_t n = r * c;
    check_type(type);
    dense_ = detail::WeightBuffer<T>();  // free first: the peak is the new size only
    bf16_ = detail::WeightBuffer<std::uint16_t>();
    if (type == WeightType::f32)
      dense_ = detail::WeightBuffer<T>(n);
    else
      bf16_ = detail::WeightBuffer<std::uint16_t>(n);
    rows_ = rows;
    cols_ = cols;
    type_ = type;
  }

  // The values as stored; each throws std::logic_error when they are stored
  // in the other type.
  Eigen::Map<const Dense> f32() const {
    require(WeightType::f32);
    return Eigen::Map<const Dense>(dense_.data(), rows_, cols_);
  }
  Eigen::Map<Dense> f32() {
    require(WeightType::f32);
    return Eigen::Map<Dense>(dense_.data(), rows_, cols_);
  }
  Eigen::Map<const Bf16> bf16() const {
    require(WeightType::bf16);
    return Eigen::Map<const Bf16>(bf16_.data(), rows_, cols_);
  }
  Eigen::Map<Bf16> bf16() {
    require(WeightType::bf16);
    return Eigen::Map<Bf16>(bf16_.data(), rows_, cols_);
  }

  // W(i, j) as T (exact: a bfloat16 converts to any wider type without loss).
  T operator()(Eigen::Index i, Eigen::Index j) const {
    const std::size_t k = static_cast<std::size_t>(i * cols_ + j);
    return type_ == WeightType::f32 ? dense_.data()[k] : static_cast<T>(detail::from_bf16(bf16_.data()[k]));
  }

  // Row i (cols() values, as T) into out, which must hold cols() values.
  void row_to(Eigen::Index i, T* out) const {
    const std::size_t first = static_cast<std::size_t>(i * cols_), n = static_cast<std::size_t>(cols_);
    if (type_ == WeightType::f32) {
      if (n != 0) std::memcpy(out, dense_.data() + first, n * sizeof(T));
    } else {
      const std::uint16_t* h = bf16_.data() + first;
      for (std::size_t j = 0; j < n; ++j) out[j] = static_cast<T>(detail::from_bf16(h[j]));
    }
  }

  // A copy of all values as T (allocates rows × cols).
  Dense to_dense() const {
    Dense m(rows_, cols_);
    for (Eigen::Index i = 0; i < rows_; ++i) row_to(i, m.data() + i * cols_);
    return m;
  }

  // Converts to `type` in place and frees the old values. To bfloat16: round
  // to nearest even. To T: exact. The peak memory is both copies of this one
  // matrix.
  void convert_to(WeightType type) {
    check_type(type);
    if (type == type_) return;
    WeightMatrix w(rows_, cols_, type);
    const std::size_t n = static_cast<std::size_t>(size());
    if (type == WeightType::bf16) {
      for (std::size_t k = 0; k < n; ++k) w.bf16_.data()[k] = detail::to_bf16(dense_.data()[k]);
    } else {
      for (Eigen::Index i = 0; i < rows_; ++i) row_to(i, w.dense_.data() + i * cols_);
    }
    swap(w);
  }

  // Moves the values into a slice of `arena` (which must have room for
  // bytes() more, rounded up to 64), freeing the memory they had.
  void move_into(detail::WeightArena& arena) {
    const auto n = static_cast<std::size_t>(size());
    if (type_ == WeightType::f32) {
      detail::WeightBuffer<T> slice = arena.take<T>(n);
      if (n != 0) std::memcpy(slice.data(), dense_.data(), n * sizeof(T));
      dense_ = std::move(slice);
    } else {
      detail::WeightBuffer<std::uint16_t> slice = arena.take<std::uint16_t>(n);
      if (n != 0) std::memcpy(slice.data(), bf16_.data(), n * sizeof(std::uint16_t));
      bf16_ = std::move(slice);
    }
  }

  void swap(WeightMatrix& other) noexcept {
    dense_.swap(other.dense_);
    bf16_.swap(other.bf16_);
    std::swap(rows_, other.rows_);
    std::swap(cols_, other.cols_);
    std::swap(type_, other.type_);
  }

  // Same shape, type and stored values.
  friend bool operator==(const WeightMatrix& a, const WeightMatrix& b) {
    if (a.type_ != b.type_ || a.rows_ != b.rows_ || a.cols_ != b.cols_) return false;
    return a.type_ == WeightType::f32 ? a.f32() == b.f32() : a.bf16() == b.bf16();
  }
  friend bool operator!=(const WeightMatrix& a, const WeightMatrix& b) { return !(a == b); }

 private:
  // The types a WeightMatrix stores (every branch below is f32 or bf16).
  static void check_type(WeightType type) {
    if (type != WeightType::f32 && type != WeightType::bf16)
      throw std::invalid_argument(std::string("kvcache: WeightMatrix stores f32 or bf16 values, not ") +
                                  to_string(type));
  }

  void require(WeightType t) const {
    if (t != type_)
      throw std::logic_error(std::string("kvcache: WeightMatrix holds ") + to_string(type_) + " values, not " +
                             to_string(t));
  }

  detail::WeightBuffer<T> dense_;             // rows × cols values when type_ == f32, else empty
  detail::WeightBuffer<std::uint16_t> bf16_;  // rows × cols bfloat16 bit patterns when type_ == bf16, else empty
  Eigen::Index rows_ = 0, cols_ = 0;
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
