// kvcache/limits.hpp — LoadLimits: the bounds that the readers of untrusted
// files (checkpoints, tokenizers) enforce before they allocate. Standard
// library only, so that tokenizer.hpp can use it without Eigen.
#pragma once

#include <cstdint>

namespace kvcache {

// What a reader refuses, whatever the file's header says. Every size a header
// claims is also checked against the file's actual length before anything is
// allocated, so a reader never allocates much more than the file it reads;
// these limits bound the file itself (a user pointing the program at a 50 GB
// file, /dev/zero or a pipe gets an error, not an exhausted machine).
struct LoadLimits {
  // ---- llama2.c checkpoints (load_llama2c, read_llama2c_header) ----
  // Weights the header may claim (RoPE tables not counted). 2^33 floats are
  // 32 GiB: far above any model this library is meant for, far below what a
  // corrupt header (dim = 2^30, …) would ask for.
  std::uint64_t max_parameters = std::uint64_t{1} << 33;
  // Bytes of keys and values a session holds at the model's seq_len
  // positions (float32): 2 · n_layers · n_kv_heads · head_size · seq_len · 4.
  // The file holds the RoPE tables for seq_len but nothing in proportion to
  // n_layers · seq_len, so without this a 3 MB header could promise a
  // context whose cache needs 100 GB. 2^35 bytes are 32 GiB (Llama 2 7B at
  // its 4096 positions needs 4 GiB).
  std::uint64_t max_kv_cache_bytes = std::uint64_t{1} << 35;
  // Scan every tensor for NaN and ±Inf, naming the first bad one. Costs one
  // pass over memory that was just read.
  bool check_finite = true;

  // ---- llama2.c tokenizers (Tokenizer::load) ----
  // The file's length. The Llama 2 tokenizer is 0.4 MB and one with a 256K
  // vocabulary about 5 MB: 256 MiB leaves room and still refuses a checkpoint
  // passed by mistake, /dev/zero or an endless pipe before reading it all.
  std::uint64_t max_tokenizer_bytes = std::uint64_t{1} << 28;
  // Tokens the vocabulary may hold. Each costs about 100 bytes in memory (its
  // string, score and hash-table entry) for as few as 8 in the file, so the
  // byte limit alone would still let a file of empty tokens take gigabytes.
  // The largest real vocabularies have about 2^18 tokens.
  std::uint64_t max_vocab_size = std::uint64_t{1} << 22;
};

}  // namespace kvcache
