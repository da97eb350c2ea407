// kvcache/weights.hpp — the parameters of a model: immutable once a Decoder
// holds them, shared by every session and thread.
//
//   WeightMatrix<T>     a linear layer's [out, in] matrix, row by row, as T,
//                       bfloat16, f16, q8_0 or q4_0, in memory aligned for huge pages
//   NormWeights, AttentionWeights, MlpWeights, BlockWeights, DecoderWeights
//                       the structs a model's parameters come in, and their
//                       shape checks against a ModelConfig
//   random_weights      seeded weights of any shape, for demos, tests and
//                       benchmarks
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <Eigen/Core>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "config.hpp"
#include "storage.hpp"

namespace kvcache {

// ============================================================================
// Weight memory
// ============================================================================

namespace detail {

constexpr std::size_t kHugePage = std::size_t{2} << 20;

// `bytes` of memory for weights. A decode step streams through every weight,
// and with 4 KB pages every 4 KB read is a TLB miss: a block of 2 MB or more
// starts on a 2 MB boundary and, on Linux, asks the kernel to back it with
// 2 MB pages (madvise MADV_HUGEPAGE, before any page is touched; where
// transparent huge pages are off it changes nothing). Only the whole 2 MB
// pages inside the block are asked for, so it takes no more memory than
// `bytes`. Smaller blocks are aligned to 64 bytes. Freed with the last copy
// of the pointer.
inline std::shared_ptr<void> allocate_weights(std::size_t bytes) {
  const std::size_t alignment = bytes >= kHugePage ? kHugePage : 64;
  void* p = ::operator new(bytes, std::align_val_t(alignment));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes >= kHugePage) (void)madvise(p, bytes / kHugePage * kHugePage, MADV_HUGEPAGE);
#endif
  // (Should the control block fail to allocate, shared_ptr frees p itself.)
  return std::shared_ptr<void>(p, [alignment](void* q) { ::operator delete(q, std::align_val_t(alignment)); });
}

// One block of memory for many small weight matrices side by side (each
// slice 64-byte aligned). The matrices of a model below 2 MB each (all of a
// stories15M's layers) would otherwise each sit in 4 KB pages; together they
// fill whole 2 MB pages. Matrices keep the block alive.
class WeightArena {
 public:
  static std::size_t slice_bytes(std::size_t bytes) { return (bytes + 63) / 64 * 64; }

  explicit WeightArena(std::size_t bytes) : capacity_(bytes) {
    if (bytes != 0) memory_ = allocate_weights(bytes);
  }

  // A slice of `bytes` (that keeps the whole block alive); throws
  // std::length_error past the capacity.
  std::shared_ptr<void> take(std::size_t bytes) {
    bytes = slice_bytes(bytes);
    if (bytes > capacity_ - used_)
      throw std::length_error("kvcache: WeightArena: " + std::to_string(bytes) + " more bytes do not fit in " +
                              std::to_string(capacity_ - used_));
    used_ += bytes;
    return std::shared_ptr<void>(memory_, static_cast<unsigned char*>(memory_.get()) + (used_ - bytes));
  }

  std::size_t used() const { return used_; }

 private:
  std::shared_ptr<void> memory_;
  std::size_t capacity_ = 0, used_ = 0;
};

}  // namespace detail

// ============================================================================
// WeightMatrix
// ============================================================================

