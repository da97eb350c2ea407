// tests/test_decode_reference.cpp — every decode step's logits, compared
// directly with the double-precision reference of tests/reference.hpp.
//
// Elsewhere a decode step is checked against a prefill of the same code, and
// generate_uncached runs the same cache and attention code: a mistake shared
// by both paths (a position, a window's re-basing, a compact type's rounding)
// would pass. Here the library is driven through its public API only
// (random_weights, Decoder, new_session(SessionOptions), forward) and each
// step is held against the formula: MHA, GQA and MQA; learned positions,
// RoPE and none; sliding windows with and without sinks; f32, bf16 and int8
// storage.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <kvcache/decoder.hpp>

#include "fixtures.hpp"
#include "reference.hpp"

namespace {

using kvcache::DecoderWeights;
using kvcache::KVType;
using kvcache::ModelConfig;
using kvcache::PositionEncoding;
using kvcache::SessionOptions;

// The model of fixtures::model, with weights that exercise every term of the
// formula: random_weights leaves the norms at identity and the biases empty,
// so here the gains, shifts and biases are random too.
template <typename T>
DecoderWeights<T> weights_of(const ModelConfig& c, std::uint64_t seed) {
  DecoderWeights<T> w = kvcache::random_weights<T>(c, seed);
  kvcache::detail::SplitMix64 rng(seed + 1000);
  const auto d = static_cast<Eigen::Index>(c.d_model);
  const auto around = [&](Eigen::Index n, double center, double spread) {
    kvcache::Vector<T> v(n);
    for (Eigen::Index i = 0; i < n; ++i) v(i) = static_cast<T>(center + spread * rng.symmetric());
    return v;
  };
  const auto randomize = [&](kvcache::NormWeights<T>& n) {
    n.gamma = around(d, 1.0, 0.3);
    if (c.norm == kvcache::NormKind::layer_norm) n.beta = around(d, 0.0, 0.2);
  };
  for (auto& b : w.blocks) {
    randomize(b.attention_norm);
    randomize(b.mlp_norm);
    const auto kv = static_cast<Eigen::Index>(c.kv_dim());
    b.attention.b_Q = around(d, 0.0, 0.2);
    b.attention.b_K = around(kv, 0.0, 0.2);
    b.attention.b_V = around(kv, 0.0, 0.2);
    b.attention.b_O = around(d, 0.0, 0.2);
    if (c.mlp == kvcache::MlpKind::gelu) {
      b.mlp.b_1 = around(static_cast<Eigen::Index>(c.d_ff), 0.0, 0.2);
      b.mlp.b_2 = around(d, 0.0, 0.2);
    }
  }
  randomize(w.final_norm);
  return w;
}

struct Steps {
  std::string what;
  std::size_t prompt = 0;  // tokens of the prefill; the rest are decode steps
  std::size_t total = 0;
  SessionOptions options;
};

// Feeds a prompt, then decodes one token at a time, and holds the prefill's
// logits and every decode step's against the reference over the same tokens,
// each within `tolerance` of the largest logit of its row. Returns the
// largest error seen.
template <typename T>
double expect_every_step_matches(const ModelConfig& c, const DecoderWeights<T>& w, const Steps& run, double tolerance) {
  const kvcache::Decoder<T> d(c, w);
  const auto tokens = fixtures::random_tokens(run.total, c.vocab_size, 11);
  const reference::Mat expected =
      reference::logits(c, w, tokens, {run.options.window.window, run.options.window.sinks});
  kvcache::Session<T> s = d.new_session(run.options);
  double worst = 0.0;
  const std::vector<int> prompt(tokens.begin(), tokens.begin() + static_cast<std::ptrdiff_t>(run.prompt));
  const kvcache::Matrix<T> prefill = d.forward(prompt, s);
  for (std::size_t i = 0; i < run.prompt; ++i) {
    const double e = reference::relative_error(prefill.row(static_cast<Eigen::Index>(i)),
                                               expected.row(static_cast<Eigen::Index>(i)));
    EXPECT_LE(e, tolerance) << run.what << ": prefill, position " << i;
    worst = std::max(worst, e);
  }
  for (std::size_t i = run.prompt; i < run.total; ++i) {
    const kvcache::Matrix<T> step = d.forward({tokens[i]}, s);
    const double e = reference::relative_error(step, expected.row(static_cast<Eigen::Index>(i)));
    EXPECT_LE(e, tolerance) << run.what << ": decode step at position " << i;
    worst = std::max(worst, e);
  }
  EXPECT_EQ(s.position(), run.total) << run.what;
  return worst;
}

std::string name_of(const fixtures::Variant& v, const SessionOptions& o) {
  std::string name = v.name + " " + kvcache::to_string(o.kv_type);
  if (o.window.window != 0)
    name += " window " + std::to_string(o.window.window) + " sinks " + std::to_string(o.window.sinks);
  return name;
}

// The variants of fixtures::variants() a sliding window accepts (RoPE; a
// window on learned positions is refused), and the same shapes with no
// position encoding.
std::vector<fixtures::Variant> window_variants() {
  std::vector<fixtures::Variant> out;
  for (const auto& v : fixtures::variants())
    if (v.positions == PositionEncoding::rope) out.push_back(v);
  out.push_back({"MHA_none", 4, 4, PositionEncoding::none});
  out.push_back({"MQA_none", 4, 1, PositionEncoding::none});
  return out;
}

// A window of 8 in a model of max_seq_len 16, decoded to position 40: past
// the window many times over and past max_seq_len. Prompts shorter than the
// window and longer (a prefill that fills it and goes on).
std::vector<Steps> window_runs(const fixtures::Variant& v, KVType type) {
  std::vector<Steps> runs;
  for (std::size_t sinks : {0u, 1u, 3u})
    for (std::size_t prompt : {3u, 11u}) {
      Steps r;
      r.options.kv_type = type;
      r.options.window = {8, sinks};
      r.prompt = prompt;
      r.total = 40;
      r.what = name_of(v, r.options) + ", prompt " + std::to_string(prompt);
      runs.push_back(r);
    }
  return runs;
}

// Tolerances, as a fraction of the largest logit of the row.
//
// double: the library and the reference add in different orders; each
// rounding is u = 2^-53 ≈ 1.1e-16 and a logit's path has a few thousand of
// them (measured: at most 2.4e-15, 22 u). 1e-12 leaves room for other
// compilers and kernels, while a real mistake (a position off by one, a token
// too many in a window) moves the logits by 0.1 to 1.
constexpr double kDouble = 1e-12;
// float: the same with u = 2^-24 ≈ 6e-8 (measured: at most 4.7e-7, 8 u);
// 1e-5 is 170 u.
constexpr double kFloat = 1e-5;
// Compact storage rounds every cached key and value once, against the exact
// formula here:
//  - bf16 keeps 8 significant bits: each element is off by at most
//    u = 2^-8 ≈ 3.9e-3 of itself;
//  - int8 stores k ≈ s·q with |q| ≤ 127 and s at most 2^(1/8) above
//    max|k| / 127: each element is off by at most s/2, u = 1.0906/254 ≈
//    4.3e-3 of the largest element of its head's row (more than bf16 on the
//    small elements, so int8 errs more).
// An error of δ in the keys moves a score q·k/√d_k by about δ·|q|·|k|/√d_k
// and a softmax weight by that much relative; an error in the values moves a
// head's output by δ of its size. That passes W_O, a residual add, a norm,
// the MLP and a second block whose keys and values carry the first block's
// error besides their own, and random roundings of the d_k = 8 terms partly
// cancel: a few u of the logit scale. Measured on these models: at most
// 1.2 u for bf16 and 2.8 u for int8 (windows and RoPE included). The
// tolerances are 4 u and 6 u, two to three times that, and still ten times
// below the smallest mistake tried (int8 values read with the neighbouring
// scale code, 9% off, errs by 0.25).
constexpr double kBf16 = 4 * 0x1p-8;
constexpr double kInt8 = 6 * 1.0906 / 254;

double tolerance_of(KVType type) {
  switch (type) {
    case KVType::full: return kFloat;
    case KVType::bf16: return kBf16;
    case KVType::int8: return kInt8;
    default: break;
  }
  return 0.0;
}

}  // namespace

