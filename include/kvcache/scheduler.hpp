// kvcache/scheduler.hpp — continuous batching: BatchScheduler steps up to N
// requests together, one Decoder::forward_batch per step, and generate_batch
// on top of it.
//
// Each step, in this order:
//   1. cancelled requests leave; waiting requests join (in arrival order)
//      while fewer than N run, each in a session of its own;
//   2. the step's rows: one token of every decoding request (its last id),
//      then chunks of the joining requests' prompts, in arrival order, until
//      the step holds step_tokens rows (chunked prefill, as vLLM's: a long
//      prompt is fed over several steps, while the others keep decoding);
//   3. one forward over all of them (forward.hpp);
//   4. every request whose prompt is now fed samples its next id from its
//      own Sampler, streams it, and leaves when it produced its end_token, its
//      max_new_tokens, or its callback asked it to stop.
// A request's ids are those generate() gives it alone with the same
// options: its logits differ only by the rounding of a batched product
// against a single one (exactly none for decode steps of fewer than
// detail::kFewTokensF32 rows of f32 weights, detail::kFewTokens of others),
// whatever it is batched with.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "decoder.hpp"
#include "detail/io.hpp"
#include "generate.hpp"

namespace kvcache {

struct SchedulerOptions {
  // N: the most requests stepped together (each holds a session meanwhile).
  std::size_t max_sequences = 8;
  // The rows of a step: one per decoding request, the rest prompt chunks.
  // (A step holds more only when more than step_tokens requests decode.)
  // 128 rather than 64: a prompt of up to about 128 tokens gets its first
  // id one step after it joins, and aggregate tokens/s stayed within noise
  // (scripts/bench_parallel.sh: --parallel 8 at 3.8-4.1x --parallel 1
  // either way); the price is that a step carrying a prompt chunk stalls
  // the decoding requests about twice as long. (llama.cpp's server computes
  // up to 512 tokens at once: its -ub.)
  std::size_t step_tokens = 128;
  // Threads of every forward.
  std::size_t threads = 1;
  // How the sessions the scheduler makes store their tokens. It makes at most
  // max_sequences and reuses them (clear()) for request after request.
  SessionOptions session;
  // With a pool (Decoder::make_pool, storing session.kv_type) those sessions
  // are paged in it, and a request that joins first maps the pool's cached
  // blocks of its prompt's prefix (Session::map_prefix) and feeds only the
  // rest. Null: contiguous sessions.
  std::shared_ptr<KVPool> pool;
};

// One request: its prompt and options (its own limit, end_token, sampler and
// seed; options.on_token, if set, is called with each id as generate() calls
// it), and an optional stream that gets each id after options.on_token and
// returns false to cancel the request there (the id is kept, as its last).
struct Request {
  std::vector<int> prompt;
  GenerateOptions options;
  std::function<bool(int)> stream;
};

using RequestId = std::uint64_t;

enum class RequestStatus { waiting, running, finished, cancelled, failed };

struct RequestResult {
  RequestStatus status = RequestStatus::waiting;
  std::vector<int> ids;      // the ids produced (streamed), in order
  std::exception_ptr error;  // failed: what its sampling or its callbacks threw
};

namespace detail {

// A request while it waits or runs.
template <typename T>
struct ScheduledRequest {
  RequestId id = 0;
  Request request;
  Session<T>* own = nullptr;                    // the caller's session, or null: one of the scheduler's
  Session<T>* session = nullptr;                // while running
  typename Session<T>::Checkpoint start{};      // where the session stood when the request joined
  std::size_t fed = 0;                          // prompt tokens fed so far
  std::optional<Sampler> sampler;               // made when it joins
  RequestResult result;
  bool cancel = false;
};

}  // namespace detail

// Steps requests together on one Decoder, as a serving loop does: submit()
// requests at any time (also from a callback), step() or run(), then take()
// each result. Used by one thread at a time (cancel() and submit() too: call
// them between steps or from a request's callback, never step() from one);
// different schedulers may run concurrently on one Decoder, which must
// outlive them, as a caller's session must outlive its request.
//
// A request that fails while it runs (its sampler met non-finite logits, one
// of its callbacks threw, memory ran out for its ids) leaves with status
// failed and the exception in its result; the others go on. A failure of
// the step's forward (out of memory) is thrown by step(), every session as it
// was before that step (the forward's guarantee), and nothing fed or
// sampled (requests that joined stay joined): step() may be called again. A request that leaves (but one that
// finished in the caller's session) leaves no tokens behind: a scheduler's
// session is cleared for the next request; the caller's session is rolled
// back to where the request found it, or, finished, holds the prompt and
// every id but the last (as after generate()).
template <typename T = float>
class BatchScheduler {
 public:
  // Throws std::invalid_argument on max_sequences, step_tokens or threads
  // of 0, or session options the decoder refuses (new_session's checks).
  BatchScheduler(const Decoder<T>& decoder, SchedulerOptions options)
      : decoder_(decoder),
        options_(std::move(options)),
        limits_(decoder.new_session(unreserved(options_.session), options_.pool)) {
    if (options_.max_sequences == 0) io_invalid("max_sequences = 0, need at least 1");
    if (options_.step_tokens == 0) io_invalid("step_tokens = 0, need at least 1");
    if (options_.threads == 0) io_invalid("threads = 0, need at least 1");
  }