// The weights of a linear layer, shape [out, in] as in PyTorch and llama2.c:
// y = W·x reads row i of W for output feature i. Stored row by row, so that a
// matrix-vector product (a decode step) streams through W once with one dot
// product per row, and so that llama2.c's files read straight into it.
//
// Built as T (WeightType::f32) from any Eigen matrix; convert_to(bf16, f16,
// q8_0, q4_0) converts it in place (see storage.hpp for each codec) and frees
// the T values. f32(), bf16(), f16(), q8_0() and q4_0() view the values as
// stored;
// reading a value (operator(), row_to, to_dense) works in every type and
// gives T.
template <typename T>
class WeightMatrix {
 public:
  using Scalar = T;
  using Dense = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Bf16 = Eigen::Matrix<std::uint16_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  WeightMatrix() = default;
  // rows × cols values of `type`, uninitialised (as Eigen's constructor).
  WeightMatrix(Eigen::Index rows, Eigen::Index cols, WeightType type = WeightType::f32) { resize(rows, cols, type); }
  // A matrix over `values` that someone else owns (an mmap'd file): rows ×
  // cols of `type`, rows × row_bytes(type, cols) bytes (q8_0, q4_0: cols a multiple
  // of 32, else std::invalid_argument), kept alive by the shared_ptr. No
  // copy. external() tells: a Decoder uses it where it is.
  WeightMatrix(Eigen::Index rows, Eigen::Index cols, WeightType type, std::shared_ptr<void> values) {
    if (rows < 0 || cols < 0 || (values == nullptr && rows * cols != 0))
      throw std::invalid_argument("kvcache: WeightMatrix(" + std::to_string(rows) + ", " + std::to_string(cols) +
                                  ", values): negative size or no values");
    check_type(type);
    row_bytes<T>(type, static_cast<std::size_t>(cols));  // throws for a q8_0 row of a partial block
    values_ = std::move(values);
    rows_ = rows;
    cols_ = cols;
    type_ = type;
    external_ = true;
  }
  // A copy of any Eigen matrix or expression, as T.
  template <typename Derived>
  WeightMatrix(const Eigen::EigenBase<Derived>& m) {  // NOLINT: implicit, like Eigen's own
    *this = m;
  }
  // A copy always gets memory of its own; a move keeps the memory.
  WeightMatrix(const WeightMatrix& other) : WeightMatrix(other.rows_, other.cols_, other.type_) {
    if (bytes() != 0) std::memcpy(values_.get(), other.values_.get(), bytes());
  }
  WeightMatrix(WeightMatrix&& other) noexcept { swap(other); }
  WeightMatrix& operator=(WeightMatrix other) noexcept {
    swap(other);
    return *this;
  }
  template <typename Derived>
  WeightMatrix& operator=(const Eigen::EigenBase<Derived>& m) {
    WeightMatrix w(m.rows(), m.cols());
    w.f32() = m.derived();
    swap(w);
    return *this;
  }

  Eigen::Index rows() const { return rows_; }
  Eigen::Index cols() const { return cols_; }
  Eigen::Index size() const { return rows_ * cols_; }
  WeightType type() const { return type_; }
  // Over memory someone else owns (the constructor above): not to be moved.
  // A bf16 one computes as llama.cpp does (detail/quant.hpp): its values
  // are a GGUF file's.
  bool external() const { return external_; }
  // Bytes the values take: rows() × row_bytes(type(), cols()).
  std::size_t bytes() const { return static_cast<std::size_t>(rows_) * row_bytes<T>(type_, static_cast<std::size_t>(cols_)); }

  // rows × cols values of `type`, uninitialised; the old values are freed.
  void resize(Eigen::Index rows, Eigen::Index cols, WeightType type = WeightType::f32) {
    if (rows < 0 || cols < 0)
      throw std::invalid_argument("kvcache: WeightMatrix::resize(" + std::to_string(rows) + ", " +
                                  std::to_string(cols) + "): negative size");
    const auto r = static_cast<std::size_t>(rows), c = static_cast<std::size_t>(cols);
    if (c != 0 && r > std::numeric_limits<std::size_t>::max() / sizeof(T) / c) throw std::bad_alloc();
    check_type(type);
    values_.reset();  // free first: the peak is the new size only
    const std::size_t row = row_bytes<T>(type, c);  // throws for a q8_0 row of a partial block
    if (r * c != 0) values_ = detail::allocate_weights(r * row);
    rows_ = rows;
    cols_ = cols;
    type_ = type;
    external_ = false;
  }

