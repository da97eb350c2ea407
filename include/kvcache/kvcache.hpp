// kvcache/kvcache.hpp — the one header a user includes. The headers, in the
// order one token's data flows through them:
//
//   config.hpp        ModelConfig, AttentionConfig and their validation
//   storage.hpp       StorageType (f32, bf16, int8, f16, q8_0, q4_0), a codec per type
//   weights.hpp       WeightMatrix and the weight structs: immutable, shared
//   slots.hpp         SlotTable: where a sequence's tokens live; windows
//   kv_pool.hpp       KVPool: paged key/value blocks shared by sessions
//   kv_cache.hpp      KVRows (one layer's typed rows) and KVCache
//   session.hpp       Session: one request's slot table and caches
//   attention.hpp     attention over the cache; MultiHeadAttentionWithCache
//   forward.hpp       Workspace and the forward pass over a batch
//   decoder.hpp       Decoder: weights, new_session, forward entry points
//   generate.hpp      prefill/decode loop, sampler, uncached baseline
//   scheduler.hpp     BatchScheduler (continuous batching), generate_batch
//   session_file.hpp  save a Session to a file and load it back (prompt cache)
#pragma once

// scheduler.hpp reaches every header above it through its includes, and
// session_file.hpp adds itself.
#include "scheduler.hpp"
#include "session_file.hpp"
