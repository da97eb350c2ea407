// Forking a session (Session::copy) and saving one to a file (session_file.hpp):
// a fork or a loaded session continues bit for bit as a fresh run of the same
// tokens, in every KV storage type, with and without a sliding window; and a
// file that does not fit (another model, truncated, a changed byte, trailing
// bytes, an impossible state) is refused with a clear error.
#include <gtest/gtest.h>

#include <algorithm>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <streambuf>
#include <string>
#include <vector>

#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <kvcache/decoder.hpp>
#include <kvcache/session_file.hpp>

#include "fixtures.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <sys/resource.h>
#endif

namespace {

namespace fs = std::filesystem;
using kvcache::Decoder;
using kvcache::KVCache;
using kvcache::KVType;
using kvcache::Logits;
using kvcache::ModelConfig;
using kvcache::SavedSession;
using kvcache::Session;
using kvcache::SessionOptions;
using kvcache::SlidingWindow;
using Mat = kvcache::Matrix<float>;

using fixtures::Storage;

// The storages the tests run through; the window holds 8 tokens, 2 of them sinks.
std::vector<Storage> storages() { return fixtures::storages({8, 2}); }

// A Llama-style model (RoPE, so that a window is allowed), GQA.
ModelConfig rope_model() { return fixtures::model(fixtures::variants()[4]); }

// Feeds `tokens` as the chunks given (their sizes add up to tokens.size())
// and returns every chunk's logits.
template <typename T>
std::vector<kvcache::Matrix<T>> feed(const Decoder<T>& d, Session<T>& s, const std::vector<int>& tokens,
                                     const std::vector<std::size_t>& chunks) {
  std::vector<kvcache::Matrix<T>> out;
  std::size_t at = 0;
  for (std::size_t m : chunks) {
    const std::vector<int> part(tokens.begin() + static_cast<std::ptrdiff_t>(at),
                                tokens.begin() + static_cast<std::ptrdiff_t>(at + m));
    out.push_back(d.forward(part, s));
    at += m;
  }
  return out;
}

// A continuation: a chunk of 3 tokens then 3 decode steps.
const std::vector<std::size_t> kContinuation = {3, 1, 1, 1};

// Every byte a session holds in its caches, in read_raw order.
template <typename T>
std::vector<unsigned char> raw_bytes(const Session<T>& s) {
  std::vector<unsigned char> bytes;
  s.read_raw([&](const unsigned char* p, std::size_t n) { bytes.insert(bytes.end(), p, p + n); });
  return bytes;
}

// The message of the E that f throws (a test failure if it throws nothing
// or something else).
template <typename E, typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw another exception: " << e.what();
    return "";
  }
  ADD_FAILURE() << "threw nothing";
  return "";
}

