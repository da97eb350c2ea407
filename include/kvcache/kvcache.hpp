// kvcache/kvcache.hpp — the one header a user includes.
//
//   config.hpp     ModelConfig, AttentionConfig and their validation
//   weight_matrix.hpp  WeightMatrix: a linear layer's weights (T or bfloat16)
//   kv_cache.hpp   KVCache: one layer's keys and values
//   attention.hpp  MultiHeadAttentionWithCache: one causal attention layer
//   decoder.hpp    Decoder (immutable weights) and Session (per-request caches)
//   generate.hpp   prefill/decode loop, sampler, uncached baseline
//   session_file.hpp  save a Session to a file and load it back (prompt cache)
#pragma once

#include "config.hpp"
#include "weight_matrix.hpp"
#include "kv_cache.hpp"
#include "attention.hpp"
#include "decoder.hpp"
#include "generate.hpp"
#include "session_file.hpp"
