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
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <istream>
#include <iterator>
#include <limits>
#include <optional>
#include <ostream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "config.hpp"
#include "decoder.hpp"
#include "detail/io.hpp"
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
    io::put_u64_le(v, b);
    update(b, 8);
  }
  std::uint64_t value() const { return h_; }

 private:
  std::uint64_t h_ = 0xcbf29ce484222325ull;
};

// The codes of the enums in the file, independent of the enums' order, and
// their names in messages.
inline std::uint64_t code(PositionEncoding p) {
  return p == PositionEncoding::none ? 0 : p == PositionEncoding::learned ? 1 : 2;
}
inline std::uint64_t code(NormKind n) { return n == NormKind::layer_norm ? 0 : 1; }
inline std::uint64_t code(MlpKind m) { return m == MlpKind::gelu ? 0 : 1; }
inline std::uint64_t code(KVType t) { return t == KVType::full ? 0 : t == KVType::bf16 ? 1 : 2; }

inline std::string code_name(std::uint64_t c, std::initializer_list<const char*> names) {
  return c < names.size() ? names.begin()[c] : "unknown (" + std::to_string(c) + ")";
}
inline std::string number_name(std::uint64_t v) { return std::to_string(v); }
inline std::string positions_name(std::uint64_t c) { return code_name(c, {"none", "learned", "rope"}); }
inline std::string norm_name(std::uint64_t c) { return code_name(c, {"layer_norm", "rms_norm"}); }
inline std::string mlp_name(std::uint64_t c) { return code_name(c, {"gelu", "swiglu"}); }
inline std::string double_name(std::uint64_t bits) {
  char buffer[40];
  std::snprintf(buffer, sizeof buffer, "%.9g", io::bit_cast<double>(bits));
  return buffer;
}

// The header fields that describe the model (3 to 15, after the scalar
// size), each listed once: where it goes, its name in messages, its value
// for a model, and how to show a stored value. Both saving and the check on
// loading go through this table.
struct ModelField {
  Field field;
  const char* name;
  std::uint64_t (*value)(const ModelConfig& c, std::size_t scalar_bytes);
  std::string (*show)(std::uint64_t);
};
using C = const ModelConfig&;
using S = std::size_t;
inline const ModelField kModelFields[] = {
    {kScalarBytes, "sizeof(T)", [](C, S bytes) -> std::uint64_t { return bytes; }, number_name},
    {kVocabSize, "vocab_size", [](C c, S) -> std::uint64_t { return c.vocab_size; }, number_name},
    {kDModel, "d_model", [](C c, S) -> std::uint64_t { return c.d_model; }, number_name},
    {kNLayers, "n_layers", [](C c, S) -> std::uint64_t { return c.n_layers; }, number_name},
    {kNHeads, "n_heads", [](C c, S) -> std::uint64_t { return c.n_heads; }, number_name},
    {kNKvHeads, "n_kv_heads", [](C c, S) -> std::uint64_t { return c.kv_heads(); }, number_name},
    {kDFf, "d_ff", [](C c, S) -> std::uint64_t { return c.d_ff; }, number_name},
    {kMaxSeqLen, "max_seq_len", [](C c, S) -> std::uint64_t { return c.max_seq_len; }, number_name},
    {kPositions, "positions", [](C c, S) { return code(c.positions); }, positions_name},
    {kRopeBase, "rope_base", [](C c, S) { return io::bit_cast<std::uint64_t>(c.rope_base); }, double_name},
    {kNorm, "norm", [](C c, S) { return code(c.norm); }, norm_name},
    {kNormEps, "norm_eps", [](C c, S) { return io::bit_cast<std::uint64_t>(c.norm_eps); }, double_name},
    {kMlp, "mlp", [](C c, S) { return code(c.mlp); }, mlp_name},
    {kTiedLmHead, "tied_lm_head", [](C c, S) -> std::uint64_t { return c.tied_lm_head ? 1 : 0; }, number_name},
};

// How errors name a session file.
inline std::string label(const std::string& name) { return "session file '" + name + "'"; }

[[noreturn]] inline void fail(const std::string& name, const std::string& problem) { io::fail(label(name), problem); }

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
  for (const ModelField& m : kModelFields) f[m.field] = m.value(decoder.config(), sizeof(T));
  f[kFingerprint] = weights_fingerprint(decoder);
}

