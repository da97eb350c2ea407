// kvcache/slots.hpp — SlotTable: where each cached token of one sequence
// lives, shared by every layer's cache of that sequence.
//
// A cache is a row of slots per layer. The table says how many tokens the
// slots hold (size), how many tokens the sequence has fed (position), and,
// with a sliding window, which slot holds which token. It also plans where
// the next m tokens go, once for all layers, and keeps the one checkpoint
// and rollback that every failing path uses. Keys and values themselves live
// in each layer's KVRows (kv_cache.hpp); this file knows nothing of them.
#pragma once

#include <algorithm>
#include <cstddef>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

#include "detail/io.hpp"

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

// A run of new tokens that go to consecutive slots [slot, slot + rows) and
// then attend together. Once the run is placed the cache holds n tokens, and
// its token i (0 = the run's first) sees the slots [0, n − rows + i]: the
// causal mask behind a cached prefix. (A run that overwrites the oldest
// token of a full window is one token long and sees all n slots.)
struct SlotRun {
  std::size_t first = 0;  // the run's first token among the call's new ones
  std::size_t rows = 0;
  std::size_t slot = 0;
  std::size_t n = 0;
  // With RoPE and sinks, once the window has dropped tokens, the sinks sit at
  // the start of the window: their scores use the query rotated to its place
  // in the window, n − 1, not to its position in the sequence.
  bool rebased = false;
};

// The slots of one sequence. With a sliding window the slots [0, sinks) hold
// the sinks and [sinks, W) a ring of the most recent tokens: once the window
// is full a new token overwrites the oldest slot of the ring, O(1), and slot
// order is no longer token order (attention does not care: it sums over all
// the slots it may see).
class SlotTable {
 public:
  // What a checkpoint restores: three counters.
  struct State {
    std::size_t size = 0;        // tokens held
    std::size_t position = 0;    // tokens fed since clear(), evicted ones included
    std::size_t ring_start = 0;  // the ring's oldest token is in slot sinks + ring_start
  };

  // max_tokens == 0: no limit. With a window the window is the limit, so
  // max_tokens must be 0 or the window. Throws std::invalid_argument unless
  // the window is off (0) or holds at least one token besides its sinks.
  explicit SlotTable(std::size_t max_tokens, SlidingWindow window = {})
      : max_tokens_(window.window != 0 ? window.window : max_tokens), window_(window) {
    if (window.window == 0 && window.sinks != 0)
      detail::io::invalid("attention sinks = ", window.sinks, " need a sliding window (window = 0)");
    if (window.window != 0 && window.sinks >= window.window)
      detail::io::invalid("sliding window of ", window.window, " with ", window.sinks, " sinks: need sinks < window");
    if (max_tokens != 0 && max_tokens != max_tokens_)
      detail::io::invalid("KVCache: max_tokens = ", max_tokens, " with a sliding window of ", window.window,
                          " (the window is the limit; pass 0 or the window)");
  }

  std::size_t size() const { return s_.size; }
  std::size_t position() const { return s_.position; }
  std::size_t ring_start() const { return s_.ring_start; }
  std::size_t max_tokens() const { return max_tokens_; }
  SlidingWindow window() const { return window_; }
  State state() const { return s_; }
  // The most positions the sequence can reach: max_tokens(), or no limit
  // with a sliding window.
  std::size_t position_limit() const {
    return window_.window != 0 ? std::numeric_limits<std::size_t>::max() : max_tokens_;
  }

  // The slot token i (0 = the oldest held) is stored in.
  std::size_t slot_of(std::size_t i) const {
    const std::size_t sinks = window_.sinks;
    if (i < sinks || s_.ring_start == 0) return i;
    return sinks + (i - sinks + s_.ring_start) % (window_.window - sinks);
  }

  // The slots that n tokens take (a window never holds more than its
  // window). Throws std::length_error past max_tokens().
  std::size_t slots_for(std::size_t n) const {
    if (window_.window != 0) return std::min(n, window_.window);
    if (max_tokens_ != 0 && n > max_tokens_)
      throw std::length_error(
          detail::io::text("kvcache: KVCache would hold ", n, " tokens, past its limit max_tokens = ", max_tokens_));
    return n;
  }

