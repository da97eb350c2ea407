// kvcache/kv_cache.hpp — one attention layer's keys and values.
//
//   KVRows<T>   the typed rows of one layer: n_kv_heads × capacity slots of
//               d_k keys and d_k values, stored as f32 (T), bf16 or int8.
//               Writes a token's rows at a slot, reads a tile back as T.
//               Knows nothing of positions or windows.
//   KVCache<T>  a KVRows with a SlotTable of its own (slots.hpp): a whole
//               cache for one layer of one sequence, for the attention layer
//               of attention.hpp. A Session (session.hpp) holds one table
//               and one KVRows per layer instead; detail::Caches is what
//               the two share.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>

#include <Eigen/Core>

#include "config.hpp"
#include "detail/io.hpp"
#include "kv_pool.hpp"
#include "slots.hpp"
#include "storage.hpp"

namespace kvcache {

// Layout: a byte array for the keys and one for the values (and, for int8,
// one for each one's scale codes). In each, kv head h holds one contiguous
// block of capacity() slots, a slot being the stored row of d_k values (or
// its scale code). With f32 storage a head's first n rows are therefore a
// dense matrix that attention reads with one Map. Capacity grows
// geometrically, so appending m tokens costs O(m) amortized however long the
// cache is. Copying costs O(size), so it is an explicit copy(), never a copy
// constructor; moving is free.
//
// Paged (a layer of a session with a KVPool): the rows live in the blocks of
// the session's detail::BlockTable, which grows and copies them; slots are
// contiguous only within a block, so view() is refused and load() and
// visit_raw() go a block at a time (contiguous() says how far a run goes).
template <typename T = float>
class KVRows {
 public:
  using HeadView = Eigen::Map<const Matrix<T>>;  // rows × d_k
  // The arrays, in visit_raw's order: the rows of keys and of values, then
  // (types with a scale per row) the keys' and the values' scale codes.
  enum Array : std::size_t { kKeys, kValues, kScales };

