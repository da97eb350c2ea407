// kvcache/session_file.hpp — a Session saved to a file and loaded back, so
// that a prompt is prefilled once and reused by later runs (a prompt cache).
//
// The format, version 1. Integers are little-endian; the header is 27 fields
// of 8 bytes (unsigned, or IEEE-754 double bits where marked).
//
//   field  offset  content
//   ------------------------------------------------------------------------
//    0        0    magic, the 8 bytes "KVCSESS\0"
//    1        8    version = 1
//    2       16    scalar_bytes: sizeof(T) of the Decoder<T> that saved it
//    3       24    vocab_size                        ┐
//    4       32    d_model                           │
//    5       40    n_layers                          │ the model's shape:
//    6       48    n_heads                           │ each must equal the
//    7       56    n_kv_heads (resolved: never 0)    │ loading Decoder's
//    8       64    d_ff                              │ ModelConfig field
//    9       72    max_seq_len                       │
//   10       80    positions: 0 none, 1 learned, 2 rope
//   11       88    rope_base (double)                │
//   12       96    norm: 0 layer_norm, 1 rms_norm    │
//   13      104    norm_eps (double)                 │
//   14      112    mlp: 0 gelu, 1 swiglu             │
//   15      120    tied_lm_head: 0 or 1              ┘
//   16      128    weights_fingerprint(decoder): tells another checkpoint of
//                  the same shape apart
//   17      136    kv_type: 0 full (T), 1 bf16, 2 int8
//   18      144    window (0: no sliding window)
//   19      152    sinks
//   20      160    max_tokens of the session (the window, with one)
//   21      168    size: tokens held by each layer's cache
//   22      176    position: tokens fed since the session was cleared
//   23      184    ring_start: the ring's oldest token is in slot sinks + ring_start
//   24      192    n_tokens = position: how many token ids follow
//   25      200    n_logits: 0, or vocab_size when the last token's logits follow
//   26      208    header checksum: FNV-1a 64 of bytes [0, 208)
//   ------------------------------------------------------------------------
//   216            token ids: n_tokens × int32, the ids that produced the state
//                  logits: n_logits × scalar_bytes, host floats (T)
//                  the caches: for each layer, the arrays KVCache::read_raw
//                  visits (keys then values of each kv head; for int8 then the
//                  keys' and the values' scale codes), each head's `size` held
//                  slots only, never the unused capacity:
//                    n_layers × 2 × n_kv_heads × size × row bytes, where row
//                    bytes = d_k × scalar_bytes (full), d_k × 2 (bf16), or
//                    d_k + 1 (int8)
//   end − 8        checksum: FNV-1a 64 of every byte before it
//
// The state is stored exactly as it is in memory (slots in slot order, the
// ring not rotated back into token order), so that a loaded session
// continues bit for bit as the original would have: attention sums over the
// slots in their order. Floats are stored as the host's bytes; hosts that
// are not little-endian are refused.
//
// Checks on loading, all before anything large is allocated: the magic, the
// version, the header checksum (so that a damaged header reads as damage,
// not as another model), the model's shape and weights against the decoder
// (std::invalid_argument naming the field), a state the session can be in,
// and the file's length against the length the header implies (computed
// without overflow: a truncated file, or one with trailing bytes, is
// refused before the caches are allocated). Then the body is read and its
// checksum compared: any changed byte is refused. Token ids are checked
// against the vocabulary last.
#pragma once

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <istream>
#include <limits>
#include <optional>
#include <ostream>
#include <random>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>  // fsync
#endif

#include <Eigen/Core>

#include "config.hpp"
#include "decoder.hpp"
#include "kv_cache.hpp"

