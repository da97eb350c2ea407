// kvcache/session.hpp — Session: the state of one request. One SlotTable
// (where each cached token lives, slots.hpp) and one KVRows per layer (the
// keys and values, kv_cache.hpp), made by a Decoder and usable only with it.
#pragma once

#include <cstddef>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kv_cache.hpp"
#include "slots.hpp"
#include "storage.hpp"

namespace kvcache {

template <typename T>
class Decoder;
template <typename T>
class Workspace;
namespace detail {
template <typename T>
class Forward;
}  // namespace detail

// How a new session stores its tokens (see KVCache).
struct SessionOptions {
  std::size_t max_tokens = 0;      // 0: the model's max_seq_len (ignored with a window)
  std::size_t reserve_tokens = 0;  // preallocate the caches (0: they grow as needed)
  KVType kv_type = KVType::f32;    // what keys and values are stored as
  SlidingWindow window;            // window = 0: no window, the default
};

namespace detail {
// What a session remembers of the decoder that made it: the address of this
// object, which the decoder (and its copies, which hold the same weights)
// keeps alive.
struct ModelTag {};
}  // namespace detail

// Create with Decoder::new_session(); one session per concurrent request. A
// session is used by one thread at a time; different sessions may run
// concurrently on one Decoder. Copying costs O(size), so it is an explicit
// copy(); moving is free, and a moved-from session holds nothing and is
// refused by every forward.
template <typename T = float>
class Session {
 public:
  // Where the session stands: what checkpoint() returns and roll_back()
  // takes.
  using Checkpoint = SlotTable::State;

  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
  Session(Session&& other) noexcept { swap(other); }
  Session& operator=(Session&& other) noexcept {
    Session(std::move(other)).swap(*this);
    return *this;
  }
  ~Session() = default;

  // Tokens each layer's cache holds (at most the window, with one).
  std::size_t size() const { return table_.size(); }
  // Tokens fed since the last clear(): the position the next token takes.
  // Equal to size() unless a sliding window has dropped tokens.
  std::size_t position() const { return table_.position(); }
  std::size_t max_tokens() const { return table_.max_tokens(); }
  // The most positions the session can reach: max_tokens(), or no limit
  // with a sliding window.
  std::size_t position_limit() const { return table_.position_limit(); }
  KVType kv_type() const { return layers_.empty() ? KVType::f32 : layers_.front().type(); }
  SlidingWindow window() const { return table_.window(); }
  std::size_t n_layers() const { return layers_.size(); }
  // Layer l's cache, as a KVCache shows it; std::out_of_range past n_layers().
  KVCacheView<T> cache(std::size_t layer) const {
    if (layer >= layers_.size())
      throw std::out_of_range("kvcache: Session::cache(" + std::to_string(layer) + ") past n_layers() = " +
                              std::to_string(layers_.size()));
    return {table_, layers_[layer]};
  }
  const SlotTable& slot_table() const { return table_; }

  // Memory held by the caches: 2 × n_layers × n_kv_heads × capacity × row
  // bytes (d_k × sizeof(T) for f32 storage).
  std::size_t kv_bytes() const {
    std::size_t total = 0;
    for (const auto& l : layers_) total += l.bytes();
    return total;
  }

  // Threads a forward pass may use (1 = the calling thread only).
  std::size_t threads() const { return threads_; }
  void set_threads(std::size_t threads) {
    if (threads == 0) throw std::invalid_argument("kvcache: Session::set_threads(0): need at least 1 thread");
    threads_ = threads;
  }

  // Forgets all tokens, so the next forward starts a new, independent
  // sequence; memory is kept for reuse.
  void clear() noexcept { table_.clear(); }

  // Rolls back to the first n tokens held. (A wrapped window is first put
  // back in token order, O(size).)
  void truncate(std::size_t n) {
    if (n > size())
      throw std::out_of_range("kvcache: Session::truncate(" + std::to_string(n) + ") past size() = " +
                              std::to_string(size()));
    table_.truncate(n, [&](std::size_t first, std::size_t length, std::size_t by) {
      for (auto& l : layers_) l.rotate(first, length, by);
    });
  }

  // The one checkpoint and rollback: roll_back(checkpoint()) later drops the
  // tokens fed in between, or, when a sliding window has overwritten tokens
  // since (they cannot be brought back), clears the session.
  Checkpoint checkpoint() const { return table_.state(); }
  void roll_back(const Checkpoint& c) noexcept { table_.roll_back(c); }

  // A deep copy of the cached tokens (O(size) memory copy, no recompute):
  // fork a prefix and continue it in several ways.
  Session copy() const {
    std::vector<KVRows<T>> layers;
    layers.reserve(layers_.size());
    for (const auto& l : layers_) layers.push_back(l.copy(size()));
    Session s(model_, table_, std::move(layers));
    s.threads_ = threads_;
    return s;
  }

  // ---- Raw state, for session files (session_file.hpp) ----------------------

  std::size_t ring_start() const { return table_.ring_start(); }

  // Puts the session in the state given (see SlotTable::check_state), slot
  // contents unspecified until write_raw fills them. Throws
  // std::invalid_argument for an impossible state, std::length_error past
  // max_tokens(); on any exception the session is unchanged.
  void restore_state(std::size_t size, std::size_t position, std::size_t ring_start) {
    const Checkpoint s{size, position, ring_start};
    table_.check_state(s);
    for (auto& l : layers_)  // all allocations before any change
      if (l.capacity() < size) l.reallocate(size, this->size());
    table_.commit(s);
  }

  // Throws std::invalid_argument unless restore_state(size, position,
  // ring_start) describes a state the session can be in.
  void check_state(std::size_t size, std::size_t position, std::size_t ring_start) const {
    table_.check_state({size, position, ring_start});
  }

  // KVRows::visit_raw of every held slot: layer 0, then layer 1, …
  template <typename F>
  void read_raw(F&& f) const {
    for (const auto& l : layers_) l.visit_raw(size(), f);
  }
  template <typename F>
  void write_raw(F&& f) {
    for (auto& l : layers_) l.visit_raw(size(), f);
  }

 private:
  friend class Decoder<T>;
  friend class detail::Forward<T>;
  Session(std::shared_ptr<const detail::ModelTag> model, const SlotTable& table, std::vector<KVRows<T>> layers)
      : model_(std::move(model)), table_(table), layers_(std::move(layers)) {}

  void swap(Session& other) noexcept {
    model_.swap(other.model_);
    std::swap(table_, other.table_);
    layers_.swap(other.layers_);
    std::swap(threads_, other.threads_);
    workspace_.swap(other.workspace_);
  }

  std::shared_ptr<const detail::ModelTag> model_;  // the decoder that made it; null once moved from
  SlotTable table_;
  std::vector<KVRows<T>> layers_;
  std::size_t threads_ = 1;
  // Only for the convenience call Decoder::forward(tokens, session), whose
  // logits must outlive the call: the Workspace it computes in, made on its
  // first use. Every path of the library (generate, decode, batches, the
  // command line) passes a Workspace of its own instead.
  std::unique_ptr<Workspace<T>> workspace_;
};

}  // namespace kvcache