  KVRows(std::size_t n_kv_heads, std::size_t d_k, StorageType type) : n_kv_heads_(n_kv_heads), d_k_(d_k), type_(type) {
    if (n_kv_heads == 0 || d_k == 0)
      detail::io::invalid("KVCache needs n_kv_heads > 0 and d_k > 0, got n_kv_heads = ", n_kv_heads, ", d_k = ", d_k);
    storage_info(type, "KVType");
    if (type == StorageType::f16 || type == StorageType::q8_0 || type == StorageType::q4_0)
      throw std::invalid_argument(std::string("kvcache: KVType ") + to_string(type) +
                                  " is a weight type; a cache stores f32, bf16 or int8");
  }
  // A moved-from KVRows keeps its shape and holds nothing. (No copy
  // constructor: copy() makes the cost explicit.)
  // Layer `layer` of a paged session's blocks.
  KVRows(std::size_t n_kv_heads, std::size_t d_k, StorageType type, const detail::BlockTable* blocks,
         std::size_t layer)
      : KVRows(n_kv_heads, d_k, type) {
    paged_ = blocks;
    layer_ = layer;
  }
  KVRows(KVRows&& other) noexcept : n_kv_heads_(other.n_kv_heads_), d_k_(other.d_k_), type_(other.type_) {
    swap(other);
  }
  KVRows& operator=(KVRows&& other) noexcept {
    KVRows(std::move(other)).swap(*this);
    return *this;
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
  std::size_t capacity() const { return paged_ != nullptr ? paged_->blocks() * paged_->block_tokens() : capacity_; }
  bool paged() const { return paged_ != nullptr; }
  // Bytes one token takes in one kv head, keys or values.
  std::size_t row_bytes() const { return kvcache::row_bytes<T>(type_, d_k_); }
  // 2 × n_kv_heads × capacity × row_bytes().
  std::size_t bytes() const { return 2 * n_kv_heads_ * capacity() * row_bytes(); }

  // Room for `needed` slots, keeping the first `used`: geometric growth (as
  // appending does), capped at `limit` (0: none). On any exception nothing
  // changes.
  // (A paged KVRows grows through its BlockTable: these do nothing.)
  void grow(std::size_t needed, std::size_t used, std::size_t limit) {
    if (needed <= capacity_ || paged_ != nullptr) return;
    std::size_t c = std::max<std::size_t>({needed, 2 * capacity_, 16});
    if (limit != 0) c = std::min(c, limit);
    reallocate_from(*this, used, c);
  }
  // Exactly `capacity` slots (at least `used`), keeping the first `used`.
  void reallocate(std::size_t capacity, std::size_t used) {
    if (paged_ == nullptr) reallocate_from(*this, used, capacity);
  }

  // Writes one token: K_row and V_row hold n_kv_heads × d_k values, kv head
  // h in [h·d_k, (h+1)·d_k).
  void write(std::size_t slot, const T* K_row, const T* V_row) {
    for (std::size_t h = 0; h < n_kv_heads_; ++h) {
      store(kKeys, h, slot, K_row + h * d_k_);
      store(kValues, h, slot, V_row + h * d_k_);
    }
  }

  // A zero-copy view of head h's first n slots of array a (kKeys or
  // kValues): f32 storage only (throws std::logic_error for compact types,
  // which have no T to point at).
  HeadView view(std::size_t a, std::size_t h, std::size_t n) const {
    if (type_ != StorageType::f32 || paged_ != nullptr)
      throw std::logic_error(std::string("kvcache: KVCache::keys/values: the cache stores ") +
                             (paged_ != nullptr ? "paged blocks" : to_string(type_)) +
                             "; read it with load_keys/load_values");
    const auto* first = reinterpret_cast<const T*>(at(a, h, 0));
    return {first, static_cast<Eigen::Index>(n), static_cast<Eigen::Index>(d_k_)};
  }

  // Slots [first, first + count) of head h's array a (kKeys or kValues), as
  // T, into out (count × d_k, row-major): how attention reads compact types,
  // a tile at a time. Unchecked: the caller knows what is held.
  void load(std::size_t a, std::size_t h, std::size_t first, std::size_t count, T* out) const {
    while (count != 0) {
      const std::size_t run = std::min(count, contiguous(first));
      load_run(a, h, first, run, out);
      first += run;
      count -= run;
      out += run * d_k_;
    }
  }

  // Where slot `slot` of head h's array a is stored, and how many slots from
  // it on are stored one after the other (all of capacity() unless paged).
  const unsigned char* at(std::size_t a, std::size_t h, std::size_t slot) const {
    return paged_ != nullptr ? paged_->at(layer_, a, h, slot) : a_[a].data() + offset(a, h, slot);
  }
  std::size_t contiguous(std::size_t slot) const {
    return paged_ != nullptr ? paged_->contiguous(slot) : capacity_ - std::min(capacity_, slot);
  }

  // Rotates slots [first, first + length) of every head left by `by`: puts a
  // wrapped ring back in token order (noexcept: moves bytes in place).
  void rotate(std::size_t first, std::size_t length, std::size_t by) noexcept {
    if (paged_ != nullptr) return rotate_paged(first, length, by);
    for (std::size_t a = 0; a < arrays(); ++a)
      for (std::size_t h = 0; h < n_kv_heads_; ++h) {
        unsigned char* begin = a_[a].data() + offset(a, h, first);
        std::rotate(begin, begin + by * width(a), begin + length * width(a));
      }
  }

  // Calls f(bytes, n) for each of rows' stored arrays and kv head with the n bytes of
  // that head's first `used` slots (contiguous, in slot order), in this
  // order: the keys of heads 0 … n_kv_heads − 1, then the values; for int8
  // then the keys' scale codes and the values' (a byte per slot). Elements
  // are in the host's byte order; the arrays of one head add up to 2 × used
  // × row_bytes(). With a writable KVRows (Rows = KVRows), f gets writable
  // bytes: how a restored cache gets its contents.
  // (Paged: f gets each head's bytes a block at a time, in the same order.)
  template <typename Rows, typename F>
  static void visit_raw(Rows& rows, std::size_t used, F&& f) {
    for (std::size_t a = 0; a < rows.arrays(); ++a)
      for (std::size_t h = 0; h < rows.n_kv_heads_; ++h)
        for (std::size_t s = 0; s < used;) {
          const std::size_t run = std::min(used - s, rows.contiguous(s));
          f(const_cast<decltype(rows.a_[0].data())>(rows.at(a, h, s)), run * rows.width(a));
          s += run;
        }
  }

 private:
  using Bytes = Eigen::Matrix<unsigned char, Eigen::Dynamic, 1>;  // uninitialised on allocation, aligned

  std::size_t arrays() const { return storage_info(type_).row_extra != 0 ? 4 : 2; }
  // Bytes of one slot of array a.
  std::size_t width(std::size_t a) const {
    const std::size_t extra = storage_info(type_).row_extra;
    return a < kScales ? row_bytes() - extra : extra;
  }
  // Where array a holds slot `slot` of head h.
  std::size_t offset(std::size_t a, std::size_t h, std::size_t slot) const { return (h * capacity_ + slot) * width(a); }

  // The codec of each type, writing one row of d_k values to array a
  // (kKeys or kValues); load() reads rows back.
  void store(std::size_t a, std::size_t h, std::size_t slot, const T* x) {
    auto* to = const_cast<unsigned char*>(at(a, h, slot));
    unsigned char* code = type_ == StorageType::int8 ? const_cast<unsigned char*>(at(a + kScales, h, slot)) : nullptr;
    if (type_ == StorageType::f32)
      std::copy_n(x, d_k_, reinterpret_cast<T*>(to));
    else if (type_ == StorageType::bf16)
      std::transform(x, x + d_k_, reinterpret_cast<std::uint16_t*>(to), detail::to_bf16<T>);
    else
      *code = detail::quantize_int8(x, d_k_, reinterpret_cast<std::int8_t*>(to));
  }

  // load() of a run of slots stored one after the other.
  void load_run(std::size_t a, std::size_t h, std::size_t first, std::size_t count, T* out) const {
    const unsigned char* from = at(a, h, first);
    const unsigned char* codes = type_ == StorageType::int8 ? at(a + kScales, h, first) : nullptr;
    const auto* b16 = reinterpret_cast<const std::uint16_t*>(from);
    const auto* i8 = reinterpret_cast<const std::int8_t*>(from);
    const auto& scales = detail::int8_scales();
    if (type_ == StorageType::f32)
      std::copy_n(reinterpret_cast<const T*>(from), count * d_k_, out);
    else if (type_ == StorageType::bf16)
      std::transform(b16, b16 + count * d_k_, out, [](std::uint16_t v) { return T(detail::from_bf16(v)); });
    else
      for (std::size_t r = 0; r < count; ++r) {
        const T s = static_cast<T>(scales[codes[r]]);
        for (std::size_t c = 0; c < d_k_; ++c) out[r * d_k_ + c] = s * static_cast<T>(i8[r * d_k_ + c]);
      }
  }

  // rotate() over blocks: three reversals, each a series of swaps of two
  // slots' bytes (no memory needed). The blocks must be private to the session.
  void rotate_paged(std::size_t first, std::size_t length, std::size_t by) noexcept {
    const auto reverse = [&](std::size_t lo, std::size_t hi) {  // slots [lo, hi)
      for (; lo + 1 < hi; ++lo, --hi)
        for (std::size_t a = 0; a < arrays(); ++a)
          for (std::size_t h = 0; h < n_kv_heads_; ++h) {
            auto* x = const_cast<unsigned char*>(at(a, h, lo));
            std::swap_ranges(x, x + width(a), const_cast<unsigned char*>(at(a, h, hi - 1)));
          }
    };
    reverse(first, first + by);
    reverse(first + by, first + length);
    reverse(first, first + length);
  }

  // Allocates every array for `capacity` slots and copies source's first
  // `used` slots of each head into them. The arrays are filled before they
  // replace the old ones, so a failed allocation leaves *this as it was.
  void reallocate_from(const KVRows& source, std::size_t used, std::size_t capacity) {
    std::array<Bytes, 4> grown;
    for (std::size_t a = 0; a < arrays(); ++a) {
      grown[a].resize(static_cast<Eigen::Index>(n_kv_heads_ * capacity * width(a)));
      for (std::size_t h = 0; h < n_kv_heads_; ++h)
        std::copy_n(source.a_[a].data() + source.offset(a, h, 0), used * width(a),
                    grown[a].data() + h * capacity * width(a));
    }
    a_.swap(grown);
    capacity_ = capacity;
  }

  void swap(KVRows& other) noexcept {
    std::swap(n_kv_heads_, other.n_kv_heads_);
    std::swap(d_k_, other.d_k_);
    std::swap(type_, other.type_);
    std::swap(capacity_, other.capacity_);
    std::swap(paged_, other.paged_);
    std::swap(layer_, other.layer_);
    a_.swap(other.a_);
  }

  std::size_t n_kv_heads_ = 0;
  std::size_t d_k_ = 0;
  StorageType type_ = StorageType::f32;
  std::size_t capacity_ = 0;
  std::array<Bytes, 4> a_;  // only the first arrays() are ever allocated
  const detail::BlockTable* paged_ = nullptr;  // paged: the session's blocks, of which layer layer_
  std::size_t layer_ = 0;
};

namespace detail {

// What KVCache and Session share: one slot table and the rows of each layer
// (Layers holds one KVRows for a KVCache, one per layer for a Session), and
// every call that goes through all of them. Copies are explicit (the
// classes' copy()); moving is free and leaves the source holding no tokens.
template <typename T, typename Layers>
class Caches {
 public:
  // blocks: a paged session's table of blocks, which its layers point at.
  Caches(const SlotTable& table, Layers layers, std::unique_ptr<BlockTable> blocks = nullptr)
      : table_(table), layers_(std::move(layers)), blocks_(std::move(blocks)) {}
  Caches(Caches&& other) noexcept
      : table_(other.table_), layers_(std::move(other.layers_)), blocks_(std::move(other.blocks_)) {
    other.table_.clear();
  }
  Caches& operator=(Caches&& other) noexcept {
    table_ = other.table_;
    layers_ = std::move(other.layers_);
    blocks_ = std::move(other.blocks_);
    other.table_.clear();
    return *this;
  }

