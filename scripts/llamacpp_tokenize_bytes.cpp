// scripts/llamacpp_tokenize_bytes.cpp — prints llama.cpp's tokenization of
// byte strings given in hex, which need not be valid UTF-8 (node-llama-cpp
// only passes JavaScript strings). Built and run by
// scripts/record_sentencepiece_fixture.sh against node-llama-cpp's prebuilt
// libllama; not part of kvcache's build.
//
// usage: llamacpp_tokenize_bytes MODEL.gguf HEX...
// prints, per HEX: `{"HEX", "ids"},` with the ids of llama_tokenize(vocab,
// bytes, add_special = false, parse_special = false).
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "llama.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: llamacpp_tokenize_bytes MODEL.gguf HEX...\n");
    return 2;
  }
  llama_log_set([](ggml_log_level, const char*, void*) {}, nullptr);
  llama_backend_init();
  llama_model_params params = llama_model_default_params();
  params.vocab_only = true;
  llama_model* model = llama_model_load_from_file(argv[1], params);
  if (model == nullptr) {
    std::fprintf(stderr, "llamacpp_tokenize_bytes: cannot load %s\n", argv[1]);
    return 1;
  }
  const llama_vocab* vocab = llama_model_get_vocab(model);
  for (int a = 2; a < argc; ++a) {
    const std::string hex = argv[a];
    std::string bytes;
    for (std::size_t i = 0; i + 1 < hex.size(); i += 2)
      bytes += static_cast<char>(std::strtol(hex.substr(i, 2).c_str(), nullptr, 16));
    std::vector<llama_token> ids(bytes.size() * 4 + 8);
    const int n = llama_tokenize(vocab, bytes.data(), static_cast<int>(bytes.size()), ids.data(),
                                 static_cast<int>(ids.size()), false, false);
    std::printf("    {\"%s\", \"", hex.c_str());
    for (int i = 0; i < n; ++i) std::printf(i ? " %d" : "%d", ids[static_cast<std::size_t>(i)]);
    std::printf("\"},\n");
  }
  llama_model_free(model);
  llama_backend_free();
  return 0;
}