  // Plans where m new tokens go: calls f(run) for each run, in order, and
  // returns the state after them; changes nothing itself. A run never makes
  // the window drop a token that one of the run's own tokens still sees: the
  // tokens go together while they fit, then one at a time. `rope`: whether
  // queries are rotated (so that sinks need re-basing once the window drops
  // tokens).
  template <typename F>
  State plan(std::size_t m, bool rope, F&& f) const {
    State s = s_;
    const std::size_t W = window_.window;
    const bool rebase = rope && W != 0 && window_.sinks != 0 && s.position + m > W;
    for (std::size_t first = 0; first < m;) {
      std::size_t rows = m - first;
      if (W != 0 && rebase && s.position != s.size)
        rows = 1;  // every query re-bases the sinks to its own place
      else if (W != 0 && s.size + rows > W)
        rows = s.size < W ? W - s.size : 1;
      const std::size_t slot = advance(s);
      for (std::size_t i = 1; i < rows; ++i) advance(s);
      f(SlotRun{first, rows, slot, s.size, rebase && s.position != s.size});
      first += rows;
    }
    return s;
  }

  // Takes the state a plan returned.
  void commit(const State& s) noexcept { s_ = s; }

  // Puts the table back at a checkpoint taken before tokens were fed. With
  // `slots_intact` (nothing was written since), exactly; otherwise the
  // tokens fed since are dropped if they only appended, and the table is
  // cleared if a window overwrote older tokens, which cannot be brought back
  // (nor can tokens that something else removed meanwhile).
  void roll_back(const State& c, bool slots_intact = false) noexcept {
    const bool only_appended = s_.ring_start == c.ring_start && s_.position >= c.position && s_.size >= c.size &&
                               s_.position - c.position == s_.size - c.size;
    s_ = slots_intact || only_appended ? c : State{};
  }

  void clear() noexcept { s_ = State{}; }

  // Keeps the first n tokens held (n <= size()). A wrapped ring is first put
  // back in token order: rotate(first, length, by) must rotate slots [first,
  // first + length) left by `by` in every layer's rows (KVRows::rotate).
  template <typename Rotate>
  void truncate(std::size_t n, Rotate&& rotate) noexcept {
    if (s_.ring_start != 0) rotate(window_.sinks, window_.window - window_.sinks, s_.ring_start);
    s_ = {n, s_.position - (s_.size - n), 0};
  }

  // Throws std::invalid_argument unless `s` is a state appends, truncates and
  // clears can reach: without a window position == size and ring_start == 0;
  // with one size <= window, position >= size, ring_start < window − sinks,
  // and ring_start == 0 unless the window is full.
  void check_state(const State& s) const {
    const std::size_t W = window_.window;
    const std::size_t ring = W - window_.sinks;
    const std::pair<bool, std::string> rules[] = {
        {max_tokens_ != 0 && s.size > max_tokens_, "size > max_tokens = " + std::to_string(max_tokens_)},
        {W == 0 && s.position != s.size, "without a sliding window position == size"},
        {W == 0 && s.ring_start != 0, "without a sliding window ring_start == 0"},
        {W != 0 && s.position < s.size, "position < size"},
        {W != 0 && s.ring_start >= ring, "ring_start >= window - sinks = " + std::to_string(ring)},
        {s.ring_start != 0 && s.size != W, "only a full window (size = " + std::to_string(W) + ") has wrapped"}};
    for (const auto& [broken, why] : rules)
      if (broken)
        detail::io::invalid("KVCache state size = ", s.size, ", position = ", s.position, ", ring_start = ",
                            s.ring_start, " is impossible: ", why);
  }

 private:
  // Feeds one token to s; returns the slot it goes to: behind the others,
  // or, in a full window, over the oldest token of the ring.
  std::size_t advance(State& s) const {
    ++s.position;
    if (window_.window == 0 || s.size < window_.window) return s.size++;
    const std::size_t slot = window_.sinks + s.ring_start;
    s.ring_start = (s.ring_start + 1) % (window_.window - window_.sinks);
    return slot;
  }

  std::size_t max_tokens_ = 0;
  SlidingWindow window_;
  State s_;
};

}  // namespace kvcache
