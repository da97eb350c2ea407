// kvcache/llama2c.hpp — reading and writing llama2.c checkpoints (the legacy
// "version 0" format written by llama2.c's export and read by its `run`).
//
// The format, all little-endian:
//
//   header: seven int32
//     dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
//     vocab_size > 0: the classifier is the token embedding (tied LM head);
//     vocab_size < 0: the classifier is stored separately, at the end.
//   then float32 arrays, each matrix row-major [out, in], with
//   head_size = dim / n_heads and kv_dim = n_kv_heads · head_size:
//     token_embedding  [vocab, dim]
//     rms_att_weight   [layers, dim]
//     wq               [layers, dim, dim]
//     wk               [layers, kv_dim, dim]
//     wv               [layers, kv_dim, dim]
//     wo               [layers, dim, dim]
//     rms_ffn_weight   [layers, dim]
//     w1               [layers, hidden, dim]
//     w2               [layers, dim, hidden]
//     w3               [layers, hidden, dim]
//     rms_final_weight [dim]
//     freq_cis_real    [seq_len, head_size / 2]   legacy RoPE tables: kvcache
//     freq_cis_imag    [seq_len, head_size / 2]   computes RoPE, skips these
//     wcls             [vocab, dim]               only when vocab_size < 0
//
// The model is a Llama block: RMSNorm (eps 1e-5), RoPE (base 10000) on
// consecutive pairs, SwiGLU MLP out = w2·(silu(w1·h) ⊙ w3·h), no biases.
// Decoder's weights have the same [out, in] shapes, stored row by row too,
// so every array is read straight into its memory.
//
// The file's floats are read as they are, which is right on a little-endian
// host only; on a big-endian host both functions throw std::runtime_error.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <fstream>
#include <istream>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "config.hpp"
#include "decoder.hpp"
#include "detail/io.hpp"
#include "limits.hpp"
#include "weights.hpp"

namespace kvcache {

// ============================================================================
// Shapes
// ============================================================================

// The ModelConfig of a llama2.c model with these header values: RoPE (base
// 10000), RMSNorm (eps 1e-5), SwiGLU, and a tied LM head unless told
// otherwise. Throws std::invalid_argument when the shape is impossible.
inline ModelConfig llama2c_config(std::size_t dim, std::size_t hidden_dim, std::size_t n_layers, std::size_t n_heads,
                                  std::size_t n_kv_heads, std::size_t vocab_size, std::size_t seq_len,
                                  bool tied_lm_head = true) {
  ModelConfig c;
  c.vocab_size = vocab_size;
  c.d_model = dim;
  c.n_layers = n_layers;
  c.n_heads = n_heads;
  c.n_kv_heads = n_kv_heads;
  c.d_ff = hidden_dim;
  c.max_seq_len = seq_len;
  c.positions = PositionEncoding::rope;
  c.rope_base = 10000.0;
  c.norm = NormKind::rms_norm;
  c.norm_eps = 1e-5;
  c.mlp = MlpKind::swiglu;
  c.tied_lm_head = tied_lm_head;
  c.validate();
  return c;
}

// The TinyStories models published with llama2.c (Llama 2 tokenizer).
inline ModelConfig llama2c_stories15M_config() { return llama2c_config(288, 768, 6, 6, 6, 32000, 256); }
inline ModelConfig llama2c_stories42M_config() { return llama2c_config(512, 1376, 8, 8, 8, 32000, 1024); }
inline ModelConfig llama2c_stories110M_config() { return llama2c_config(768, 2048, 12, 12, 12, 32000, 1024); }

// ============================================================================
// Header
// ============================================================================

// A validated header and the sizes that follow from it.
struct Llama2cHeader {
  static constexpr std::uint64_t kBytes = 7 * 4;

