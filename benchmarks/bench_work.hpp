// bench_work.hpp — the work one Decoder::forward call must do, counted from
// the model's shape, and the time that work predicts on this machine.
//
// How the prediction is made, and what it leaves out:
//   - FLOPs are the multiply-adds of the matrix products (2 FLOPs each) that
//     the math requires: the Q, K, V, O projections, the MLP, Q·Kᵀ and S·V
//     over the causal positions only (row i of m new tokens after p cached
//     ones sees p + i + 1 keys), and the LM head for the last position only
//     (generation asks for Logits::last). Norms, RoPE, softmax, residual
//     additions and sampling are O(m·d) or O(m·n) element-wise work and are
//     left out. A kernel that computes the masked half of the score matrix
//     and throws it away does up to 2× the counted attention work.
//   - Bytes are what must come from memory at least once: every weight
//     (the embedding table in full as the tied LM head, only the m gathered
//     rows otherwise) and every cached key and value (2 × n × kv_dim per
//     layer, n = p + m). Activations and score matrices are left out: they
//     are rewritten in place every layer and mostly stay in cache, though for
//     a long uncached pass the 6 heads' n × n scores do spill past L2.
//   - Predicted time = max(FLOPs / peak FLOP rate, bytes / read bandwidth):
//     the roofline bound, as if compute and memory traffic overlapped
//     perfectly and the products ran at the rate of a large square GEMM. It
//     is a lower bound on the time, not a model of the implementation's
//     overheads; a measured time far above it says where time is lost.
#pragma once

#include <algorithm>
#include <cstddef>

#include <kvcache/config.hpp>

#include "bench_machine.hpp"

namespace kvcache_bench {

struct Work {
  double flops = 0.0;
  double bytes = 0.0;

  Work& operator+=(const Work& w) {
    flops += w.flops;
    bytes += w.bytes;
    return *this;
  }
};

// Parameters of a model of this shape without biases (as llama2.c checkpoints
// and kvcache::random_weights have none): the count Decoder::weight_bytes()
// divides by sizeof(T).
inline double parameter_count(const kvcache::ModelConfig& c) {
  const double d = static_cast<double>(c.d_model), kv = static_cast<double>(c.kv_dim());
  const double ff = static_cast<double>(c.d_ff), V = static_cast<double>(c.vocab_size);
  const double norm = c.norm == kvcache::NormKind::layer_norm ? 2 * d : d;  // gamma (and beta)
  const double mlp = (c.mlp == kvcache::MlpKind::swiglu ? 3 : 2) * ff * d;
  const double block = 2 * norm + d * d + 2 * kv * d + d * d + mlp;
  double total = V * d + static_cast<double>(c.n_layers) * block + norm;
  if (c.positions == kvcache::PositionEncoding::learned) total += static_cast<double>(c.max_seq_len) * d;
  if (!c.tied_lm_head) total += V * d;
  return total;
}

// forward() of m new tokens after p cached ones, logits for the last only.
//   cached decode step at position p:  forward_work(c, 1, p)
//   prefill of a P-token prompt:       forward_work(c, P, 0)
//   uncached step over n tokens:       forward_work(c, n, 0)
inline Work forward_work(const kvcache::ModelConfig& c, std::size_t m_tokens, std::size_t p_cached) {
  const double m = static_cast<double>(m_tokens), p = static_cast<double>(p_cached), n = m + p;
  const double d = static_cast<double>(c.d_model), kv = static_cast<double>(c.kv_dim());
  const double ff = static_cast<double>(c.d_ff), V = static_cast<double>(c.vocab_size);
  const double L = static_cast<double>(c.n_layers);
  const double mlp_matrices = c.mlp == kvcache::MlpKind::swiglu ? 3 : 2;
  constexpr double kFloat = sizeof(float);

  // Keys visible to the m rows: p + 1, p + 2, ..., p + m.
  const double causal_pairs = m * p + m * (m + 1) / 2;
  Work per_layer;
  per_layer.flops = 2 * m * d * (d + 2 * kv)   // Q, K, V
                    + 2 * 2 * d * causal_pairs  // Q·Kᵀ and S·V, all heads (n_heads × d_k = d)
                    + 2 * m * d * d             // W_O
                    + 2 * m * d * ff * mlp_matrices;
  per_layer.bytes = kFloat * (d * (d + 2 * kv + d) + mlp_matrices * ff * d  // the block's weights
                              + 2 * n * kv);                               // its cached K and V

  Work total;
  total.flops = L * per_layer.flops + 2 * d * V;  // + the LM head on one row
  total.bytes = L * per_layer.bytes + kFloat * V * d;  // the LM head (the embedding table when tied)
  if (!c.tied_lm_head) total.bytes += kFloat * m * d;  // the embedding rows gathered
  if (c.positions == kvcache::PositionEncoding::learned) total.bytes += kFloat * m * d;
  return total;
}

inline double predicted_seconds(const Work& w, const Peaks& peaks) {
  return std::max(w.flops / peaks.flops_per_second, w.bytes / peaks.bytes_per_second);
}

}  // namespace kvcache_bench
