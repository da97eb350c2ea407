// kvcache/kv_cache.hpp — KVCache: one attention layer's keys and values.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include <Eigen/Core>

#include "config.hpp"
#include "storage.hpp"

namespace kvcache {

// What a cache does when it runs out of room.
//   window == 0: nothing; appending past max_tokens throws (the default).
//   window == W: a sliding window of W tokens that keeps the first `sinks`
//   tokens for ever (attention sinks, as in StreamingLLM) and drops the
//   oldest of the others to make room. Needs 0 < W and sinks < W.
struct SlidingWindow {
  std::size_t window = 0;
  std::size_t sinks = 0;
};

// The keys and values of one attention layer for the tokens seen so far.
//
// Layout: for each kv head h, keys live in one contiguous block of capacity()
// rows of d_k values (a row per token, a "slot"), and so do values. With
// KVType::full a head's first size() rows are therefore a dense matrix that
// attention reads with one Map, and appending m tokens writes m rows behind
// them. Capacity grows geometrically, so appending m tokens costs O(m)
// amortized however long the cache is.
//
// With a sliding window the slots [0, sinks) hold the sinks and [sinks, W) a
// ring buffer of the most recent tokens: once the cache is full an append
// overwrites the oldest slot of the ring, O(1), and slot order is no longer
// token order (attention does not care: it sums over all cached tokens).
//
// Copying costs O(size()), so it is an explicit copy(), never a copy
// constructor; moving is free.
template <typename T = float>
class KVCache {
 public:
  using Scalar = T;
  using HeadView = Eigen::Map<const Matrix<T>>;  // size() × d_k

  // max_tokens == 0 means no limit other than memory. With a sliding window
  // the cache holds at most window.window tokens and never refuses a token,
  // so max_tokens must be 0 or equal to the window.
  KVCache(std::size_t n_kv_heads, std::size_t d_k, std::size_t max_tokens = 0, KVType type = KVType::full,
          SlidingWindow window = {})
      : n_kv_heads_(n_kv_heads), d_k_(d_k), max_tokens_(max_tokens), type_(type), window_(window) {
    if (n_kv_heads == 0 || d_k == 0)
      throw std::invalid_argument("kvcache: KVCache needs n_kv_heads > 0 and d_k > 0, got n_kv_heads = " +
                                  std::to_string(n_kv_heads) + ", d_k = " + std::to_string(d_k));
    if (type != KVType::full && type != KVType::bf16 && type != KVType::int8)
      throw std::invalid_argument("kvcache: KVCache: unknown KVType " + std::to_string(static_cast<int>(type)));
    check_window(window);
    if (window.window != 0) {
      if (max_tokens != 0 && max_tokens != window.window)
        throw std::invalid_argument("kvcache: KVCache: max_tokens = " + std::to_string(max_tokens) +
                                    " with a sliding window of " + std::to_string(window.window) +
                                    " (the window is the limit; pass 0 or the window)");
      max_tokens_ = window.window;
    }
  }

  // Throws std::invalid_argument unless the window is off (0) or holds at
  // least one token besides its sinks.
  static void check_window(SlidingWindow w) {
    if (w.window == 0 && w.sinks != 0)
      throw std::invalid_argument("kvcache: attention sinks = " + std::to_string(w.sinks) +
                                  " need a sliding window (window = 0)");
    if (w.window != 0 && w.sinks >= w.window)
      throw std::invalid_argument("kvcache: sliding window of " + std::to_string(w.window) + " with " +
                                  std::to_string(w.sinks) + " sinks: need sinks < window");
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
    KVCache c(n_kv_heads_, d_k_, window_.window != 0 ? 0 : max_tokens_, type_, window_);
    c.reallocate_from(*this, size_);
    c.size_ = size_;
    c.position_ = position_;
    c.ring_start_ = ring_start_;
    return c;
  }

