// kvcache/kv_pool.hpp — KVPool: paged keys and values shared by the sessions
// of one decoder.
//
// A block holds B consecutive slots (B = block_tokens, 16 by default) of a
// sequence in every layer, as the storage type of the pool (f32, bf16 or
// int8). A paged session (Decoder::new_session with a pool) keeps a table of blocks, a
// detail::BlockTable: slot s of layer l lives in block s / B, at the layer's
// slice of it. Blocks are handed out on demand, under an optional budget,
// and counted: a block that several sessions map (a fork, a shared prompt)
// is stored once, and returned when none of them uses it.
//
// Prefix sharing: once a block is full with the tokens [kB, (k+1)B) of a
// sequence that holds its prefix from position 0, it is published under the
// exact token ids up to its end: its own B ids and the serial of the block
// before it (each published block has a serial that is never reused, so the
// chain of serials names the whole prefix; a hash of the pair finds it, and
// collisions are resolved by comparing the ids and the parent serial). The
// pool is bound to one model and one storage type, the rest of a block's
// identity. A new session whose first tokens match published blocks maps
// them and computes only the rest. A block no session uses stays published
// until the budget needs its memory, least recently released first. A session
// writes only into a block no other session can see: a shared block is
// copied first, a published one that only it maps is withdrawn first.
//
// Block layout, for each layer l (at l × layer_bytes): the keys of kv heads
// 0 … H−1 (B rows of d_k each), then the values, then for int8 the keys' and
// the values' scale codes (B bytes per head each).
//
// Thread safety: every call takes the pool's mutex; sessions on different
// threads share one pool. A block's bytes are written only by a session that
// alone maps it, and read without a lock.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <unordered_map>
#include <vector>

#include <Eigen/Core>

#include "detail/io.hpp"
#include "storage.hpp"

namespace kvcache {

struct KVPoolOptions {
  std::size_t block_tokens = 16;  // B: slots per block
  std::size_t budget_bytes = 0;   // most bytes of blocks held at once; 0: no limit
  bool prefix_sharing = true;     // publish full blocks and map them into new sessions
};

// What the pool holds and has saved, for --stats.
struct KVPoolStats {
  std::size_t blocks = 0;         // held now: mapped by a session or kept published
  std::size_t cached_blocks = 0;  // of which no session maps (evictable)
  std::size_t bytes = 0;          // blocks × block_bytes
  std::size_t bytes_peak = 0;     // the most bytes held at once
  // Bytes of the tokens the held blocks store (a shared token counted once),
  // now and when bytes_peak was reached.
  std::size_t bytes_needed = 0;
  std::size_t bytes_needed_at_peak = 0;
  std::size_t prefix_hit_tokens = 0;  // tokens new sessions mapped instead of computing
  std::size_t evicted_blocks = 0;
};

namespace detail {

struct KVBlock {
  Eigen::Matrix<unsigned char, Eigen::Dynamic, 1> bytes;  // block_bytes, aligned
  std::size_t refs = 0;    // sessions that map it
  std::size_t filled = 0;  // slots holding tokens (for bytes_needed)
  // Published: findable by its prefix, kept when refs drop to 0.
  bool published = false;
  std::uint64_t serial = 0, parent = 0, hash = 0;
  std::vector<int> ids;                            // its B token ids, once published
  KVBlock *lru_prev = nullptr, *lru_next = nullptr;  // refs == 0 and published
};

}  // namespace detail

class KVPool {
 public:
  // The shape of the blocks: layers, kv heads, d_k, the storage type and the
  // bytes of one stored row of d_k values (row_bytes<T>(type, d_k)). `model`
  // names the model whose sessions may use the pool. Throws
  // std::invalid_argument on block_tokens = 0 or a budget under one block.
  KVPool(const void* model, std::size_t n_layers, std::size_t n_kv_heads, std::size_t d_k, StorageType type,
         std::size_t row_bytes, const KVPoolOptions& options)
      : model_(model), n_layers_(n_layers), n_kv_heads_(n_kv_heads), d_k_(d_k), type_(type), row_bytes_(row_bytes),
        extra_(storage_info(type).row_extra), options_(options) {
    if (options.block_tokens == 0) detail::io::invalid("KVPool: block_tokens = 0, need at least 1");
    if (options.budget_bytes != 0 && options.budget_bytes < block_bytes())
      detail::io::invalid("KVPool: budget of ", options.budget_bytes, " bytes is under one block of ", block_bytes(),
                  " bytes");
  }
  KVPool(const KVPool&) = delete;
  KVPool& operator=(const KVPool&) = delete;
  ~KVPool() {
    while (lru_head_ != nullptr) destroy(lru_pop());
  }

