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
#include <fstream>
#include <initializer_list>
#include <istream>
#include <iterator>
#include <limits>
#include <memory>
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
  // Null: the loaded session has contiguous caches of its own. Otherwise it
  // is paged in this pool (Decoder::make_pool, storing the file's kv_type):
  // its tokens are written into new blocks of the pool, not published for
  // prefix sharing: a published block is trusted to hold what its token ids
  // produce, and a file's keys and values are only checked against a
  // checksum, so a crafted file could otherwise change what every later
  // session with that prefix computes.
  std::shared_ptr<KVPool> pool;
};

// A 64-bit fingerprint of a decoder's weights: FNV-1a over every weight
// array's shape and 256 of its values, evenly spaced (all of them in smaller
// arrays). Two checkpoints trained or fine-tuned apart differ in nearly
// every weight and so get different fingerprints; an edit of a few single
// weights may go unnoticed. Cheap: a few thousand values, whatever the model's
// size. Session files record it, so that a session is never continued on
// other weights of the same shape.
template <typename T>
std::uint64_t weights_fingerprint(const Decoder<T>& decoder) {
  std::uint64_t h = detail::io::kFnvStart;
  // Values are taken row by row through m(i, j), so that a matrix stored as
  // bfloat16 gives the rounded values it computes with (and a fingerprint of
  // its own).
  const auto add_one = [&h](const auto& m) {
    const auto n = static_cast<std::uint64_t>(m.size());
    const auto cols = static_cast<std::uint64_t>(m.cols());
    h = detail::io::fnv1a(h, static_cast<std::uint64_t>(m.rows()));
    h = detail::io::fnv1a(h, cols);
    const std::uint64_t samples = std::min<std::uint64_t>(n, 256);
    for (std::uint64_t k = 0; k < samples; ++k) {
      const std::uint64_t at = (2 * k + 1) * n / (2 * samples);  // the middle of the k-th of `samples` parts
      const T value = m(static_cast<Eigen::Index>(at / cols), static_cast<Eigen::Index>(at % cols));
      h = detail::io::fnv1a(h, reinterpret_cast<const unsigned char*>(&value), sizeof value);
    }
  };
  const auto add = [&](const auto&... arrays) { (add_one(arrays), ...); };
  add(decoder.token_embedding(), decoder.position_embedding());
  for (std::size_t l = 0; l < decoder.config().n_layers; ++l) {  // in the order of the block's structs
    const auto& b = decoder.block(l);
    const AttentionWeights<T>& a = b.attention;
    add(b.attention_norm.gamma, b.attention_norm.beta, a.W_Q, a.W_K, a.W_V, a.W_O, a.b_Q, a.b_K, a.b_V, a.b_O,
        b.mlp_norm.gamma, b.mlp_norm.beta, b.mlp.W_1, b.mlp.W_2, b.mlp.W_3, b.mlp.b_1, b.mlp.b_2);
  }
  add(decoder.final_norm().gamma, decoder.final_norm().beta);
  if (!decoder.config().tied_lm_head) add(decoder.lm_head());
  return h;
}