  std::size_t n_kv_heads() const { return n_kv_heads_; }
  std::size_t d_k() const { return d_k_; }
  std::size_t kv_dim() const { return n_kv_heads_ * d_k_; }
  KVType type() const { return type_; }
  SlidingWindow window() const { return window_; }
  // Tokens held (at most the window).
  std::size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  // Tokens appended since the last clear(), evicted ones included: the
  // position the next token takes in the sequence.
  std::size_t position() const { return position_; }
  // Tokens the sliding window has dropped.
  std::size_t evicted() const { return position_ - size_; }
  std::size_t capacity() const { return capacity_; }
  std::size_t max_tokens() const { return max_tokens_; }

  // Bytes one token takes in one kv head, keys or values.
  std::size_t row_bytes() const {
    switch (type_) {
      case KVType::bf16: return d_k_ * sizeof(std::uint16_t);
      case KVType::int8: return d_k_ * sizeof(std::int8_t) + 1;  // + the scale code
      case KVType::full: break;
    }
    return d_k_ * sizeof(T);
  }

  // Memory held for keys and values: 2 × n_kv_heads × capacity × row_bytes().
  std::size_t bytes() const { return 2 * n_kv_heads_ * capacity_ * row_bytes(); }

  // Zero-copy views of head h's cached keys and values, size() × d_k, in
  // slot order (token order until a sliding window wraps). Only for
  // KVType::full: compact types have no T to point at (throws
  // std::logic_error); read them with load_keys / load_values.
  HeadView keys(std::size_t h) const { return view(s_.K, h); }
  HeadView values(std::size_t h) const { return view(s_.V, h); }

  // Writes slots [first, first + count) of head h, converted to T, to out
  // (count × d_k, row-major). This is how attention reads compact types: a
  // tile at a time.
  void load_keys(std::size_t h, std::size_t first, std::size_t count, T* out) const {
    load(s_.K, s_.K16, s_.K8, s_.K_scale, h, first, count, out);
  }
  void load_values(std::size_t h, std::size_t first, std::size_t count, T* out) const {
    load(s_.V, s_.V16, s_.V8, s_.V_scale, h, first, count, out);
  }

  // The slot token i (0 = the oldest held) is stored in.
  std::size_t slot_of(std::size_t i) const {
    const std::size_t sinks = window_.sinks;
    if (i < sinks || ring_start_ == 0) return i;
    const std::size_t ring = window_.window - sinks;
    return sinks + (i - sinks + ring_start_) % ring;
  }

  // Ensures room for n tokens without reallocating (a sliding window never
  // needs more than its window). Throws std::length_error past max_tokens();
  // on any exception the cache is unchanged.
  void reserve(std::size_t n) {
    if (window_.window != 0) n = std::min(n, window_.window);
    if (n <= capacity_) return;
    check_limit(n);
    reallocate(n);
  }

  // Ensures room for m more tokens, growing geometrically as append does: a
  // caller that makes room before appending (to fail before changing
  // anything else) keeps append's O(m) amortized cost.
  void reserve_more(std::size_t m) {
    std::size_t needed = size_ + m;
    if (window_.window != 0) needed = std::min(needed, window_.window);
    check_limit(needed);
    if (needed > capacity_) reallocate(grown_capacity(needed));
  }

  // Appends m tokens. K_new and V_new are m × (n_kv_heads·d_k), a row per
  // token with kv head h in columns [h·d_k, (h+1)·d_k). Throws (and changes
  // nothing) on a shape mismatch or past max_tokens(). A full sliding window
  // drops its oldest non-sink token for each new one.
  void append(const Eigen::Ref<const Matrix<T>>& K_new, const Eigen::Ref<const Matrix<T>>& V_new) {
    check_shape("K_new", K_new);
    check_shape("V_new", V_new);
    if (K_new.rows() != V_new.rows())
      throw std::invalid_argument("kvcache: KVCache::append: K_new has " + std::to_string(K_new.rows()) +
                                  " rows but V_new has " + std::to_string(V_new.rows()));
    const std::size_t m = static_cast<std::size_t>(K_new.rows());
    reserve_more(m);
    for (std::size_t i = 0; i < m; ++i) {
      const std::size_t slot = next_slot();
      for (std::size_t h = 0; h < n_kv_heads_; ++h) {
        const T* k = K_new.row(static_cast<Eigen::Index>(i)).data() + h * d_k_;
        const T* v = V_new.row(static_cast<Eigen::Index>(i)).data() + h * d_k_;
        store(s_.K, s_.K16, s_.K8, s_.K_scale, h, slot, k);
        store(s_.V, s_.V16, s_.V8, s_.V_scale, h, slot, v);
      }
      advance();
    }
  }

