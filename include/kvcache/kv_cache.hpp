// kvcache/kv_cache.hpp — KVCache: one attention layer's keys and values.
#pragma once

#include <algorithm>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <utility>

#include <Eigen/Core>

#include "config.hpp"

namespace kvcache {

// The keys and values of one attention layer for the tokens seen so far.
//
// Layout: for each kv head h, keys live in one contiguous row-major block of
// capacity() × d_k (a row per token), and so do values. A head's first size()
// rows are therefore a dense matrix that attention reads with one Map, and
// appending m tokens writes m rows behind them. Capacity grows geometrically,
// so appending m tokens costs O(m) amortized however long the cache is.
//
// Copying costs O(size()), so it is an explicit copy(), never a copy
// constructor; moving is free.
template <typename T = float>
class KVCache {
 public:
  using Scalar = T;
  using HeadView = Eigen::Map<const Matrix<T>>;  // size() × d_k

  // max_tokens == 0 means no limit other than memory.
  KVCache(std::size_t n_kv_heads, std::size_t d_k, std::size_t max_tokens = 0)
      : n_kv_heads_(n_kv_heads), d_k_(d_k), max_tokens_(max_tokens) {
    if (n_kv_heads == 0 || d_k == 0)
      throw std::invalid_argument("kvcache: KVCache needs n_kv_heads > 0 and d_k > 0, got n_kv_heads = " +
                                  std::to_string(n_kv_heads) + ", d_k = " + std::to_string(d_k));
  }

  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;
  // A moved-from cache is empty, with no capacity, and still usable.
  KVCache(KVCache&& other) noexcept { swap(other); }
  KVCache& operator=(KVCache&& other) noexcept {
    KVCache(std::move(other)).swap(*this);
    return *this;
  }
  ~KVCache() = default;

  // A deep copy holding the same tokens (capacity trimmed to size()).
  KVCache copy() const {
    KVCache c(n_kv_heads_, d_k_, max_tokens_);
    c.reserve(size_);
    for (std::size_t h = 0; h < n_kv_heads_; ++h) {
      c.head_block(c.keys_, h).topRows(size_) = keys(h);
      c.head_block(c.values_, h).topRows(size_) = values(h);
    }
    c.size_ = size_;
    return c;
  }

  std::size_t n_kv_heads() const { return n_kv_heads_; }
  std::size_t d_k() const { return d_k_; }
  std::size_t kv_dim() const { return n_kv_heads_ * d_k_; }
  std::size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  std::size_t capacity() const { return capacity_; }
  std::size_t max_tokens() const { return max_tokens_; }

  // Memory held for keys and values: 2 × n_kv_heads × d_k × capacity × sizeof(T).
  std::size_t bytes() const { return 2 * kv_dim() * capacity_ * sizeof(T); }

  // Zero-copy views of head h's cached keys and values, size() × d_k.
  HeadView keys(std::size_t h) const { return view(keys_, h); }
  HeadView values(std::size_t h) const { return view(values_, h); }

  // Ensures room for n tokens without reallocating. Throws std::length_error
  // past max_tokens(); on any exception the cache is unchanged.
  void reserve(std::size_t n) {
    if (n <= capacity_) return;
    check_limit(n);
    reallocate(n);
  }

  // Ensures room for m more tokens, growing geometrically as append does: a
  // caller that makes room before appending (to fail before changing
  // anything else) keeps append's O(m) amortized cost.
  void reserve_more(std::size_t m) {
    const std::size_t needed = size_ + m;
    check_limit(needed);
    if (needed > capacity_) reallocate(grown_capacity(needed));
  }