  const SlotTable& slot_table() const { return table_; }

  // Forgets every token (the reset between independent requests); keeps the
  // memory for the next request (paged: returns the blocks to the pool).
  void clear() noexcept {
    table_.clear();
    if (blocks_) blocks_->clear();
  }

  // Rolls back to the first n tokens held, e.g. to undo rejected draft
  // tokens. (A wrapped ring is first put back in token order, O(size).)
  void truncate(std::size_t n) {
    if (n > table_.size())
      throw std::out_of_range(io::text("kvcache: truncate(", n, ") past size() = ", table_.size()));
    const SlidingWindow w = table_.window();
    if (blocks_ && table_.ring_start() != 0) blocks_->prepare(table_.size(), w.sinks, w.window - 1);  // may throw
    table_.truncate(n, [&](std::size_t first, std::size_t length, std::size_t by) {
      for (auto& l : layers_) l.rotate(first, length, by);
    });
    if (blocks_) blocks_->trim(n);
  }

  // Makes the caches hold `size` tokens in the ring state given, with the
  // contents of their slots unspecified until write_raw fills them: the
  // first half of restoring a saved cache. Throws as check_state,
  // std::length_error past max_tokens(); on any exception no token changes.
  void restore_state(std::size_t size, std::size_t position, std::size_t ring_start) {
    check_state(size, position, ring_start);
    reserve(size);
    if (blocks_) {
      if (size != 0) blocks_->prepare(size, 0, size - 1);  // every slot written by write_raw
      blocks_->stop_tracking();             // the ids of the tokens are not known
    }
    table_.commit({size, position, ring_start});
  }