  std::size_t dim = 0, hidden_dim = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, vocab_size = 0, seq_len = 0;
  bool shared_classifier = true;   // vocab_size was positive in the file
  std::uint64_t n_parameters = 0;  // floats of weights, RoPE tables excluded
  std::uint64_t file_bytes = 0;    // the exact length the file must have

  std::size_t head_size() const { return dim / n_heads; }
  std::size_t kv_dim() const { return n_kv_heads * head_size(); }
  ModelConfig config() const {
    return llama2c_config(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len, shared_classifier);
  }
};

namespace detail {

// The arrays stored per layer, in file order, each [layers, rows, cols] (a
// vector: cols 0): f(name, rows, cols, of), where of(block) is the array in
// a block. Loading, saving and the count of parameters walk this table.
template <typename F>
void for_each_layer_array(std::size_t d, std::size_t kv, std::size_t ff, F&& f) {
  f("rms_att_weight", d, 0, [](auto& b) -> auto& { return b.attention_norm.gamma; });
  f("wq", d, d, [](auto& b) -> auto& { return b.attention.W_Q; });
  f("wk", kv, d, [](auto& b) -> auto& { return b.attention.W_K; });
  f("wv", kv, d, [](auto& b) -> auto& { return b.attention.W_V; });
  f("wo", d, d, [](auto& b) -> auto& { return b.attention.W_O; });
  f("rms_ffn_weight", d, 0, [](auto& b) -> auto& { return b.mlp_norm.gamma; });
  f("w1", ff, d, [](auto& b) -> auto& { return b.mlp.W_1; });
  f("w2", d, ff, [](auto& b) -> auto& { return b.mlp.W_2; });
  f("w3", ff, d, [](auto& b) -> auto& { return b.mlp.W_3; });
}

// Checks the seven header ints and computes the sizes they imply. Every size
// check happens here, before anything is allocated.
inline Llama2cHeader parse_llama2c_header(const std::string& path, const unsigned char* bytes,
                                          std::uint64_t actual_bytes, const LoadLimits& limits) {
  using io::sat_add;
  using io::sat_mul;
  Llama2cHeader h;
  const std::pair<const char*, std::size_t*> fields[7] = {
      {"dim", &h.dim}, {"hidden_dim", &h.hidden_dim}, {"n_layers", &h.n_layers}, {"n_heads", &h.n_heads},
      {"n_kv_heads", &h.n_kv_heads}, {"vocab_size", &h.vocab_size}, {"seq_len", &h.seq_len}};
  // Every size must be positive: a zero or negative one is a corrupt or
  // foreign file (vocab_size's sign carries the tied/untied flag, so its
  // magnitude must be positive; int64 keeps -INT32_MIN representable).
  for (int i = 0; i < 7; ++i) {
    const std::int64_t v = io::get_le<std::int32_t>(bytes + 4 * i);
    const std::int64_t magnitude = i == 5 && v < 0 ? -v : v;
    if (magnitude <= 0)
      io::fail(path, "header field ", fields[i].first, " = ", v, i == 5 ? ", its magnitude" : ",", " must be > 0");
    *fields[i].second = static_cast<std::size_t>(magnitude);
    if (i == 5) h.shared_classifier = v > 0;
  }

  // The head structure: heads split dim evenly, query heads split evenly
  // over kv heads, and RoPE rotates pairs, so a head has an even size.
  if (h.dim % h.n_heads != 0) io::fail(path, "dim is not a multiple of n_heads (", h.dim, " vs ", h.n_heads, ")");
  if (h.n_heads % h.n_kv_heads != 0)
    io::fail(path, "n_heads is not a multiple of n_kv_heads (", h.n_heads, " vs ", h.n_kv_heads, ")");
  if (h.head_size() % 2 != 0)
    io::fail(path, "head size dim / n_heads = ", h.head_size(), " is odd, RoPE needs it even");

  // Sizes in 64-bit saturating arithmetic: each header int is < 2^31, so a
  // product of three can pass 2^64; saturation makes it fail the limit.
  // Per layer: the arrays of the table above.
  const std::uint64_t d = h.dim, L = h.n_layers, V = h.vocab_size, kv = h.kv_dim();
  std::uint64_t per_layer = 0;
  for_each_layer_array(h.dim, h.kv_dim(), h.hidden_dim, [&](const char*, std::uint64_t rows, std::uint64_t cols, auto) {
    per_layer = sat_add(per_layer, sat_mul(rows, std::max<std::uint64_t>(cols, 1)));
  });
  std::uint64_t params = sat_add(sat_mul(V, d), sat_mul(L, per_layer));  // token embedding, layers
  params = sat_add(params, d);                                           // final RMSNorm
  if (!h.shared_classifier) params = sat_add(params, sat_mul(V, d));     // wcls
  if (params > limits.max_parameters)
    io::fail(path, "the header claims too many parameters for LoadLimits::max_parameters (", io::count_string(params),
             " vs ", limits.max_parameters, ")");
  h.n_parameters = params;

  // Keys and values at every position: 2 (K and V) · 4 bytes · layers · kv_dim · seq_len.
  const std::uint64_t kv_cache_bytes = sat_mul(sat_mul(8, L), sat_mul(kv, h.seq_len));
  if (kv_cache_bytes > limits.max_kv_cache_bytes)
    io::fail(path, "a session at seq_len = ", h.seq_len,
             " positions would cache more keys and values than LoadLimits::max_kv_cache_bytes (",
             io::count_string(kv_cache_bytes), " vs ", limits.max_kv_cache_bytes, " bytes)");

  // Two RoPE tables of seq_len × head_size/2 floats: seq_len × head_size.
  const std::uint64_t rope_floats = sat_mul(h.seq_len, h.head_size());
  const std::uint64_t expected = sat_add(Llama2cHeader::kBytes, sat_mul(4, sat_add(params, rope_floats)));
  if (expected > static_cast<std::uint64_t>(std::numeric_limits<std::ptrdiff_t>::max()))
    io::fail(path, "the header implies a file of ", io::count_string(expected),
             " bytes, more than this platform can address (seq_len = ", h.seq_len, ")");
  io::require_length(path, actual_bytes, expected);
  h.file_bytes = expected;
  return h;
}

// The weights after a validated header, `in` positioned at the first float;
// each array is allocated as it is read.
inline Decoder<float> read_llama2c_weights(std::istream& in, const std::string& name, const Llama2cHeader& h,
                                           bool finite, WeightType weights) {
  // Reads `count` floats of `tensor` into dst; `first` is the index of dst[0]
  // in the tensor, for the message about a non-finite value.
  const auto read_floats = [&](float* dst, std::size_t count, const std::string& tensor, std::size_t first) {
    if (!in.read(reinterpret_cast<char*>(dst), static_cast<std::streamsize>(count * sizeof(float))))
      io::fail(name, "read error in ", tensor, " (file changed or truncated while reading)");
    for (std::size_t i = 0; finite && i < count; ++i)
      if (!std::isfinite(dst[i]))
        io::fail(name, "tensor ", tensor, " holds a non-finite value (", dst[i], ") at element ", first + i);
  };
  // Allocates an array of the given shape (a vector: cols 0) and reads it.
  // The file stores matrices row by row, as WeightMatrix does: straight into
  // its memory, or, for a bfloat16 matrix, through a buffer of 64K floats
  // rounded into place (so the float32 values never all exist at once).
  const auto read = [&](auto& W, std::size_t rows, std::size_t cols, const std::string& tensor) {
    if constexpr (std::is_same<std::decay_t<decltype(W)>, Vector<float>>::value) {
      W.resize(static_cast<Eigen::Index>(rows));
      return read_floats(W.data(), rows, tensor, 0);
    } else {
      W.resize(static_cast<Eigen::Index>(rows), static_cast<Eigen::Index>(cols), weights);
      const auto count = static_cast<std::size_t>(W.size());
      if (weights == WeightType::f32) return read_floats(W.f32().data(), count, tensor, 0);
      std::uint16_t* dst = W.bf16().data();
      std::vector<float> buffer(std::min<std::size_t>(count, std::size_t{1} << 16));
      for (std::size_t first = 0; first < count; first += buffer.size()) {
        const std::size_t n = std::min(buffer.size(), count - first);
        read_floats(buffer.data(), n, tensor, first);
        for (std::size_t i = 0; i < n; ++i) dst[first + i] = float_to_bf16(buffer[i]);
      }
    }
  };
  DecoderWeights<float> w;
  w.blocks.resize(h.n_layers);
  read(w.token_embedding, h.vocab_size, h.dim, "token_embedding");
  for_each_layer_array(h.dim, h.kv_dim(), h.hidden_dim, [&](const char* array, std::size_t rows, std::size_t cols,
                                                            auto of) {
    for (std::size_t l = 0; l < h.n_layers; ++l) read(of(w.blocks[l]), rows, cols, io::text(array, "[layer ", l, "]"));
  });
  read(w.final_norm.gamma, h.dim, 0, "rms_final_weight");
  // The legacy RoPE tables: kvcache computes the rotation instead.
  in.seekg(static_cast<std::streamoff>(h.seq_len * h.head_size() * sizeof(float)), std::ios::cur);
  if (!in) io::fail(name, "cannot skip the RoPE tables");
  if (!h.shared_classifier) read(w.lm_head, h.vocab_size, h.dim, "wcls");
  return Decoder<float>(h.config(), std::move(w), weights);
}

// Saving: the header of `decoder`'s checkpoint. Throws std::invalid_argument, naming
// the field, for what the format cannot say.
inline void llama2c_header_of(const Decoder<float>& decoder, unsigned char* header) {
  const ModelConfig& c = decoder.config();
  const char* const at = "save_llama2c: ";
  if (c.positions != PositionEncoding::rope)
    io::invalid(at, "positions = ", to_string(c.positions), ", the format needs rope");
  if (c.rope_base != 10000.0) io::invalid(at, "rope_base = ", c.rope_base, ", the format needs 10000");
  if (c.norm != NormKind::rms_norm) io::invalid(at, "norm = layer_norm, the format needs rms_norm");
  if (c.norm_eps != 1e-5) io::invalid(at, "norm_eps = ", c.norm_eps, ", the format needs 1e-5");
  if (c.mlp != MlpKind::swiglu) io::invalid(at, "mlp = gelu, the format needs swiglu");
  // The seven header fields, in file order.
  const std::pair<const char*, std::size_t> fields[7] = {
      {"d_model", c.d_model},       {"d_ff", c.d_ff},             {"n_layers", c.n_layers},
      {"n_heads", c.n_heads},       {"n_kv_heads", c.kv_heads()}, {"vocab_size", c.vocab_size},
      {"max_seq_len", c.max_seq_len}};
  for (int i = 0; i < 7; ++i) {
    if (fields[i].second > static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()))
      io::invalid(at, fields[i].first, " = ", fields[i].second, " does not fit the format's int32 header");
    const auto value = static_cast<std::int32_t>(fields[i].second);
    io::put_le<std::int32_t>(i == 5 && !c.tied_lm_head ? -value : value, header + 4 * i);
  }
  for (std::size_t l = 0; l < c.n_layers; ++l) {
    const auto& b = decoder.block(l);
    const std::pair<const char*, Eigen::Index> biases[] = {
        {"attention.b_Q", b.attention.b_Q.size()}, {"attention.b_K", b.attention.b_K.size()},
        {"attention.b_V", b.attention.b_V.size()}, {"attention.b_O", b.attention.b_O.size()},
        {"mlp.b_1", b.mlp.b_1.size()},             {"mlp.b_2", b.mlp.b_2.size()}};
    for (const auto& bias : biases)
      if (bias.second != 0) io::invalid(at, "blocks[", l, "].", bias.first, " is a bias; the llama2.c format has none");
  }
}

// Row by row, as both the format and WeightMatrix store matrices; a bfloat16
// matrix is written as the floats it holds (exact), a row at a time.
inline void put_tensor(io::FileSink& out, const WeightMatrix<float>& W) {
  if (W.type() == WeightType::f32) return out.put(W.f32().data(), static_cast<std::size_t>(W.size()) * sizeof(float));
  std::vector<float> row(static_cast<std::size_t>(W.cols()));
  for (Eigen::Index i = 0; i < W.rows(); ++i) {
    W.row_to(i, row.data());
    out.put(row.data(), row.size() * sizeof(float));
  }
}
inline void put_tensor(io::FileSink& out, const Vector<float>& v) {
  out.put(v.data(), static_cast<std::size_t>(v.size()) * sizeof(float));
}

}  // namespace detail