  // The values as stored; each throws std::logic_error when they are stored
  // in the other type.
  Eigen::Map<const Dense> f32() const { return {stored<T>(WeightType::f32), rows_, cols_}; }
  Eigen::Map<Dense> f32() { return {stored<T>(WeightType::f32), rows_, cols_}; }
  Eigen::Map<const Bf16> bf16() const { return {stored<std::uint16_t>(WeightType::bf16), rows_, cols_}; }
  Eigen::Map<Bf16> bf16() { return {stored<std::uint16_t>(WeightType::bf16), rows_, cols_}; }
  Eigen::Map<const Bf16> f16() const { return {stored<std::uint16_t>(WeightType::f16), rows_, cols_}; }
  Eigen::Map<Bf16> f16() { return {stored<std::uint16_t>(WeightType::f16), rows_, cols_}; }
  // q8_0: row i's cols() / 32 blocks of 34 bytes start at i · row_bytes.
  const unsigned char* q8_0() const { return stored<unsigned char>(WeightType::q8_0); }
  unsigned char* q8_0() { return stored<unsigned char>(WeightType::q8_0); }
  // q4_0: row i's cols() / 32 blocks of 18 bytes start at i · row_bytes.
  const unsigned char* q4_0() const { return stored<unsigned char>(WeightType::q4_0); }
  unsigned char* q4_0() { return stored<unsigned char>(WeightType::q4_0); }

  // W(i, j) as T (exact for bfloat16 and f16; q8_0, q4_0: d · q rounded to
  // float).
  T operator()(Eigen::Index i, Eigen::Index j) const {
    T v{};
    read(i * cols_ + j, 1, &v);
    return v;
  }
  // Row i (cols() values, as T) into out, which must hold cols() values.
  void row_to(Eigen::Index i, T* out) const { read(i * cols_, cols_, out); }
  // A copy of all values as T (allocates rows × cols).
  Dense to_dense() const {
    Dense m(rows_, cols_);
    read(0, size(), m.data());
    return m;
  }

  // Converts to `type` in place and frees the old values. To bfloat16 and
  // f16: round to nearest even. To q8_0 and q4_0: ggml's quantizers, a block
  // of 32 values at a time (throws std::invalid_argument, changing nothing,
  // when cols() is not a multiple of 32). To T: as read. From one compact type to
  // another: through T. The peak memory is two copies of this one matrix.
  void convert_to(WeightType type) {
    check_type(type);
    if (type == type_) return;
    if (const std::size_t block = storage_info(type).block; static_cast<std::size_t>(cols_) % block != 0)
      throw std::invalid_argument(std::string("kvcache: WeightMatrix::convert_to(") + to_string(type) + "): rows of " +
                                  std::to_string(cols_) + " values; " + to_string(type) + " needs a multiple of " +
                                  std::to_string(block));
    if (type_ != WeightType::f32 && type != WeightType::f32) {
      WeightMatrix t(rows_, cols_);
      read(0, size(), t.f32().data());
      t.convert_to(type);
      return swap(t);
    }
    WeightMatrix w(rows_, cols_, type);
    const T* v = static_cast<const T*>(values_.get());
    if (type == WeightType::f32) {
      read(0, size(), static_cast<T*>(w.values_.get()));
    } else if (type == WeightType::bf16) {
      std::transform(v, v + size(), static_cast<std::uint16_t*>(w.values_.get()), detail::to_bf16<T>);
    } else if (type == WeightType::f16) {
      std::transform(v, v + size(), static_cast<std::uint16_t*>(w.values_.get()), detail::to_f16<T>);
    } else {  // q8_0 or q4_0, a row at a time
      const std::size_t row = row_bytes<T>(type, static_cast<std::size_t>(cols_));
      auto* out = static_cast<unsigned char*>(w.values_.get());
      for (Eigen::Index i = 0; i < rows_; ++i, out += row) {
        if (type == WeightType::q8_0)
          detail::quantize_q8_0(v + i * cols_, static_cast<std::size_t>(cols_), out);
        else
          detail::quantize_q4_0(v + i * cols_, static_cast<std::size_t>(cols_), out);
      }
    }
    swap(w);
  }

  // Moves the values into a slice of `arena` (which must have room for
  // bytes() more, rounded up to 64), freeing the memory they had.
  void move_into(detail::WeightArena& arena) {
    std::shared_ptr<void> slice = arena.take(bytes());
    if (bytes() != 0) std::memcpy(slice.get(), values_.get(), bytes());
    values_ = std::move(slice);
    external_ = false;
  }

