// kvcache/kv_cache.hpp — one attention layer's keys and values.
//
//   KVRows<T>   the typed rows of one layer: n_kv_heads × capacity slots of
//               d_k keys and d_k values, stored as f32 (T), bf16 or int8.
//               Writes a token's rows at a slot, reads a tile back as T.
//               Knows nothing of positions or windows.
//   KVCache<T>  a KVRows with a SlotTable of its own (slots.hpp): a whole
//               cache for one layer of one sequence, for the attention layer
//               of attention.hpp. A Session (session.hpp) holds one table
//               and one KVRows per layer instead.
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
#include "slots.hpp"
#include "storage.hpp"

namespace kvcache {

// Layout: for each kv head h, keys live in one contiguous block of capacity()
// rows of d_k values (a row per slot), and so do values. With f32 storage a
// head's first n rows are therefore a dense matrix that attention reads with
// one Map. Capacity grows geometrically, so appending m tokens costs O(m)
// amortized however long the cache is. Copying costs O(size), so it is an
// explicit copy(), never a copy constructor; moving is free.
template <typename T = float>
class KVRows {
 public:
  using HeadView = Eigen::Map<const Matrix<T>>;  // rows × d_k

  KVRows() = default;
  KVRows(std::size_t n_kv_heads, std::size_t d_k, StorageType type) : n_kv_heads_(n_kv_heads), d_k_(d_k), type_(type) {
    if (n_kv_heads == 0 || d_k == 0)
      throw std::invalid_argument("kvcache: KVCache needs n_kv_heads > 0 and d_k > 0, got n_kv_heads = " +
                                  std::to_string(n_kv_heads) + ", d_k = " + std::to_string(d_k));
    storage_info(type, "KVType");
    if (type == StorageType::f16 || type == StorageType::q8_0)
      throw std::invalid_argument(std::string("kvcache: KVType ") + to_string(type) +
                                  " is a weight type; a cache stores f32, bf16 or int8");
  }
  KVRows(const KVRows&) = delete;
  KVRows& operator=(const KVRows&) = delete;
  KVRows(KVRows&& other) noexcept { swap(other); }
  KVRows& operator=(KVRows&& other) noexcept {
    KVRows(std::move(other)).swap(*this);
    return *this;
  }
  ~KVRows() = default;

  // The same shape and type, holding nothing.
  KVRows shape_only() const noexcept {
    KVRows r;
    r.n_kv_heads_ = n_kv_heads_;
    r.d_k_ = d_k_;
    r.type_ = type_;
    return r;
  }

  // The first `used` slots, in a copy with exactly that capacity.
  KVRows copy(std::size_t used) const {
    KVRows c(n_kv_heads_, d_k_, type_);
    c.reallocate_from(*this, used, used);
    return c;
  }

  std::size_t n_kv_heads() const { return n_kv_heads_; }
  std::size_t d_k() const { return d_k_; }
  StorageType type() const { return type_; }
  std::size_t capacity() const { return capacity_; }
  // Bytes one token takes in one kv head, keys or values.
  std::size_t row_bytes() const { return kvcache::row_bytes<T>(type_, d_k_); }
  // 2 × n_kv_heads × capacity × row_bytes().
  std::size_t bytes() const { return 2 * n_kv_heads_ * capacity_ * row_bytes(); }

  // Room for `needed` slots, keeping the first `used`: geometric growth (as
  // appending does), capped at `limit` (0: none). On any exception nothing
  // changes.
  void grow(std::size_t needed, std::size_t used, std::size_t limit) {
    if (needed <= capacity_) return;
    std::size_t c = std::max<std::size_t>({needed, 2 * capacity_, 16});
    if (limit != 0) c = std::min(c, limit);
    reallocate_from(*this, used, c);
  }
  // Exactly `capacity` slots (at least `used`), keeping the first `used`.
  void reallocate(std::size_t capacity, std::size_t used) { reallocate_from(*this, used, capacity); }

  // Writes one token: K_row and V_row hold n_kv_heads × d_k values, kv head
  // h in [h·d_k, (h+1)·d_k).
  void write(std::size_t slot, const T* K_row, const T* V_row) {
    for (std::size_t h = 0; h < n_kv_heads_; ++h) {
      store(s_.K, s_.K16, s_.K8, s_.K_scale, h, slot, K_row + h * d_k_);
      store(s_.V, s_.V16, s_.V8, s_.V_scale, h, slot, V_row + h * d_k_);
    }
  }

