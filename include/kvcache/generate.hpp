// kvcache/generate.hpp — the prefill/decode loop, the sampler, and the
// uncached baseline that recomputes the whole sequence every step.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "decoder.hpp"

namespace kvcache {

struct GenerateOptions {
  std::size_t max_new_tokens = 64;
  // Generation stops after producing this id; it is the last id returned.
  std::optional<int> end_token;
  // 0 = greedy (argmax, the lowest id on ties); otherwise sample from
  // softmax(logits / temperature), restricted to the top_p nucleus when
  // 0 < top_p < 1.
  float temperature = 0.0f;
  float top_p = 1.0f;
  std::uint64_t seed = 1;
  // Called with each new id as soon as it is chosen (streaming).
  std::function<void(int)> on_token;
};

// Picks the next id from a row of logits. Sampling follows llama2.c's `run`
// step for step (xorshift64* generator, temperature, softmax, top-p), so a
// seed gives the same ids here as there. Owns its buffers: no allocation per
// call.
class Sampler {
 public:
  Sampler(std::size_t vocab_size, float temperature, float top_p, std::uint64_t seed)
      : temperature_(temperature), top_p_(top_p), state_(seed), probs_(vocab_size) {
    if (vocab_size == 0) throw std::invalid_argument("kvcache: Sampler needs vocab_size > 0, got 0");
    if (!(temperature >= 0.0f) || !std::isfinite(temperature))
      throw std::invalid_argument("kvcache: temperature = " + std::to_string(temperature) + ", must be >= 0");
    if (!(top_p >= 0.0f && top_p <= 1.0f))
      throw std::invalid_argument("kvcache: top_p = " + std::to_string(top_p) + ", must be in [0, 1]");
    if (seed == 0) throw std::invalid_argument("kvcache: seed = 0; xorshift needs a non-zero seed");
    if (temperature > 0.0f && top_p > 0.0f && top_p < 1.0f) candidates_.resize(vocab_size);
  }

  explicit Sampler(std::size_t vocab_size, const GenerateOptions& o = {})
      : Sampler(vocab_size, o.temperature, o.top_p, o.seed) {}

  template <typename Derived>
  int sample(const Eigen::MatrixBase<Derived>& logits) {
    const auto n = static_cast<std::size_t>(logits.size());
    if (n != probs_.size())
      throw std::invalid_argument("kvcache: Sampler got " + std::to_string(n) + " logits, expected " +
                                  std::to_string(probs_.size()));
    if (!logits.allFinite())
      throw std::domain_error("kvcache: Sampler: the logits contain NaN or infinity (the model's weights or "
                              "activations overflowed)");
    if (temperature_ == 0.0f) return argmax(logits);
    for (std::size_t i = 0; i < n; ++i) probs_[i] = static_cast<float>(logits(static_cast<Eigen::Index>(i))) / temperature_;
    // A temperature so small that logits / temperature overflows is greedy
    // decoding in all but name: the limit of softmax(l / t) as t → 0.
    if (!std::all_of(probs_.begin(), probs_.end(), [](float p) { return std::isfinite(p); })) return argmax(logits);
    softmax(probs_);
    const float coin = random_f32();
    return (top_p_ <= 0.0f || top_p_ >= 1.0f) ? sample_multinomial(coin) : sample_top_p(coin);
  }

  // The first index of the largest value.
  template <typename Derived>
  static int argmax(const Eigen::MatrixBase<Derived>& logits) {
    Eigen::Index best = 0;
    for (Eigen::Index i = 1; i < logits.size(); ++i)
      if (logits(i) > logits(best)) best = i;
    return static_cast<int>(best);
  }

 private:
  // xorshift64*: 64 bits of state, the top 32 bits of the product returned.
  std::uint32_t random_u32() {
    state_ ^= state_ >> 12;
    state_ ^= state_ << 25;
    state_ ^= state_ >> 27;
    return static_cast<std::uint32_t>((state_ * 0x2545F4914F6CDD1Dull) >> 32);
  }
  float random_f32() { return static_cast<float>(random_u32() >> 8) / 16777216.0f; }

  static void softmax(std::vector<float>& x) {
    const float max = *std::max_element(x.begin(), x.end());
    float sum = 0.0f;
    for (float& v : x) {
      v = std::exp(v - max);
      sum += v;
    }
    for (float& v : x) v /= sum;
  }

  int sample_multinomial(float coin) const {
    float cdf = 0.0f;
    for (std::size_t i = 0; i < probs_.size(); ++i) {
      cdf += probs_[i];
      if (coin < cdf) return static_cast<int>(i);
    }
    return static_cast<int>(probs_.size() - 1);  // rounding left coin >= cdf
  }

