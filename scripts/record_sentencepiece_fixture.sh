#!/usr/bin/env bash
# scripts/record_sentencepiece_fixture.sh — regenerates
# tests/sentencepiece_fixture.hpp from llama.cpp (see
# record_sentencepiece_fixture.mjs). Not needed by the build.
#
# usage: scripts/record_sentencepiece_fixture.sh MODELS_DIR PEER_DIR NODE_DIR
#   MODELS_DIR  holds tok512.bin and llama2_tokenizer.bin
#   PEER_DIR    holds llama2c_to_gguf.py
#   NODE_DIR    a folder whose node_modules holds node-llama-cpp 3.21.1
# Makes two tiny all-zero llama2.c checkpoints (vocab 512 and 32000) in a
# temporary folder and converts them with each tokenizer: llama.cpp only reads
# their vocabularies (vocabOnly).
set -euo pipefail
models=$1 peer=$2 node_dir=$3
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for vocab in 512 32000; do
  python3 - "$peer" "$tmp/v$vocab.bin" "$vocab" <<'PY'
import struct, sys
sys.path.insert(0, sys.argv[1])
import llama2c_to_gguf as g
vocab = int(sys.argv[3])
c = dict(dim=8, hidden=8, layers=1, heads=1, kv_heads=1, vocab=vocab, seq=4, shared=True)
_, n = g.checkpoint_layout(c)
with open(sys.argv[2], "wb") as f:
    f.write(struct.pack("<7i", 8, 8, 1, 1, 1, vocab, 4) + bytes(4 * n))
PY
done
python3 "$peer/llama2c_to_gguf.py" "$tmp/v512.bin" "$models/tok512.bin" "$tmp/tok512.gguf" 2> /dev/null
python3 "$peer/llama2c_to_gguf.py" "$tmp/v32000.bin" "$models/llama2_tokenizer.bin" "$tmp/llama2.gguf" 2> /dev/null
NODE_LLAMA_CPP_DIR=$node_dir node "$here/record_sentencepiece_fixture.mjs" "$tmp/tok512.gguf" "$tmp/llama2.gguf" \
  > "$here/../tests/sentencepiece_fixture.hpp"
echo "wrote tests/sentencepiece_fixture.hpp"