  // Forgets every token (the reset between independent requests); keeps the
  // memory for the next request.
  void clear() noexcept {
    size_ = 0;
    position_ = 0;
    ring_start_ = 0;
  }

  // Rolls back to the first n tokens held, e.g. to undo rejected draft
  // tokens. (A wrapped ring is first put back in token order, O(size).)
  void truncate(std::size_t n) {
    if (n > size_)
      throw std::out_of_range("kvcache: KVCache::truncate(" + std::to_string(n) +
                              ") past size() = " + std::to_string(size_));
    unwrap();
    position_ -= size_ - n;
    size_ = n;
  }

  // Releases the memory beyond size().
  void shrink_to_fit() {
    if (capacity_ > size_) reallocate(size_);
  }

  // ---- Raw storage, for saving and restoring a cache (session_file.hpp) ----

  // Where the ring's oldest token is: slot sinks + ring_start() (0 until a
  // sliding window wraps, and after truncate).
  std::size_t ring_start() const { return ring_start_; }

  // Calls f(bytes, n) once for each stored array and kv head, with the n
  // bytes of that head's size() held slots (contiguous, in slot order), in
  // this order: the keys of heads 0 … n_kv_heads − 1, then the values; for
  // int8 then the keys' scale codes and the values' (a byte per slot).
  // Elements are in the host's byte order. n = size() × the array's bytes
  // per slot, so the arrays of one head add up to 2 × size() × row_bytes().
  template <typename F>
  void read_raw(F&& f) const {
    visit_raw(*this, f);
  }
  // The same with writable bytes: how a restored cache gets its contents.
  template <typename F>
  void write_raw(F&& f) {
    visit_raw(*this, f);
  }

  // Makes the cache hold `size` tokens in the ring state given, with the
  // contents of their slots unspecified until write_raw fills them: the
  // first half of restoring a saved cache. The state must be one that
  // appends, truncates and clears can reach: without a window position ==
  // size and ring_start == 0; with one size <= window, position >= size,
  // ring_start < window − sinks, and ring_start == 0 unless the window is
  // full. Throws std::invalid_argument otherwise, std::length_error past
  // max_tokens(); on any exception the cache is unchanged.
  void restore_state(std::size_t size, std::size_t position, std::size_t ring_start) {
    check_state(size, position, ring_start);
    reserve(size);
    size_ = size;
    position_ = position;
    ring_start_ = ring_start;
  }

  // Throws std::invalid_argument unless restore_state(size, position,
  // ring_start) describes a state this cache can be in.
  void check_state(std::size_t size, std::size_t position, std::size_t ring_start) const {
    const auto fail = [&](const std::string& why) {
      throw std::invalid_argument("kvcache: KVCache state size = " + std::to_string(size) + ", position = " +
                                  std::to_string(position) + ", ring_start = " + std::to_string(ring_start) +
                                  " is impossible: " + why);
    };
    if (max_tokens_ != 0 && size > max_tokens_) fail("size > max_tokens = " + std::to_string(max_tokens_));
    if (window_.window == 0) {
      if (position != size) fail("without a sliding window position == size");
      if (ring_start != 0) fail("without a sliding window ring_start == 0");
      return;
    }
    const std::size_t ring = window_.window - window_.sinks;
    if (position < size) fail("position < size");
    if (ring_start >= ring) fail("ring_start >= window - sinks = " + std::to_string(ring));
    if (ring_start != 0 && size != window_.window)
      fail("only a full window (size = " + std::to_string(window_.window) + ") has wrapped");
  }

 private:
  template <typename E>
  using Buffer = Eigen::Matrix<E, Eigen::Dynamic, 1>;  // uninitialised on allocation, aligned