  // Samples from the smallest set of most probable ids whose probabilities
  // add up to more than top_p. Ids below (1 - top_p) / (n - 1) cannot be in
  // that set and are dropped before sorting.
  int sample_top_p(float coin) {
    const std::size_t n = probs_.size();
    const float cutoff = (1.0f - top_p_) / static_cast<float>(n - 1);
    std::size_t kept = 0;
    for (std::size_t i = 0; i < n; ++i)
      if (probs_[i] >= cutoff) candidates_[kept++] = {probs_[i], static_cast<int>(i)};
    if (kept == 0) return argmax_of_probs();  // only by rounding, with top_p < 1/n
    std::sort(candidates_.begin(), candidates_.begin() + static_cast<std::ptrdiff_t>(kept),
              [](const Candidate& a, const Candidate& b) { return a.prob > b.prob; });
    float cumulative = 0.0f;
    std::size_t last = kept - 1;
    for (std::size_t i = 0; i < kept; ++i) {
      cumulative += candidates_[i].prob;
      if (cumulative > top_p_) {
        last = i;
        break;
      }
    }
    const float r = coin * cumulative;
    float cdf = 0.0f;
    for (std::size_t i = 0; i <= last; ++i) {
      cdf += candidates_[i].prob;
      if (r < cdf) return candidates_[i].id;
    }
    return candidates_[last].id;
  }

  int argmax_of_probs() const {
    return static_cast<int>(std::max_element(probs_.begin(), probs_.end()) - probs_.begin());
  }

  struct Candidate {
    float prob;
    int id;
  };