  BatchScheduler(const BatchScheduler&) = delete;
  BatchScheduler& operator=(const BatchScheduler&) = delete;

  // Queues a request, to run in one of the scheduler's sessions, or in
  // `session` (made by the same decoder, used by no other pending request;
  // the prompt is appended to what it holds). Checks everything generate()
  // checks before the request is queued, and throws as generate() does
  // (std::invalid_argument, std::out_of_range, std::length_error, naming the
  // request's id); a max_new_tokens of 0 finishes at once, feeding nothing.
  RequestId submit(Request request, Session<T>* session = nullptr) {
    const RequestId id = next_id_;
    check(request, session, id);
    detail::ScheduledRequest<T> r;
    r.id = id;
    r.request = std::move(request);
    r.own = session;
    r.result.status = RequestStatus::waiting;
    if (r.request.options.max_new_tokens == 0) r.result.status = RequestStatus::finished;
    // Either queue may throw (bad_alloc): then nothing has changed.
    if (r.result.status == RequestStatus::finished)
      done_.emplace(id, std::move(r.result));
    else
      waiting_.push_back(std::move(r));
    ++next_id_;
    return id;
  }

  // Cancels a request: a waiting one at once (no ids), a running one at the
  // start of the next step (its ids so far are kept). Returns false for an
  // id that has already left (or was never given).
  bool cancel(RequestId id) {
    for (auto it = waiting_.begin(); it != waiting_.end(); ++it) {
      if (it->id != id) continue;
      RequestResult result = std::move(it->result);
      result.status = RequestStatus::cancelled;
      done_.emplace(id, std::move(result));
      waiting_.erase(it);
      return true;
    }
    for (auto& r : running_)
      if (r->id == id) return r->cancel = true;
    return false;
  }

  // One step (see the top of this file). Returns whether requests remain
  // (waiting or running) after it.
  bool step() {
    retire_cancelled();
    admit();
    if (running_.empty()) return false;
    const Matrix<T>& logits = forward();
    // The forward succeeded: from here every request's progress is its own.
    std::size_t row = 0;
    for (std::size_t k = 0; k < running_.size(); ++k) {
      detail::ScheduledRequest<T>& r = *running_[k];
      if (chunk_[k] == 0) continue;
      r.fed += r.fed < r.request.prompt.size() ? chunk_[k] : 0;
      if (r.fed == r.request.prompt.size()) produce(r, logits.row(static_cast<Eigen::Index>(row)));
      ++row;
    }
    retire_done();
    return !idle();
  }

  // Steps until no request waits or runs.
  void run() {
    while (step()) {
    }
  }

  bool idle() const { return waiting_.empty() && running_.empty(); }
  std::size_t waiting() const { return waiting_.size(); }
  std::size_t running() const { return running_.size(); }
  // Sessions the scheduler has made: at most max_sequences, however many
  // requests it served.
  std::size_t sessions_made() const { return sessions_.size(); }
  const SchedulerOptions& options() const { return options_; }

  // Where request `id` stands; std::out_of_range for an id never given or
  // already taken.
  RequestStatus status(RequestId id) const {
    if (const auto it = done_.find(id); it != done_.end()) return it->second.status;
    for (const auto& r : running_)
      if (r->id == id) return RequestStatus::running;
    for (const auto& r : waiting_)
      if (r.id == id) return RequestStatus::waiting;
    throw std::out_of_range(detail::io::text("kvcache: BatchScheduler: no request ", id, " (never submitted, or taken)"));
  }

  // The result of a request that has left (finished, cancelled or failed),
  // handed over and forgotten; std::out_of_range for any other id.
  RequestResult take(RequestId id) {
    const auto it = done_.find(id);
    if (it == done_.end())
      throw std::out_of_range(detail::io::text("kvcache: BatchScheduler::take(", id, "): the request ",
                                               id < next_id_ ? "has not left yet, or was taken" : "was never submitted"));
    RequestResult result = std::move(it->second);
    done_.erase(it);
    return result;
  }