  // Slots [first, first + count) of head h's keys or values, as T, into out
  // (count × d_k, row-major): how attention reads compact types, a tile at a
  // time. Unchecked: the caller knows what is held.
  void load_keys(std::size_t h, std::size_t first, std::size_t count, T* out) const {
    load(s_.K, s_.K16, s_.K8, s_.K_scale, h, first, count, out);
  }
  void load_values(std::size_t h, std::size_t first, std::size_t count, T* out) const {
    load(s_.V, s_.V16, s_.V8, s_.V_scale, h, first, count, out);
  }

  // Zero-copy views of head h's first n slots: f32 storage only (throws
  // std::logic_error for compact types, which have no T to point at).
  HeadView keys(std::size_t h, std::size_t n) const { return view(s_.K, h, n); }
  HeadView values(std::size_t h, std::size_t n) const { return view(s_.V, h, n); }

  // Rotates slots [first, first + length) of every head left by `by`: puts a
  // wrapped ring back in token order (noexcept: moves bytes in place).
  void rotate(std::size_t first, std::size_t length, std::size_t by) noexcept {
    for_each_buffer(s_, s_, [&](auto& buffer, const auto&, std::size_t width) {
      for (std::size_t h = 0; h < n_kv_heads_; ++h) {
        auto* begin = buffer.data() + (h * capacity_ + first) * width;
        std::rotate(begin, begin + by * width, begin + length * width);
      }
    });
  }

  // Calls f(bytes, n) for each stored array and kv head with the n bytes of
  // that head's first `used` slots (contiguous, in slot order), in this
  // order: the keys of heads 0 … n_kv_heads − 1, then the values; for int8
  // then the keys' scale codes and the values' (a byte per slot). Elements
  // are in the host's byte order; the arrays of one head add up to 2 × used
  // × row_bytes(). With a writable KVRows, f gets writable bytes: how a
  // restored cache gets its contents.
  template <typename F>
  void visit_raw(std::size_t used, F&& f) const {
    visit_raw_of(*this, used, f);
  }
  template <typename F>
  void visit_raw(std::size_t used, F&& f) {
    visit_raw_of(*this, used, f);
  }

 private:
  template <typename E>
  using Buffer = Eigen::Matrix<E, Eigen::Dynamic, 1>;  // uninitialised on allocation, aligned

  // Only the buffers of type_ are ever allocated. Each is n_kv_heads blocks
  // of capacity slots of `width` entries (d_k, or 1 for a scale code).
  struct Storage {
    Buffer<T> K, V;                         // f32
    Buffer<std::uint16_t> K16, V16;         // bf16
    Buffer<std::int8_t> K8, V8;             // int8
    Buffer<std::uint8_t> K_scale, V_scale;  // int8: a scale code per slot
  };

  // Calls f(buffer_of_a, buffer_of_b, width) for each buffer type_ uses, in
  // the order visit_raw documents. The one switch over the buffers.
  template <typename A, typename B, typename F>
  void for_each_buffer(A& a, B& b, F&& f) const {
    switch (type_) {
      case StorageType::f32:
        f(a.K, b.K, d_k_);
        f(a.V, b.V, d_k_);
        break;
      case StorageType::bf16:
        f(a.K16, b.K16, d_k_);
        f(a.V16, b.V16, d_k_);
        break;
      case StorageType::int8:
        f(a.K8, b.K8, d_k_);
        f(a.V8, b.V8, d_k_);
        f(a.K_scale, b.K_scale, 1);
        f(a.V_scale, b.V_scale, 1);
        break;
      default:  // f16, q8_0: refused by the constructor
        break;
    }
  }

  template <typename Self, typename F>
  static void visit_raw_of(Self& self, std::size_t used, F& f) {
    using Byte = std::conditional_t<std::is_const<Self>::value, const unsigned char, unsigned char>;
    self.for_each_buffer(self.s_, self.s_, [&](auto& buffer, const auto&, std::size_t width) {
      using Element = std::remove_reference_t<decltype(*buffer.data())>;
      for (std::size_t h = 0; h < self.n_kv_heads_; ++h)
        f(reinterpret_cast<Byte*>(buffer.data() + h * self.capacity_ * width), used * width * sizeof(Element));
    });
  }