// No window: prefill 5 tokens, then decode up to max_seq_len, in double, with
// the LM head tied and untied.
TEST(DecodeReference, EveryStepMatchesTheFormulaInDouble) {
  for (const auto& v : fixtures::variants())
    for (bool tied : {true, false}) {
      ModelConfig c = fixtures::model(v);
      c.tied_lm_head = tied;
      Steps run;
      run.prompt = 5;
      run.total = c.max_seq_len;
      run.what = v.name + (tied ? " tied" : " untied");
      expect_every_step_matches(c, weights_of<double>(c, 3), run, kDouble);
    }
}

TEST(DecodeReference, EveryStepMatchesTheFormulaInFloat) {
  for (const auto& v : fixtures::variants()) {
    const ModelConfig c = fixtures::model(v);
    Steps run;
    run.prompt = 5;
    run.total = c.max_seq_len;
    run.what = v.name;
    expect_every_step_matches(c, weights_of<float>(c, 4), run, kFloat);
  }
}

// A one-token prompt: every position after the first is a decode step.
TEST(DecodeReference, DecodingFromTheFirstTokenMatchesTheFormula) {
  for (const auto& v : fixtures::variants()) {
    const ModelConfig c = fixtures::model(v);
    Steps run;
    run.prompt = 1;
    run.total = 20;
    run.what = v.name;
    expect_every_step_matches(c, weights_of<double>(c, 5), run, kDouble);
  }
}

