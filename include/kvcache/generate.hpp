// kvcache/generate.hpp — the prefill/decode loop, the sampler, and the
// uncached baseline that recomputes the whole sequence every step.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <numeric>
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
    if (vocab_size == 0) detail::io::invalid("Sampler needs vocab_size > 0, got 0");
    if (!(temperature >= 0.0f) || !std::isfinite(temperature))
      detail::io::invalid("temperature = ", temperature, ", must be >= 0");
    if (!(top_p >= 0.0f && top_p <= 1.0f)) detail::io::invalid("top_p = ", top_p, ", must be in [0, 1]");
    if (seed == 0) detail::io::invalid("seed = 0; xorshift needs a non-zero seed");
    if (temperature > 0.0f && top_p > 0.0f && top_p < 1.0f) candidates_.resize(vocab_size);
  }

  explicit Sampler(std::size_t vocab_size, const GenerateOptions& o = {})
      : Sampler(vocab_size, o.temperature, o.top_p, o.seed) {}

  template <typename Derived>
  int sample(const Eigen::MatrixBase<Derived>& logits) {
    const auto n = static_cast<std::size_t>(logits.size());
    if (n != probs_.size()) detail::io::invalid("Sampler got ", n, " logits, expected ", probs_.size());
    // 0·l is 0 for every finite l and NaN otherwise: one vectorized pass.
    if (!std::isfinite(static_cast<float>((logits.array() * 0).sum())))
      throw std::domain_error("kvcache: Sampler: the logits contain NaN or infinity (the model's weights or "
                              "activations overflowed)");
    if (temperature_ == 0.0f) return argmax(logits);
    for (std::size_t i = 0; i < n; ++i) probs_[i] = static_cast<float>(logits(static_cast<Eigen::Index>(i))) / temperature_;
    // A temperature so small that logits / temperature overflows is greedy
    // decoding in all but name: the limit of softmax(l / t) as t → 0.
    if (!std::all_of(probs_.begin(), probs_.end(), [](float p) { return std::isfinite(p); })) return argmax(logits);
    const float max = *std::max_element(probs_.begin(), probs_.end());
    for (float& p : probs_) p = std::exp(p - max);
    const float sum = std::accumulate(probs_.begin(), probs_.end(), 0.0f);  // in order, as llama2.c adds
    for (float& p : probs_) p /= sum;  // softmax
    // One draw of the generator either way.
    if (top_p_ > 0.0f && top_p_ < 1.0f) return sample_top_p(random_f32());
    return static_cast<int>(pick(n, random_f32(), [&](std::size_t k) { return probs_[k]; }));
  }

  // The first index of the largest of finite logits. Two passes, the first
  // a vectorized maximum: a compare-and-branch loop over 32000 logits took
  // 5% of a batch-8 decode step (perf, stories15M shape).
  template <typename Derived>
  static int argmax(const Eigen::MatrixBase<Derived>& logits) {
    if (logits.size() == 0) detail::io::invalid("Sampler::argmax got no logits");
    const auto max = logits.maxCoeff();
    Eigen::Index best = 0;
    while (best + 1 < logits.size() && !(logits(best) == max)) ++best;
    return static_cast<int>(best);
  }

 private:
  // xorshift64*: 64 bits of state; the top 24 of the product's top 32 bits
  // make a float in [0, 1).
  float random_f32() {
    state_ ^= state_ >> 12;
    state_ ^= state_ << 25;
    state_ ^= state_ >> 27;
    return static_cast<float>(static_cast<std::uint32_t>((state_ * 0x2545F4914F6CDD1Dull) >> 32) >> 8) / 16777216.0f;
  }

  // The first of n items whose running sum of prob(k) exceeds r; the last
  // when rounding left r at or above the total.
  template <typename Prob>
  static std::size_t pick(std::size_t n, float r, const Prob& prob) {
    float cdf = 0.0f;
    for (std::size_t k = 0; k < n; ++k) {
      cdf += prob(k);
      if (r < cdf) return k;
    }
    return n - 1;
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
    // None only by rounding, with top_p < 1/n: the most probable id.
    if (kept == 0) return argmax(Eigen::Map<const Eigen::VectorXf>(probs_.data(), static_cast<Eigen::Index>(n)));
    std::sort(candidates_.begin(), candidates_.begin() + static_cast<std::ptrdiff_t>(kept),
              [](const auto& a, const auto& b) { return a.first > b.first; });
    std::size_t last = 0;
    float cumulative = candidates_[0].first;
    while (cumulative <= top_p_ && last + 1 < kept) cumulative += candidates_[++last].first;
    return candidates_[pick(last + 1, coin * cumulative, [&](std::size_t k) { return candidates_[k].first; })].second;
  }

  float temperature_;
  float top_p_;
  std::uint64_t state_;
  std::vector<float> probs_;
  std::vector<std::pair<float, int>> candidates_;  // (probability, id) of the top_p nucleus
};

