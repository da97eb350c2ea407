// fuzz/fuzz_llama2c.cpp — the llama2.c checkpoint reader on arbitrary bytes.
//
// Each input is tried twice:
//   1. as a whole file: read_llama2c_header and load_llama2c must agree, and
//      either throw std::runtime_error or give a decoder whose shape is the
//      header's and whose file length is what the format implies;
//   2. as a header only: the first 28 bytes, followed by a body of exactly
//      the length that header implies (small finite floats made from the
//      remaining bytes) when that is small. Random mutations almost never
//      get the length right, so this is what reaches the loading of every
//      odd shape (one layer of dim 2, vocab 1, seq_len 1, …). A header this
//      harness computes as valid must load.
// A file that loads must load with bfloat16 weights too, each the float32
// weight rounded. Every decoder that loads then generates a few tokens
// (greedy or sampled), so shapes the reader accepts are also shapes the
// forward pass and the sampler survive.
//
// LoadLimits keeps the models small (max_parameters = 2^19 floats, 2 MiB;
// max_kv_cache_bytes = 64 MiB), and libFuzzer's -malloc_limit_mb catches any allocation the header could
// inflate past what the input justifies.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <kvcache/generate.hpp>
#include <kvcache/llama2c.hpp>

#include "fuzz_support.hpp"