  HeadView view(const Buffer<T>& s, std::size_t h, std::size_t n) const {
    if (type_ != StorageType::f32)
      throw std::logic_error(std::string("kvcache: KVCache::keys/values: the cache stores ") + to_string(type_) +
                             "; read it with load_keys/load_values");
    return {s.data() + h * capacity_ * d_k_, static_cast<Eigen::Index>(n), static_cast<Eigen::Index>(d_k_)};
  }

  // The codec of each type, writing one row of d_k values.
  void store(Buffer<T>& full, Buffer<std::uint16_t>& b16, Buffer<std::int8_t>& i8, Buffer<std::uint8_t>& scale,
             std::size_t h, std::size_t slot, const T* x) {
    const std::size_t at = (h * capacity_ + slot) * d_k_;
    switch (type_) {
      case StorageType::f32:
        std::copy_n(x, d_k_, full.data() + at);
        break;
      case StorageType::bf16:
        for (std::size_t c = 0; c < d_k_; ++c) b16.data()[at + c] = detail::to_bf16(x[c]);
        break;
      case StorageType::int8:
        scale.data()[h * capacity_ + slot] = detail::quantize_int8(x, d_k_, i8.data() + at);
        break;
      default:
        break;
    }
  }

  // ... and reading `count` rows back as T.
  void load(const Buffer<T>& full, const Buffer<std::uint16_t>& b16, const Buffer<std::int8_t>& i8,
            const Buffer<std::uint8_t>& scale, std::size_t h, std::size_t first, std::size_t count, T* out) const {
    const std::size_t at = (h * capacity_ + first) * d_k_, n = count * d_k_;
    switch (type_) {
      case StorageType::f32:
        std::copy_n(full.data() + at, n, out);
        break;
      case StorageType::bf16:
        for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<T>(detail::from_bf16(b16.data()[at + i]));
        break;
      case StorageType::int8: {
        const std::int8_t* src = i8.data() + at;
        const std::uint8_t* codes = scale.data() + h * capacity_ + first;
        const auto& scales = detail::int8_scales();
        for (std::size_t r = 0; r < count; ++r) {
          const T s = static_cast<T>(scales[codes[r]]);
          for (std::size_t c = 0; c < d_k_; ++c) out[r * d_k_ + c] = s * static_cast<T>(src[r * d_k_ + c]);
        }
        break;
      }
      default:
        break;
    }
  }

  // Allocates every buffer for `capacity` slots and copies source's first
  // `used` slots of each head into them. The buffers are filled before they
  // replace the old ones, so a failed allocation leaves *this as it was.
  void reallocate_from(const KVRows& source, std::size_t used, std::size_t capacity) {
    Storage grown;
    for_each_buffer(grown, source.s_, [&](auto& to, const auto& from, std::size_t width) {
      to.resize(static_cast<Eigen::Index>(n_kv_heads_ * capacity * width));
      for (std::size_t h = 0; h < n_kv_heads_; ++h)
        std::copy_n(from.data() + h * source.capacity_ * width, used * width, to.data() + h * capacity * width);
    });
    swap_storage(s_, grown);
    capacity_ = capacity;
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

  void swap(KVRows& other) noexcept {
    std::swap(n_kv_heads_, other.n_kv_heads_);
    std::swap(d_k_, other.d_k_);
    std::swap(type_, other.type_);
    std::swap(capacity_, other.capacity_);
    swap_storage(s_, other.s_);
  }

  std::size_t n_kv_heads_ = 0;
  std::size_t d_k_ = 0;
  StorageType type_ = StorageType::f32;
  std::size_t capacity_ = 0;
  Storage s_;
};

namespace detail {

// What a cache shows a reader: a slot table and the rows of one layer. Shared
// by KVCache (which owns both) and KVCacheView (a layer of a Session).
template <typename T, typename Derived>
class CacheReader {
 public:
  using Scalar = T;
  using HeadView = typename KVRows<T>::HeadView;  // size() × d_k