// Throws std::invalid_argument, before anything is written, unless `session`
// was made by `decoder`'s model and `tokens` (and `last_logits`) can describe
// it; std::runtime_error on a host that cannot write the format.
template <typename T>
void check_saveable(const std::string& name, const Decoder<T>& decoder, const Session<T>& session,
                    const std::vector<int>& tokens, std::size_t n_logits) {
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
  io::require_little_endian(label(name), "session files");
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
  const std::uint64_t state[] = {code(session.kv_type()), session.window().window, session.window().sinks,
                                 session.max_tokens(),     session.size(),          session.position(),
                                 session.ring_start(),     tokens.size(),           n_logits};
  static_assert(sizeof state / sizeof state[0] == kNLogits - kKvType + 1, "the session fields, in order");
  std::copy(std::begin(state), std::end(state), f + kKvType);
  unsigned char header[kHeaderBytes];
  std::memcpy(header, kMagic, 8);
  for (std::size_t i = 1; i < kFields - 1; ++i) io::put_u64_le(f[i], header + 8 * i);
  Fnv1a64 header_hash;
  header_hash.update(header, kHeaderBytes - 8);
  io::put_u64_le(header_hash.value(), header + kHeaderBytes - 8);
  emit(header, kHeaderBytes);

  for (const int id : tokens) {  // little-endian int32
    unsigned char b[4];
    io::put_i32_le(static_cast<std::int32_t>(id), b);
    emit(b, 4);
  }
  emit(reinterpret_cast<const unsigned char*>(logits), n_logits * sizeof(T));
  session.read_raw([&](const unsigned char* p, std::size_t n) { emit(p, n); });

  unsigned char checksum[8];
  io::put_u64_le(hash.value(), checksum);
  put(checksum, 8);
}

// Compares the saved model with the decoder's, naming the first field that
// differs.
template <typename T>
void check_model(const std::string& name, const std::uint64_t* saved, const Decoder<T>& decoder) {
  std::uint64_t have[kFields] = {};
  fill_model_fields(decoder, have);
  for (const ModelField& m : kModelFields)
    if (saved[m.field] != have[m.field])
      throw std::invalid_argument("kvcache: " + label(name) + " was saved for " + m.name + " = " +
                                  m.show(saved[m.field]) + ", this model has " + m.show(have[m.field]));
  if (saved[kFingerprint] != have[kFingerprint]) {
    char buffer[96];
    std::snprintf(buffer, sizeof buffer, "(weights fingerprint %016llx, this model's %016llx)",
                  static_cast<unsigned long long>(saved[kFingerprint]),
                  static_cast<unsigned long long>(have[kFingerprint]));
    throw std::invalid_argument("kvcache: " + label(name) + " was saved for a model of this shape with other weights " +
                                buffer);
  }
}

// Reads the header into f: the magic bytes, the version and the header's
// checksum are checked here.
inline void read_header(io::BoundedReader& reader, const std::string& name, std::uint64_t* f) {
  unsigned char header[kHeaderBytes];
  reader.read(header, kHeaderBytes, "header");
  if (std::memcmp(header, kMagic, 8) != 0) fail(name, "not a kvcache session file (wrong magic bytes)");
  for (std::size_t i = 1; i < kFields; ++i) f[i] = io::get_u64_le(header + 8 * i);
  if (f[kVersionField] != kVersion)
    fail(name, "format version " + std::to_string(f[kVersionField]) + ", this build reads version " +
                   std::to_string(kVersion));
  Fnv1a64 header_hash;
  header_hash.update(header, kHeaderBytes - 8);
  if (header_hash.value() != f[kHeaderChecksum]) fail(name, "header checksum mismatch: the file is damaged");
}