  // Only the buffers of type_ are ever allocated. Each is n_kv_heads blocks
  // of capacity slots of `width` entries (d_k, or 1 for a scale code).
  struct Storage {
    Buffer<T> K, V;                        // full
    Buffer<std::uint16_t> K16, V16;        // bf16
    Buffer<std::int8_t> K8, V8;            // int8
    Buffer<std::uint8_t> K_scale, V_scale;  // int8: a scale code per slot
  };

  // Calls f(buffer_of_a, buffer_of_b, width) for each buffer type_ uses.
  template <typename F>
  void for_each_buffer(Storage& a, const Storage& b, F&& f) const {
    switch (type_) {
      case KVType::full:
        f(a.K, b.K, d_k_);
        f(a.V, b.V, d_k_);
        break;
      case KVType::bf16:
        f(a.K16, b.K16, d_k_);
        f(a.V16, b.V16, d_k_);
        break;
      case KVType::int8:
        f(a.K8, b.K8, d_k_);
        f(a.V8, b.V8, d_k_);
        f(a.K_scale, b.K_scale, 1);
        f(a.V_scale, b.V_scale, 1);
        break;
    }
  }

  // read_raw / write_raw for a const or mutable cache.
  template <typename Self, typename F>
  static void visit_raw(Self& self, F& f) {
    auto& s = self.s_;
    const auto heads = [&](auto& buffer, std::size_t width) {
      using Element = std::remove_reference_t<decltype(*buffer.data())>;
      using Byte = std::conditional_t<std::is_const<Self>::value, const unsigned char, unsigned char>;
      for (std::size_t h = 0; h < self.n_kv_heads_; ++h)
        f(reinterpret_cast<Byte*>(buffer.data() + h * self.capacity_ * width), self.size_ * width * sizeof(Element));
    };
    switch (self.type_) {
      case KVType::full:
        heads(s.K, self.d_k_);
        heads(s.V, self.d_k_);
        break;
      case KVType::bf16:
        heads(s.K16, self.d_k_);
        heads(s.V16, self.d_k_);
        break;
      case KVType::int8:
        heads(s.K8, self.d_k_);
        heads(s.V8, self.d_k_);
        heads(s.K_scale, 1);
        heads(s.V_scale, 1);
        break;
    }
  }

  HeadView view(const Buffer<T>& s, std::size_t h) const {
    if (type_ != KVType::full)
      throw std::logic_error(std::string("kvcache: KVCache::keys/values: the cache stores ") + to_string(type_) +
                             "; read it with load_keys/load_values");
    return {s.data() + h * capacity_ * d_k_, static_cast<Eigen::Index>(size_), static_cast<Eigen::Index>(d_k_)};
  }

  void store(Buffer<T>& full, Buffer<std::uint16_t>& b16, Buffer<std::int8_t>& i8, Buffer<std::uint8_t>& scale,
             std::size_t h, std::size_t slot, const T* x) {
    const std::size_t at = (h * capacity_ + slot) * d_k_;
    switch (type_) {
      case KVType::full:
        std::copy_n(x, d_k_, full.data() + at);
        break;
      case KVType::bf16:
        for (std::size_t c = 0; c < d_k_; ++c) b16[static_cast<Eigen::Index>(at + c)] = detail::to_bf16(static_cast<float>(x[c]));
        break;
      case KVType::int8:
        scale[static_cast<Eigen::Index>(h * capacity_ + slot)] = detail::quantize_int8(x, d_k_, i8.data() + at);
        break;
    }
  }