// Reads and validates the header of a checkpoint held by a seekable stream
// (a file, a std::istringstream over bytes in memory), and checks the length
// from its current position to its end against it, without reading or
// allocating the weights; `name` stands for the path in messages. The
// stream is left after the header. Throws std::runtime_error
// "kvcache: <name>: <problem>".
inline Llama2cHeader read_llama2c_header(std::istream& in, const std::string& name, const LoadLimits& limits = {}) {
  // A stream that cannot seek (a pipe) has no length to check the header against.
  const std::uint64_t size = detail::io::file_length(in, name);
  if (size < Llama2cHeader::kBytes)
    detail::io::fail(name, "file is too short for the 28-byte header (", size, " vs 28 bytes)");
  unsigned char bytes[Llama2cHeader::kBytes];
  if (!in.read(reinterpret_cast<char*>(bytes), sizeof bytes)) detail::io::fail(name, "cannot read the header");
  return detail::parse_llama2c_header(name, bytes, size, limits);
}

// The same for the checkpoint at `path`.
inline Llama2cHeader read_llama2c_header(const std::string& path, const LoadLimits& limits = {}) {
  std::ifstream in = detail::io::open_for_reading(path, path);
  return read_llama2c_header(in, path, limits);
}

// ============================================================================
// Loading
// ============================================================================