  void swap(WeightMatrix& other) noexcept {
    values_.swap(other.values_);
    std::swap(rows_, other.rows_);
    std::swap(cols_, other.cols_);
    std::swap(type_, other.type_);
    std::swap(external_, other.external_);
  }

  // Same shape, type and stored values (T compared as numbers, the compact
  // types byte for byte).
  friend bool operator==(const WeightMatrix& a, const WeightMatrix& b) {
    if (a.type_ != b.type_ || a.rows_ != b.rows_ || a.cols_ != b.cols_) return false;
    if (a.type_ == WeightType::f32) return a.f32() == b.f32();
    return a.bytes() == 0 || std::memcmp(a.values_.get(), b.values_.get(), a.bytes()) == 0;
  }
  friend bool operator!=(const WeightMatrix& a, const WeightMatrix& b) { return !(a == b); }

 private:
  // The types a WeightMatrix stores: every one but int8 (a cache's type).
  static void check_type(WeightType type) {
    storage_info(type, "WeightType");
    if (type == WeightType::int8)
      throw std::invalid_argument(std::string("kvcache: WeightMatrix stores f32, bf16, f16, q8_0 or q4_0 values, not ") +
                                  to_string(type));
  }

  // The values, as S, when they are stored as `type`.
  template <typename S>
  S* stored(WeightType type) const {
    if (type != type_)
      throw std::logic_error(std::string("kvcache: WeightMatrix holds ") + to_string(type_) + " values, not " +
                             to_string(type));
    return static_cast<S*>(values_.get());
  }

  // Values [first, first + n) in row-major order, as T, into out.
  void read(Eigen::Index first, Eigen::Index n, T* out) const {
    const auto halves = [&] { return static_cast<const std::uint16_t*>(values_.get()) + first; };
    if (type_ == WeightType::f32) {
      std::copy_n(static_cast<const T*>(values_.get()) + first, n, out);
    } else if (type_ == WeightType::bf16) {
      std::transform(halves(), halves() + n, out, detail::from_bf16);
    } else if (type_ == WeightType::f16) {
      std::transform(halves(), halves() + n, out, detail::from_f16);
    } else {  // q8_0 or q4_0, a row at a time
      const std::size_t row = row_bytes<T>(type_, static_cast<std::size_t>(cols_));
      const auto* values = static_cast<const unsigned char*>(values_.get());
      for (Eigen::Index e = first; e < first + n;) {
        const Eigen::Index i = e / cols_, j = e % cols_, count = std::min(first + n - e, cols_ - j);
        const unsigned char* r = values + static_cast<std::size_t>(i) * row;
        if (type_ == WeightType::q8_0)
          detail::dequantize_q8_0(r, static_cast<std::size_t>(j), static_cast<std::size_t>(count), out);
        else
          detail::dequantize_q4_0(r, static_cast<std::size_t>(j), static_cast<std::size_t>(count), out);
        e += count;
        out += count;
      }
    }
  }

  // rows × cols values of type_ (T or bfloat16 bit patterns): memory of its
  // own (allocate_weights), or a slice of a WeightArena.
  std::shared_ptr<void> values_;
  Eigen::Index rows_ = 0, cols_ = 0;
  WeightType type_ = WeightType::f32;
  bool external_ = false;
};