  float temperature_;
  float top_p_;
  std::uint64_t state_;
  std::vector<float> probs_;
  std::vector<Candidate> candidates_;
};

namespace detail {

// Generation feeds the prompt and then every new id but the last, so it needs
// prompt + max_new_tokens - 1 positions after the ones already cached.
inline void check_generation_fits(std::size_t cached, std::size_t prompt, std::size_t max_new_tokens,
                                  std::size_t limit) {
  const std::size_t later = max_new_tokens == 0 ? 0 : max_new_tokens - 1;
  // Compared by subtraction, so that a huge max_new_tokens cannot wrap around.
  if (cached > limit || prompt > limit - cached || later > limit - cached - prompt)
    throw std::length_error("kvcache: generate: " + std::to_string(cached) + " cached + " + std::to_string(prompt) +
                            " prompt tokens + " + std::to_string(max_new_tokens) +
                            " new tokens need more positions than the limit of " + std::to_string(limit));
}

inline bool emit(int id, std::vector<int>& out, const GenerateOptions& o) {
  out.push_back(id);
  if (o.on_token) o.on_token(id);
  return (o.end_token && id == *o.end_token) || out.size() >= o.max_new_tokens;
}

}  // namespace detail

namespace detail {

// The decode loop: samples an id from `logits` (the last token's), feeds it,
// and so on until options say stop; ids go to out.
template <typename T, typename Row>
void decode_into(const Decoder<T>& decoder, Session<T>& session, Workspace<T>& workspace, Sampler& sampler,
                 const Row& logits, const GenerateOptions& options, std::vector<int>& out) {
  std::vector<int> step(1);
  int id = sampler.sample(logits);
  while (!emit(id, out, options)) {
    step[0] = id;
    id = sampler.sample(decoder.forward(step, session, workspace, Logits::last).row(0));
  }
}

}  // namespace detail

// Prefill then decode: one forward over the whole prompt, then one forward
// per new token, each reusing the keys and values cached by the previous
// ones. The session may already hold a prefix (a conversation goes on);
// the prompt is appended to it. Returns the new ids.
//
// When anything throws midway (out of memory, non-finite logits, the
// caller's on_token), the session is rolled back to the tokens it held
// before the call: the caller never gets the ids, so the cache must not keep
// them either. (A sliding window that dropped tokens during the call cannot
// be rolled back: the session is then cleared.)
template <typename T>
std::vector<int> generate(const Decoder<T>& decoder, Session<T>& session, const std::vector<int>& prompt,
                          const GenerateOptions& options = {}) {
  if (prompt.empty()) throw std::invalid_argument("kvcache: generate: the prompt is empty (give at least one token)");
  detail::check_generation_fits(session.position(), prompt.size(), options.max_new_tokens, session.position_limit());
  Sampler sampler(decoder.config().vocab_size, options);
  std::vector<int> out;
  if (options.max_new_tokens == 0) return out;
  out.reserve(std::min<std::size_t>(options.max_new_tokens, 4096));  // not 2³¹ ids for a window's huge limit
  const auto start = session.checkpoint();
  Workspace<T> workspace;
  try {
    const Matrix<T>& logits = decoder.forward(prompt, session, workspace, Logits::last);  // prefill
    detail::decode_into(decoder, session, workspace, sampler, logits.row(0), options, out);
  } catch (...) {
    session.roll_back(start);
    throw;
  }
  return out;
}

// generate() without the prefill: decodes from the logits of the last token
// the session has fed (1 × vocab_size, e.g. a saved session's last_logits).
// Rolls back as generate() does.
template <typename T, typename Derived>
std::vector<int> decode(const Decoder<T>& decoder, Session<T>& session, const Eigen::MatrixBase<Derived>& last_logits,
                        const GenerateOptions& options = {}) {
  detail::check_generation_fits(session.position(), 0, options.max_new_tokens, session.position_limit());
  Sampler sampler(decoder.config().vocab_size, options);
  std::vector<int> out;
  if (options.max_new_tokens == 0) return out;
  out.reserve(std::min<std::size_t>(options.max_new_tokens, 4096));
  const auto start = session.checkpoint();
  Workspace<T> workspace;
  try {
    detail::decode_into(decoder, session, workspace, sampler, last_logits, options, out);
  } catch (...) {
    session.roll_back(start);
    throw;
  }
  return out;
}

// The same with a fresh session.
template <typename T>
std::vector<int> generate(const Decoder<T>& decoder, const std::vector<int>& prompt,
                          const GenerateOptions& options = {}, std::size_t threads = 1) {
  Session<T> session = decoder.new_session();
  session.set_threads(threads);
  return generate(decoder, session, prompt, options);
}

// ============================================================================
// Batches: several sequences, one forward per step
// ============================================================================

// The seed of sequence i of a batch that shares one seed: seed + i (mod 2⁶⁴;
// 0, which xorshift cannot start from, becomes 1).
inline std::uint64_t sequence_seed(std::uint64_t seed, std::size_t i) {
  const std::uint64_t s = seed + static_cast<std::uint64_t>(i);
  return s == 0 ? 1 : s;
}

namespace detail {

// generate_batch's checks, all before any session changes (its prefills run
// one sequence at a time).
template <typename T>
void check_batch(const Decoder<T>& decoder, const std::vector<Session<T>*>& sessions,
                 const std::vector<std::vector<int>>& prompts, const std::vector<GenerateOptions>& options) {
  const std::size_t B = prompts.size();
  if (sessions.size() != B || options.size() != B)
    throw std::invalid_argument("kvcache: generate_batch: " + std::to_string(B) + " prompts, " +
                                std::to_string(sessions.size()) + " sessions and " + std::to_string(options.size()) +
                                " options; need one of each per sequence");
  for (std::size_t i = 0; i < B; ++i) {
    const std::string at = "kvcache: generate_batch: sequence " + std::to_string(i) + ": ";
    check_distinct(sessions, i, "kvcache: generate_batch", "sessions", "session");
    const Session<T>* s = sessions[i];
    if (prompts[i].empty()) throw std::invalid_argument(at + "the prompt is empty (give at least one token)");
    decoder.check_input(prompts[i], *s, " (sequence " + std::to_string(i) + ")");
    try {
      check_generation_fits(s->position(), prompts[i].size(), options[i].max_new_tokens, s->position_limit());
    } catch (const std::length_error& e) {
      throw std::length_error(at + e.what());
    }
  }
}

}  // namespace detail

// Generates a continuation of every prompt, the sequences stepped together:
// each prompt is prefilled alone in its session (exactly as generate()
// does), then every sequence that has not finished feeds its last id, all of
// them in one Decoder::forward_batch per step, so the weights are read once
// per step for the whole batch. A sequence leaves the batch when it produces
// its end_token or reaches its max_new_tokens. Sequence i uses options[i]
// (its own limit, stopping id, sampler and seed; its on_token is called with
// its ids only) and sessions[i], which may already hold a prefix. The
// batched steps use sessions.front()->threads() threads.
//
// Returns the new ids of each sequence, in the prompts' order: for greedy
// decoding those generate() gives each prompt alone, unless two logits are
// so close that the rounding of a batched product (against a single one)
// swaps them. Throws std::invalid_argument (different counts, a null or
// repeated session, a session of another model shape, an empty prompt),
// std::out_of_range (an id outside the vocabulary) or std::length_error (a
// sequence past its session's limit), naming the sequence, before any
// session changes. When something throws later (out of memory, non-finite
// logits, an on_token callback), every session is rolled back as generate()
// rolls back its one.
template <typename T>
std::vector<std::vector<int>> generate_batch(const Decoder<T>& decoder, const std::vector<Session<T>*>& sessions,
                                             const std::vector<std::vector<int>>& prompts,
                                             const std::vector<GenerateOptions>& options) {
  const ModelConfig& c = decoder.config();
  const std::size_t B = prompts.size();
  detail::check_batch(decoder, sessions, prompts, options);
  std::vector<Sampler> samplers;
  samplers.reserve(B);
  for (std::size_t i = 0; i < B; ++i) samplers.emplace_back(c.vocab_size, options[i]);

  std::vector<std::vector<int>> out(B);
  // Where each session was, to roll all of them back if anything throws
  // midway (as generate() does for one).
  std::vector<typename Session<T>::Checkpoint> start(B);
  for (std::size_t i = 0; i < B; ++i) start[i] = sessions[i]->checkpoint();
  Workspace<T> workspace;
  try {
    std::vector<std::size_t> active;  // the sequences still generating, in order
    for (std::size_t i = 0; i < B; ++i) {
      if (options[i].max_new_tokens == 0) continue;
      out[i].reserve(std::min<std::size_t>(options[i].max_new_tokens, 4096));
      const Matrix<T>& logits = decoder.forward(prompts[i], *sessions[i], workspace, Logits::last);  // prefill, alone
      if (!detail::emit(samplers[i].sample(logits.row(0)), out[i], options[i])) active.push_back(i);
    }
    std::vector<std::vector<int>> step;
    std::vector<Session<T>*> batch;
    const std::size_t threads = B == 0 ? 1 : sessions.front()->threads();
    while (!active.empty()) {
      step.resize(active.size());
      batch.resize(active.size());
      for (std::size_t k = 0; k < active.size(); ++k) {
        step[k].assign(1, out[active[k]].back());
        batch[k] = sessions[active[k]];
      }
      const Matrix<T>& logits = decoder.forward_batch(step, batch, workspace, Logits::last, threads);  // decode
      std::size_t kept = 0;
      for (std::size_t k = 0; k < active.size(); ++k) {
        const std::size_t i = active[k];
        if (!detail::emit(samplers[i].sample(logits.row(static_cast<Eigen::Index>(k))), out[i], options[i]))
          active[kept++] = i;
      }
      active.resize(kept);
    }
  } catch (...) {
    for (std::size_t i = 0; i < B; ++i) sessions[i]->roll_back(start[i]);
    throw;
  }
  return out;
}

// The same with fresh sessions of `threads` threads and one set of options:
// sequence i samples with the seed sequence_seed(options.seed, i),
// i.e. options.seed + i, so that sequence 0 is generate() with `options`.
// options.on_token must be empty (with one stream of ids for all sequences,
// it could not tell them apart: give one GenerateOptions per sequence).
template <typename T>
std::vector<std::vector<int>> generate_batch(const Decoder<T>& decoder, const std::vector<std::vector<int>>& prompts,
                                             const GenerateOptions& options = {}, std::size_t threads = 1) {
  if (options.on_token)
    throw std::invalid_argument("kvcache: generate_batch: on_token is set for the whole batch; give one "
                                "GenerateOptions per sequence to stream each one's ids");
  if (threads == 0) throw std::invalid_argument("kvcache: generate_batch: threads = 0, need at least 1");
  std::vector<Session<T>> sessions;
  std::vector<Session<T>*> pointers;
  std::vector<GenerateOptions> per_sequence(prompts.size(), options);
  sessions.reserve(prompts.size());
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    sessions.push_back(decoder.new_session());
    sessions.back().set_threads(threads);
    pointers.push_back(&sessions.back());
    per_sequence[i].seed = sequence_seed(options.seed, i);
  }
  return generate_batch(decoder, pointers, prompts, per_sequence);
}

