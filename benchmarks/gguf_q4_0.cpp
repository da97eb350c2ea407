// benchmarks/gguf_q4_0.cpp — writes a llama2.c checkpoint as a GGUF file of
// q4_0 matrices, for scripts/bench_gguf.sh (the peer's converter writes f32,
// f16, bf16 and q8_0 only). The bytes are those of the tests' GGUF writer
// (tests/gguf_writer.hpp: ggml's q4_0 quantizer, llama.cpp's tensor names
// and metadata). Refuses to write over an existing file.
//
//   gguf_q4_0 CHECKPOINT.bin TOKENIZER.bin OUT.gguf
#include <exception>
#include <filesystem>
#include <iostream>
#include <string>

#include <kvcache/detail/io.hpp>
#include <kvcache/llama2c.hpp>
#include <kvcache/tokenizer.hpp>

#include "../tests/gguf_writer.hpp"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: gguf_q4_0 CHECKPOINT.bin TOKENIZER.bin OUT.gguf\n";
    return 1;
  }
  const std::string out = argv[3];
  const auto refuse_existing = [&] {
    if (std::filesystem::exists(std::filesystem::symlink_status(out)))
      kvcache::detail::io::fail(out, "exists; gguf_q4_0 writes new files only");
  };
  try {
    refuse_existing();  // before the (slow) conversion; again right before the file is put in place
    const kvcache::Decoder<float> model = kvcache::load_llama2c(argv[1]);
    const kvcache::Tokenizer tokenizer = kvcache::Tokenizer::load(argv[2]);
    const std::string bytes = kvcache_test::llama_gguf(model, kvcache_test::kGgmlQ4_0, kvcache_test::llama2c_vocab(tokenizer));
    kvcache::detail::io::write_atomically(
        out, out, [&](kvcache::detail::io::FileSink& sink) { sink.put(bytes.data(), bytes.size()); },
        refuse_existing);
  } catch (const std::exception& e) {
    std::cerr << "gguf_q4_0: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