namespace detail::session_file {

constexpr char kMagic[8] = {'K', 'V', 'C', 'S', 'E', 'S', 'S', '\0'};
constexpr std::uint64_t kVersion = 1;
constexpr std::size_t kFields = 27;  // header fields, the checksum included
constexpr std::uint64_t kHeaderBytes = kFields * 8;

// Indices of the header fields (see the table at the top), and their names
// in messages.
enum Field : std::size_t {
  kMagicField, kVersionField, kScalarBytes, kVocabSize, kDModel, kNLayers, kNHeads, kNKvHeads, kDFf, kMaxSeqLen,
  kPositions, kRopeBase, kNorm, kNormEps, kMlp, kTiedLmHead, kFingerprint, kKvType, kWindow, kSinks, kMaxTokens,
  kSize, kPosition, kRingStart, kNTokens, kNLogits, kHeaderChecksum
};
constexpr const char* kNames[kFields] = {
    "magic",     "version",     "sizeof(T)", "vocab_size", "d_model",  "n_layers",   "n_heads",
    "n_kv_heads", "d_ff",       "max_seq_len", "positions", "rope_base", "norm",      "norm_eps",
    "mlp",       "tied_lm_head", "weights fingerprint", "kv_type", "window", "sinks", "max_tokens",
    "size",      "position",    "ring_start", "n_tokens",   "n_logits", "header checksum"};

// A stored value as messages show it: the enums' names (their codes in the
// file are fixed, whatever the enums' order), doubles, the fingerprint in hex.
inline std::string show(std::size_t field, std::uint64_t v) {
  const auto named = [v](std::initializer_list<const char*> names) {
    return v < names.size() ? std::string(names.begin()[v]) : io::text("unknown (", v, ")");
  };
  char buffer[40];
  switch (field) {
    case kPositions: return named({"none", "learned", "rope"});
    case kNorm: return named({"layer_norm", "rms_norm"});
    case kMlp: return named({"gelu", "swiglu"});
    case kRopeBase:
    case kNormEps: std::snprintf(buffer, sizeof buffer, "%.9g", io::bit_cast<double>(v)); break;
    case kFingerprint: std::snprintf(buffer, sizeof buffer, "%016llx", static_cast<unsigned long long>(v)); break;
    default: return std::to_string(v);
  }
  return buffer;
}

// The header's checksum: FNV-1a of its bytes before the checksum field.
inline std::uint64_t header_checksum(const std::uint64_t* f) {
  std::uint64_t h = io::kFnvStart;
  for (std::size_t i = 0; i < kHeaderChecksum; ++i) h = io::fnv1a(h, f[i]);
  return h;
}

// How errors name a session file.
inline std::string label(const std::string& name) { return "session file '" + name + "'"; }

template <typename... Parts>
[[noreturn]] void fail(const std::string& name, const Parts&... problem) {
  io::fail(label(name), problem...);
}

// f(), its std::invalid_argument turned into "kvcache: session file
// '<name>': <prefix><what>": the saved state is impossible.
template <typename F>
auto as_file_error(const std::string& name, const char* prefix, F&& f) {
  try {
    return f();
  } catch (const std::invalid_argument& e) {
    fail(name, prefix, e.what());
  }
}

// "token id X at index i is outside [0, vocab_size = V)" for the first id
// outside the vocabulary, or "" when there is none.
inline std::string bad_token(const std::vector<int>& tokens, std::uint64_t vocab_size) {
  for (std::size_t i = 0; i < tokens.size(); ++i)
    if (tokens[i] < 0 || static_cast<std::uint64_t>(tokens[i]) >= vocab_size)
      return io::text("token id ", tokens[i], " at index ", i, " is outside [0, vocab_size = ", vocab_size, ")");
  return "";
}

// The header fields the model determines (2 to 16: scalar size, shape,
// fingerprint), in file order, with the enums' codes of the table on top.
template <typename T>
void fill_model_fields(const Decoder<T>& decoder, std::uint64_t* f) {
  const ModelConfig& c = decoder.config();
  const std::uint64_t positions = c.positions == PositionEncoding::none      ? 0
                                  : c.positions == PositionEncoding::learned ? 1
                                                                             : 2;
  const std::uint64_t model[] = {sizeof(T),    c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.kv_heads(), c.d_ff,
                                 c.max_seq_len, positions,   io::bit_cast<std::uint64_t>(c.rope_base),
                                 c.norm == NormKind::layer_norm ? 0u : 1u, io::bit_cast<std::uint64_t>(c.norm_eps),
                                 c.mlp == MlpKind::gelu ? 0u : 1u,         c.tied_lm_head,
                                 weights_fingerprint(decoder)};
  static_assert(sizeof model / sizeof model[0] == kFingerprint - kScalarBytes + 1, "the model fields, in order");
  std::copy(std::begin(model), std::end(model), f + kScalarBytes);
}

// Throws std::invalid_argument, before anything is written, unless `session`
// was made by `decoder`'s model and `tokens` (and `last_logits`) can describe
// it; std::runtime_error on a host that cannot write the format.
template <typename T>
void check_saveable(const std::string& name, const Decoder<T>& decoder, const Session<T>& session,
                    const std::vector<int>& tokens, const RowVector<T>& last_logits) {
  const ModelConfig& c = decoder.config();
  const auto n_logits = static_cast<std::size_t>(last_logits.size());
  if (session.n_layers() != c.n_layers || session.cache(0).n_kv_heads() != c.kv_heads() ||
      session.cache(0).d_k() != c.d_k())
    io::invalid("save_session: the session was made for another model shape");
  if (tokens.size() != session.position())
    io::invalid("save_session: the session has been fed ", session.position(), " tokens but ", tokens.size(),
                " token ids were given (they must be the ids that produced the state)");
  const std::string bad = bad_token(tokens, c.vocab_size);
  if (!bad.empty()) io::invalid("save_session: ", bad);
  if (n_logits != 0 && n_logits != c.vocab_size)
    io::invalid("save_session: last_logits has ", n_logits, " entries, expected 0 or vocab_size = ", c.vocab_size);
  io::require_little_endian(label(name), "session files");
}

// Writes the whole file through put(bytes, n), which throws on failure.
template <typename T, typename Put>
void write_all(const Decoder<T>& decoder, const Session<T>& session, const std::vector<int>& tokens,
               const RowVector<T>& logits, Put&& put) {
  const auto n_logits = static_cast<std::size_t>(logits.size());
  std::uint64_t hash = io::kFnvStart;
  const auto emit = [&](const unsigned char* p, std::size_t n) {
    if (n == 0) return;
    hash = io::fnv1a(hash, p, n);
    put(p, n);
  };

  std::uint64_t f[kFields] = {io::get_le<std::uint64_t>(reinterpret_cast<const unsigned char*>(kMagic)), kVersion};
  fill_model_fields(decoder, f);
  const std::uint64_t kv_type = session.kv_type() == KVType::full ? 0 : session.kv_type() == KVType::bf16 ? 1 : 2;
  const std::uint64_t state[] = {kv_type,           session.window().window, session.window().sinks,
                                 session.max_tokens(), session.size(),        session.position(),
                                 session.ring_start(), tokens.size(),         n_logits};
  static_assert(sizeof state / sizeof state[0] == kNLogits - kKvType + 1, "the session fields, in order");
  std::copy(std::begin(state), std::end(state), f + kKvType);
  f[kHeaderChecksum] = header_checksum(f);
  unsigned char header[kHeaderBytes];
  for (std::size_t i = 0; i < kFields; ++i) io::put_le(f[i], header + 8 * i);
  emit(header, kHeaderBytes);

  for (const int id : tokens) {  // little-endian int32
    unsigned char b[4];
    io::put_le(static_cast<std::int32_t>(id), b);
    emit(b, 4);
  }
  emit(reinterpret_cast<const unsigned char*>(logits.data()), n_logits * sizeof(T));
  session.read_raw([&](const unsigned char* p, std::size_t n) { emit(p, n); });

  unsigned char checksum[8];
  io::put_le(hash, checksum);
  put(checksum, 8);
}

// Reads the header into f and checks it: the magic bytes, the version, the
// header's checksum, then the model it was saved for against the decoder's,
// naming the first field that differs (std::invalid_argument).
template <typename T>
void read_header(io::BoundedReader& reader, const std::string& name, const Decoder<T>& decoder, std::uint64_t* f) {
  std::size_t i = 0;
  reader.read_values<std::uint64_t>(kFields, "header", [&](std::uint64_t v) { f[i++] = v; });
  if (f[kMagicField] != io::get_le<std::uint64_t>(reinterpret_cast<const unsigned char*>(kMagic)))
    fail(name, "not a kvcache session file (wrong magic bytes)");
  if (f[kVersionField] != kVersion)
    fail(name, "format version ", f[kVersionField], ", this build reads version ", kVersion);
  if (header_checksum(f) != f[kHeaderChecksum]) fail(name, "header checksum mismatch: the file is damaged");
  std::uint64_t have[kFields] = {};
  fill_model_fields(decoder, have);
  for (std::size_t k = kScalarBytes; k < kFingerprint; ++k)
    if (f[k] != have[k])
      io::invalid(label(name), " was saved for ", kNames[k], " = ", show(k, f[k]), ", this model has ",
                  show(k, have[k]));
  if (f[kFingerprint] != have[kFingerprint])
    io::invalid(label(name), " was saved for a model of this shape with other weights (weights fingerprint ",
                show(kFingerprint, f[kFingerprint]), ", this model's ", show(kFingerprint, have[kFingerprint]), ")");
}

// The session options of the saved session, and an empty session made with
// them (its constructor checks the window and the limit, and it allocates
// nothing yet); then the saved state is checked against it.
template <typename T>
Session<T> empty_session_of(const std::string& name, const std::uint64_t* f, const Decoder<T>& decoder,
                            SessionOptions& options) {
  if (f[kKvType] > 2) fail(name, "unknown kv_type code ", f[kKvType], " (0 full, 1 bf16, 2 int8)");
  options.kv_type = f[kKvType] == 0 ? KVType::full : f[kKvType] == 1 ? KVType::bf16 : KVType::int8;
  const std::uint64_t max_seq_len = decoder.config().max_seq_len;
  if (f[kWindow] > max_seq_len || f[kSinks] > max_seq_len || f[kMaxTokens] == 0 || f[kMaxTokens] > max_seq_len)
    fail(name, "impossible window = ", f[kWindow], ", sinks = ", f[kSinks], " or max_tokens = ", f[kMaxTokens],
         " for max_seq_len = ", max_seq_len);
  options.window = SlidingWindow{static_cast<std::size_t>(f[kWindow]), static_cast<std::size_t>(f[kSinks])};
  options.max_tokens = static_cast<std::size_t>(f[kMaxTokens]);
  Session<T> probe = as_file_error(name, "impossible session options: ", [&] { return decoder.new_session(options); });
  if (probe.max_tokens() != f[kMaxTokens])
    fail(name, "max_tokens = ", f[kMaxTokens], " but a window of ", f[kWindow], " holds ", probe.max_tokens());
  if (f[kPosition] > static_cast<std::uint64_t>(std::numeric_limits<std::size_t>::max()))
    fail(name, "position = ", f[kPosition], " does not fit this platform");
  as_file_error(name, "", [&] {
    probe.check_state(static_cast<std::size_t>(f[kSize]), static_cast<std::size_t>(f[kPosition]),
                      static_cast<std::size_t>(f[kRingStart]));
  });
  if (f[kNTokens] != f[kPosition])
    fail(name, "n_tokens = ", f[kNTokens], " but position = ", f[kPosition], " (a token id per position)");
  if (f[kNLogits] != 0 && f[kNLogits] != f[kVocabSize])
    fail(name, "n_logits = ", f[kNLogits], ", expected 0 or vocab_size = ", f[kVocabSize]);
  return probe;
}

// Reads and checks a whole session file from `in`. `length`: the bytes
// left in `in`, when known.
template <typename T>
SavedSession<T> read_all(std::istream& in, const std::string& name, std::optional<std::uint64_t> length,
                         const Decoder<T>& decoder, const SessionLoadOptions& options) {
  io::require_little_endian(label(name), "session files");
  if (length && *length > options.max_bytes)
    fail(name, "the file has ", *length, " bytes, more than the limit of ", options.max_bytes);
  io::BoundedReader reader(in, label(name));
  std::uint64_t f[kFields];
  read_header(reader, name, decoder, f);
  SessionOptions session_options;
  const Session<T> probe = empty_session_of(name, f, decoder, session_options);

  // The length the header implies (size <= max_seq_len by now, but n_tokens
  // is bounded by nothing but the file): header, ids, logits, caches, checksum.
  const std::uint64_t slot_bytes = probe.cache(0).row_bytes(), layers = f[kNLayers], heads = f[kNKvHeads];
  std::uint64_t expected = io::sat_add(kHeaderBytes + 8, io::sat_mul(4, f[kNTokens]));
  expected = io::sat_add(expected, io::sat_mul(f[kNLogits], sizeof(T)));
  expected = io::sat_add(expected, io::sat_mul(io::sat_mul(2 * layers, heads), io::sat_mul(f[kSize], slot_bytes)));
  const std::uint64_t limit =
      std::min<std::uint64_t>(options.max_bytes, static_cast<std::uint64_t>(std::numeric_limits<std::ptrdiff_t>::max()));
  if (expected > limit)
    fail(name, "the header implies a file of ", io::count_string(expected), " bytes, more than the limit of ", limit);
  if (length) io::require_length(label(name), *length, expected);

  // Everything is consistent: allocate and read. With a known length the
  // token count was checked against it; without one (a pipe) nothing but
  // max_bytes bounds it, so the ids are stored as they arrive: a header
  // claiming 2^31 ids then costs what the stream really delivers, not 8 GB.
  const auto n_tokens = static_cast<std::size_t>(f[kNTokens]);
  std::vector<int> tokens;
  tokens.reserve(length ? n_tokens : std::min<std::size_t>(n_tokens, std::size_t{1} << 16));
  reader.read_values<std::int32_t>(n_tokens, "token ids", [&](std::int32_t id) { tokens.push_back(id); });
  RowVector<T> logits(static_cast<Eigen::Index>(f[kNLogits]));
  reader.read(reinterpret_cast<unsigned char*>(logits.data()), static_cast<std::size_t>(logits.size()) * sizeof(T),
              "logits");

  const auto size = static_cast<std::size_t>(f[kSize]);
  session_options.reserve_tokens = std::max(size, std::min(options.reserve_tokens, probe.max_tokens()));
  Session<T> session = decoder.new_session(session_options, options.pool);
  session.restore_state(size, static_cast<std::size_t>(f[kPosition]), static_cast<std::size_t>(f[kRingStart]));
  session.write_raw([&](unsigned char* p, std::size_t n) { reader.read(p, n, "caches"); });

  const std::uint64_t computed = reader.checksum();
  std::uint64_t stored = 0;
  reader.read_values<std::uint64_t>(1, "checksum", [&](std::uint64_t v) { stored = v; });
  if (stored != computed) fail(name, "checksum mismatch: the file is damaged");
  if (!length && in.peek() != std::char_traits<char>::eof())
    fail(name, "file has trailing bytes after the ", expected, " the header implies");
  const std::string bad = bad_token(tokens, f[kVocabSize]);
  if (!bad.empty()) fail(name, bad);
  return SavedSession<T>{std::move(tokens), std::move(session), std::move(logits)};
}

// Whether a file that starts with `p` is a session file kvcache may replace:
// it has the magic bytes (damaged, of another model or another version, it
// is still one of ours).
inline bool is_session_file(const io::FilePrefix& p) { return p.bytes.compare(0, 8, kMagic, 8) == 0; }

}  // namespace detail::session_file

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
  detail::session_file::check_saveable("<stream>", decoder, session, tokens, last_logits);
  const auto put = [&out](const unsigned char* p, std::size_t n) {
    out.write(reinterpret_cast<const char*>(p), static_cast<std::streamsize>(n));
    if (!out) detail::io::fail("write_session", "write error");
  };
  detail::session_file::write_all(decoder, session, tokens, last_logits, put);
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
  sf::check_saveable(path, decoder, session, tokens, last_logits);
  const auto write = [&](detail::io::FileSink& out) {
    sf::write_all(decoder, session, tokens, last_logits,
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
  std::ifstream in = detail::io::open_for_reading(path, sf::label(path));
  return sf::read_all(in, path, detail::io::file_length(in, sf::label(path)), decoder, options);
}

}  // namespace kvcache