namespace detail {

inline std::string shape(Eigen::Index rows, Eigen::Index cols) {
  return std::to_string(rows) + " x " + std::to_string(cols);
}

// Throws std::invalid_argument (fail_config) unless w is rows × cols, or,
// when `why_none` is given, unless w is empty ("<name> given but <why_none>").
template <typename W>
void check_weight(const std::string& name, const W& w, Eigen::Index rows, Eigen::Index cols,
                  const std::string& why_none = "") {
  if (!why_none.empty() && w.size() != 0) fail_config(name, " given but ", why_none);
  if (why_none.empty() && (w.rows() != rows || w.cols() != cols))
    fail_config(name, " is ", shape(w.rows(), w.cols()), ", expected ", shape(rows, cols));
}

// ... unless v has `size` entries, or none when it is `optional` (a bias).
template <typename T>
void check_vector(const std::string& name, const Vector<T>& v, std::size_t size, bool optional = true) {
  if (static_cast<std::size_t>(v.size()) != size && !(optional && v.size() == 0))
    fail_config(name, " has ", v.size(), " entries, expected ", size, optional ? " (or none)" : "");
}

// ---- For random_weights (at the end of this file) ----

// SplitMix64: a tiny, portable generator, so that "seed 42" means the same
// weights on every platform and standard library.
class SplitMix64 {
 public:
  explicit SplitMix64(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform in [-1, 1).
  double symmetric() { return static_cast<double>(next() >> 11) * 0x1.0p-52 - 1.0; }

 private:
  std::uint64_t state_;
};

template <typename T>
Matrix<T> random_matrix(SplitMix64& rng, std::size_t rows, std::size_t cols, double stddev) {
  // A uniform in [-a, a] has standard deviation a / √3.
  const double a = stddev * std::sqrt(3.0);
  Matrix<T> M(static_cast<Eigen::Index>(rows), static_cast<Eigen::Index>(cols));
  for (Eigen::Index i = 0; i < M.size(); ++i) M.data()[i] = static_cast<T>(a * rng.symmetric());
  return M;
}

}  // namespace detail

// ============================================================================
// The parameters of a model
// ============================================================================

// gamma (and for LayerNorm an optional beta), d_model entries each.
template <typename T = float>
struct NormWeights {
  Vector<T> gamma;
  Vector<T> beta;  // empty: no shift (always empty for RMSNorm)
};

// The parameters of one attention layer, each of shape [out, in]:
//   W_Q: d_model × d_model     W_K, W_V: kv_dim × d_model     W_O: d_model × d_model
// with kv_dim = n_kv_heads · d_k. A bias left empty is no bias.
template <typename T = float>
struct AttentionWeights {
  WeightMatrix<T> W_Q, W_K, W_V, W_O;
  Vector<T> b_Q, b_K, b_V, b_O;
};

// GELU:   out = W_2 · gelu(W_1 x + b_1) + b_2
// SwiGLU: out = W_2 · (silu(W_1 x) ⊙ W_3 x)
// W_1, W_3: d_ff × d_model; W_2: d_model × d_ff. Empty biases are none.
template <typename T = float>
struct MlpWeights {
  WeightMatrix<T> W_1, W_2, W_3;
  Vector<T> b_1, b_2;
};

// One pre-norm block: x += attention(norm(x)); x += mlp(norm(x)).
template <typename T = float>
struct BlockWeights {
  NormWeights<T> attention_norm;
  AttentionWeights<T> attention;
  NormWeights<T> mlp_norm;
  MlpWeights<T> mlp;
};

template <typename T = float>
struct DecoderWeights {
  WeightMatrix<T> token_embedding;  // vocab_size × d_model (also the LM head when tied)
  Matrix<T> position_embedding;     // max_seq_len × d_model (learned positions only)
  std::vector<BlockWeights<T>> blocks;
  NormWeights<T> final_norm;
  WeightMatrix<T> lm_head;  // vocab_size × d_model; empty when tied to token_embedding
};

// ---- Shape checks: std::invalid_argument naming the field and the values ----

template <typename T>
void check_weights(const AttentionConfig& c, const AttentionWeights<T>& w, const std::string& at = "") {
  const std::size_t d = c.d_model, kv = c.kv_dim();
  // (name, W, b, outputs); every input is d_model wide.
  const std::tuple<const char*, const WeightMatrix<T>&, const Vector<T>&, std::size_t> projections[] = {
      {"Q", w.W_Q, w.b_Q, d}, {"K", w.W_K, w.b_K, kv}, {"V", w.W_V, w.b_V, kv}, {"O", w.W_O, w.b_O, d}};
  for (const auto& [x, W, b, out] : projections) {
    detail::check_weight(at + "W_" + x, W, out, d);
    detail::check_vector(at + "b_" + x, b, out);
  }
}

// Every size and shape of a whole model, in the order a reader meets them.
template <typename T>
void check_weights(const ModelConfig& c, const DecoderWeights<T>& w) {
  c.validate();
  const std::size_t d = c.d_model, V = c.vocab_size, ff = c.d_ff;
  const auto check_norm = [&](const std::string& name, const NormWeights<T>& n) {
    detail::check_vector(name + ".gamma", n.gamma, d, false);
    if (c.norm == NormKind::rms_norm) detail::check_weight(name + ".beta", n.beta, 0, 0, "RMSNorm has no shift");
    detail::check_vector(name + ".beta", n.beta, d);
  };
  const bool learned = c.positions == PositionEncoding::learned;
  detail::check_weight("token_embedding", w.token_embedding, V, d);
  detail::check_weight("position_embedding", w.position_embedding, c.max_seq_len, d,
                       learned ? "" : std::string("positions = ") + to_string(c.positions));
  if (w.blocks.size() != c.n_layers)
    detail::fail_config("weights have ", w.blocks.size(), " blocks but n_layers = ", c.n_layers);
  check_norm("final_norm", w.final_norm);
  detail::check_weight("lm_head", w.lm_head, V, d, c.tied_lm_head ? "tied_lm_head = true" : "");
  for (std::size_t l = 0; l < c.n_layers; ++l) {
    const BlockWeights<T>& b = w.blocks[l];
    const std::string at = "blocks[" + std::to_string(l) + "].";
    check_norm(at + "attention_norm", b.attention_norm);
    check_norm(at + "mlp_norm", b.mlp_norm);
    detail::check_weight(at + "mlp.W_1", b.mlp.W_1, ff, d);
    detail::check_weight(at + "mlp.W_2", b.mlp.W_2, d, ff);
    detail::check_weight(at + "mlp.W_3", b.mlp.W_3, ff, d, c.mlp == MlpKind::swiglu ? "" : "the MLP is GELU");
    detail::check_vector(at + "mlp.b_1", b.mlp.b_1, ff);
    detail::check_vector(at + "mlp.b_2", b.mlp.b_2, d);
    check_weights(c.attention(), b.attention, at + "attention.");
  }
}

// ============================================================================
// Random weights
// ============================================================================

// Seeded random weights of the configured shape: linear layers with standard
// deviation 1/√fan_in (activations keep their scale through the depth),
// embeddings with 1 (so logits are decisive and greedy picks are stable),
// norms at identity.
template <typename T = float>
DecoderWeights<T> random_weights(const ModelConfig& c, std::uint64_t seed) {
  c.validate();
  detail::SplitMix64 rng(seed);
  const std::size_t d = c.d_model, kv = c.kv_dim(), ff = c.d_ff;
  // A linear layer's [out, in] matrix, with standard deviation 1/√in.
  const auto linear = [&](std::size_t out, std::size_t in) {
    return detail::random_matrix<T>(rng, out, in, 1.0 / std::sqrt(static_cast<double>(in)));
  };
  const auto di = static_cast<Eigen::Index>(d);
  const NormWeights<T> norm{Vector<T>::Ones(di), c.norm == NormKind::layer_norm ? Vector<T>::Zero(di) : Vector<T>()};
  DecoderWeights<T> w;
  w.token_embedding = detail::random_matrix<T>(rng, c.vocab_size, d, 1.0);
  if (c.positions == PositionEncoding::learned)
    w.position_embedding = detail::random_matrix<T>(rng, c.max_seq_len, d, 1.0);
  for (std::size_t l = 0; l < c.n_layers; ++l) {
    BlockWeights<T> b;
    b.attention_norm = b.mlp_norm = norm;
    b.attention.W_Q = linear(d, d);
    b.attention.W_K = linear(kv, d);
    b.attention.W_V = linear(kv, d);
    b.attention.W_O = linear(d, d);
    b.mlp.W_1 = linear(ff, d);
    b.mlp.W_2 = linear(d, ff);
    if (c.mlp == MlpKind::swiglu) b.mlp.W_3 = linear(ff, d);
    w.blocks.push_back(std::move(b));
  }
  w.final_norm = norm;
  if (!c.tied_lm_head) w.lm_head = linear(c.vocab_size, d);
  return w;
}

}  // namespace kvcache