  std::size_t n_kv_heads() const { return rows().n_kv_heads(); }
  std::size_t d_k() const { return rows().d_k(); }
  std::size_t kv_dim() const { return n_kv_heads() * d_k(); }
  StorageType type() const { return rows().type(); }
  SlidingWindow window() const { return table().window(); }
  // Tokens held (at most the window).
  std::size_t size() const { return table().size(); }
  bool empty() const { return size() == 0; }
  // Tokens appended since the last clear(), evicted ones included: the
  // position the next token takes in the sequence.
  std::size_t position() const { return table().position(); }
  // Tokens the sliding window has dropped.
  std::size_t evicted() const { return table().evicted(); }
  std::size_t capacity() const { return rows().capacity(); }
  std::size_t max_tokens() const { return table().max_tokens(); }
  std::size_t row_bytes() const { return rows().row_bytes(); }
  // Memory held for keys and values: 2 × n_kv_heads × capacity × row_bytes().
  std::size_t bytes() const { return rows().bytes(); }
  // Where the ring's oldest token is: slot sinks + ring_start() (0 until a
  // sliding window wraps, and after truncate).
  std::size_t ring_start() const { return table().ring_start(); }
  // The slot token i (0 = the oldest held) is stored in.
  std::size_t slot_of(std::size_t i) const { return table().slot_of(i); }

  // Zero-copy views of head h's cached keys and values, size() × d_k, in
  // slot order (token order until a sliding window wraps). f32 storage only
  // (std::logic_error otherwise: read compact types with load_keys /
  // load_values); std::out_of_range for a head past n_kv_heads().
  HeadView keys(std::size_t h) const { return rows().keys(checked_head(h), size()); }
  HeadView values(std::size_t h) const { return rows().values(checked_head(h), size()); }

  // Writes slots [first, first + count) of head h, converted to T, to out
  // (count × d_k, row-major). Throws std::out_of_range past size() or
  // n_kv_heads().
  void load_keys(std::size_t h, std::size_t first, std::size_t count, T* out) const {
    check_slots(h, first, count);
    rows().load_keys(h, first, count, out);
  }
  void load_values(std::size_t h, std::size_t first, std::size_t count, T* out) const {
    check_slots(h, first, count);
    rows().load_values(h, first, count, out);
  }

  // The bytes of every held slot (see KVRows::visit_raw): how a session
  // file saves a cache.
  template <typename F>
  void read_raw(F&& f) const {
    rows().visit_raw(size(), f);
  }

 protected:
  const SlotTable& table() const { return static_cast<const Derived&>(*this).slot_table(); }
  const KVRows<T>& rows() const { return static_cast<const Derived&>(*this).kv_rows(); }

 private:
  std::size_t checked_head(std::size_t h) const {
    if (h >= n_kv_heads())
      throw std::out_of_range("kvcache: KVCache: kv head " + std::to_string(h) + " past n_kv_heads = " +
                              std::to_string(n_kv_heads()));
    return h;
  }
  void check_slots(std::size_t h, std::size_t first, std::size_t count) const {
    checked_head(h);
    if (first > size() || count > size() - first)
      throw std::out_of_range("kvcache: KVCache::load: slots [" + std::to_string(first) + ", " +
                              std::to_string(first + count) + ") past size() = " + std::to_string(size()));
  }
};

}  // namespace detail

// A read-only view of one layer of a Session: its cache as a KVCache shows it.
template <typename T = float>
class KVCacheView : public detail::CacheReader<T, KVCacheView<T>> {
 public:
  KVCacheView(const SlotTable& table, const KVRows<T>& rows) : table_(&table), rows_(&rows) {}
  const SlotTable& slot_table() const { return *table_; }
  const KVRows<T>& kv_rows() const { return *rows_; }

 private:
  const SlotTable* table_;
  const KVRows<T>* rows_;
};

// The keys and values of one attention layer for the tokens seen so far: a
// SlotTable and a KVRows of its own.
template <typename T = float>
class KVCache : public detail::CacheReader<T, KVCache<T>> {
 public:
  // max_tokens == 0 means no limit other than memory. With a sliding window
  // the cache holds at most window.window tokens and never refuses a token,
  // so max_tokens must be 0 or equal to the window.
  KVCache(std::size_t n_kv_heads, std::size_t d_k, std::size_t max_tokens = 0, KVType type = KVType::f32,
          SlidingWindow window = {})
      : rows_(n_kv_heads, d_k, type), table_(max_tokens, window) {}