namespace kvcache {

// What load_session returns: the restored session and what it was made of.
template <typename T = float>
struct SavedSession {
  std::vector<int> tokens;  // the ids fed to the session, oldest first (position() of them)
  Session<T> session;       // ready to continue: its next token takes position tokens.size()
  RowVector<T> last_logits;  // the logits after the last token, or empty when none were saved
};

struct SessionLoadOptions {
  // Room in each cache for this many tokens (at most the saved session's
  // limit), so that continuing does not reallocate; the loaded tokens
  // always fit.
  std::size_t reserve_tokens = 0;
  // A file (or stream) longer than this is refused before anything is
  // allocated: the bound for untrusted input.
  std::uint64_t max_bytes = std::numeric_limits<std::uint64_t>::max();
};

namespace detail {
namespace session_file {

constexpr unsigned char kMagic[8] = {'K', 'V', 'C', 'S', 'E', 'S', 'S', '\0'};
constexpr std::uint64_t kVersion = 1;
constexpr std::size_t kFields = 27;  // header fields, the checksum included
constexpr std::uint64_t kHeaderBytes = kFields * 8;
constexpr std::uint64_t kChecksumBytes = 8;

// Indices of the header fields (see the table at the top).
enum Field : std::size_t {
  kMagicField, kVersionField, kScalarBytes, kVocabSize, kDModel, kNLayers, kNHeads, kNKvHeads, kDFf, kMaxSeqLen,
  kPositions, kRopeBase, kNorm, kNormEps, kMlp, kTiedLmHead, kFingerprint, kKvType, kWindow, kSinks, kMaxTokens,
  kSize, kPosition, kRingStart, kNTokens, kNLogits, kHeaderChecksum
};

// FNV-1a, 64 bits: one xor and one multiply per byte. Both are bijections of
// the state, so changing any single byte always changes the result.
class Fnv1a64 {
 public:
  void update(const unsigned char* p, std::size_t n) {
    std::uint64_t h = h_;
    for (std::size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
    h_ = h;
  }
  void update_u64(std::uint64_t v) {
    unsigned char b[8];
    encode_u64(v, b);
    update(b, 8);
  }
  std::uint64_t value() const { return h_; }

  static void encode_u64(std::uint64_t v, unsigned char* p) {
    for (int i = 0; i < 8; ++i) p[i] = static_cast<unsigned char>((v >> (8 * i)) & 0xFFu);
  }

 private:
  std::uint64_t h_ = 0xcbf29ce484222325ull;
};

inline std::uint64_t decode_u64(const unsigned char* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

inline std::uint64_t double_bits(double x) {
  std::uint64_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}
inline double bits_double(std::uint64_t bits) {
  double x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

inline bool host_is_little_endian() {
  const std::uint32_t one = 1;
  unsigned char first = 0;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

// a·b and a+b saturating at 2^64 − 1, so that a huge count from a file
// fails the length check instead of wrapping into a small one.
constexpr std::uint64_t kSaturated = std::numeric_limits<std::uint64_t>::max();
inline std::uint64_t sat_mul(std::uint64_t a, std::uint64_t b) {
  return a != 0 && b > kSaturated / a ? kSaturated : a * b;
}
inline std::uint64_t sat_add(std::uint64_t a, std::uint64_t b) { return b > kSaturated - a ? kSaturated : a + b; }
inline std::string count_string(std::uint64_t n) { return n == kSaturated ? "more than 2^64" : std::to_string(n); }

// The codes of the enums in the file, independent of the enums' order.
inline std::uint64_t code(PositionEncoding p) {
  return p == PositionEncoding::none ? 0 : p == PositionEncoding::learned ? 1 : 2;
}
inline std::uint64_t code(NormKind n) { return n == NormKind::layer_norm ? 0 : 1; }
inline std::uint64_t code(MlpKind m) { return m == MlpKind::gelu ? 0 : 1; }
inline std::uint64_t code(KVType t) { return t == KVType::full ? 0 : t == KVType::bf16 ? 1 : 2; }

inline std::string positions_name(std::uint64_t c) {
  return c == 0 ? "none" : c == 1 ? "learned" : c == 2 ? "rope" : "unknown (" + std::to_string(c) + ")";
}
inline std::string norm_name(std::uint64_t c) {
  return c == 0 ? "layer_norm" : c == 1 ? "rms_norm" : "unknown (" + std::to_string(c) + ")";
}
inline std::string mlp_name(std::uint64_t c) {
  return c == 0 ? "gelu" : c == 1 ? "swiglu" : "unknown (" + std::to_string(c) + ")";
}
inline std::string double_string(std::uint64_t bits) {
  char buffer[40];
  std::snprintf(buffer, sizeof buffer, "%.9g", bits_double(bits));
  return buffer;
}

inline std::string quoted(const std::string& name) { return "'" + name + "'"; }

[[noreturn]] inline void fail(const std::string& name, const std::string& problem) {
  throw std::runtime_error("kvcache: session file " + quoted(name) + ": " + problem);
}

inline void require_little_endian(const std::string& name) {
  if (!host_is_little_endian())
    fail(name, "session files are little-endian and this host is not (unsupported)");
}

}  // namespace session_file
}  // namespace detail

// A 64-bit fingerprint of a decoder's weights: FNV-1a over every weight
// array's shape and 256 of its values, evenly spaced (all of them in smaller
// arrays). Two checkpoints trained or fine-tuned apart differ in nearly
// every weight and so get different fingerprints; an edit of a few single
// weights may go unnoticed. Cheap: a few thousand values, whatever the model's
// size. Session files record it, so that a session is never continued on
// other weights of the same shape.
template <typename T>
std::uint64_t weights_fingerprint(const Decoder<T>& decoder) {
  detail::session_file::Fnv1a64 h;
  // Values are taken row by row through m(i, j), so that a matrix stored as
  // bfloat16 gives the rounded values it computes with (and a fingerprint of
  // its own).
  const auto add = [&h](const auto& m) {
    const auto n = static_cast<std::uint64_t>(m.size());
    const auto cols = static_cast<std::uint64_t>(m.cols());
    h.update_u64(static_cast<std::uint64_t>(m.rows()));
    h.update_u64(cols);
    const std::uint64_t samples = std::min<std::uint64_t>(n, 256);
    for (std::uint64_t k = 0; k < samples; ++k) {
      const std::uint64_t at = (2 * k + 1) * n / (2 * samples);  // the middle of the k-th of `samples` parts
      const T value = m(static_cast<Eigen::Index>(at / cols), static_cast<Eigen::Index>(at % cols));
      h.update(reinterpret_cast<const unsigned char*>(&value), sizeof value);
    }
  };
  const auto add_norm = [&add](const NormWeights<T>& w) {
    add(w.gamma);
    add(w.beta);
  };
  add(decoder.token_embedding());
  add(decoder.position_embedding());
  for (std::size_t l = 0; l < decoder.config().n_layers; ++l) {
    const auto& b = decoder.block(l);
    const AttentionWeights<T>& a = b.attention;
    add_norm(b.attention_norm);
    for (const auto* W : {&a.W_Q, &a.W_K, &a.W_V, &a.W_O}) add(*W);
    for (const auto* bias : {&a.b_Q, &a.b_K, &a.b_V, &a.b_O}) add(*bias);
    add_norm(b.mlp_norm);
    for (const auto* W : {&b.mlp.W_1, &b.mlp.W_2, &b.mlp.W_3}) add(*W);
    add(b.mlp.b_1);
    add(b.mlp.b_2);
  }
  add_norm(decoder.final_norm());
  if (!decoder.config().tied_lm_head) add(decoder.lm_head());
  return h.value();
}

namespace detail {
namespace session_file {

// The header fields the model determines: scalar size, shape, fingerprint.
template <typename T>
void fill_model_fields(const Decoder<T>& decoder, std::uint64_t* f) {
  const ModelConfig& c = decoder.config();
  f[kScalarBytes] = sizeof(T);
  f[kVocabSize] = c.vocab_size;
  f[kDModel] = c.d_model;
  f[kNLayers] = c.n_layers;
  f[kNHeads] = c.n_heads;
  f[kNKvHeads] = c.kv_heads();
  f[kDFf] = c.d_ff;
  f[kMaxSeqLen] = c.max_seq_len;
  f[kPositions] = code(c.positions);
  f[kRopeBase] = double_bits(c.rope_base);
  f[kNorm] = code(c.norm);
  f[kNormEps] = double_bits(c.norm_eps);
  f[kMlp] = code(c.mlp);
  f[kTiedLmHead] = c.tied_lm_head ? 1 : 0;
  f[kFingerprint] = weights_fingerprint(decoder);
}

// Throws std::invalid_argument, before anything is written, unless `session`
// was made by `decoder`'s model and `tokens` (and `last_logits`) can describe it.
template <typename T>
void check_saveable(const Decoder<T>& decoder, const Session<T>& session, const std::vector<int>& tokens,
                    std::size_t n_logits) {
  const ModelConfig& c = decoder.config();
  if (session.n_layers() != c.n_layers || session.cache(0).n_kv_heads() != c.kv_heads() ||
      session.cache(0).d_k() != c.d_k())
    throw std::invalid_argument("kvcache: save_session: the session was made for another model shape");
  if (tokens.size() != session.position())
    throw std::invalid_argument("kvcache: save_session: the session has been fed " +
                                std::to_string(session.position()) + " tokens but " + std::to_string(tokens.size()) +
                                " token ids were given (they must be the ids that produced the state)");
  for (std::size_t i = 0; i < tokens.size(); ++i)
    if (tokens[i] < 0 || static_cast<std::size_t>(tokens[i]) >= c.vocab_size)
      throw std::invalid_argument("kvcache: save_session: token id " + std::to_string(tokens[i]) + " at index " +
                                  std::to_string(i) + " is outside [0, vocab_size = " +
                                  std::to_string(c.vocab_size) + ")");
  if (n_logits != 0 && n_logits != c.vocab_size)
    throw std::invalid_argument("kvcache: save_session: last_logits has " + std::to_string(n_logits) +
                                " entries, expected 0 or vocab_size = " + std::to_string(c.vocab_size));
}

// Writes the whole file through put(bytes, n), which throws on failure.
template <typename T, typename Put>
void write_all(const Decoder<T>& decoder, const Session<T>& session, const std::vector<int>& tokens,
                   const T* logits, std::size_t n_logits, Put&& put) {
  Fnv1a64 hash;
  const auto emit = [&](const unsigned char* p, std::size_t n) {
    if (n == 0) return;
    hash.update(p, n);
    put(p, n);
  };

  std::uint64_t f[kFields] = {};
  fill_model_fields(decoder, f);
  f[kVersionField] = kVersion;
  f[kKvType] = code(session.kv_type());
  f[kWindow] = session.window().window;
  f[kSinks] = session.window().sinks;
  f[kMaxTokens] = session.max_tokens();
  f[kSize] = session.size();
  f[kPosition] = session.position();
  f[kRingStart] = session.ring_start();
  f[kNTokens] = tokens.size();
  f[kNLogits] = n_logits;
  unsigned char header[kHeaderBytes];
  std::memcpy(header, kMagic, 8);
  for (std::size_t i = 1; i < kFields - 1; ++i) Fnv1a64::encode_u64(f[i], header + 8 * i);
  Fnv1a64 header_hash;
  header_hash.update(header, kHeaderBytes - 8);
  Fnv1a64::encode_u64(header_hash.value(), header + kHeaderBytes - 8);
  emit(header, kHeaderBytes);

  // Token ids, little-endian int32, a block at a time.
  unsigned char block[4096];
  for (std::size_t i = 0; i < tokens.size();) {
    std::size_t n = 0;
    for (; i < tokens.size() && n + 4 <= sizeof block; ++i, n += 4) {
      const auto id = static_cast<std::uint32_t>(tokens[i]);
      for (std::size_t b = 0; b < 4; ++b) block[n + b] = static_cast<unsigned char>((id >> (8 * b)) & 0xFFu);
    }
    emit(block, n);
  }
  emit(reinterpret_cast<const unsigned char*>(logits), n_logits * sizeof(T));
  session.read_raw([&](const unsigned char* p, std::size_t n) { emit(p, n); });

  unsigned char checksum[8];
  Fnv1a64::encode_u64(hash.value(), checksum);
  put(checksum, 8);
}

// Reads exactly n bytes from `in` into p, hashing them; a short read is a
// truncated file.
class Reader {
 public:
  Reader(std::istream& in, const std::string& name) : in_(in), name_(name) {}

  void read(unsigned char* p, std::size_t n, const char* what) {
    if (n == 0) return;
    in_.read(reinterpret_cast<char*>(p), static_cast<std::streamsize>(n));
    const auto got = static_cast<std::size_t>(in_.gcount());
    consumed_ += got;
    if (got != n)
      fail(name_, std::string("file is truncated: it ends in the ") + what + " after " + std::to_string(consumed_) +
                      " bytes");
    hash_.update(p, n);
  }
  std::uint64_t hash() const { return hash_.value(); }

 private:
  std::istream& in_;
  const std::string& name_;
  Fnv1a64 hash_;
  std::uint64_t consumed_ = 0;
};

// Bytes left in `in` from where it is, when it can seek; nothing otherwise.
inline std::optional<std::uint64_t> remaining_bytes(std::istream& in) {
  const std::istream::pos_type here = in.tellg();
  if (here == std::istream::pos_type(-1)) {
    in.clear(in.rdstate() & ~std::ios::failbit);
    return std::nullopt;
  }
  in.seekg(0, std::ios::end);
  const std::istream::pos_type end = in.tellg();
  in.clear(in.rdstate() & ~std::ios::failbit);
  in.seekg(here);
  if (end == std::istream::pos_type(-1) || end < here || !in) {
    in.clear(in.rdstate() & ~std::ios::failbit);
    in.seekg(here);
    return std::nullopt;
  }
  return static_cast<std::uint64_t>(end - here);
}

// Compares the saved model with the decoder's, naming the first field that
// differs.
template <typename T>
void check_model(const std::string& name, const std::uint64_t* saved, const Decoder<T>& decoder) {
  std::uint64_t have[kFields] = {};
  fill_model_fields(decoder, have);
  struct Named {
    Field field;
    const char* label;
    std::string (*show)(std::uint64_t);
  };
  const auto number = [](std::uint64_t v) { return std::to_string(v); };
  const Named fields[] = {
      {kScalarBytes, "sizeof(T)", +number},    {kVocabSize, "vocab_size", +number},
      {kDModel, "d_model", +number},           {kNLayers, "n_layers", +number},
      {kNHeads, "n_heads", +number},           {kNKvHeads, "n_kv_heads", +number},
      {kDFf, "d_ff", +number},                 {kMaxSeqLen, "max_seq_len", +number},
      {kPositions, "positions", positions_name}, {kRopeBase, "rope_base", double_string},
      {kNorm, "norm", norm_name},              {kNormEps, "norm_eps", double_string},
      {kMlp, "mlp", mlp_name},                 {kTiedLmHead, "tied_lm_head", +number},
  };
  for (const Named& n : fields)
    if (saved[n.field] != have[n.field])
      throw std::invalid_argument("kvcache: session file " + quoted(name) + " was saved for " + n.label + " = " +
                                  n.show(saved[n.field]) + ", this model has " + n.show(have[n.field]));
  if (saved[kFingerprint] != have[kFingerprint]) {
    char buffer[96];
    std::snprintf(buffer, sizeof buffer, "(weights fingerprint %016llx, this model's %016llx)",
                  static_cast<unsigned long long>(saved[kFingerprint]),
                  static_cast<unsigned long long>(have[kFingerprint]));
    throw std::invalid_argument("kvcache: session file " + quoted(name) +
                                " was saved for a model of this shape with other weights " + buffer);
  }
}

inline KVType kv_type_of(const std::string& name, std::uint64_t c) {
  switch (c) {
    case 0: return KVType::full;
    case 1: return KVType::bf16;
    case 2: return KVType::int8;
    default: fail(name, "unknown kv_type code " + std::to_string(c) + " (0 full, 1 bf16, 2 int8)");
  }
}

// Reads and checks a whole session file from `in`. `length`: the bytes
// left in `in`, when known.
template <typename T>
SavedSession<T> read_all(std::istream& in, const std::string& name, std::optional<std::uint64_t> length,
                         const Decoder<T>& decoder, const SessionLoadOptions& options) {
  require_little_endian(name);
  if (length && *length > options.max_bytes)
    fail(name, "the file has " + std::to_string(*length) + " bytes, more than the limit of " +
                   std::to_string(options.max_bytes));
  if (length && *length < kHeaderBytes)
    fail(name, "file is truncated: " + std::to_string(*length) + " bytes, the header alone takes " +
                   std::to_string(kHeaderBytes));
  Reader reader(in, name);
  unsigned char header[kHeaderBytes];
  reader.read(header, kHeaderBytes, "header");
  if (std::memcmp(header, kMagic, 8) != 0) fail(name, "not a kvcache session file (wrong magic bytes)");
  std::uint64_t f[kFields];
  for (std::size_t i = 1; i < kFields; ++i) f[i] = decode_u64(header + 8 * i);
  if (f[kVersionField] != kVersion)
    fail(name, "format version " + std::to_string(f[kVersionField]) + ", this build reads version " +
                   std::to_string(kVersion));
  Fnv1a64 header_hash;
  header_hash.update(header, kHeaderBytes - 8);
  if (header_hash.value() != f[kHeaderChecksum]) fail(name, "header checksum mismatch: the file is damaged");

  check_model(name, f, decoder);

  // A session of the saved kind, still empty: its constructor checks the
  // window and the limit, and it allocates nothing yet.
  SessionOptions session_options;
  session_options.kv_type = kv_type_of(name, f[kKvType]);
  const std::uint64_t max_seq_len = decoder.config().max_seq_len;
  if (f[kWindow] > max_seq_len || f[kSinks] > max_seq_len || f[kMaxTokens] == 0 || f[kMaxTokens] > max_seq_len)
    fail(name, "impossible window = " + std::to_string(f[kWindow]) + ", sinks = " + std::to_string(f[kSinks]) +
                   " or max_tokens = " + std::to_string(f[kMaxTokens]) + " for max_seq_len = " +
                   std::to_string(max_seq_len));
  session_options.window = SlidingWindow{static_cast<std::size_t>(f[kWindow]), static_cast<std::size_t>(f[kSinks])};
  session_options.max_tokens = static_cast<std::size_t>(f[kMaxTokens]);
  std::optional<Session<T>> probe;
  try {
    probe.emplace(decoder.new_session(session_options));
  } catch (const std::invalid_argument& e) {
    fail(name, std::string("impossible session options: ") + e.what());
  }
  if (probe->max_tokens() != f[kMaxTokens])
    fail(name, "max_tokens = " + std::to_string(f[kMaxTokens]) + " but a window of " + std::to_string(f[kWindow]) +
                   " holds " + std::to_string(probe->max_tokens()));
  if (f[kPosition] > static_cast<std::uint64_t>(std::numeric_limits<std::size_t>::max()))
    fail(name, "position = " + std::to_string(f[kPosition]) + " does not fit this platform");
  try {
    probe->check_state(static_cast<std::size_t>(f[kSize]), static_cast<std::size_t>(f[kPosition]),
                                static_cast<std::size_t>(f[kRingStart]));
  } catch (const std::invalid_argument& e) {
    fail(name, e.what());
  }
  if (f[kNTokens] != f[kPosition])
    fail(name, "n_tokens = " + std::to_string(f[kNTokens]) + " but position = " + std::to_string(f[kPosition]) +
                   " (a token id per position)");
  if (f[kNLogits] != 0 && f[kNLogits] != f[kVocabSize])
    fail(name, "n_logits = " + std::to_string(f[kNLogits]) + ", expected 0 or vocab_size = " +
                   std::to_string(f[kVocabSize]));

  // The length the header implies (size <= max_seq_len by now, but n_tokens
  // is bounded by nothing but the file).
  const std::uint64_t slot_bytes = probe->cache(0).row_bytes();
  const std::uint64_t layers = f[kNLayers], heads = f[kNKvHeads];
  std::uint64_t expected = sat_add(kHeaderBytes, sat_mul(4, f[kNTokens]));
  expected = sat_add(expected, sat_mul(f[kNLogits], sizeof(T)));
  expected = sat_add(expected, sat_mul(sat_mul(2 * layers, heads), sat_mul(f[kSize], slot_bytes)));
  expected = sat_add(expected, kChecksumBytes);
  if (expected > static_cast<std::uint64_t>(std::numeric_limits<std::ptrdiff_t>::max()) ||
      expected > options.max_bytes)
    fail(name, "the header implies a file of " + count_string(expected) + " bytes, more than the limit of " +
                   std::to_string(std::min<std::uint64_t>(
                       options.max_bytes, static_cast<std::uint64_t>(std::numeric_limits<std::ptrdiff_t>::max()))));
  if (length && *length != expected)
    fail(name, std::string(*length < expected ? "file is truncated" : "file has trailing bytes") +
                   ": the header implies " + std::to_string(expected) + " bytes, the file has " +
                   std::to_string(*length));

  // Everything is consistent: allocate and read. With a known length the
  // token count was checked against it; without one (a pipe) nothing but
  // max_bytes bounds it, so the ids are stored as they arrive: a header
  // claiming 2^31 ids then costs what the stream really delivers, not 8 GB.
  const auto n_tokens = static_cast<std::size_t>(f[kNTokens]);
  std::vector<int> tokens;
  tokens.reserve(length ? n_tokens : std::min<std::size_t>(n_tokens, std::size_t{1} << 16));
  {
    unsigned char block[4096];
    while (tokens.size() < n_tokens) {
      const std::size_t n = std::min<std::size_t>(n_tokens - tokens.size(), sizeof block / 4);
      reader.read(block, 4 * n, "token ids");
      for (std::size_t k = 0; k < n; ++k) {
        const std::uint32_t bits = static_cast<std::uint32_t>(block[4 * k]) |
                                   (static_cast<std::uint32_t>(block[4 * k + 1]) << 8) |
                                   (static_cast<std::uint32_t>(block[4 * k + 2]) << 16) |
                                   (static_cast<std::uint32_t>(block[4 * k + 3]) << 24);
        std::int32_t id;
        std::memcpy(&id, &bits, sizeof id);
        tokens.push_back(static_cast<int>(id));
      }
    }
  }
  RowVector<T> logits(static_cast<Eigen::Index>(f[kNLogits]));
  reader.read(reinterpret_cast<unsigned char*>(logits.data()), static_cast<std::size_t>(logits.size()) * sizeof(T),
              "logits");

  const auto size = static_cast<std::size_t>(f[kSize]);
  session_options.reserve_tokens = std::max(size, std::min(options.reserve_tokens, probe->max_tokens()));
  probe.reset();
  Session<T> session = decoder.new_session(session_options);
  session.restore_state(size, static_cast<std::size_t>(f[kPosition]), static_cast<std::size_t>(f[kRingStart]));
  session.write_raw([&](unsigned char* p, std::size_t n) { reader.read(p, n, "caches"); });

  const std::uint64_t computed = reader.hash();
  unsigned char stored[8];
  reader.read(stored, 8, "checksum");
  if (decode_u64(stored) != computed) fail(name, "checksum mismatch: the file is damaged");
  if (!length && in.peek() != std::char_traits<char>::eof())
    fail(name, "file has trailing bytes after the " + std::to_string(expected) + " the header implies");

  for (std::size_t i = 0; i < tokens.size(); ++i)
    if (tokens[i] < 0 || static_cast<std::uint64_t>(tokens[i]) >= f[kVocabSize])
      fail(name, "token id " + std::to_string(tokens[i]) + " at index " + std::to_string(i) +
                     " is outside [0, vocab_size = " + std::to_string(f[kVocabSize]) + ")");
  return SavedSession<T>{std::move(tokens), std::move(session), std::move(logits)};
}

// A name for the temporary file beside `path` that no one else is using.
inline std::string temporary_name(const std::string& path, unsigned attempt) {
  static_assert(sizeof(unsigned long long) >= 8, "");
  std::random_device device;
  const auto now = static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  const std::uint64_t salt = (static_cast<std::uint64_t>(device()) << 32) ^ now ^ attempt;
  char suffix[32];
  std::snprintf(suffix, sizeof suffix, ".tmp.%016llx", static_cast<unsigned long long>(salt));
  return path + suffix;
}

}  // namespace session_file
}  // namespace detail

// ============================================================================
// Saving
// ============================================================================

// Writes `session` (made by `decoder`) to `out` in the format at the top of
// this file. `tokens` are the ids that produced its state, one per position
// (session.position() of them); `last_logits`, when not empty, the logits
// after the last one (vocab_size values), so that whoever loads it can pick
// the next token without a forward pass.
//
// Throws std::invalid_argument (before writing anything) when the session
// is not of this decoder's shape, the token count is not position(), an id
// is outside the vocabulary, or last_logits has another size;
// std::runtime_error when writing fails.
template <typename T>
void write_session(std::ostream& out, const Decoder<T>& decoder, const Session<T>& session,
                   const std::vector<int>& tokens, const RowVector<T>& last_logits = {}) {
  const auto n_logits = static_cast<std::size_t>(last_logits.size());
  detail::session_file::check_saveable(decoder, session, tokens, n_logits);
  detail::session_file::require_little_endian("<stream>");
  const auto put = [&out](const unsigned char* p, std::size_t n) {
    out.write(reinterpret_cast<const char*>(p), static_cast<std::streamsize>(n));
    if (!out) throw std::runtime_error("kvcache: write_session: write error");
  };
  detail::session_file::write_all(decoder, session, tokens, last_logits.data(), n_logits, put);
}

// The same into the file at `path`, atomically: the bytes go to a new
// temporary file beside it (same directory, so same file system), which is
// flushed to disk and then renamed over `path`. A crash or an error at any
// point leaves `path` as it was (absent, or the previous file) and never a
// half-written one; on error the temporary file is removed. Throws as
// write_session, std::runtime_error naming `path` on I/O failure.
template <typename T>
void save_session(const std::string& path, const Decoder<T>& decoder, const Session<T>& session,
                  const std::vector<int>& tokens, const RowVector<T>& last_logits = {}) {
  namespace sf = detail::session_file;
  const auto n_logits = static_cast<std::size_t>(last_logits.size());
  sf::check_saveable(decoder, session, tokens, n_logits);
  sf::require_little_endian(path);
  if (path.empty()) throw std::invalid_argument("kvcache: save_session: empty path");

  // "x": create, failing if the name exists, so that two writers never
  // share a temporary file.
  std::string tmp;
  std::FILE* file = nullptr;
  int error = 0;
  for (unsigned attempt = 0; attempt < 8 && file == nullptr; ++attempt) {
    tmp = sf::temporary_name(path, attempt);
    errno = 0;
    file = std::fopen(tmp.c_str(), "wbx");
    error = errno;
    if (file == nullptr && error != EEXIST) break;
  }
  if (file == nullptr)
    sf::fail(path, "cannot create a temporary file beside it (" + tmp + ")" +
                       (error != 0 ? ": " + std::generic_category().message(error) : std::string()));
  const auto io_error = [&](const std::string& what) {
    const int e = errno;
    return std::runtime_error("kvcache: session file " + sf::quoted(path) + ": " + what + " " + tmp +
                              (e != 0 ? ": " + std::generic_category().message(e) : std::string()));
  };
  try {
    const auto put = [&](const unsigned char* p, std::size_t n) {
      errno = 0;
      if (std::fwrite(p, 1, n, file) != n) throw io_error("write error on");
    };
    sf::write_all(decoder, session, tokens, last_logits.data(), n_logits, put);
    errno = 0;
    if (std::fflush(file) != 0) throw io_error("write error on");
#if defined(__unix__) || defined(__APPLE__)
    // On disk before the rename makes it visible: after a power failure the
    // name then holds the old file or the whole new one.
    if (::fsync(::fileno(file)) != 0) throw io_error("cannot flush to disk");
#endif
    std::FILE* closing = file;
    file = nullptr;
    errno = 0;
    if (std::fclose(closing) != 0) throw io_error("write error while closing");
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    if (ec) sf::fail(path, "cannot rename " + tmp + " into place: " + ec.message());
  } catch (...) {
    if (file != nullptr) std::fclose(file);
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);
    throw;
  }
}

// ============================================================================
// Loading
// ============================================================================

// Reads a session written by write_session from `in`, for `decoder`, whose
// model must be the one that saved it. At most options.max_bytes are
// accepted. When `in` can seek (a file, a string stream), its length is
// checked exactly against the header before anything large is allocated;
// when it cannot, max_bytes is the only bound on what a hostile header can
// make it allocate, so set it for untrusted input. `name` is used in error
// messages.
//
// Throws std::invalid_argument when the file was saved for another model
// (naming the field: "was saved for n_layers = 6, this model has 5") and
// std::runtime_error for anything else: not a session file, another
// version, truncated, trailing bytes, a damaged byte (checksum), an
// impossible state, a token id outside the vocabulary. Nothing large is
// allocated before the header has been checked against the length.
template <typename T>
SavedSession<T> read_session(std::istream& in, const Decoder<T>& decoder, const SessionLoadOptions& options,
                             const std::string& name = "<stream>") {
  const std::optional<std::uint64_t> length = detail::session_file::remaining_bytes(in);
  return detail::session_file::read_all(in, name, length, decoder, options);
}

// The same from the file at `path` (its length checked exactly against the
// header). Errors name the path.
template <typename T>
SavedSession<T> load_session(const std::string& path, const Decoder<T>& decoder,
                             const SessionLoadOptions& options = {}) {
  namespace sf = detail::session_file;
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) sf::fail(path, "is a directory");
  errno = 0;
  std::ifstream in(path, std::ios::binary);
  if (!in)
    sf::fail(path, std::string(std::filesystem::exists(path, ec) ? "cannot open for reading" : "no such file") +
                       (errno != 0 ? ": " + std::generic_category().message(errno) : std::string()));
  const std::optional<std::uint64_t> length = sf::remaining_bytes(in);
  if (!length) sf::fail(path, "cannot determine the file's length (not a regular file?)");
  return sf::read_all(in, path, length, decoder, options);
}

}  // namespace kvcache