  const void* model() const { return model_; }
  std::size_t n_layers() const { return n_layers_; }
  std::size_t n_kv_heads() const { return n_kv_heads_; }
  std::size_t d_k() const { return d_k_; }
  StorageType type() const { return type_; }
  const KVPoolOptions& options() const { return options_; }
  std::size_t block_tokens() const { return options_.block_tokens; }
  // Bytes of one slot of array a of a layer (0 keys, 1 values, 2/3 scales).
  std::size_t width(std::size_t a) const { return a < 2 ? row_bytes_ - extra_ : extra_; }
  std::size_t arrays() const { return extra_ != 0 ? 4 : 2; }
  // Where array a of kv head h starts within a layer's slice of a block.
  std::size_t array_offset(std::size_t a, std::size_t h) const {
    const std::size_t B = block_tokens(), H = n_kv_heads_;
    const std::size_t starts[] = {0, H * B * width(0), 2 * H * B * width(0), 2 * H * B * width(0) + H * B * extra_};
    return starts[a] + h * B * width(a);
  }
  std::size_t layer_bytes() const { return 2 * n_kv_heads_ * block_tokens() * row_bytes_; }
  std::size_t block_bytes() const { return n_layers_ * layer_bytes(); }

  KVPoolStats stats() const {
    std::lock_guard<std::mutex> lock(mutex_);
    KVPoolStats s = stats_;
    s.bytes = s.blocks * block_bytes();
    s.bytes_needed = needed_tokens_ * token_bytes();
    return s;
  }

  // ---- For sessions (detail::BlockTable) -----------------------------------

  // Makes `blocks` (a session's table) hold `need` blocks, with blocks
  // [lo, hi] writable: those another session maps are replaced by copies,
  // published ones that only it maps are withdrawn, and new blocks are
  // appended (unpublished first, then ones taken back from the cache, least
  // recently released first). Throws std::length_error when the budget
  // cannot hold them (or std::bad_alloc); then nothing changes.
  void prepare(std::vector<detail::KVBlock*>& blocks, std::size_t need, std::size_t lo, std::size_t hi) {
    blocks.reserve(need);
    std::lock_guard<std::mutex> lock(mutex_);
    std::size_t copies = 0;
    for (std::size_t k = lo; k <= hi && k < blocks.size(); ++k) copies += blocks[k]->refs > 1;
    const std::size_t n = copies + (need > blocks.size() ? need - blocks.size() : 0);
    if (n == 0) {
      for (std::size_t k = lo; k <= hi && k < blocks.size(); ++k) withdraw(blocks[k]);
      return;
    }
    std::vector<detail::KVBlock*> got = take(n);  // the only step that throws
    for (std::size_t k = lo; k <= hi && k < blocks.size(); ++k) {
      if (blocks[k]->refs == 1) {
        withdraw(blocks[k]);
        continue;
      }
      detail::KVBlock* copy = got.back();
      got.pop_back();
      copy->bytes = blocks[k]->bytes;  // same size: no allocation
      set_filled(copy, blocks[k]->filled);
      --blocks[k]->refs;
      blocks[k] = copy;
    }
    blocks.insert(blocks.end(), got.begin(), got.end());
  }

  // One more session maps b.
  void retain(detail::KVBlock* b) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (b->refs++ == 0) lru_unlink(b);
  }

  // A session no longer maps b: freed, or kept in the cache if published.
  void release(detail::KVBlock* b) noexcept {
    std::lock_guard<std::mutex> lock(mutex_);
    if (--b->refs != 0) return;
    if (b->published)
      lru_push(b);
    else
      destroy(b);
  }