  // Throws std::invalid_argument unless restore_state(size, position,
  // ring_start) describes a state the caches can be in (SlotTable::check_state).
  void check_state(std::size_t size, std::size_t position, std::size_t ring_start) const {
    table_.check_state({size, position, ring_start});
  }

  // KVRows::visit_raw of every held slot, layer 0, then layer 1, …: how a
  // session file saves the caches, and, with writable bytes, how a restored
  // one gets its contents.
  template <typename F>
  void read_raw(F&& f) const {
    for (const auto& l : layers_) KVRows<T>::visit_raw(l, table_.size(), f);
  }
  template <typename F>
  void write_raw(F&& f) {
    for (auto& l : layers_) KVRows<T>::visit_raw(l, table_.size(), f);
  }

 protected:
  // Ensures room for n tokens without reallocating (a sliding window never
  // needs more than its window). Throws std::length_error past max_tokens();
  // on any exception no token changes (every layer keeps its tokens).
  void reserve(std::size_t n) {
    n = table_.slots_for(n);
    if (blocks_) return blocks_->prepare(n, 1, 0);
    for (auto& l : layers_)
      if (l.capacity() < n) l.reallocate(n, table_.size());
  }

  SlotTable table_;
  Layers layers_;
  std::unique_ptr<BlockTable> blocks_;  // paged only
};

// What a cache shows a reader: a slot table and the rows of one layer. Shared
// by KVCache (which owns both) and KVCacheView (a layer of a Session).
template <typename T, typename Derived>
class CacheReader {
 public:
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
  std::size_t evicted() const { return position() - size(); }
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
  HeadView keys(std::size_t h) const { return rows().view(KVRows<T>::kKeys, checked(h), size()); }
  HeadView values(std::size_t h) const { return rows().view(KVRows<T>::kValues, checked(h), size()); }

  // Writes slots [first, first + count) of head h, converted to T, to out
  // (count × d_k, row-major). Throws std::out_of_range past size() or
  // n_kv_heads().
  void load_keys(std::size_t h, std::size_t first, std::size_t count, T* out) const {
    rows().load(KVRows<T>::kKeys, checked(h, first, count), first, count, out);
  }
  void load_values(std::size_t h, std::size_t first, std::size_t count, T* out) const {
    rows().load(KVRows<T>::kValues, checked(h, first, count), first, count, out);
  }