  void load(const Buffer<T>& full, const Buffer<std::uint16_t>& b16, const Buffer<std::int8_t>& i8,
            const Buffer<std::uint8_t>& scale, std::size_t h, std::size_t first, std::size_t count, T* out) const {
    if (first > size_ || count > size_ - first)
      throw std::out_of_range("kvcache: KVCache::load: slots [" + std::to_string(first) + ", " +
                              std::to_string(first + count) + ") past size() = " + std::to_string(size_));
    const std::size_t at = (h * capacity_ + first) * d_k_, n = count * d_k_;
    switch (type_) {
      case KVType::full:
        std::copy_n(full.data() + at, n, out);
        break;
      case KVType::bf16: {
        const std::uint16_t* src = b16.data() + at;
        for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<T>(detail::from_bf16(src[i]));
        break;
      }
      case KVType::int8: {
        const std::int8_t* src = i8.data() + at;
        const std::uint8_t* codes = scale.data() + h * capacity_ + first;
        const auto& scales = detail::int8_scales();
        for (std::size_t r = 0; r < count; ++r) {
          const T s = static_cast<T>(scales[codes[r]]);
          for (std::size_t c = 0; c < d_k_; ++c) out[r * d_k_ + c] = s * static_cast<T>(src[r * d_k_ + c]);
        }
        break;
      }
    }
  }

  // The slot the next token goes to: behind the others, or, in a full
  // window, over the oldest token of the ring.
  std::size_t next_slot() const {
    if (window_.window == 0 || size_ < window_.window) return size_;
    return window_.sinks + ring_start_;
  }
  void advance() {
    ++position_;
    if (window_.window == 0 || size_ < window_.window)
      ++size_;
    else
      ring_start_ = (ring_start_ + 1) % (window_.window - window_.sinks);
  }

  // Rotates every head's ring back into token order (noexcept: moves bytes
  // within buffers that exist).
  void unwrap() noexcept {
    if (ring_start_ == 0) return;
    const std::size_t sinks = window_.sinks, ring = window_.window - sinks;
    for_each_buffer(s_, s_, [&](auto& buffer, const auto&, std::size_t width) {
      for (std::size_t h = 0; h < n_kv_heads_; ++h) {
        auto* first = buffer.data() + (h * capacity_ + sinks) * width;
        std::rotate(first, first + ring_start_ * width, first + ring * width);
      }
    });
    ring_start_ = 0;
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

  void reallocate(std::size_t new_capacity) { reallocate_from(*this, new_capacity); }

  // Allocates every buffer for `new_capacity` slots and copies source's
  // first size() slots of each head into them. The buffers are filled before
  // they replace the old ones, so a failed allocation leaves *this as it was.
  void reallocate_from(const KVCache& source, std::size_t new_capacity) {
    Storage grown;
    const std::size_t used = source.size_;
    for_each_buffer(grown, source.s_, [&](auto& to, const auto& from, std::size_t width) {
      to.resize(static_cast<Eigen::Index>(n_kv_heads_ * new_capacity * width));
      for (std::size_t h = 0; h < n_kv_heads_; ++h)
        std::copy_n(from.data() + h * source.capacity_ * width, used * width, to.data() + h * new_capacity * width);
    });
    swap_storage(s_, grown);
    capacity_ = new_capacity;
  }

  static void swap_storage(Storage& a, Storage& b) noexcept {
    a.K.swap(b.K);
    a.V.swap(b.V);
    a.K16.swap(b.K16);
    a.V16.swap(b.V16);
    a.K8.swap(b.K8);
    a.V8.swap(b.V8);
    a.K_scale.swap(b.K_scale);
    a.V_scale.swap(b.V_scale);
  }

  void swap(KVCache& other) noexcept {
    std::swap(n_kv_heads_, other.n_kv_heads_);
    std::swap(d_k_, other.d_k_);
    std::swap(max_tokens_, other.max_tokens_);
    std::swap(type_, other.type_);
    std::swap(window_, other.window_);
    std::swap(size_, other.size_);
    std::swap(position_, other.position_);
    std::swap(ring_start_, other.ring_start_);
    std::swap(capacity_, other.capacity_);
    swap_storage(s_, other.s_);
  }

  std::size_t n_kv_heads_ = 0;
  std::size_t d_k_ = 0;
  std::size_t max_tokens_ = 0;
  KVType type_ = KVType::full;
  SlidingWindow window_;
  std::size_t size_ = 0;        // tokens held
  std::size_t position_ = 0;    // tokens appended since clear(), evicted included
  std::size_t ring_start_ = 0;  // the ring's oldest token is in slot sinks + ring_start_
  std::size_t capacity_ = 0;
  Storage s_;
};

}  // namespace kvcache