// Reads a llama2.c checkpoint from a seekable stream, from its current
// position to its end, which must be exactly the checkpoint (see
// load_llama2c(path) below for the checks); `name` stands for the path in
// messages. Throws std::runtime_error "kvcache: <name>: <problem>".
inline Decoder<float> load_llama2c(std::istream& in, const std::string& name, const LoadLimits& limits = {},
                                   WeightType weights = WeightType::f32) {
  detail::io::require_little_endian(name, "llama2.c checkpoints");
  const Llama2cHeader h = read_llama2c_header(in, name, limits);
  // Every allocation is bounded by the file's length; one can still fail.
  try {
    return detail::read_llama2c_weights(in, name, h, limits.check_finite, weights);
  } catch (const std::bad_alloc&) {
    detail::io::fail(name, "out of memory loading ", h.n_parameters, " parameters (",
                     detail::io::count_string(detail::io::sat_mul(4, h.n_parameters)), " bytes)");
  }
}

// Reads a llama2.c checkpoint into a Decoder<float> (see the top of this file
// for the format). Everything about the file is checked before the weights
// are allocated: it exists and is readable, the header is sane, the sizes fit
// in LoadLimits (the weights, and the KV cache at seq_len positions), and
// the file is exactly as long as the header implies.
// With weights = WeightType::bf16 the weight matrices are rounded to
// bfloat16 as they are read (to nearest even), so memory holds half their
// float32 bytes and never all of them as float32.
// Throws std::runtime_error "kvcache: <path>: <problem>" on any failure.
inline Decoder<float> load_llama2c(const std::string& path, const LoadLimits& limits = {},
                                   WeightType weights = WeightType::f32) {
  std::ifstream in = detail::io::open_for_reading(path, path);
  return load_llama2c(in, path, limits, weights);
}