 protected:
  const SlotTable& table() const { return static_cast<const Derived&>(*this).slot_table(); }
  const KVRows<T>& rows() const { return static_cast<const Derived&>(*this).kv_rows(); }

 private:
  // h, once head h and slots [first, first + count) are known to be held.
  std::size_t checked(std::size_t h, std::size_t first = 0, std::size_t count = 0) const {
    if (h >= n_kv_heads())
      throw std::out_of_range(io::text("kvcache: KVCache: kv head ", h, " past n_kv_heads = ", n_kv_heads()));
    if (first > size() || count > size() - first)
      throw std::out_of_range(
          io::text("kvcache: KVCache::load: slots [", first, ", ", first + count, ") past size() = ", size()));
    return h;
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
  // The bytes of every held slot (see KVRows::visit_raw).
  template <typename F>
  void read_raw(F&& f) const {
    KVRows<T>::visit_raw(*rows_, table_->size(), f);
  }

 private:
  const SlotTable* table_;
  const KVRows<T>* rows_;
};

// The keys and values of one attention layer for the tokens seen so far: a
// SlotTable and a KVRows of its own. Copying costs O(size), so it is an
// explicit copy(), never a copy constructor; a moved-from cache is empty,
// with no capacity, and still usable.
template <typename T = float>
class KVCache : public detail::Caches<T, std::array<KVRows<T>, 1>>, public detail::CacheReader<T, KVCache<T>> {
  using Base = detail::Caches<T, std::array<KVRows<T>, 1>>;

 public:
  // max_tokens == 0 means no limit other than memory. With a sliding window
  // the cache holds at most window.window tokens and never refuses a token,
  // so max_tokens must be 0 or equal to the window.
  KVCache(std::size_t n_kv_heads, std::size_t d_k, std::size_t max_tokens = 0, KVType type = KVType::f32,
          SlidingWindow window = {})
      : Base(SlotTable(max_tokens, window), {KVRows<T>(n_kv_heads, d_k, type)}) {}

  // A deep copy holding the same tokens (capacity trimmed to size()).
  KVCache copy() const { return KVCache(this->table_, kv_rows().copy(this->size())); }

  using Base::slot_table;
  SlotTable& slot_table() { return this->table_; }
  const KVRows<T>& kv_rows() const { return this->layers_[0]; }
  KVRows<T>& kv_rows() { return this->layers_[0]; }

  // reserve(n): room for n tokens without reallocating (detail::Caches).
  using Base::reserve;

  // Ensures room for m more tokens, growing geometrically as append does: a
  // caller that makes room before appending (to fail before changing
  // anything else) keeps append's O(m) amortized cost.
  void reserve_more(std::size_t m) {
    const std::size_t room = std::numeric_limits<std::size_t>::max() - this->size();
    kv_rows().grow(this->table_.slots_for(this->size() + std::min(m, room)), this->size(), this->max_tokens());
  }

  // Appends m tokens. K_new and V_new are m × (n_kv_heads·d_k), a row per
  // token with kv head h in columns [h·d_k, (h+1)·d_k). Throws (and changes
  // nothing) on a shape mismatch or past max_tokens(). A full sliding window
  // drops its oldest non-sink token for each new one.
  void append(const Eigen::Ref<const Matrix<T>>& K_new, const Eigen::Ref<const Matrix<T>>& V_new) {
    if (static_cast<std::size_t>(K_new.cols()) != this->kv_dim() || V_new.cols() != K_new.cols() ||
        V_new.rows() != K_new.rows())
      detail::io::invalid("KVCache::append: K_new is ", K_new.rows(), " × ", K_new.cols(), " and V_new ", V_new.rows(),
                          " × ", V_new.cols(), ", expected both m × n_kv_heads * d_k = m × ", this->kv_dim());
    reserve_more(static_cast<std::size_t>(K_new.rows()));
    this->table_.commit(this->table_.plan(static_cast<std::size_t>(K_new.rows()), false, [&](const SlotRun& run) {
      for (std::size_t i = 0; i < run.rows; ++i) {
        const auto r = static_cast<Eigen::Index>(run.first + i);
        kv_rows().write(run.slot + i, K_new.row(r).data(), V_new.row(r).data());
      }
    }));
  }

  // Releases the memory beyond size().
  void shrink_to_fit() {
    if (this->capacity() > this->size()) kv_rows().reallocate(this->size(), this->size());
  }

 private:
  KVCache(const SlotTable& table, KVRows<T> rows) : Base(table, {std::move(rows)}) {}
};

}  // namespace kvcache