 private:
  [[noreturn]] static void io_invalid(const char* what) { detail::io::invalid("BatchScheduler: ", what); }

  static SessionOptions unreserved(SessionOptions o) {
    o.reserve_tokens = 0;
    return o;
  }

  // generate()'s checks, against `session` or a scheduler's session.
  void check(const Request& request, Session<T>* session, RequestId id) const {
    const std::string where = "kvcache: BatchScheduler: request " + std::to_string(id) + ": ";
    const Session<T>& s = session ? *session : limits_;
    if (session) {
      for (const auto& r : waiting_)
        if (r.own == session) detail::io::invalid("BatchScheduler: request ", id, ": its session is request ", r.id, "'s");
      for (const auto& r : running_)
        if (r->own == session) detail::io::invalid("BatchScheduler: request ", id, ": its session is request ", r->id, "'s");
    }
    detail::check_generation(where, &request.prompt, s.position(), s.position_limit(), request.options.max_new_tokens);
    decoder_.check_input(request.prompt, s, " (request " + std::to_string(id) + ")");
    Sampler(1, request.options);  // its options' checks, with a buffer of one
  }

  // ---- Joining and leaving ---------------------------------------------------

  // Waiting requests join while fewer than max_sequences run. Each join
  // either completes or changes nothing.
  void admit() {
    while (running_.size() < options_.max_sequences && !waiting_.empty()) {
      detail::ScheduledRequest<T>& r = waiting_.front();
      if (awaits_shared_blocks(r)) return;
      auto joined = std::make_unique<detail::ScheduledRequest<T>>();
      joined->sampler.emplace(decoder_.config().vocab_size, r.request.options);
      // Not 2³¹ ids for a window's limit; a step then rarely allocates.
      joined->result.ids.reserve(std::min<std::size_t>(r.request.options.max_new_tokens, 4096));
      if (!r.own && free_.empty()) make_session();
      running_.reserve(running_.size() + 1);
      result_slots_.try_emplace(r.id);  // the node its result will move into
      // The cached prefix of its prompt, in a scheduler's (empty) session.
      const std::size_t mapped = r.own ? 0 : free_.back()->map_prefix(r.request.prompt);
      // Nothing below throws.
      joined->id = r.id;
      joined->fed = mapped;
      joined->request = std::move(r.request);
      joined->own = r.own;
      joined->result.status = RequestStatus::running;
      joined->session = r.own;
      if (!joined->session) {
        joined->session = free_.back();
        free_.pop_back();
      }
      joined->start = joined->session->checkpoint();
      waiting_.pop_front();
      running_.push_back(std::move(joined));
    }
  }

  // Whether r should wait (and the requests behind it) because a running
  // request is still computing blocks of the prompt prefix they share: they
  // become r's, computed once, when that request has fed them (prefix
  // sharing publishes full blocks after each step).
  bool awaits_shared_blocks(const detail::ScheduledRequest<T>& r) const {
    if (!options_.pool || !options_.pool->options().prefix_sharing || r.own) return false;
    const std::size_t B = options_.pool->block_tokens();
    const std::vector<int>& p = r.request.prompt;
    for (const auto& q : running_) {
      const std::vector<int>& leader = q->request.prompt;
      const std::size_t most = std::min(p.size() - 1, leader.size());  // r maps at most all but its last token
      std::size_t common = 0;
      while (common < most && p[common] == leader[common]) ++common;
      if (!q->own && common >= B && q->fed < common / B * B) return true;
    }
    return false;
  }

  void make_session() {
    SessionOptions o = options_.session;
    auto s = std::make_unique<Session<T>>(decoder_.new_session(o, options_.pool));
    s->set_threads(options_.threads);
    free_.reserve(sessions_.size() + 1);
    sessions_.reserve(sessions_.size() + 1);
    free_.push_back(s.get());
    sessions_.push_back(std::move(s));
  }

  // Moves every running request whose status is no longer `running` to the
  // results, its session released.
  void retire_done() {
    std::size_t kept = 0;
    for (std::size_t k = 0; k < running_.size(); ++k) {
      if (running_[k]->result.status == RequestStatus::running) {
        running_[kept++] = std::move(running_[k]);
        continue;
      }
      release(*running_[k]);
      auto node = result_slots_.extract(running_[k]->id);  // allocated in admit(): nothing here allocates
      node.mapped() = std::move(running_[k]->result);
      done_.insert(std::move(node));
    }
    running_.resize(kept);
  }