namespace detail {

// Everything generate, decode, generate_uncached and the scheduler check of
// one sequence's sizes before any session changes, each message starting
// with `where`: a prompt (none for decode()) of at least one token, and room
// after the `cached` positions for it and every new id but the last (which
// is not fed), within `limit`.
inline void check_generation(const std::string& where, const std::vector<int>* prompt, std::size_t cached,
                             std::size_t limit, std::size_t max_new_tokens) {
  if (prompt && prompt->empty()) throw std::invalid_argument(where + "the prompt is empty (give at least one token)");
  const std::size_t m = prompt ? prompt->size() : 0;
  const std::size_t later = max_new_tokens == 0 ? 0 : max_new_tokens - 1;
  // Compared by subtraction, so that a huge max_new_tokens cannot wrap around.
  if (cached > limit || m > limit - cached || later > limit - cached - m)
    throw std::length_error(io::text(where, cached, " cached + ", m, " prompt tokens + ", max_new_tokens,
                                     " new tokens need more positions than the limit of ", limit));
}

inline bool emit(int id, std::vector<int>& out, const GenerateOptions& o) {
  out.push_back(id);
  if (o.on_token) o.on_token(id);
  return o.end_token == id || out.size() >= o.max_new_tokens;
}

// The loop of generate and decode, whose checks have passed.
// Sequence i (options[i], *sessions[i]) starts with the id first(i,
// workspace, its sampler) picks (from its prompt's prefill, or from logits
// the caller holds); then every sequence that has not finished feeds its
// last id, all of them in one Decoder::forward_batch per step (one sequence
// is a batch of one), until each produces its end_token or reaches its
// max_new_tokens. When anything throws, every session is rolled back to the
// tokens it held before: the caller never gets the ids, so the cache must
// not keep them either. (A sliding window that dropped tokens during the call
// cannot be rolled back: the session is then cleared.)
template <typename T, typename First>
std::vector<std::vector<int>> generate_sequences(const Decoder<T>& decoder, const std::vector<Session<T>*>& sessions,
                                                 const std::vector<GenerateOptions>& options, const First& first) {
  const std::size_t B = sessions.size();
  std::vector<Sampler> samplers;
  for (const GenerateOptions& o : options) samplers.emplace_back(decoder.config().vocab_size, o);
  std::vector<typename Session<T>::Checkpoint> start;
  for (const Session<T>* s : sessions) start.push_back(s->checkpoint());
  std::vector<std::vector<int>> out(B);
  Workspace<T> workspace;
  try {
    std::vector<std::size_t> active;  // the sequences still generating, in order
    for (std::size_t i = 0; i < B; ++i) {
      if (options[i].max_new_tokens == 0) continue;
      out[i].reserve(std::min<std::size_t>(options[i].max_new_tokens, 4096));  // not 2³¹ ids for a window's limit
      if (!emit(first(i, workspace, samplers[i]), out[i], options[i])) active.push_back(i);
    }
    std::vector<std::vector<int>> step;
    std::vector<Session<T>*> batch;
    while (!active.empty()) {
      step.resize(active.size());
      batch.resize(active.size());
      for (std::size_t k = 0; k < active.size(); ++k) {
        step[k].assign(1, out[active[k]].back());
        batch[k] = sessions[active[k]];
      }
      // Decode, with the threads of the first session.
      const Matrix<T>& logits = decoder.forward_batch(step, batch, workspace, Logits::last, sessions[0]->threads());
      std::size_t kept = 0;
      for (std::size_t k = 0; k < active.size(); ++k) {
        const std::size_t i = active[k];
        if (!emit(samplers[i].sample(logits.row(static_cast<Eigen::Index>(k))), out[i], options[i]))
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

}  // namespace detail

// Prefill then decode: one forward over the whole prompt, then one forward
// per new token, each reusing the keys and values cached by the previous
// ones. The session may already hold a prefix (a conversation goes on);
// the prompt is appended to it. Returns the new ids. When anything throws
// midway (out of memory, non-finite logits, the caller's on_token), the
// session is rolled back to the tokens it held before the call.
template <typename T>
std::vector<int> generate(const Decoder<T>& decoder, Session<T>& session, const std::vector<int>& prompt,
                          const GenerateOptions& options = {}) {
  detail::check_generation("kvcache: generate: ", &prompt, session.position(), session.position_limit(),
                           options.max_new_tokens);
  const auto prefill = [&](std::size_t, Workspace<T>& w, Sampler& s) {
    return s.sample(decoder.forward(prompt, session, w, Logits::last).row(0));
  };
  // Moved out: a copy could fail to allocate after the session has changed.
  return std::move(detail::generate_sequences(decoder, {&session}, {options}, prefill).front());
}

// generate() without the prefill: decodes from the logits of the last token
// the session has fed (1 × vocab_size, e.g. a saved session's last_logits).
// Rolls back as generate() does.
template <typename T, typename Derived>
std::vector<int> decode(const Decoder<T>& decoder, Session<T>& session, const Eigen::MatrixBase<Derived>& last_logits,
                        const GenerateOptions& options = {}) {
  detail::check_generation("kvcache: decode: ", nullptr, session.position(), session.position_limit(),
                           options.max_new_tokens);
  const auto given = [&](std::size_t, Workspace<T>&, Sampler& s) { return s.sample(last_logits); };
  return std::move(detail::generate_sequences(decoder, {&session}, {options}, given).front());
}

// The same with a fresh session.
template <typename T>
std::vector<int> generate(const Decoder<T>& decoder, const std::vector<int>& prompt,
                          const GenerateOptions& options = {}, std::size_t threads = 1) {
  Session<T> session = decoder.new_session();
  session.set_threads(threads);
  return generate(decoder, session, prompt, options);
}

// generate_batch and the scheduler that steps many requests together:
// scheduler.hpp.

// The baseline without a cache: every step clears the session and feeds the
// whole sequence so far, with the same kernels as generate(). Step n costs a
// forward over n tokens, so n tokens cost about n²/2 token passes.
template <typename T>
std::vector<int> generate_uncached(const Decoder<T>& decoder, const std::vector<int>& prompt,
                                   const GenerateOptions& options = {}, std::size_t threads = 1) {
  detail::check_generation("kvcache: generate_uncached: ", &prompt, 0, decoder.config().max_seq_len,
                           options.max_new_tokens);
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