  // Appends m tokens. K_new and V_new are m × (n_kv_heads·d_k), a row per
  // token with kv head h in columns [h·d_k, (h+1)·d_k). Throws (and changes
  // nothing) on a shape mismatch or past max_tokens().
  void append(const Eigen::Ref<const Matrix<T>>& K_new, const Eigen::Ref<const Matrix<T>>& V_new) {
    check_shape("K_new", K_new);
    check_shape("V_new", V_new);
    if (K_new.rows() != V_new.rows())
      throw std::invalid_argument("kvcache: KVCache::append: K_new has " + std::to_string(K_new.rows()) +
                                  " rows but V_new has " + std::to_string(V_new.rows()));
    const std::size_t m = static_cast<std::size_t>(K_new.rows());
    reserve_more(m);
    for (std::size_t h = 0; h < n_kv_heads_; ++h) {
      const auto cols = static_cast<Eigen::Index>(h * d_k_);
      const auto d_k = static_cast<Eigen::Index>(d_k_);
      head_block(keys_, h).middleRows(size_, m) = K_new.middleCols(cols, d_k);
      head_block(values_, h).middleRows(size_, m) = V_new.middleCols(cols, d_k);
    }
    size_ += m;
  }

  // Forgets every token (the reset between independent requests); keeps the
  // memory for the next request.
  void clear() noexcept { size_ = 0; }

  // Rolls back to the first n tokens, e.g. to undo rejected draft tokens.
  void truncate(std::size_t n) {
    if (n > size_)
      throw std::out_of_range("kvcache: KVCache::truncate(" + std::to_string(n) +
                              ") past size() = " + std::to_string(size_));
    size_ = n;
  }

  // Releases the memory beyond size().
  void shrink_to_fit() {
    if (capacity_ > size_) reallocate(size_);
  }

 private:
  using Storage = Vector<T>;  // uninitialised on allocation, aligned

  Eigen::Map<Matrix<T>> head_block(Storage& s, std::size_t h) {
    return {s.data() + h * capacity_ * d_k_, static_cast<Eigen::Index>(capacity_),
            static_cast<Eigen::Index>(d_k_)};
  }
  HeadView view(const Storage& s, std::size_t h) const {
    return {s.data() + h * capacity_ * d_k_, static_cast<Eigen::Index>(size_),
            static_cast<Eigen::Index>(d_k_)};
  }

  void check_shape(const char* name, const Eigen::Ref<const Matrix<T>>& M) const {
    if (static_cast<std::size_t>(M.cols()) != kv_dim())
      throw std::invalid_argument(std::string("kvcache: KVCache::append: ") + name + " has " +
                                  std::to_string(M.cols()) + " columns, expected n_kv_heads * d_k = " +
                                  std::to_string(kv_dim()));
  }

  void check_limit(std::size_t n) const {
    if (max_tokens_ != 0 && n > max_tokens_)
      throw std::length_error("kvcache: KVCache would hold " + std::to_string(n) +
                              " tokens, past its limit max_tokens = " + std::to_string(max_tokens_));
  }

  std::size_t grown_capacity(std::size_t needed) const {
    std::size_t c = std::max<std::size_t>({needed, 2 * capacity_, 16});
    if (max_tokens_ != 0) c = std::min(c, max_tokens_);
    return c;
  }

  // Moves the cached rows into storage for new_capacity tokens. The new
  // buffers are filled before they replace the old ones, so a failed
  // allocation leaves the cache as it was.
  void reallocate(std::size_t new_capacity) {
    Storage keys(static_cast<Eigen::Index>(n_kv_heads_ * new_capacity * d_k_));
    Storage values(static_cast<Eigen::Index>(n_kv_heads_ * new_capacity * d_k_));
    const std::size_t head = size_ * d_k_;
    for (std::size_t h = 0; h < n_kv_heads_; ++h) {
      std::copy_n(keys_.data() + h * capacity_ * d_k_, head, keys.data() + h * new_capacity * d_k_);
      std::copy_n(values_.data() + h * capacity_ * d_k_, head, values.data() + h * new_capacity * d_k_);
    }
    keys_.swap(keys);
    values_.swap(values);
    capacity_ = new_capacity;
  }

  void swap(KVCache& other) noexcept {
    std::swap(n_kv_heads_, other.n_kv_heads_);
    std::swap(d_k_, other.d_k_);
    std::swap(max_tokens_, other.max_tokens_);
    std::swap(size_, other.size_);
    std::swap(capacity_, other.capacity_);
    keys_.swap(other.keys_);
    values_.swap(other.values_);
  }

  std::size_t n_kv_heads_ = 0;
  std::size_t d_k_ = 0;
  std::size_t max_tokens_ = 0;
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;
  Storage keys_;
  Storage values_;
};

}  // namespace kvcache
