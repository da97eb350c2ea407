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
# their vocabularies (vocabOnly). Texts that are not valid UTF-8 go through
# llamacpp_tokenize_bytes.cpp, built with g++ against node-llama-cpp's
# prebuilt libllama and the llama.h of the llama.cpp source it ships
# (node_modules/node-llama-cpp/llama/gitRelease.bundle, cloned into the
# temporary folder).
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
# tok512 with user-defined pieces (type 4): ids 264 "ing", 267 "en", 313 "ent"
# as they are, 300 ("ke") renamed "<|user|>" and 325 (" whispers") as
# "\u2581whispers"; the test builds the same vocabulary (user_defined_vocab).
python3 - "$peer" "$tmp/v512.bin" "$models/tok512.bin" "$tmp/tok512_user.gguf" <<'PY' 2> /dev/null
import sys
sys.path.insert(0, sys.argv[1])
import llama2c_to_gguf as g
read = g.read_tokenizer
def patched(path, vocab):
    texts, scores, types = read(path, vocab)
    texts[300] = "<|user|>"
    for i in (264, 267, 300, 313, 325):
        types[i] = 4
    return texts, scores, types
g.read_tokenizer = patched
sys.argv = ["llama2c_to_gguf.py"] + sys.argv[2:]
g.main()
PY
out=$here/../tests/sentencepiece_fixture.hpp
NODE_LLAMA_CPP_DIR=$node_dir node "$here/record_sentencepiece_fixture.mjs" "$tmp/tok512.gguf" "$tmp/llama2.gguf" \
  | sed '$d' | sed '$d' > "$out"   # without its closing "}  // namespace" line

bins=$node_dir/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64
git clone -q "$node_dir/node_modules/node-llama-cpp/llama/gitRelease.bundle" "$tmp/llama.cpp" 2> /dev/null
g++ -std=c++17 -O1 -I"$tmp/llama.cpp/include" -I"$tmp/llama.cpp/ggml/include" \
  "$here/llamacpp_tokenize_bytes.cpp" -o "$tmp/tokenize_bytes" \
  "$bins"/libllama.v*.so "$bins"/libggml.v*.so "$bins/libggml-base.so" -Wl,-rpath,"$bins"
# not UTF-8: lone lead bytes, stray continuation bytes, truncated and
# overlong sequences, a surrogate, 0xFF/0xFE, NUL; and valid ones around them
hex=(c3 c361 80 80c3 61e282ac62 e282 e28261 f09f98 f09f988061 ff fe41 c0af eda080 00 410042 e29681 2020 0a0a)
{
  echo ""
  echo "// Byte strings (hex) that are not all valid UTF-8: llama_tokenize(bytes,"
  echo "// add_special = false, parse_special = false), by llamacpp_tokenize_bytes.cpp."
  echo "struct SpmBytesCase {"
  echo "  const char* hex;"
  echo "  const char* ids;  // space-separated, no BOS"
  echo "};"
  for name in Tok512:tok512 Llama2:llama2; do
    echo ""
    echo "inline const SpmBytesCase k${name%%:*}BytesCases[] = {"
    "$tmp/tokenize_bytes" "$tmp/${name##*:}.gguf" "${hex[@]}"
    echo "};"
  done
  echo ""
  echo "// tok512 with user-defined pieces (see record_sentencepiece_fixture.sh):"
  echo "// llama_tokenize(bytes, add_special = false, parse_special = false)."
  echo "inline const SpmBytesCase kTok512UserDefinedCases[] = {"
  user=("singing" "<|user|>hello" "hi <|user|> there" "<|user|><|user|>" "mention entry" "spent" "ing"
        " ing " "<|user|>" $'\xe2\x96\x81whispers and whispers' "a<|user|" "ingent")
  "$tmp/tokenize_bytes" "$tmp/tok512_user.gguf" $(for t in "${user[@]}"; do printf '%s' "$t" | od -An -tx1 | tr -d ' \n'; echo; done)
  echo "};"
  echo ""
  echo "}  // namespace kvcache_test"
} >> "$out"
echo "wrote tests/sentencepiece_fixture.hpp"
