// fuzz/fuzz_gguf.cpp — the GGUF reader (GgufFile over bytes in memory), the
// `llama` loader (load_gguf) and the vocabulary reader (read_gguf_vocab) on
// arbitrary bytes.
//
// The input is copied into a buffer of exactly its size (AddressSanitizer
// then catches any read past the end) and parsed; a malformed file must be
// one std::runtime_error (the documented error of every GGUF function), and
// nothing else may escape. What parses is then read every way a caller can:
// every metadata value through the getter of its type (and a wrong one),
// every tensor's bytes, the model (as the file stores it and, as the input
// says, converted to bf16), a few generated tokens, and the vocabulary as a
// Tokenizer (std::invalid_argument for a vocabulary it refuses) that encodes
// and decodes.
//
// LoadLimits keep the models small (2^19 values, 64 MiB of cache) and
// libFuzzer's -malloc_limit_mb catches any allocation a header could inflate
// past what the input justifies.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <kvcache/generate.hpp>
#include <kvcache/gguf.hpp>
#include <kvcache/tokenizer.hpp>

#include "fuzz_support.hpp"

namespace {

using kvcache_fuzz::check;

kvcache::LoadLimits limits() {
  kvcache::LoadLimits l;
  l.max_parameters = std::uint64_t{1} << 19;
  l.max_kv_cache_bytes = std::uint64_t{1} << 26;
  l.max_vocab_size = std::uint64_t{1} << 16;
  return l;
}

// Every metadata value through its getter; a wrong getter must throw
// std::runtime_error, never read out of place.
void read_metadata(const kvcache::GgufFile& f) {
  for (const auto& entry : f.metadata()) {
    const std::string& key = entry.first;
    const kvcache::GgufValue& v = entry.second;
    const auto attempt = [&](auto&& get) {
      try {
        get();
      } catch (const std::runtime_error&) {
      }
    };
    attempt([&] { (void)f.get_uint(key); });
    attempt([&] { (void)f.get_float(key); });
    attempt([&] { (void)f.get_bool(key); });
    attempt([&] { (void)f.get_string(key); });
    if (v.type == kvcache::GgufType::array && v.count <= (std::uint64_t{1} << 16)) {
      attempt([&] { (void)f.get_strings(key); });
      attempt([&] { (void)f.get_f32s(key); });
      attempt([&] { (void)f.get_i32s(key); });
    }
  }
  // Every tensor lies inside the file: touch its first and last byte.
  for (const kvcache::GgufTensorInfo& t : f.tensors()) {
    check(f.data_offset() + t.offset + t.bytes <= f.size(), "a tensor past the end of the file");
    if (t.bytes == 0) continue;
    volatile unsigned char sink = f.tensor_data(t)[0];
    sink = f.tensor_data(t)[t.bytes - 1];
    (void)sink;
  }
}

// A few greedy tokens: a model the loader accepts must run. Non-finite
// logits (weights that overflow) are the one error allowed.
void generate_a_little(const kvcache::Decoder<float>& d, const std::uint8_t* data, std::size_t size) {
  const kvcache::ModelConfig& c = d.config();
  std::vector<int> prompt{static_cast<int>((size > 0 ? data[0] : 0) % c.vocab_size)};
  kvcache::GenerateOptions o;
  o.max_new_tokens = std::min<std::size_t>(3, c.max_seq_len);
  try {
    const std::vector<int> ids = kvcache::generate(d, prompt, o);
    check(ids.size() == o.max_new_tokens, "generate returned a wrong number of ids");
    for (const int id : ids) check(id >= 0 && static_cast<std::size_t>(id) < c.vocab_size, "id outside the vocabulary");
  } catch (const std::domain_error&) {
  }
}

// The vocabulary as a Tokenizer: encode some of the input, decode the ids.
void tokenize(const kvcache::GgufFile& f, const std::uint8_t* data, std::size_t size) {
  std::optional<kvcache::SentencePieceVocab> vocab;
  try {
    vocab = kvcache::read_gguf_vocab(f, limits());
  } catch (const std::runtime_error&) {
    return;
  }
  std::optional<kvcache::Tokenizer> tok;
  try {
    tok.emplace(std::move(*vocab));
  } catch (const std::invalid_argument&) {
    return;
  }
  const std::string text(reinterpret_cast<const char*>(data), std::min<std::size_t>(size, 64));
  const std::vector<int> ids = tok->encode(text, true, true);
  int prev = tok->sentencepiece()->vocab().bos_id;
  for (const int id : ids) {
    check(id >= 0 && static_cast<std::size_t>(id) < tok->vocab_size(), "an encoded id outside the vocabulary");
    (void)tok->decode(prev, id);
    prev = id;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::shared_ptr<unsigned char> bytes(new unsigned char[size == 0 ? 1 : size], std::default_delete<unsigned char[]>());
  if (size != 0) std::memcpy(bytes.get(), data, size);
  std::optional<kvcache::GgufFile> file;
  try {
    file.emplace(bytes, size, "fuzz.gguf");
  } catch (const std::runtime_error&) {
    return 0;
  }
  read_metadata(*file);
  std::optional<kvcache::Decoder<float>> decoder;
  try {
    std::optional<kvcache::WeightType> convert;
    if (size > 0 && (data[size - 1] & 1) != 0) convert = kvcache::WeightType::bf16;
    decoder.emplace(kvcache::load_gguf(*file, limits(), convert));
  } catch (const std::runtime_error&) {
  }
  if (decoder) generate_a_little(*decoder, data, size);
  tokenize(*file, data, size);
  return 0;
}