// The baseline without a cache: every step clears the session and feeds the
// whole sequence so far, with the same kernels as generate(). Step n costs a
// forward over n tokens, so n tokens cost about n²/2 token passes.
template <typename T>
std::vector<int> generate_uncached(const Decoder<T>& decoder, const std::vector<int>& prompt,
                                   const GenerateOptions& options = {}, std::size_t threads = 1) {
  if (prompt.empty()) throw std::invalid_argument("kvcache: generate: the prompt is empty (give at least one token)");
  detail::check_generation_fits(0, prompt.size(), options.max_new_tokens, decoder.config().max_seq_len);
  Sampler sampler(decoder.config().vocab_size, options);
  std::vector<int> out;
  if (options.max_new_tokens == 0) return out;
  Session<T> session = decoder.new_session(0, prompt.size() + options.max_new_tokens - 1);
  session.set_threads(threads);
  std::vector<int> sequence = prompt;
  sequence.reserve(prompt.size() + options.max_new_tokens);
  Workspace<T> workspace;
  for (;;) {
    session.clear();
    const Matrix<T>& logits = decoder.forward(sequence, session, workspace, Logits::last);
    if (detail::emit(sampler.sample(logits.row(0)), out, options)) break;
    sequence.push_back(out.back());
  }
  return out;
}

}  // namespace kvcache