TEST(DecodeReference, SlidingWindowsMatchTheFormulaInDouble) {
  for (const auto& v : window_variants()) {
    const ModelConfig c = fixtures::model(v, 16);
    const auto w = weights_of<double>(c, 6);
    for (const Steps& run : window_runs(v, KVType::full)) expect_every_step_matches(c, w, run, kDouble);
  }
}

TEST(DecodeReference, SlidingWindowsMatchTheFormulaInFloat) {
  for (const auto& v : window_variants()) {
    const ModelConfig c = fixtures::model(v, 16);
    const auto w = weights_of<float>(c, 7);
    for (const Steps& run : window_runs(v, KVType::full)) expect_every_step_matches(c, w, run, kFloat);
  }
}

// bf16 and int8 caches against the exact formula, within what rounding each
// cached key and value to the format allows (see kBf16, kInt8).
TEST(DecodeReference, CompactStorageMatchesTheFormulaWithinItsPrecision) {
  for (KVType type : {KVType::bf16, KVType::int8}) {
    double worst = 0.0;
    for (const auto& v : fixtures::variants()) {
      const ModelConfig c = fixtures::model(v);
      Steps run;
      run.options.kv_type = type;
      run.prompt = 5;
      run.total = c.max_seq_len;
      run.what = name_of(v, run.options);
      worst = std::max(worst, expect_every_step_matches(c, weights_of<float>(c, 8), run, tolerance_of(type)));
    }
    for (const auto& v : window_variants()) {
      const ModelConfig c = fixtures::model(v, 16);
      const auto w = weights_of<float>(c, 9);
      for (const Steps& run : window_runs(v, type))
        worst = std::max(worst, expect_every_step_matches(c, w, run, tolerance_of(type)));
    }
    // The format does round: an error of 0 would mean the cache was not
    // compact at all.
    EXPECT_GT(worst, 1e-5) << kvcache::to_string(type);
    std::printf("%s: largest error %.2e of the logit scale (tolerance %.2e)\n", kvcache::to_string(type), worst,
                tolerance_of(type));
  }
}