std::string temp_dir(const std::string& name) {
  const fs::path dir = fs::path(KVCACHE_TEST_TMP_DIR) / "session_tmp" / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void spill(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::vector<std::string> entries(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

// A stream that cannot seek: read_session must then find the end by reading.
class NonSeekable : public std::streambuf {
 public:
  explicit NonSeekable(std::string bytes) : bytes_(std::move(bytes)) {
    setg(bytes_.data(), bytes_.data(), bytes_.data() + bytes_.size());
  }

 private:
  std::string bytes_;
};

// FNV-1a 64 from its definition, to forge files whose checksums are right.
std::uint64_t fnv1a(const unsigned char* p, std::size_t n) {
  std::uint64_t h = 14695981039346656037ull;
  for (std::size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  return h;
}

void put_u64(std::string& bytes, std::size_t at, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) bytes[at + static_cast<std::size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xFF);
}

// Makes both checksums of a session file right again.
std::string fix_checksums(std::string bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  put_u64(bytes, 208, fnv1a(p, 208));
  put_u64(bytes, bytes.size() - 8, fnv1a(p, bytes.size() - 8));
  return bytes;
}

// Sets header field `field` (see the table in session_file.hpp), checksums
// made right.
std::string forge(std::string bytes, std::size_t field, std::uint64_t value) {
  put_u64(bytes, 8 * field, value);
  return fix_checksums(std::move(bytes));
}

// A session of `storage` fed `n` tokens, with the ids and the last logits.
struct Fed {
  std::vector<int> tokens;
  Session<float> session;
  kvcache::RowVector<float> last_logits;
};

Fed fed_session(const Decoder<float>& d, const Storage& storage, std::size_t n = 13) {
  Fed f{fixtures::random_tokens(n, d.config().vocab_size, 7), d.new_session(storage.options()), {}};
  const auto logits = feed(d, f.session, f.tokens, {n - 3, 1, 1, 1});
  f.last_logits = logits.back().row(0);
  return f;
}

std::string saved_bytes(const Decoder<float>& d, const Fed& f, bool with_logits = true) {
  std::ostringstream out(std::ios::binary);
  kvcache::write_session(out, d, f.session, f.tokens,
                         with_logits ? f.last_logits : kvcache::RowVector<float>());
  return out.str();
}

SavedSession<float> read_bytes(const std::string& bytes, const Decoder<float>& d,
                               const kvcache::SessionLoadOptions& o = {}) {
  std::istringstream in(bytes, std::ios::binary);
  return kvcache::read_session(in, d, o, "bytes");
}

}  // namespace

// ============================================================================
// Forking
// ============================================================================

// After a shared prefix (13 tokens: past the window of 8, so its ring has
// wrapped), the session is copied; the original and the copy continue with
// different tokens, and each gives exactly the logits of a fresh session fed
// the prefix and then its continuation in the same chunks.
TEST(Fork, EachContinuationEqualsAFreshRunBitForBit) {
  const std::vector<fixtures::Variant> variants = {fixtures::variants()[1], fixtures::variants()[4]};
  for (const auto& v : variants) {
    const ModelConfig c = fixtures::model(v);
    const Decoder<float> d = fixtures::make_decoder<float>(c);
    const auto prefix = fixtures::random_tokens(13, c.vocab_size, 1);
    const auto x = fixtures::random_tokens(6, c.vocab_size, 2), y = fixtures::random_tokens(6, c.vocab_size, 3);
    for (const Storage& s : storages()) {
      if (s.window.window != 0 && v.positions != kvcache::PositionEncoding::rope) continue;
      const std::string what = v.name + " " + s.name();
      Session<float> base = d.new_session(s.options());
      feed(d, base, prefix, {9, 1, 3});
      Session<float> fork = base.copy();
      EXPECT_EQ(raw_bytes(fork), raw_bytes(base)) << what;
      EXPECT_EQ(fork.ring_start(), base.ring_start()) << what;
      // The fork goes first: continuing it must not disturb the original.
      const auto from_fork = feed(d, fork, y, kContinuation);
      const auto from_base = feed(d, base, x, kContinuation);
      for (const auto* pair : {&x, &y}) {
        Session<float> fresh = d.new_session(s.options());
        feed(d, fresh, prefix, {9, 1, 3});
        const auto expected = feed(d, fresh, *pair, kContinuation);
        const auto& got = pair == &x ? from_base : from_fork;
        for (std::size_t i = 0; i < expected.size(); ++i)
          EXPECT_EQ(got[i], expected[i]) << what << (pair == &x ? " original" : " fork") << ", chunk " << i;
      }
      EXPECT_EQ(base.position(), 19u);
      EXPECT_EQ(fork.position(), 19u);
    }
  }
}

// ============================================================================
// Raw state
// ============================================================================

TEST(RawState, ReadRawVisitsEveryHeldSlotOfEveryArray) {
  for (const Storage& s : storages()) {
    KVCache<float> c(3, 4, 0, s.type, s.window);
    c.reserve(20);
    const Mat K = Mat::Random(5, 12), V = Mat::Random(5, 12);
    c.append(K, V);
    std::vector<std::size_t> sizes;
    c.read_raw([&](const unsigned char*, std::size_t n) { sizes.push_back(n); });
    const std::size_t arrays = s.type == KVType::int8 ? 4 : 2;
    ASSERT_EQ(sizes.size(), arrays * 3) << s.name();
    std::size_t total = 0;
    for (std::size_t n : sizes) total += n;
    EXPECT_EQ(total, 2 * 3 * 5 * c.row_bytes()) << s.name();  // held slots only, not the capacity of 20
    if (s.type == KVType::full) {  // keys of head 0 first: exactly its view
      c.read_raw([&, first = true](const unsigned char* p, std::size_t n) mutable {
        if (first) {
          EXPECT_EQ(std::memcmp(p, c.keys(0).data(), n), 0);
        }
        first = false;
      });
    }
  }
}

TEST(RawState, RestoreThenWriteRawRebuildsTheCache) {
  for (const Storage& s : storages()) {
    KVCache<float> a(2, 4, 0, s.type, s.window);
    a.append(Mat::Random(11, 8), Mat::Random(11, 8));  // wraps a window of 8
    std::vector<unsigned char> bytes;
    a.read_raw([&](const unsigned char* p, std::size_t n) { bytes.insert(bytes.end(), p, p + n); });
    KVCache<float> b(2, 4, 0, s.type, s.window);
    b.restore_state(a.size(), a.position(), a.ring_start());
    std::size_t at = 0;
    b.write_raw([&](unsigned char* p, std::size_t n) {
      std::memcpy(p, bytes.data() + at, n);
      at += n;
    });
    EXPECT_EQ(at, bytes.size());
    EXPECT_EQ(b.size(), a.size());
    EXPECT_EQ(b.position(), a.position());
    EXPECT_EQ(b.ring_start(), a.ring_start());
    Mat ka(1, 4), kb(1, 4);
    for (std::size_t i = 0; i < a.size(); ++i) {
      a.load_keys(1, a.slot_of(i), 1, ka.data());
      b.load_keys(1, b.slot_of(i), 1, kb.data());
      EXPECT_EQ(ka, kb) << s.name() << " token " << i;
    }
  }
}

TEST(RawState, ImpossibleStatesAreRefusedAndChangeNothing) {
  KVCache<float> plain(2, 4, 10);
  KVCache<float> windowed(2, 4, 0, KVType::full, SlidingWindow{8, 2});
  struct Case {
    KVCache<float>* cache;
    std::size_t size, position, ring_start;
    const char* why;
  };
  const Case cases[] = {
      {&plain, 3, 4, 0, "position == size"},      {&plain, 3, 3, 1, "ring_start == 0"},
      {&plain, 11, 11, 0, "max_tokens = 10"},     {&windowed, 9, 9, 0, "max_tokens = 8"},
      {&windowed, 5, 4, 0, "position < size"},    {&windowed, 8, 20, 6, "ring_start >= window - sinks = 6"},
      {&windowed, 7, 20, 1, "only a full window"},
  };
  for (const Case& c : cases) {
    const std::string message =
        error_of<std::invalid_argument>([&] { c.cache->restore_state(c.size, c.position, c.ring_start); });
    EXPECT_NE(message.find(c.why), std::string::npos) << message;
    EXPECT_EQ(c.cache->size(), 0u);
    EXPECT_EQ(c.cache->capacity(), 0u);
  }
  // States appends and truncates reach are accepted.
  windowed.restore_state(8, 20, 5);
  EXPECT_EQ(windowed.ring_start(), 5u);
  windowed.restore_state(5, 20, 0);  // a truncated window
  plain.restore_state(10, 10, 0);
}

TEST(RawState, SessionRestoreIsAllOrNothing) {
  const Decoder<float> d = fixtures::make_decoder<float>(rope_model());
  Session<float> s = d.new_session(SessionOptions{10, 0, KVType::full, {}});
  EXPECT_THROW(s.restore_state(11, 11, 0), std::invalid_argument);
  EXPECT_EQ(s.kv_bytes(), 0u);
  s.restore_state(4, 4, 0);
  for (std::size_t l = 0; l < s.n_layers(); ++l) EXPECT_EQ(s.cache(l).size(), 4u);
}

// ============================================================================
// Session files: round trips
// ============================================================================

// Saved and loaded, a session continues exactly as the original: every KV
// type, a window that has not wrapped (5 tokens) and one that has (13).
TEST(SessionFile, LoadedSessionContinuesBitForBit) {
  const Decoder<float> d = fixtures::make_decoder<float>(rope_model());
  const std::string dir = temp_dir("round_trip");
  const auto next = fixtures::random_tokens(6, d.config().vocab_size, 9);
  for (const Storage& s : storages())
    for (std::size_t n : {5u, 13u}) {
      const std::string what = s.name() + ", " + std::to_string(n) + " tokens";
      Fed original = fed_session(d, s, n);
      const std::string path = dir + "/" + s.name() + std::to_string(n) + ".kvs";
      kvcache::save_session(path, d, original.session, original.tokens, original.last_logits);
      SavedSession<float> loaded = kvcache::load_session(path, d);

      EXPECT_EQ(loaded.tokens, original.tokens) << what;
      EXPECT_EQ(loaded.last_logits, original.last_logits) << what;
      const Session<float>& l = loaded.session;
      EXPECT_EQ(l.kv_type(), s.type) << what;
      EXPECT_EQ(l.window().window, s.window.window) << what;
      EXPECT_EQ(l.window().sinks, s.window.sinks) << what;
      EXPECT_EQ(l.max_tokens(), original.session.max_tokens()) << what;
      EXPECT_EQ(l.size(), original.session.size()) << what;
      EXPECT_EQ(l.position(), n) << what;
      EXPECT_EQ(l.ring_start(), original.session.ring_start()) << what;
      if (s.window.window != 0 && n == 13) {
        EXPECT_NE(l.ring_start(), 0u) << what << ": the window should have wrapped";
      }
      EXPECT_EQ(raw_bytes(l), raw_bytes(original.session)) << what;

      const auto a = feed(d, original.session, next, kContinuation);
      const auto b = feed(d, loaded.session, next, kContinuation);
      for (std::size_t i = 0; i < a.size(); ++i) EXPECT_EQ(b[i], a[i]) << what << ", chunk " << i;
    }
}

TEST(SessionFile, StreamsRoundTripAndLogitsAreOptional) {
  const Decoder<float> d = fixtures::make_decoder<float>(rope_model());
  const Fed f = fed_session(d, {KVType::int8, {8, 2}});
  const std::string with = saved_bytes(d, f), without = saved_bytes(d, f, false);
  EXPECT_EQ(with.size(), without.size() + 4 * d.config().vocab_size);
  EXPECT_EQ(read_bytes(with, d).last_logits, f.last_logits);
  EXPECT_EQ(read_bytes(without, d).last_logits.size(), 0);
  // A stream that cannot seek is read to its end.
  NonSeekable buffer(with);
  std::istream in(&buffer);
  const SavedSession<float> loaded = kvcache::read_session(in, d, kvcache::SessionLoadOptions{});
  EXPECT_EQ(loaded.tokens, f.tokens);
  EXPECT_EQ(raw_bytes(loaded.session), raw_bytes(f.session));
}

TEST(SessionFile, DoubleSessionsRoundTrip) {
  const ModelConfig c = rope_model();
  const Decoder<double> d = fixtures::make_decoder<double>(c);
  const auto tokens = fixtures::random_tokens(9, c.vocab_size, 4), next = fixtures::random_tokens(4, c.vocab_size, 5);
  Session<double> s = d.new_session();
  d.forward(tokens, s);
  std::stringstream file;
  kvcache::write_session(file, d, s, tokens);
  SavedSession<double> loaded = kvcache::read_session(file, d, kvcache::SessionLoadOptions{});
  EXPECT_EQ(d.forward(next, loaded.session), d.forward(next, s));
}

TEST(SessionFile, FileLengthIsTheHeaderTheTokensTheLogitsAndTheHeldSlots) {
  const Decoder<float> d = fixtures::make_decoder<float>(rope_model());
  const ModelConfig& c = d.config();
  for (const Storage& s : storages()) {
    const Fed f = fed_session(d, s, 13);
    const std::size_t held = f.session.size();  // 13, or 8 with the window
    const std::size_t expected = 216 + 4 * 13 + 4 * c.vocab_size +
                                 c.n_layers * 2 * c.kv_heads() * held * f.session.cache(0).row_bytes() + 8;
    EXPECT_EQ(saved_bytes(d, f).size(), expected) << s.name();
  }
}

// Version 1 files stay readable and are written byte for byte as before:
// the file is built here from the format table at the top of
// session_file.hpp (not by the code under test), then loaded, and
// write_session must produce exactly these bytes. Every header field is
// exercised: untied head, a wrapped window with sinks, int8 storage, logits.
TEST(SessionFile, Version1BytesBuiltFromTheFormatTableLoadAndAreWrittenAgain) {
  ModelConfig c = rope_model();
  c.tied_lm_head = false;
  const Decoder<float> d = fixtures::make_decoder<float>(c);
  const Fed f = fed_session(d, {KVType::int8, {8, 2}}, 13);
  ASSERT_NE(f.session.ring_start(), 0u);
  const Session<float>& s = f.session;

  const auto u64 = [](std::string& out, std::uint64_t v) {
    for (int i = 0; i < 8; ++i) out += static_cast<char>((v >> (8 * i)) & 0xFF);
  };
  const auto bits = [](double x) {
    std::uint64_t b;
    std::memcpy(&b, &x, 8);
    return b;
  };
  std::string bytes("KVCSESS\0", 8);
  u64(bytes, 1);                   // version
  u64(bytes, 4);                   // scalar_bytes
  u64(bytes, c.vocab_size);
  u64(bytes, c.d_model);
  u64(bytes, c.n_layers);
  u64(bytes, c.n_heads);
  u64(bytes, c.kv_heads());
  u64(bytes, c.d_ff);
  u64(bytes, c.max_seq_len);
  u64(bytes, 2);                   // positions: rope
  u64(bytes, bits(c.rope_base));
  u64(bytes, c.norm == kvcache::NormKind::rms_norm ? 1 : 0);
  u64(bytes, bits(c.norm_eps));
  u64(bytes, c.mlp == kvcache::MlpKind::swiglu ? 1 : 0);
  u64(bytes, 0);                   // tied_lm_head
  u64(bytes, kvcache::weights_fingerprint(d));
  u64(bytes, 2);                   // kv_type: int8
  u64(bytes, 8);                   // window
  u64(bytes, 2);                   // sinks
  u64(bytes, s.max_tokens());
  u64(bytes, s.size());
  u64(bytes, s.position());
  u64(bytes, s.ring_start());
  u64(bytes, f.tokens.size());
  u64(bytes, c.vocab_size);        // n_logits
  ASSERT_EQ(bytes.size(), 208u);
  u64(bytes, fnv1a(reinterpret_cast<const unsigned char*>(bytes.data()), 208));
  for (const int id : f.tokens)
    for (int i = 0; i < 4; ++i) bytes += static_cast<char>((static_cast<std::uint32_t>(id) >> (8 * i)) & 0xFF);
  bytes.append(reinterpret_cast<const char*>(f.last_logits.data()), 4 * c.vocab_size);
  const std::vector<unsigned char> raw = raw_bytes(s);
  bytes.append(raw.begin(), raw.end());
  u64(bytes, fnv1a(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size()));

  const SavedSession<float> loaded = read_bytes(bytes, d);
  EXPECT_EQ(loaded.tokens, f.tokens);
  EXPECT_EQ(loaded.last_logits, f.last_logits);
  EXPECT_EQ(loaded.session.ring_start(), s.ring_start());
  EXPECT_EQ(raw_bytes(loaded.session), raw);
  EXPECT_TRUE(saved_bytes(d, f) == bytes) << "write_session no longer writes format version 1 byte for byte";
}

TEST(SessionFile, ReserveTokensMakesRoomToContinue) {
  const Decoder<float> d = fixtures::make_decoder<float>(rope_model());
  const Fed f = fed_session(d, {KVType::full, {}});
  kvcache::SessionLoadOptions o;
  o.reserve_tokens = 40;
  EXPECT_EQ(read_bytes(saved_bytes(d, f), d, o).session.cache(0).capacity(), 40u);
  o.reserve_tokens = 1000;  // past max_seq_len = 48: as much as the session may hold
  EXPECT_EQ(read_bytes(saved_bytes(d, f), d, o).session.cache(0).capacity(), 48u);
  EXPECT_EQ(read_bytes(saved_bytes(d, f), d).session.cache(0).capacity(), 13u);
}

// ============================================================================
// Session files: what is refused
// ============================================================================

TEST(SessionFile, AnotherModelIsRefusedNamingTheField) {
  const ModelConfig c = rope_model();
  const Decoder<float> d = fixtures::make_decoder<float>(c);
  const std::string dir = temp_dir("other_model");
  const std::string path = dir + "/s.kvs";
  const Fed f = fed_session(d, {KVType::full, {}});
  kvcache::save_session(path, d, f.session, f.tokens, f.last_logits);

  struct Change {
    std::function<void(ModelConfig&)> apply;
    std::string expected;
  };
  const std::vector<Change> changes = {
      {[](ModelConfig& m) { m.n_layers = 3; }, "was saved for n_layers = 2, this model has 3"},
      {[](ModelConfig& m) { m.vocab_size = 40; }, "vocab_size = 37, this model has 40"},
      {[](ModelConfig& m) { m.d_model = 48; }, "d_model = 32, this model has 48"},
      {[](ModelConfig& m) { m.n_heads = 2; m.n_kv_heads = 2; }, "n_heads = 4, this model has 2"},
      {[](ModelConfig& m) { m.n_kv_heads = 4; }, "n_kv_heads = 2, this model has 4"},
      {[](ModelConfig& m) { m.d_ff = 64; }, "d_ff = 48, this model has 64"},
      {[](ModelConfig& m) { m.max_seq_len = 64; }, "max_seq_len = 48, this model has 64"},
      {[](ModelConfig& m) { m.positions = kvcache::PositionEncoding::none; }, "positions = rope, this model has none"},
      {[](ModelConfig& m) { m.rope_base = 500000.0; }, "rope_base = 10000, this model has 500000"},
      {[](ModelConfig& m) { m.norm = kvcache::NormKind::layer_norm; }, "norm = rms_norm, this model has layer_norm"},
      {[](ModelConfig& m) { m.norm_eps = 1e-6; }, "norm_eps = 1e-05, this model has 1e-06"},
      {[](ModelConfig& m) { m.mlp = kvcache::MlpKind::gelu; }, "mlp = swiglu, this model has gelu"},
      {[](ModelConfig& m) { m.tied_lm_head = true; }, "tied_lm_head = 0, this model has 1"},
  };
  for (const Change& change : changes) {
    ModelConfig other = c;
    change.apply(other);
    const Decoder<float> e = fixtures::make_decoder<float>(other);
    const std::string message = error_of<std::invalid_argument>([&] { kvcache::load_session(path, e); });
    EXPECT_NE(message.find(change.expected), std::string::npos) << message;
    EXPECT_NE(message.find(path), std::string::npos) << message;
  }
  // Same shape, other weights.
  const Decoder<float> reseeded = fixtures::make_decoder<float>(c, 43);
  EXPECT_NE(kvcache::weights_fingerprint(reseeded), kvcache::weights_fingerprint(d));
  EXPECT_EQ(kvcache::weights_fingerprint(fixtures::make_decoder<float>(c)), kvcache::weights_fingerprint(d));
  EXPECT_NE(error_of<std::invalid_argument>([&] { kvcache::load_session(path, reseeded); }).find("other weights"),
            std::string::npos);
  // The same weights stored as bfloat16: they compute other keys and values.
  const Decoder<float> rounded(c, kvcache::random_weights<float>(c, 42), kvcache::WeightType::bf16);
  EXPECT_NE(kvcache::weights_fingerprint(rounded), kvcache::weights_fingerprint(d));
  EXPECT_NE(error_of<std::invalid_argument>([&] { kvcache::load_session(path, rounded); }).find("other weights"),
            std::string::npos);
  // Another scalar type.
  const Decoder<double> wide = fixtures::make_decoder<double>(c);
  EXPECT_NE(error_of<std::invalid_argument>([&] { kvcache::load_session(path, wide); })
                .find("sizeof(T) = 4, this model has 8"),
            std::string::npos);
}

TEST(SessionFile, EveryTruncationIsRefused) {
  const Decoder<float> d = fixtures::make_decoder<float>(rope_model());
  const std::string bytes = saved_bytes(d, fed_session(d, {KVType::int8, {8, 2}}));
  for (std::size_t n = 0; n < bytes.size(); ++n) {
    const std::string cut = bytes.substr(0, n);
    const std::string message = error_of<std::runtime_error>([&] { read_bytes(cut, d); });
    EXPECT_NE(message.find("truncated"), std::string::npos) << n << ": " << message;
    // Without a length to check up front, the read runs out.
    if (n % 97 == 0 || n + 1 == bytes.size()) {
      NonSeekable buffer(cut);
      std::istream in(&buffer);
      EXPECT_THROW(kvcache::read_session(in, d, kvcache::SessionLoadOptions{}), std::runtime_error) << n;
    }
  }
  // A file on disk, cut in the caches.
  const std::string path = temp_dir("truncated") + "/s.kvs";
  spill(path, bytes.substr(0, bytes.size() - 100));
  const std::string message = error_of<std::runtime_error>([&] { kvcache::load_session(path, d); });
  EXPECT_NE(message.find("file is truncated: the header implies"), std::string::npos) << message;
  EXPECT_NE(message.find(path), std::string::npos) << message;
}

TEST(SessionFile, EveryChangedByteIsRefused) {
  const Decoder<float> d = fixtures::make_decoder<float>(rope_model());
  for (const Storage& s : {Storage{KVType::full, {}}, Storage{KVType::int8, {8, 2}}}) {
    const std::string bytes = saved_bytes(d, fed_session(d, s));
    for (std::size_t i = 0; i < bytes.size(); ++i)
      for (unsigned char flip : {0x01, 0x80}) {
        std::string changed = bytes;
        changed[i] = static_cast<char>(static_cast<unsigned char>(changed[i]) ^ flip);
        // Damage reads as damage (runtime_error), never as another model.
        EXPECT_THROW(read_bytes(changed, d), std::runtime_error) << s.name() << ", byte " << i;
      }
  }
}

TEST(SessionFile, TrailingBytesAreRefused) {
  const Decoder<float> d = fixtures::make_decoder<float>(rope_model());
  const std::string bytes = saved_bytes(d, fed_session(d, {KVType::bf16, {}}));
  for (const std::string& extra : {std::string(1, '\0'), std::string(100, 'x')}) {
    const std::string message = error_of<std::runtime_error>([&] { read_bytes(bytes + extra, d); });
    EXPECT_NE(message.find("trailing bytes"), std::string::npos) << message;
    NonSeekable buffer(bytes + extra);
    std::istream in(&buffer);
    EXPECT_NE(error_of<std::runtime_error>([&] { kvcache::read_session(in, d, kvcache::SessionLoadOptions{}); })
                  .find("trailing bytes"),
              std::string::npos);
  }
}

TEST(SessionFile, ByteLimitRefusesBeforeReading) {
  const Decoder<float> d = fixtures::make_decoder<float>(rope_model());
  const std::string bytes = saved_bytes(d, fed_session(d, {KVType::full, {}}));
  kvcache::SessionLoadOptions o;
  o.max_bytes = bytes.size() - 1;
  EXPECT_NE(error_of<std::runtime_error>([&] { read_bytes(bytes, d, o); }).find("more than the limit"),
            std::string::npos);
  NonSeekable buffer(bytes);
  std::istream in(&buffer);
  EXPECT_NE(error_of<std::runtime_error>([&] { kvcache::read_session(in, d, o); }).find("more than the limit"),
            std::string::npos);
  o.max_bytes = bytes.size();
  EXPECT_NO_THROW(read_bytes(bytes, d, o));
}

// Files whose checksums are right but whose content is not: what a buggy or
// hostile writer could produce.
TEST(SessionFile, ImpossibleContentIsRefused) {
  const Decoder<float> d = fixtures::make_decoder<float>(rope_model());
  const std::string bytes = saved_bytes(d, fed_session(d, {KVType::full, {8, 2}}, 13));
  struct Case {
    std::size_t field;
    std::uint64_t value;
    const char* expected;
  };
  const Case cases[] = {
      {1, 2, "format version 2, this build reads version 1"},
      {17, 7, "unknown kv_type code 7"},
      {18, 49, "impossible window"},
      {19, 8, "impossible session options"},             // sinks = window
      {20, 7, "max_tokens = 7 but a window of 8"},
      {21, 9, "size > max_tokens = 8"},
      {23, 6, "ring_start >= window - sinks = 6"},
      {22, 7, "position < size"},
      {24, 12, "n_tokens = 12 but position = 13"},
      {25, 5, "n_logits = 5"},
      {22, 1ull << 62, "n_tokens = 13 but position"},
      {21, 7, "only a full window"},
  };
  for (const Case& c : cases) {
    const std::string message = error_of<std::runtime_error>([&] { read_bytes(forge(bytes, c.field, c.value), d); });
    EXPECT_NE(message.find(c.expected), std::string::npos) << "field " << c.field << ": " << message;
  }
  // Counts that would need terabytes or more fail the length check before
  // any allocation.
  const auto with_tokens = [&](std::uint64_t n) { return forge(forge(bytes, 22, n), 24, n); };
  EXPECT_NE(error_of<std::runtime_error>([&] { read_bytes(with_tokens(1ull << 40), d); })
                .find("file is truncated: the header implies 439804651"),
            std::string::npos);
  EXPECT_NE(error_of<std::runtime_error>([&] { read_bytes(with_tokens(1ull << 61), d); })
                .find("the header implies a file of 922337203685477"),
            std::string::npos);
  EXPECT_NE(error_of<std::runtime_error>([&] { read_bytes(with_tokens(~0ull), d); }).find("more than 2^64"),
            std::string::npos);
  // A token id outside the vocabulary (the first id, right after the header).
  std::string bad_id = bytes;
  put_u64(bad_id, 216, 37);  // ids 0 and 1: 37, 0
  bad_id = fix_checksums(bad_id);
  EXPECT_NE(error_of<std::runtime_error>([&] { read_bytes(bad_id, d); })
                .find("token id 37 at index 0 is outside [0, vocab_size = 37)"),
            std::string::npos);
  // Not a session file at all.
  EXPECT_NE(error_of<std::runtime_error>([&] { read_bytes(std::string(300, 'A'), d); }).find("not a kvcache session"),
            std::string::npos);
}

TEST(SessionFile, MissingOrUnreadableFilesNameThePath) {
  const Decoder<float> d = fixtures::make_decoder<float>(rope_model());
  const std::string dir = temp_dir("missing");
  EXPECT_NE(error_of<std::runtime_error>([&] { kvcache::load_session(dir + "/absent.kvs", d); })
                .find(dir + "/absent.kvs': no such file"),
            std::string::npos);
  EXPECT_NE(error_of<std::runtime_error>([&] { kvcache::load_session(dir, d); }).find("is a directory"),
            std::string::npos);
}

// ============================================================================
// Session files: saving
// ============================================================================

TEST(SessionFile, BadArgumentsWriteNothing) {
  const Decoder<float> d = fixtures::make_decoder<float>(rope_model());
  const std::string dir = temp_dir("bad_arguments");
  const std::string path = dir + "/s.kvs";
  Fed f = fed_session(d, {KVType::full, {}});
  std::vector<int> short_tokens(f.tokens.begin(), f.tokens.end() - 1);
  EXPECT_NE(error_of<std::invalid_argument>([&] { kvcache::save_session(path, d, f.session, short_tokens); })
                .find("fed 13 tokens but 12 token ids"),
            std::string::npos);
  std::vector<int> bad_id = f.tokens;
  bad_id[3] = 37;
  EXPECT_NE(error_of<std::invalid_argument>([&] { kvcache::save_session(path, d, f.session, bad_id); })
                .find("token id 37 at index 3"),
            std::string::npos);
  EXPECT_NE(error_of<std::invalid_argument>([&] {
              kvcache::save_session(path, d, f.session, f.tokens, kvcache::RowVector<float>(5));
            }).find("last_logits has 5 entries"),
            std::string::npos);
  ModelConfig other = rope_model();
  other.n_layers = 3;
  const Decoder<float> e = fixtures::make_decoder<float>(other);
  EXPECT_THROW(kvcache::save_session(path, e, f.session, f.tokens), std::invalid_argument);
  EXPECT_NE(error_of<std::invalid_argument>([&] { kvcache::save_session("", d, f.session, f.tokens); })
                .find("empty file name"),
            std::string::npos);
  EXPECT_TRUE(entries(dir).empty());
}

// save_session never writes over a file kvcache did not write: a file of
// another kind (even empty, even a prefix of the magic), a symbolic link (to
// a session file or not), a FIFO or a device is refused with a message
// naming it and left exactly as it was (content, type, time). A session file
// (the magic bytes) may be replaced however damaged it is.
TEST(SessionFile, SavingRefusesToReplaceWhatKvcacheDidNotWrite) {
  const Decoder<float> d = fixtures::make_decoder<float>(rope_model());
  const std::string dir = temp_dir("refuse");
  const Fed f = fed_session(d, {KVType::full, {}}, 5);
  const auto save = [&](const std::string& path) { kvcache::save_session(path, d, f.session, f.tokens); };
  const auto refused = [&](const std::string& path, const std::string& what) {
    struct stat before;
    ASSERT_EQ(::lstat(path.c_str(), &before), 0) << path;
    const std::string content = fs::is_regular_file(fs::symlink_status(path)) ? slurp(path) : "";
    const std::string message = error_of<std::runtime_error>([&] { save(path); });
    EXPECT_NE(message.find("'" + path + "'"), std::string::npos) << message;
    EXPECT_NE(message.find(what + "refusing to replace it"), std::string::npos) << message;
    EXPECT_THROW(kvcache::check_session_replaceable(path), std::runtime_error) << path;
    struct stat after;
    ASSERT_EQ(::lstat(path.c_str(), &after), 0) << path;
    EXPECT_EQ(after.st_mode, before.st_mode) << path;
    EXPECT_EQ(after.st_ino, before.st_ino) << path;
    EXPECT_EQ(after.st_mtim.tv_sec, before.st_mtim.tv_sec) << path;
    EXPECT_EQ(after.st_mtim.tv_nsec, before.st_mtim.tv_nsec) << path;
    if (S_ISREG(before.st_mode)) {
      EXPECT_EQ(slurp(path), content) << path;
    }
  };
  spill(dir + "/notes.txt", "my notes\n");
  refused(dir + "/notes.txt", "exists and is not a kvcache session file; ");
  spill(dir + "/empty", "");
  refused(dir + "/empty", "exists and is not a kvcache session file; ");
  spill(dir + "/prefix", std::string("KVCSESS", 7));
  refused(dir + "/prefix", "exists and is not a kvcache session file; ");
  save(dir + "/good.kvs");
  fs::create_symlink(dir + "/good.kvs", dir + "/link.kvs");
  refused(dir + "/link.kvs", "is a symbolic link, not a kvcache session file; ");
  fs::create_symlink(dir + "/notes.txt", dir + "/link.txt");
  refused(dir + "/link.txt", "is a symbolic link, not a kvcache session file; ");
  fs::create_symlink(dir + "/absent", dir + "/dangling");
  refused(dir + "/dangling", "is a symbolic link, not a kvcache session file; ");
  ASSERT_EQ(::mkfifo((dir + "/fifo").c_str(), 0600), 0);
  refused(dir + "/fifo", "is a FIFO, not a kvcache session file; ");
  // A device node of its own (a copy of /dev/null; root only): never a real
  // /dev path, which a broken save would destroy for the whole machine.
  if (::mknod((dir + "/null").c_str(), S_IFCHR | 0666, ::makedev(1, 3)) == 0) {
    refused(dir + "/null", "is a device, not a kvcache session file; ");
    fs::remove(dir + "/null");
  }
  EXPECT_EQ(slurp(dir + "/notes.txt"), "my notes\n");
  EXPECT_FALSE(fs::exists(dir + "/absent"));
  EXPECT_NO_THROW(kvcache::check_session_replaceable(dir + "/absent"));

  // A damaged session file, or one of another version, is one of ours.
  std::string damaged = slurp(dir + "/good.kvs");
  damaged.resize(100);
  spill(dir + "/damaged.kvs", damaged);
  save(dir + "/damaged.kvs");
  EXPECT_EQ(kvcache::load_session(dir + "/damaged.kvs", d).tokens, f.tokens);
  spill(dir + "/magic-only.kvs", std::string("KVCSESS\0", 8));
  save(dir + "/magic-only.kvs");
  EXPECT_EQ(kvcache::load_session(dir + "/magic-only.kvs", d).tokens, f.tokens);
  // Nothing else appeared: no temporary file.
  EXPECT_EQ(entries(dir), (std::vector<std::string>{"damaged.kvs", "dangling", "empty", "fifo", "good.kvs",
                                                    "link.kvs", "link.txt", "magic-only.kvs", "notes.txt", "prefix"}));
}

// Writing goes to a temporary file that is renamed into place: when writing
// fails the target keeps its old content and no temporary file is left.
TEST(SessionFile, SavingIsAtomic) {
  const Decoder<float> d = fixtures::make_decoder<float>(rope_model());
  const std::string dir = temp_dir("atomic");
  const std::string path = dir + "/s.kvs";
  const Fed first = fed_session(d, {KVType::full, {}}, 5), second = fed_session(d, {KVType::int8, {}}, 9);

  kvcache::save_session(path, d, first.session, first.tokens);
  const std::string before = slurp(path);
  EXPECT_EQ(entries(dir), std::vector<std::string>{"s.kvs"});
  // Overwriting replaces the whole file.
  kvcache::save_session(path, d, second.session, second.tokens);
  EXPECT_EQ(kvcache::load_session(path, d).tokens, second.tokens);
  kvcache::save_session(path, d, first.session, first.tokens);
  EXPECT_EQ(slurp(path), before);

  // The target is a directory: refused before anything is written.
  const std::string occupied = dir + "/occupied";
  fs::create_directories(occupied + "/inside");
  const std::string message =
      error_of<std::runtime_error>([&] { kvcache::save_session(occupied, d, second.session, second.tokens); });
  EXPECT_NE(message.find("is a directory, not a kvcache session file; refusing to replace it"), std::string::npos)
      << message;
  EXPECT_TRUE(fs::is_directory(occupied + "/inside"));
  EXPECT_EQ(entries(dir), (std::vector<std::string>{"occupied", "s.kvs"}));

  // The temporary file cannot be created: no such directory.
  EXPECT_NE(error_of<std::runtime_error>([&] {
              kvcache::save_session(dir + "/absent/s.kvs", d, second.session, second.tokens);
            }).find("cannot create a temporary file"),
            std::string::npos);

  // The directory is read-only. Root may write anyway (and CI runs as
  // root): then the probe succeeds and this case cannot be made, but the
  // next one can.
  fs::permissions(dir, fs::perms::owner_read | fs::perms::owner_exec);
  const bool writable = std::ofstream(dir + "/probe").good();
  if (!writable) {
    EXPECT_THROW(kvcache::save_session(path, d, second.session, second.tokens), std::runtime_error);
  } else {
    fs::remove(dir + "/probe");
  }
  fs::permissions(dir, fs::perms::owner_all);
  EXPECT_EQ(slurp(path), before);
  EXPECT_EQ(entries(dir), (std::vector<std::string>{"occupied", "s.kvs"}));

#if defined(__unix__) || defined(__APPLE__)
  // The disk fills up while the file is written, for every user, root
  // included: a file-size limit (RLIMIT_FSIZE, which binds root too) of 64
  // bytes makes the writes past it fail with EFBIG, as a full disk fails
  // with ENOSPC. The save must throw, remove its temporary file and leave
  // the old file whole.
  {
    struct rlimit old_limit {};
    ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old_limit), 0);
    void (*old_handler)(int) = std::signal(SIGXFSZ, SIG_IGN);  // EFBIG instead of the signal
    struct rlimit small = old_limit;
    small.rlim_cur = 64;
    ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
    std::string full_disk;
    try {
      kvcache::save_session(path, d, second.session, second.tokens);
    } catch (const std::runtime_error& e) {
      full_disk = e.what();
    }
    ::setrlimit(RLIMIT_FSIZE, &old_limit);
    std::signal(SIGXFSZ, old_handler);
    EXPECT_NE(full_disk.find("write error"), std::string::npos) << "'" << full_disk << "'";
    EXPECT_EQ(slurp(path), before);
    EXPECT_EQ(entries(dir), (std::vector<std::string>{"occupied", "s.kvs"}));
  }
#endif

  // A stream that fails.
  std::ostringstream broken;
  broken.setstate(std::ios::badbit);
  EXPECT_THROW(kvcache::write_session(broken, d, first.session, first.tokens), std::runtime_error);
}