  // Whether a session that maps b may write into it: then no other session
  // maps it, and it is withdrawn from the cache if it was published.
  bool make_private(detail::KVBlock* b) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (b->refs != 1) return false;
    withdraw(b);
    return true;
  }

  // Records that b holds `filled` tokens (for bytes_needed), and the peak.
  void note_filled(detail::KVBlock* b, std::size_t filled) {
    std::lock_guard<std::mutex> lock(mutex_);
    set_filled(b, filled);
    note_peak();
  }

  // Publishes b, full of the B ids at `ids`, after the block `parent`
  // serial (0: b starts the sequence); returns its serial, or 0 when an
  // equal block is already published (b stays private). May throw
  // std::bad_alloc (then nothing changes).
  std::uint64_t publish(detail::KVBlock* b, std::uint64_t parent, const int* ids) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (b->published) return b->serial;
    const std::uint64_t h = hash(parent, ids);
    if (find(h, parent, ids) != nullptr) return 0;
    b->ids.assign(ids, ids + block_tokens());
    map_.emplace(h, b);
    b->published = true;
    b->serial = ++serials_;
    b->parent = parent;
    b->hash = h;
    return b->serial;
  }

  // The published block after `parent` holding the B ids at `ids`, mapped
  // for the caller (counted as B prefix hits), or null.
  detail::KVBlock* map_published(std::uint64_t parent, const int* ids) {
    std::lock_guard<std::mutex> lock(mutex_);
    detail::KVBlock* b = find(hash(parent, ids), parent, ids);
    if (b == nullptr) return nullptr;
    if (b->refs++ == 0) lru_unlink(b);
    stats_.prefix_hit_tokens += block_tokens();
    return b;
  }
  // Undoes the count of hits of a mapping that was then given up.
  void unhit(std::size_t tokens) noexcept {
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.prefix_hit_tokens -= tokens;
  }

 private:
  // n blocks only the caller maps; see prepare. Called with the lock held.
  std::vector<detail::KVBlock*> take(std::size_t n) {
    const std::size_t cap =
        options_.budget_bytes == 0 ? std::numeric_limits<std::size_t>::max() : options_.budget_bytes / block_bytes();
    const std::size_t fresh = std::min(n, cap > stats_.blocks ? cap - stats_.blocks : 0);
    if (n - fresh > stats_.cached_blocks)
      throw std::length_error(detail::io::text("kvcache: KV pool budget of ", options_.budget_bytes, " bytes (", cap,
                                       " blocks of ", block_bytes(), " bytes) exceeded: ", n,
                                       " more blocks needed, ", stats_.blocks - stats_.cached_blocks,
                                       " in use by sessions and ", stats_.cached_blocks, " cached"));
    std::vector<std::unique_ptr<detail::KVBlock>> made(fresh);
    for (auto& b : made) {
      b = std::make_unique<detail::KVBlock>();
      b->bytes.resize(static_cast<Eigen::Index>(block_bytes()));
      b->ids.reserve(block_tokens());
    }
    std::vector<detail::KVBlock*> got;
    got.reserve(n);
    for (auto& b : made) {
      b->refs = 1;
      got.push_back(b.release());
      ++stats_.blocks;
    }
    for (std::size_t i = fresh; i < n; ++i) {
      detail::KVBlock* b = lru_pop();
      withdraw(b);
      set_filled(b, 0);
      ++stats_.evicted_blocks;
      b->refs = 1;
      got.push_back(b);
    }
    return got;
  }

  std::size_t token_bytes() const { return n_layers_ * 2 * n_kv_heads_ * row_bytes_; }

  std::uint64_t hash(std::uint64_t parent, const int* ids) const {
    std::uint64_t h = 0xcbf29ce484222325ULL ^ parent;
    for (std::size_t i = 0; i < block_tokens(); ++i) {
      h ^= static_cast<std::uint32_t>(ids[i]);
      h *= 0x100000001b3ULL;
      h ^= h >> 29;
    }
    return h;
  }
  detail::KVBlock* find(std::uint64_t h, std::uint64_t parent, const int* ids) const {
    const auto [first, last] = map_.equal_range(h);
    for (auto it = first; it != last; ++it)
      if (it->second->parent == parent && std::equal(ids, ids + block_tokens(), it->second->ids.begin()))
        return it->second;
    return nullptr;
  }
  // Takes b out of the prefix cache (noexcept: erasing allocates nothing).
  void withdraw(detail::KVBlock* b) noexcept {
    if (!b->published) return;
    const auto [first, last] = map_.equal_range(b->hash);
    for (auto it = first; it != last; ++it)
      if (it->second == b) {
        map_.erase(it);
        break;
      }
    b->published = false;
  }
  void destroy(detail::KVBlock* b) noexcept {
    withdraw(b);
    set_filled(b, 0);
    --stats_.blocks;
    delete b;
  }
  void set_filled(detail::KVBlock* b, std::size_t filled) noexcept {
    needed_tokens_ = needed_tokens_ - b->filled + filled;
    b->filled = filled;
  }
  void note_peak() noexcept {
    const std::size_t bytes = stats_.blocks * block_bytes();
    const std::size_t needed = needed_tokens_ * token_bytes();
    if (bytes > stats_.bytes_peak) stats_.bytes_needed_at_peak = needed;
    if (bytes == stats_.bytes_peak) stats_.bytes_needed_at_peak = std::max(stats_.bytes_needed_at_peak, needed);
    stats_.bytes_peak = std::max(stats_.bytes_peak, bytes);
  }

  // The LRU list of published blocks no session maps: released at the tail,
  // evicted from the head.
  void lru_push(detail::KVBlock* b) noexcept {
    b->lru_prev = lru_tail_;
    b->lru_next = nullptr;
    (lru_tail_ != nullptr ? lru_tail_->lru_next : lru_head_) = b;
    lru_tail_ = b;
    ++stats_.cached_blocks;
  }
  void lru_unlink(detail::KVBlock* b) noexcept {
    (b->lru_prev != nullptr ? b->lru_prev->lru_next : lru_head_) = b->lru_next;
    (b->lru_next != nullptr ? b->lru_next->lru_prev : lru_tail_) = b->lru_prev;
    b->lru_prev = b->lru_next = nullptr;
    --stats_.cached_blocks;
  }
  detail::KVBlock* lru_pop() noexcept {
    detail::KVBlock* b = lru_head_;
    lru_unlink(b);
    return b;
  }

  const void* model_;
  std::size_t n_layers_, n_kv_heads_, d_k_;
  StorageType type_;
  std::size_t row_bytes_, extra_;
  KVPoolOptions options_;
  mutable std::mutex mutex_;
  KVPoolStats stats_;
  std::size_t needed_tokens_ = 0;
  std::uint64_t serials_ = 0;
  std::unordered_multimap<std::uint64_t, detail::KVBlock*> map_;
  detail::KVBlock *lru_head_ = nullptr, *lru_tail_ = nullptr;
};