// ============================================================================
// Saving
// ============================================================================

// Writes `decoder` as a legacy (version 0) llama2.c checkpoint: vocab_size is
// written negative when the LM head is not tied, and the two RoPE tables are
// filled with cos and sin of pos · 10000^(-2i / head_size), as llama2.c's
// export writes them (nothing reads them; they keep the file valid for tools
// that expect them).
//
// The file is written with detail/io.hpp's atomic write: `path` then holds
// this whole checkpoint, or what it held before, and never a mix of two
// concurrent writers; no temporary file is left. An existing `path` is
// replaced only when it is itself a llama2.c checkpoint (a sane header and
// the length it implies); anything else (another file, a symbolic link, a
// directory, a device) is refused and left untouched.
//
// Throws std::invalid_argument (naming the field) for a decoder the format
// cannot express: positions other than rope, rope_base != 10000, LayerNorm,
// norm_eps != 1e-5, GELU, biases, sizes past int32. Throws std::runtime_error
// naming `path` when it may not be replaced and on any I/O failure.
inline void save_llama2c(const Decoder<float>& decoder, const std::string& path) {
  unsigned char header[Llama2cHeader::kBytes];
  detail::llama2c_header_of(decoder, header);
  detail::io::require_little_endian(path, "llama2.c checkpoints");
  const ModelConfig& c = decoder.config();

  // RoPE tables, [seq_len, head_size / 2] each: cos, then sin.
  const std::size_t half = c.d_k() / 2, n = c.max_seq_len * half;
  std::vector<float> rope(2 * n);
  for (std::size_t pos = 0; pos < c.max_seq_len; ++pos)
    for (std::size_t i = 0; i < half; ++i) {
      const double angle =
          static_cast<double>(pos) * std::pow(10000.0, -static_cast<double>(2 * i) / static_cast<double>(c.d_k()));
      rope[pos * half + i] = static_cast<float>(std::cos(angle));
      rope[n + pos * half + i] = static_cast<float>(std::sin(angle));
    }

  const auto write = [&](detail::io::FileSink& out) {
    out.put(header, sizeof header);
    detail::put_tensor(out, decoder.token_embedding());
    detail::for_each_layer_array(c.d_model, c.kv_dim(), c.d_ff, [&](const char*, std::size_t, std::size_t, auto of) {
      for (std::size_t l = 0; l < c.n_layers; ++l) detail::put_tensor(out, of(decoder.block(l)));
    });
    detail::put_tensor(out, decoder.final_norm().gamma);
    out.put(rope.data(), rope.size() * sizeof(float));
    if (!c.tied_lm_head) detail::put_tensor(out, decoder.lm_head());
  };
  // `path` may be replaced only when absent or a llama2.c checkpoint (a sane
  // header and exactly the length it implies, whatever its size), so that
  // save_llama2c never writes over a file it could not have written.
  const auto is_checkpoint = [&](const detail::io::FilePrefix& p) {
    if (p.bytes.size() < Llama2cHeader::kBytes) return false;
    LoadLimits any;
    any.max_parameters = any.max_kv_cache_bytes = std::numeric_limits<std::uint64_t>::max();
    try {
      detail::parse_llama2c_header(path, reinterpret_cast<const unsigned char*>(p.bytes.data()), p.size, any);
      return true;
    } catch (const std::exception&) {
      return false;
    }
  };
  detail::io::write_atomically(path, path, write, [&] {
    detail::io::require_replaceable(path, path, "llama2.c checkpoint", Llama2cHeader::kBytes, is_checkpoint);
  });
}

}  // namespace kvcache