// The session options of the saved session, and an empty session made with
// them (its constructor checks the window and the limit, and it allocates
// nothing yet); then the saved state is checked against it.
template <typename T>
Session<T> empty_session_of(const std::string& name, const std::uint64_t* f, const Decoder<T>& decoder,
                            SessionOptions& options) {
  if (f[kKvType] > 2) fail(name, "unknown kv_type code " + std::to_string(f[kKvType]) + " (0 full, 1 bf16, 2 int8)");
  options.kv_type = f[kKvType] == 0 ? KVType::full : f[kKvType] == 1 ? KVType::bf16 : KVType::int8;
  const std::uint64_t max_seq_len = decoder.config().max_seq_len;
  if (f[kWindow] > max_seq_len || f[kSinks] > max_seq_len || f[kMaxTokens] == 0 || f[kMaxTokens] > max_seq_len)
    fail(name, "impossible window = " + std::to_string(f[kWindow]) + ", sinks = " + std::to_string(f[kSinks]) +
                   " or max_tokens = " + std::to_string(f[kMaxTokens]) + " for max_seq_len = " +
                   std::to_string(max_seq_len));
  options.window = SlidingWindow{static_cast<std::size_t>(f[kWindow]), static_cast<std::size_t>(f[kSinks])};
  options.max_tokens = static_cast<std::size_t>(f[kMaxTokens]);
  std::optional<Session<T>> probe;
  try {
    probe.emplace(decoder.new_session(options));
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
  return std::move(*probe);
}

// Reads and checks a whole session file from `in`. `length`: the bytes
// left in `in`, when known.
template <typename T>
SavedSession<T> read_all(std::istream& in, const std::string& name, std::optional<std::uint64_t> length,
                         const Decoder<T>& decoder, const SessionLoadOptions& options) {
  io::require_little_endian(label(name), "session files");
  if (length && *length > options.max_bytes)
    fail(name, "the file has " + std::to_string(*length) + " bytes, more than the limit of " +
                   std::to_string(options.max_bytes));
  if (length && *length < kHeaderBytes)
    fail(name, "file is truncated: " + std::to_string(*length) + " bytes, the header alone takes " +
                   std::to_string(kHeaderBytes));
  io::BoundedReader reader(in, label(name));
  Fnv1a64 hash;
  reader.on_read = [&hash](const unsigned char* p, std::size_t n) { hash.update(p, n); };
  std::uint64_t f[kFields];
  read_header(reader, name, f);
  check_model(name, f, decoder);
  SessionOptions session_options;
  const Session<T> probe = empty_session_of(name, f, decoder, session_options);

  // The length the header implies (size <= max_seq_len by now, but n_tokens
  // is bounded by nothing but the file).
  const std::uint64_t slot_bytes = probe.cache(0).row_bytes(), layers = f[kNLayers], heads = f[kNKvHeads];
  std::uint64_t expected = io::sat_add(kHeaderBytes, io::sat_mul(4, f[kNTokens]));
  expected = io::sat_add(expected, io::sat_mul(f[kNLogits], sizeof(T)));
  expected = io::sat_add(expected, io::sat_mul(io::sat_mul(2 * layers, heads), io::sat_mul(f[kSize], slot_bytes)));
  expected = io::sat_add(expected, kChecksumBytes);
  const std::uint64_t limit =
      std::min<std::uint64_t>(options.max_bytes, static_cast<std::uint64_t>(std::numeric_limits<std::ptrdiff_t>::max()));
  if (expected > limit)
    fail(name, "the header implies a file of " + io::count_string(expected) + " bytes, more than the limit of " +
                   std::to_string(limit));
  if (length) io::require_length(label(name), *length, expected);

  // Everything is consistent: allocate and read. With a known length the
  // token count was checked against it; without one (a pipe) nothing but
  // max_bytes bounds it, so the ids are stored as they arrive: a header
  // claiming 2^31 ids then costs what the stream really delivers, not 8 GB.
  const auto n_tokens = static_cast<std::size_t>(f[kNTokens]);
  std::vector<int> tokens;
  tokens.reserve(length ? n_tokens : std::min<std::size_t>(n_tokens, std::size_t{1} << 16));
  reader.read_i32s(n_tokens, "token ids", [&](std::int32_t id) { tokens.push_back(static_cast<int>(id)); });
  RowVector<T> logits(static_cast<Eigen::Index>(f[kNLogits]));
  reader.read(reinterpret_cast<unsigned char*>(logits.data()), static_cast<std::size_t>(logits.size()) * sizeof(T),
              "logits");

  const auto size = static_cast<std::size_t>(f[kSize]);
  session_options.reserve_tokens = std::max(size, std::min(options.reserve_tokens, probe.max_tokens()));
  Session<T> session = decoder.new_session(session_options);
  session.restore_state(size, static_cast<std::size_t>(f[kPosition]), static_cast<std::size_t>(f[kRingStart]));
  session.write_raw([&](unsigned char* p, std::size_t n) { reader.read(p, n, "caches"); });

  const std::uint64_t computed = hash.value();
  unsigned char stored[8];
  reader.read(stored, 8, "checksum");
  if (io::get_u64_le(stored) != computed) fail(name, "checksum mismatch: the file is damaged");
  if (!length && in.peek() != std::char_traits<char>::eof())
    fail(name, "file has trailing bytes after the " + std::to_string(expected) + " the header implies");

  for (std::size_t i = 0; i < tokens.size(); ++i)
    if (tokens[i] < 0 || static_cast<std::uint64_t>(tokens[i]) >= f[kVocabSize])
      fail(name, "token id " + std::to_string(tokens[i]) + " at index " + std::to_string(i) +
                     " is outside [0, vocab_size = " + std::to_string(f[kVocabSize]) + ")");
  return SavedSession<T>{std::move(tokens), std::move(session), std::move(logits)};
}

// Whether a file that starts with `p` is a session file kvcache may replace:
// it has the magic bytes (damaged, of another model or another version, it
// is still one of ours).
inline bool is_session_file(const io::FilePrefix& p) {
  return p.bytes.size() >= 8 && std::memcmp(p.bytes.data(), kMagic, 8) == 0;
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
  detail::session_file::check_saveable("<stream>", decoder, session, tokens, n_logits);
  const auto put = [&out](const unsigned char* p, std::size_t n) {
    out.write(reinterpret_cast<const char*>(p), static_cast<std::streamsize>(n));
    if (!out) throw std::runtime_error("kvcache: write_session: write error");
  };
  detail::session_file::write_all(decoder, session, tokens, last_logits.data(), n_logits, put);
}

// Throws std::runtime_error naming `path` unless save_session may write
// there: `path` does not exist, or it is a regular file that starts with a
// session file's magic bytes (one kvcache wrote: damaged, of another model
// or of another version, it may be replaced). Anything else (a file of
// another kind, even empty; a symbolic link, which is not followed; a
// directory, a FIFO, a device) is refused and left as it was. save_session
// makes this check itself; a program calls it early to refuse before doing
// any work.
inline void check_session_replaceable(const std::string& path) {
  namespace sf = detail::session_file;
  detail::io::require_replaceable(path, sf::label(path), "kvcache session file", 8, sf::is_session_file);
}

// The same into the file at `path`, with the atomic write of detail/io.hpp:
// `path` then holds this whole file, or what it held before (after a crash,
// an error, or with a concurrent writer: exactly one writer's file), and no
// temporary file is left. An existing `path` is replaced only when it is a
// session file (check_session_replaceable). Throws as write_session, and
// std::runtime_error naming `path` when it may not be replaced or on I/O
// failure.
template <typename T>
void save_session(const std::string& path, const Decoder<T>& decoder, const Session<T>& session,
                  const std::vector<int>& tokens, const RowVector<T>& last_logits = {}) {
  namespace sf = detail::session_file;
  const auto n_logits = static_cast<std::size_t>(last_logits.size());
  if (path.empty()) throw std::invalid_argument("kvcache: save_session: empty path");
  sf::check_saveable(path, decoder, session, tokens, n_logits);
  const auto write = [&](detail::io::FileSink& out) {
    sf::write_all(decoder, session, tokens, last_logits.data(), n_logits,
                  [&out](const unsigned char* p, std::size_t n) { out.put(p, n); });
  };
  detail::io::write_atomically(path, sf::label(path), write, [&] { check_session_replaceable(path); });
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
  return detail::session_file::read_all(in, name, detail::io::remaining_bytes(in), decoder, options);
}

// The same from the file at `path` (its length checked exactly against the
// header). Errors name the path.
template <typename T>
SavedSession<T> load_session(const std::string& path, const Decoder<T>& decoder,
                             const SessionLoadOptions& options = {}) {
  namespace sf = detail::session_file;
  std::ifstream in;
  detail::io::open_for_reading(path, sf::label(path), in);
  return sf::read_all(in, path, detail::io::file_length(in, sf::label(path)), decoder, options);
}

}  // namespace kvcache