namespace detail {

// A paged session's table of blocks (see the top of the file): slot s is in
// blocks()[s / B]. Shared by every layer's KVRows of the session, which
// point at it (it lives on the heap, so moving the session keeps it put).
// Also remembers the token ids of the prefix it holds, to publish its full
// blocks.
class BlockTable {
 public:
  explicit BlockTable(std::shared_ptr<KVPool> pool) : pool_(std::move(pool)), B_(pool_->block_tokens()) {
    for (std::size_t a = 0; a < 4; ++a) {
      width_[a] = a < pool_->arrays() ? pool_->width(a) : 0;
      start_[a] = a < pool_->arrays() ? pool_->array_offset(a, 0) : 0;
    }
    layer_bytes_ = pool_->layer_bytes();
    tracking_ = pool_->options().prefix_sharing;
  }
  BlockTable(const BlockTable&) = delete;
  BlockTable& operator=(const BlockTable&) = delete;
  ~BlockTable() { trim(0); }

  // The fork: maps the same blocks (no key or value is copied; the first
  // write into a shared block copies it).
  std::unique_ptr<BlockTable> share() const {
    auto t = std::make_unique<BlockTable>(pool_);
    t->blocks_.reserve(blocks_.size());
    t->ids_ = ids_;
    for (KVBlock* b : blocks_) {
      pool_->retain(b);
      t->blocks_.push_back(b);
    }
    t->tracking_ = tracking_;
    t->chain_ = chain_;
    return t;
  }

  KVPool& pool() const { return *pool_; }
  const std::shared_ptr<KVPool>& pool_ptr() const { return pool_; }
  std::size_t block_tokens() const { return B_; }
  std::size_t blocks() const { return blocks_.size(); }
  std::size_t blocks_for(std::size_t slots) const { return (slots + B_ - 1) / B_; }
  std::size_t width(std::size_t a) const { return width_[a]; }