  void retire_cancelled() {
    for (auto& r : running_)
      if (r->cancel) r->result.status = RequestStatus::cancelled;
    retire_done();
  }

  // A finished request in the caller's session keeps its tokens; every other
  // request leaves its session as it found it (a scheduler's: empty).
  void release(detail::ScheduledRequest<T>& r) noexcept {
    if (!r.own) {
      r.session->clear();
      free_.push_back(r.session);  // reserved in make_session
    } else if (r.result.status != RequestStatus::finished) {
      r.session->roll_back(r.start);
    }
    r.session = nullptr;
  }

  // ---- The step ----------------------------------------------------------------

  // Plans the step's rows (chunk_[k] tokens of running request k, 0: not in
  // this step) and runs the forward.
  const Matrix<T>& forward() {
    chunk_.assign(running_.size(), 0);
    batch_.clear();
    std::size_t decoding = 0;
    for (const auto& r : running_) decoding += r->fed == r->request.prompt.size();
    std::size_t budget = options_.step_tokens - std::min(options_.step_tokens, decoding);
    for (std::size_t k = 0; k < running_.size(); ++k) {
      const detail::ScheduledRequest<T>& r = *running_[k];
      // With nothing decoding, the budget is at least 1: the step is never empty.
      const std::size_t left = r.request.prompt.size() - r.fed;
      chunk_[k] = left == 0 ? 1 : std::min(left, budget);
      budget -= left == 0 ? 0 : chunk_[k];
      if (chunk_[k] != 0) batch_.push_back(r.session);
    }
    tokens_.resize(batch_.size());  // each list keeps its buffer from step to step
    std::size_t b = 0;
    for (std::size_t k = 0; k < running_.size(); ++k) {
      const detail::ScheduledRequest<T>& r = *running_[k];
      const auto from = r.request.prompt.begin() + static_cast<std::ptrdiff_t>(r.fed);
      if (r.fed == r.request.prompt.size())
        tokens_[b++].assign(1, r.result.ids.back());
      else if (chunk_[k] != 0)
        tokens_[b++].assign(from, from + static_cast<std::ptrdiff_t>(chunk_[k]));
    }
    return decoder_.forward_batch(tokens_, batch_, workspace_, Logits::last, options_.threads);
  }

  // Samples and streams request r's next id from its logits; it leaves
  // (status finished, cancelled or failed) when it is done.
  template <typename Row>
  void produce(detail::ScheduledRequest<T>& r, const Row& logits) noexcept {
    try {
      const int id = r.sampler->sample(logits);
      const bool last = detail::emit(id, r.result.ids, r.request.options);
      const bool go_on = !r.request.stream || r.request.stream(id);
      if (last) r.result.status = RequestStatus::finished;
      else if (!go_on) r.result.status = RequestStatus::cancelled;
    } catch (...) {
      r.result.status = RequestStatus::failed;
      r.result.error = std::current_exception();
    }
  }

