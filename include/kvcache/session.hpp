// kvcache/session.hpp — Session: the state of one request. One SlotTable
// (where each cached token lives, slots.hpp) and one KVRows per layer (the
// keys and values, kv_cache.hpp), made by a Decoder and usable only with it.
// With a KVPool (kv_pool.hpp) the rows of every layer live in the pool's
// blocks, through one table of blocks per session; otherwise each layer has
// contiguous rows of its own.
#pragma once

#include <algorithm>
#include <cstddef>
#include <memory>
#include <stdexcept>
#include <utility>
#include <vector>

#include "detail/io.hpp"
#include "kv_cache.hpp"
#include "slots.hpp"
#include "storage.hpp"

namespace kvcache {

template <typename T>
class Decoder;
template <typename T>
struct Workspace;
namespace detail {
template <typename T>
class Forward;
// What a session remembers of the decoder that made it: the address of this
// object, which the decoder (and its copies, which hold the same weights)
// keeps alive.
struct ModelTag {};
}  // namespace detail

// How a new session stores its tokens (see KVCache).
struct SessionOptions {
  std::size_t max_tokens = 0;      // 0: the model's max_seq_len (ignored with a window)
  std::size_t reserve_tokens = 0;  // preallocate the caches (0: they grow as needed)
  KVType kv_type = KVType::f32;    // what keys and values are stored as
  SlidingWindow window;            // window = 0: no window, the default
};

// Create with Decoder::new_session(); one session per concurrent request. A
// session is used by one thread at a time; different sessions may run
// concurrently on one Decoder. Copying costs O(size), so it is an explicit
// copy(); moving is free, and a moved-from session holds nothing and is
// refused by every forward. clear(), truncate(n), restore_state,
// check_state, read_raw and write_raw are detail::Caches'.
template <typename T = float>
class Session : public detail::Caches<T, std::vector<KVRows<T>>> {
 public:
  // Where the session stands: what checkpoint() returns and roll_back()
  // takes.
  using Checkpoint = SlotTable::State;

  // Tokens each layer's cache holds (at most the window, with one).
  std::size_t size() const { return this->table_.size(); }
  // Tokens fed since the last clear(): the position the next token takes.
  // Equal to size() unless a sliding window has dropped tokens.
  std::size_t position() const { return this->table_.position(); }
  std::size_t max_tokens() const { return this->table_.max_tokens(); }
  // The most positions the session can reach: max_tokens(), or no limit
  // with a sliding window.
  std::size_t position_limit() const { return this->table_.position_limit(); }
  KVType kv_type() const { return n_layers() == 0 ? KVType::f32 : this->layers_.front().type(); }
  SlidingWindow window() const { return this->table_.window(); }
  std::size_t ring_start() const { return this->table_.ring_start(); }
  std::size_t n_layers() const { return this->layers_.size(); }
  // Layer l's cache, as a KVCache shows it; std::out_of_range past n_layers().
  KVCacheView<T> cache(std::size_t layer) const {
    if (layer >= n_layers())
      throw std::out_of_range(detail::io::text("kvcache: Session::cache(", layer, ") past n_layers() = ", n_layers()));
    return {this->table_, this->layers_[layer]};
  }

  // Memory held by the caches: 2 × n_layers × n_kv_heads × capacity × row
  // bytes (d_k × sizeof(T) for f32 storage).
  std::size_t kv_bytes() const {
    std::size_t total = 0;
    for (const auto& l : this->layers_) total += l.bytes();
    return total;
  }

  // Threads a forward pass may use (1 = the calling thread only).
  std::size_t threads() const { return threads_; }
  void set_threads(std::size_t threads) {
    if (threads == 0) throw std::invalid_argument("kvcache: Session::set_threads(0): need at least 1 thread");
    threads_ = threads;
  }

  // The one checkpoint and rollback: roll_back(checkpoint()) later drops the
  // tokens fed in between, or, when a sliding window has overwritten tokens
  // since (they cannot be brought back), clears the session.
  // (Paged: the blocks no longer needed go back to the pool.)
  Checkpoint checkpoint() const { return this->table_.state(); }
  void roll_back(const Checkpoint& c) noexcept {
    this->table_.roll_back(c);
    if (this->blocks_) this->blocks_->trim(size());
  }

  // Prefix sharing ahead of a prompt fed in several calls: an empty paged
  // session whose pool shares prefixes maps the pool's cached blocks that
  // hold the first tokens of `prompt` (whole blocks, at most prompt.size() − 1
  // tokens, within a window) and returns how many tokens it mapped; feed the
  // prompt from there. Any other session maps nothing and returns 0. (A
  // forward with Logits::last does this itself for an empty session.)
  // Throws std::bad_alloc, mapping nothing.
  std::size_t map_prefix(const std::vector<int>& prompt) {
    if (!this->blocks_ || prompt.empty() || size() != 0 || position() != 0) return 0;
    std::size_t limit = prompt.size() - 1;
    if (window().window != 0) limit = std::min(limit, window().window);
    const std::size_t mapped = this->blocks_->map_prefix(prompt.data(), limit);
    this->table_.commit({mapped, mapped, 0});
    return mapped;
  }

  // A copy of the cached tokens, no recompute: fork a prefix and continue it
  // in several ways. Contiguous: an O(size) memory copy. Paged: O(blocks),
  // no key or value copied: the copy maps the same blocks, and whichever
  // session first writes into a shared block copies that block (only the
  // partly filled last one, unless a window or truncate rewrites others).
  Session copy() const {
    Session s(model_, this->table_, {});
    if (this->blocks_) {
      s.blocks_ = this->blocks_->share();
      s.layers_.reserve(n_layers());
      for (std::size_t l = 0; l < n_layers(); ++l) s.layers_.emplace_back(s.paged_rows(this->layers_[l], l));
    } else {
      for (const auto& l : this->layers_) s.layers_.push_back(l.copy(size()));
    }
    s.threads_ = threads_;
    return s;
  }
  Session fork() const { return copy(); }

  // The pool a paged session keeps its blocks in (null: contiguous caches).
  std::shared_ptr<KVPool> pool() const { return this->blocks_ ? this->blocks_->pool_ptr() : nullptr; }

 private:
  friend class Decoder<T>;
  friend class detail::Forward<T>;
  Session(std::shared_ptr<const detail::ModelTag> model, const SlotTable& table, std::vector<KVRows<T>> layers,
          std::unique_ptr<detail::BlockTable> blocks = nullptr)
      : detail::Caches<T, std::vector<KVRows<T>>>(table, std::move(layers), std::move(blocks)),
        model_(std::move(model)) {}
  // Layer l's rows over this session's blocks, shaped as `like`.
  KVRows<T> paged_rows(const KVRows<T>& like, std::size_t l) const {
    return KVRows<T>(like.n_kv_heads(), like.d_k(), like.type(), this->blocks_.get(), l);
  }

  std::shared_ptr<const detail::ModelTag> model_;  // the decoder that made it; null once moved from
  std::size_t threads_ = 1;
  // Only for the convenience call Decoder::forward(tokens, session), whose
  // logits must outlive the call: the Workspace it computes in, made on its
  // first use. Every path of the library (generate, decode, batches, the
  // command line) passes a Workspace of its own instead.
  std::unique_ptr<Workspace<T>> workspace_;
};

}  // namespace kvcache