  // Where layer l keeps slot `slot` of array a of kv head h.
  unsigned char* at(std::size_t l, std::size_t a, std::size_t h, std::size_t slot) const {
    return blocks_[slot / B_]->bytes.data() + l * layer_bytes_ + start_[a] + (h * B_ + slot % B_) * width_[a];
  }
  // Slots from `slot` on that are stored one after the other (to the end of
  // its block).
  std::size_t contiguous(std::size_t slot) const { return B_ - slot % B_; }

  // Holds blocks for `slots` slots, with the slots [lo, hi] writable (lo >
  // hi: none). Throws as KVPool::prepare; then nothing changes.
  void prepare(std::size_t slots, std::size_t lo, std::size_t hi) {
    const std::size_t need = std::max(blocks_.size(), blocks_for(slots));
    if (lo > hi)
      pool_->prepare(blocks_, need, 1, 0);
    else
      pool_->prepare(blocks_, need, lo / B_, hi / B_);
  }

  // Keeps the blocks of the first n slots, and the ids of n tokens.
  void trim(std::size_t n) noexcept {
    while (blocks_.size() > blocks_for(n)) {
      pool_->release(blocks_.back());
      blocks_.pop_back();
    }
    if (ids_.size() > n) ids_.resize(n);
    chain_ = std::min(chain_, n / B_);
  }
  // Forgets every token: what a cleared session holds.
  void clear() noexcept {
    trim(0);
    tracking_ = pool_->options().prefix_sharing;
  }
  void stop_tracking() noexcept {
    tracking_ = false;
    ids_.clear();
  }

  // For an empty session about to be fed ids[0, m): maps the published
  // blocks that hold its first tokens, at most `limit` tokens of them;
  // returns the tokens mapped. Throws std::bad_alloc (nothing mapped).
  std::size_t map_prefix(const int* ids, std::size_t limit) {
    if (!tracking_ || !blocks_.empty()) return 0;
    blocks_.reserve(limit / B_);
    ids_.reserve(limit);
    std::uint64_t parent = 0;
    for (std::size_t k = 0; (k + 1) * B_ <= limit; ++k) {
      KVBlock* b = pool_->map_published(parent, ids + k * B_);
      if (b == nullptr) break;
      blocks_.push_back(b);
      parent = b->serial;
    }
    chain_ = blocks_.size();
    ids_.assign(ids, ids + chain_ * B_);
    return chain_ * B_;
  }

  // After a step that fed ids[0, m) and wrote the slots [lo, hi] (lo > hi:
  // none), the table holding `size` tokens, the first of which is at
  // position `position` − size: records what the blocks hold and publishes
  // those that became full. Publishing is an optimisation: if it runs out
  // of memory the session just stops publishing.
  void after_step(const int* ids, std::size_t m, std::size_t lo, std::size_t hi, std::size_t size,
                  std::size_t position) noexcept {
    for (std::size_t k = lo / B_; lo <= hi && k <= hi / B_; ++k)
      pool_->note_filled(blocks_[k], std::min(B_, size - std::min(size, k * B_)));
    if (!tracking_) return;
    if (position != size || ids_.size() + m != size) return stop_tracking();
    try {
      ids_.insert(ids_.end(), ids, ids + m);
      for (; (chain_ + 1) * B_ <= size; ++chain_) {
        const std::uint64_t parent = chain_ == 0 ? 0 : blocks_[chain_ - 1]->serial;
        if (pool_->publish(blocks_[chain_], parent, ids_.data() + chain_ * B_) == 0) break;
      }
    } catch (...) {
      stop_tracking();
    }
  }

 private:
  std::shared_ptr<KVPool> pool_;
  std::size_t B_;
  std::size_t width_[4] = {}, start_[4] = {};
  std::size_t layer_bytes_ = 0;
  std::vector<KVBlock*> blocks_;
  std::vector<int> ids_;    // the ids of the tokens held, while tracking
  bool tracking_ = false;   // holds its prefix from position 0, with the ids of every token
  std::size_t chain_ = 0;   // blocks [0, chain_) are published in order
};

}  // namespace detail
}  // namespace kvcache