  const Decoder<T>& decoder_;
  SchedulerOptions options_;
  Session<T> limits_;  // an empty session of options_.session: what submit() checks against
  std::deque<detail::ScheduledRequest<T>> waiting_;
  std::vector<std::unique_ptr<detail::ScheduledRequest<T>>> running_;
  std::map<RequestId, RequestResult> done_;          // results not yet taken
  std::map<RequestId, RequestResult> result_slots_;  // a node for each running request's result
  std::vector<std::unique_ptr<Session<T>>> sessions_;  // every session made
  std::vector<Session<T>*> free_;                      // those no request holds
  RequestId next_id_ = 0;
  Workspace<T> workspace_;
  std::vector<std::size_t> chunk_;
  std::vector<std::vector<int>> tokens_;
  std::vector<Session<T>*> batch_;
};

// ============================================================================
// generate_batch: a batch of prompts through a BatchScheduler
// ============================================================================

// The seed of sequence i of a batch that shares one seed: seed + i (mod 2⁶⁴;
// 0, which xorshift cannot start from, becomes 1).
inline std::uint64_t sequence_seed(std::uint64_t seed, std::size_t i) {
  const std::uint64_t s = seed + static_cast<std::uint64_t>(i);
  return s == 0 ? 1 : s;
}

namespace detail {

// Runs every request of `scheduler` (ids first … first + n − 1) and returns
// their ids in that order, or rethrows the first (in that order) failed
// request's exception.
template <typename T>
std::vector<std::vector<int>> run_all(BatchScheduler<T>& scheduler, RequestId first, std::size_t n) {
  scheduler.run();
  std::vector<std::vector<int>> out(n);
  for (std::size_t i = 0; i < n; ++i) {
    RequestResult r = scheduler.take(first + i);
    if (r.error) std::rethrow_exception(r.error);
    out[i] = std::move(r.ids);
  }
  return out;
}

}  // namespace detail

// Generates a continuation of every prompt, all the sequences stepped
// together by a BatchScheduler (max_sequences = the number of prompts,
// step_tokens as given): the prompts are prefilled in chunks of the steps'
// token budget while the sequences that have them decode, one
// Decoder::forward_batch per step, so the weights are read once per step
// for the whole batch. A sequence leaves the batch when it produces its
// end_token or reaches its max_new_tokens. Sequence i uses options[i] (its
// own limit, stopping id, sampler and seed; its on_token is called with its
// ids only) and sessions[i], which may already hold a prefix. The steps use
// sessions.front()->threads() threads.
//
// Returns the new ids of each sequence, in the prompts' order: those
// generate() gives each prompt alone, unless two logits are so close that
// the rounding of a batched product (against a single one) swaps them.
// Throws std::invalid_argument (different counts, a null or repeated
// session, a session of another model shape, an empty prompt, step_tokens =
// 0), std::out_of_range (an id outside the vocabulary) or std::length_error (a
// sequence past its session's limit), naming the sequence, before any
// session changes. When something throws later (out of memory, non-finite
// logits, an on_token callback), the whole call fails: every session is
// rolled back to the tokens it held before, as generate() rolls back its one,
// and the first failed sequence's exception is thrown.
template <typename T>
std::vector<std::vector<int>> generate_batch(const Decoder<T>& decoder, const std::vector<Session<T>*>& sessions,
                                             const std::vector<std::vector<int>>& prompts,
                                             const std::vector<GenerateOptions>& options,
                                             std::size_t step_tokens = SchedulerOptions{}.step_tokens) {
  const std::size_t B = prompts.size();
  if (sessions.size() != B || options.size() != B)
    detail::io::invalid("generate_batch: ", B, " prompts, ", sessions.size(), " sessions and ", options.size(),
                        " options; need one of each per sequence");
  for (std::size_t i = 0; i < B; ++i) {  // all before any prefill
    detail::check_distinct(sessions, i, "kvcache: generate_batch", "sessions", "session");
    detail::check_generation("kvcache: generate_batch: sequence " + std::to_string(i) + ": ", &prompts[i],
                             sessions[i]->position(), sessions[i]->position_limit(), options[i].max_new_tokens);
    decoder.check_input(prompts[i], *sessions[i], " (sequence " + std::to_string(i) + ")");
  }
  if (step_tokens == 0) detail::io::invalid("generate_batch: step_tokens = 0, need at least 1");
  if (B == 0) return {};
  std::vector<typename Session<T>::Checkpoint> start;
  for (const Session<T>* s : sessions) start.push_back(s->checkpoint());
  try {
    SchedulerOptions o;
    o.max_sequences = B;
    o.step_tokens = step_tokens;
    o.threads = sessions.front()->threads();
    BatchScheduler<T> scheduler(decoder, o);
    for (std::size_t i = 0; i < B; ++i) scheduler.submit({prompts[i], options[i], {}}, sessions[i]);
    return detail::run_all(scheduler, 0, B);
  } catch (...) {
    for (std::size_t i = 0; i < B; ++i) sessions[i]->roll_back(start[i]);
    throw;
  }
}

// The same with the scheduler's sessions of `threads` threads and one set of
// options: sequence i samples with the seed sequence_seed(options.seed, i),
// i.e. options.seed + i, so that sequence 0 is generate() with `options`.
// options.on_token must be empty (with one stream of ids for all sequences,
// it could not tell them apart: give one GenerateOptions per sequence).
template <typename T>
std::vector<std::vector<int>> generate_batch(const Decoder<T>& decoder, const std::vector<std::vector<int>>& prompts,
                                             const GenerateOptions& options = {}, std::size_t threads = 1) {
  if (options.on_token)
    throw std::invalid_argument("kvcache: generate_batch: on_token is set for the whole batch; give one "
                                "GenerateOptions per sequence to stream each one's ids");
  if (threads == 0) detail::io::invalid("generate_batch: threads = 0, need at least 1");
  if (prompts.empty()) return {};
  SchedulerOptions o;
  o.max_sequences = prompts.size();
  o.threads = threads;
  BatchScheduler<T> scheduler(decoder, o);
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    Request r{prompts[i], options, {}};
    r.options.seed = sequence_seed(options.seed, i);
    scheduler.submit(std::move(r));
  }
  return detail::run_all(scheduler, 0, prompts.size());
}

}  // namespace kvcache