  static void check_window(SlidingWindow w) { kvcache::check_window(w); }

  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;
  // A moved-from cache is empty, with no capacity, and still usable.
  KVCache(KVCache&& other) noexcept : rows_(std::move(other.rows_)), table_(other.table_) {
    other.rows_ = rows_.shape_only();
    other.table_.clear();
  }
  KVCache& operator=(KVCache&& other) noexcept {
    KVCache(std::move(other)).swap(*this);
    return *this;
  }
  ~KVCache() = default;

  // A deep copy holding the same tokens (capacity trimmed to size()).
  KVCache copy() const {
    KVCache c(*this, rows_.copy(this->size()));
    return c;
  }

  const SlotTable& slot_table() const { return table_; }
  const KVRows<T>& kv_rows() const { return rows_; }
  SlotTable& slot_table() { return table_; }
  KVRows<T>& kv_rows() { return rows_; }

  // Ensures room for n tokens without reallocating (a sliding window never
  // needs more than its window). Throws std::length_error past max_tokens();
  // on any exception the cache is unchanged.
  void reserve(std::size_t n) {
    if (this->window().window != 0) n = std::min(n, this->window().window);
    if (n <= rows_.capacity()) return;
    table_.check_limit(n);
    rows_.reallocate(n, this->size());
  }

  // Ensures room for m more tokens, growing geometrically as append does: a
  // caller that makes room before appending (to fail before changing
  // anything else) keeps append's O(m) amortized cost.
  void reserve_more(std::size_t m) {
    const std::size_t needed = table_.size_after(m);
    table_.check_limit(needed);
    rows_.grow(needed, this->size(), table_.max_tokens());
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
    reserve_more(static_cast<std::size_t>(K_new.rows()));
    const SlotTable::State end =
        table_.for_each_slot(static_cast<std::size_t>(K_new.rows()), [&](std::size_t i, std::size_t slot) {
          const auto r = static_cast<Eigen::Index>(i);
          rows_.write(slot, K_new.row(r).data(), V_new.row(r).data());
        });
    table_.commit(end);
  }

  // Forgets every token (the reset between independent requests); keeps the
  // memory for the next request.
  void clear() noexcept { table_.clear(); }

  // Rolls back to the first n tokens held, e.g. to undo rejected draft
  // tokens. (A wrapped ring is first put back in token order, O(size).)
  void truncate(std::size_t n) {
    if (n > this->size())
      throw std::out_of_range("kvcache: KVCache::truncate(" + std::to_string(n) + ") past size() = " +
                              std::to_string(this->size()));
    table_.truncate(n, [&](std::size_t first, std::size_t length, std::size_t by) { rows_.rotate(first, length, by); });
  }

  // Releases the memory beyond size().
  void shrink_to_fit() {
    if (rows_.capacity() > this->size()) rows_.reallocate(this->size(), this->size());
  }

  // The same with writable bytes: how a restored cache gets its contents.
  template <typename F>
  void write_raw(F&& f) {
    rows_.visit_raw(this->size(), f);
  }

  // Makes the cache hold `size` tokens in the ring state given, with the
  // contents of their slots unspecified until write_raw fills them: the
  // first half of restoring a saved cache. Throws as check_state,
  // std::length_error past max_tokens(); on any exception the cache is
  // unchanged.
  void restore_state(std::size_t size, std::size_t position, std::size_t ring_start) {
    check_state(size, position, ring_start);
    reserve(size);
    table_.commit({size, position, ring_start});
  }

  // Throws std::invalid_argument unless restore_state(size, position,
  // ring_start) describes a state this cache can be in (SlotTable::check_state).
  void check_state(std::size_t size, std::size_t position, std::size_t ring_start) const {
    table_.check_state({size, position, ring_start});
  }

 private:
  KVCache(const KVCache& like, KVRows<T> rows) : rows_(std::move(rows)), table_(like.table_) {}

  void check_shape(const char* name, const Eigen::Ref<const Matrix<T>>& M) const {
    if (static_cast<std::size_t>(M.cols()) != this->kv_dim())
      throw std::invalid_argument(std::string("kvcache: KVCache::append: ") + name + " has " +
                                  std::to_string(M.cols()) + " columns, expected n_kv_heads * d_k = " +
                                  std::to_string(this->kv_dim()));
  }

  void swap(KVCache& other) noexcept {
    std::swap(rows_, other.rows_);
    std::swap(table_, other.table_);
  }

  KVRows<T> rows_;
  SlotTable table_;
};

}  // namespace kvcache