namespace {

using kvcache_fuzz::check;

constexpr std::uint64_t kMaxParameters = std::uint64_t{1} << 19;
constexpr std::uint64_t kMaxKvCacheBytes = std::uint64_t{1} << 26;
constexpr std::uint64_t kMaxFittedBytes = std::uint64_t{1} << 18;

kvcache::LoadLimits limits() {
  kvcache::LoadLimits l;
  l.max_parameters = kMaxParameters;
  l.max_kv_cache_bytes = kMaxKvCacheBytes;
  return l;
}

std::int32_t int32_at(const std::uint8_t* p) {
  const std::uint32_t bits = static_cast<std::uint32_t>(p[0]) | (static_cast<std::uint32_t>(p[1]) << 8) |
                             (static_cast<std::uint32_t>(p[2]) << 16) | (static_cast<std::uint32_t>(p[3]) << 24);
  std::int32_t v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// The header as this harness reads the format, independently of the library:
// nullopt when a field is not positive or the head structure is impossible.
struct Shape {
  unsigned __int128 parameters = 0, file_bytes = 0;
  bool valid = false;  // also within kMaxParameters
};

std::optional<Shape> shape_of(const std::uint8_t* h) {
  const std::int64_t dim = int32_at(h), hidden = int32_at(h + 4), layers = int32_at(h + 8), heads = int32_at(h + 12),
                     kv_heads = int32_at(h + 16), vocab_signed = int32_at(h + 20), seq = int32_at(h + 24);
  const std::int64_t vocab = vocab_signed < 0 ? -vocab_signed : vocab_signed;
  if (dim <= 0 || hidden <= 0 || layers <= 0 || heads <= 0 || kv_heads <= 0 || vocab <= 0 || seq <= 0)
    return std::nullopt;
  using U = unsigned __int128;
  const U d = static_cast<U>(dim), ff = static_cast<U>(hidden), L = static_cast<U>(layers), V = static_cast<U>(vocab);
  const U head = d / static_cast<U>(heads), kv = static_cast<U>(kv_heads) * head;
  Shape s;
  s.parameters = V * d + L * (2 * d + 2 * d * d + 2 * kv * d + 3 * ff * d) + d + (vocab_signed < 0 ? V * d : 0);
  s.file_bytes = 28 + 4 * (s.parameters + static_cast<U>(seq) * head);
  const U kv_cache_bytes = 8 * L * kv * static_cast<U>(seq);
  s.valid = dim % heads == 0 && heads % kv_heads == 0 && head % 2 == 0 && s.parameters <= kMaxParameters &&
            kv_cache_bytes <= kMaxKvCacheBytes;
  return s;
}

// A few greedy tokens: the forward pass must accept any shape the reader
// does. Non-finite logits (weights that overflow) are the one error allowed.
void generate_a_little(const kvcache::Decoder<float>& decoder, const std::uint8_t* data, std::size_t size) {
  const kvcache::ModelConfig& c = decoder.config();
  std::vector<int> prompt;
  for (std::size_t i = 0; i < 3 && i < size && prompt.size() < c.max_seq_len; ++i)
    prompt.push_back(static_cast<int>(data[i] % c.vocab_size));
  if (prompt.empty()) prompt.push_back(0);
  kvcache::GenerateOptions options;
  options.max_new_tokens = std::min<std::size_t>(4, c.max_seq_len - prompt.size() + 1);
  // Greedy or sampled, with or without a nucleus, as the input says.
  const std::uint8_t knob = size > 3 ? data[3] : 0;
  options.temperature = static_cast<float>(knob % 4) * 0.5f;
  options.top_p = static_cast<float>((knob / 4) % 5) / 4.0f;
  options.seed = 1 + knob;
  try {
    const std::vector<int> ids = kvcache::generate(decoder, prompt, options);
    check(ids.size() == options.max_new_tokens, "generate returned a wrong number of ids");
    for (const int id : ids) check(id >= 0 && static_cast<std::size_t>(id) < c.vocab_size, "id outside the vocabulary");
  } catch (const std::domain_error&) {
    // NaN or infinite logits: reported, not sampled from.
  }
}

// Loads the file `bytes` both ways. Returns whether it loaded.
bool try_load(const std::uint8_t* bytes, std::size_t n_bytes, const std::uint8_t* data, std::size_t size) {
  std::optional<kvcache::Llama2cHeader> header;
  try {
    kvcache_fuzz::MemoryStream in(bytes, n_bytes);
    header = kvcache::read_llama2c_header(in, "fuzz.bin", limits());
  } catch (const std::runtime_error&) {
  }
  std::optional<kvcache::Decoder<float>> decoder;
  try {
    kvcache_fuzz::MemoryStream in(bytes, n_bytes);
    decoder.emplace(kvcache::load_llama2c(in, "fuzz.bin", limits()));
  } catch (const std::runtime_error&) {
  }
  if (!decoder) return false;
  check(header.has_value(), "load_llama2c accepted a file whose header read_llama2c_header refuses");
  const std::optional<Shape> shape = shape_of(bytes);
  check(shape && shape->valid, "the library accepted a header this harness finds invalid");
  check(shape->file_bytes == n_bytes, "the library accepted a file of the wrong length");
  check(header->file_bytes == n_bytes && header->n_parameters == shape->parameters,
        "the header's sizes disagree with the format");
  const kvcache::ModelConfig& c = decoder->config();
  check(c.d_model == header->dim && c.n_layers == header->n_layers && c.vocab_size == header->vocab_size &&
            c.max_seq_len == header->seq_len && c.kv_heads() == header->n_kv_heads,
        "the decoder's shape is not the header's");
  generate_a_little(*decoder, data, size);

  // The same file with the weights rounded to bfloat16 as they are read:
  // it must load too, hold every weight rounded, and run.
  kvcache_fuzz::MemoryStream again(bytes, n_bytes);
  const kvcache::Decoder<float> bf16 = kvcache::load_llama2c(again, "fuzz.bin", limits(), kvcache::WeightType::bf16);
  check(bf16.weight_type() == kvcache::WeightType::bf16, "a bf16 load did not store bfloat16");
  const kvcache::WeightMatrix<float>& E = decoder->token_embedding();
  for (Eigen::Index i = 0; i < E.rows(); ++i)
    for (Eigen::Index j = 0; j < E.cols(); ++j) {
      const float rounded = kvcache::detail::from_bf16(kvcache::detail::float_to_bf16(E(i, j)));
      const float got = bf16.token_embedding()(i, j);
      check(got == rounded || (got != got && rounded != rounded), "a bf16 weight is not the rounded float32 one");
    }
  generate_a_little(bf16, data, size);
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try_load(data, size, data, size);

  // 2. The header with a body of the implied length (when the input is not
  //    already that long: then step 1 read it as it is).
  if (size < 28) return 0;
  const std::optional<Shape> shape = shape_of(data);
  if (!shape || shape->file_bytes > kMaxFittedBytes || shape->file_bytes == size) return 0;
  std::vector<std::uint8_t> fitted(static_cast<std::size_t>(shape->file_bytes));
  std::memcpy(fitted.data(), data, 28);
  const std::size_t n_floats = (fitted.size() - 28) / 4;
  for (std::size_t i = 0; i < n_floats; ++i) {
    // Small finite weights in [-2, 2) from the bytes after the header.
    const std::uint8_t b = size > 28 ? data[28 + i % (size - 28)] : 0;
    const float value = static_cast<float>(static_cast<std::int8_t>(b ^ static_cast<std::uint8_t>(i))) / 64.0f;
    std::memcpy(fitted.data() + 28 + 4 * i, &value, 4);
  }
  const bool loaded = try_load(fitted.data(), fitted.size(), data, size);
  check(loaded == shape->valid, loaded ? "a header this harness finds invalid loaded"
                                       : "a valid header with a body of the right length did not load");
  return 0;
}
