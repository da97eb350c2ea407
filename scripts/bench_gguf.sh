#!/usr/bin/env bash
# scripts/bench_gguf.sh — GGUF speed (issue 14): kvcache-generate on GGUF
# files of random weights of the stories110M shape (dim 768, hidden 2048,
# 12 layers, 12 heads, 12 kv heads, vocab 32000, seq 1024, tied classifier)
# in f32, f16, bf16, q8_0 and q4_0, decode and prefill at 1 and 2 threads;
# with KVCACHE_PEER set, llama.cpp on the same files in the same run,
# interleaved.
#   1. writes a random llama2.c checkpoint (scripts/random_ckpt.py, seed 14),
#   2. builds kvcache-generate and gguf_q4_0 (Release, -DKVCACHE_NATIVE=ON),
#   3. converts the checkpoint with the peer's llama2c_to_gguf.py (needs
#      KVCACHE_PEER; without it, those GGUF files must already be in the GGUF
#      folder), and to q4_0 with benchmarks/gguf_q4_0 (the peer's converter
#      has no q4_0),
#   4. runs scripts/bench_gguf.py: 3 repetitions of (each type: kvcache, then
#      llama.cpp), a 64-id prompt then 128 generated ids per run,
#      OMP_WAIT_POLICY=ACTIVE for kvcache, f32 K/V and flash attention off
#      for llama.cpp; appends to bench/results/bench_gguf.jsonl and writes
#      bench/results/bench_gguf.md (medians).
# About 6 minutes with llama.cpp on a quiet 2-core machine once the files
# exist (the q8_0 conversion is pure Python, about a minute).
#
# Environment:
#   KVCACHE_GGUF_DIR    GGUF and checkpoint folder (default /work/gguf/bench); never commit it
#   KVCACHE_PEER        the peer folder (llama2c_to_gguf.py, llamacpp_generate.mjs); unset: kvcache only
#   NODE_LLAMA_CPP_DIR  folder whose node_modules holds node-llama-cpp 3.21.1 (with KVCACHE_PEER)
#   KVCACHE_MODELS_DIR  folder with llama2_tokenizer.bin (default ../shared/models)
#   KVCACHE_BENCH_BUILD_DIR, KVCACHE_BENCH_RESULTS, KVCACHE_JOBS as scripts/bench.sh
# Arguments are passed to bench_gguf.py, e.g. --reps 5 --threads 1
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="${KVCACHE_BENCH_BUILD_DIR:-$root/build-bench}"
results="${KVCACHE_BENCH_RESULTS:-$root/bench/results}"
gguf_dir="${KVCACHE_GGUF_DIR:-/work/gguf/bench}"
models="${KVCACHE_MODELS_DIR:-$root/../shared/models}"
peer="${KVCACHE_PEER:-}"
name=r110M

log() { printf '[bench_gguf] %s\n' "$*" >&2; }

mkdir -p "$gguf_dir/ckpt" "$results"
ckpt="$gguf_dir/ckpt/$name.bin"
if [[ ! -f "$ckpt" ]]; then
  log "writing $ckpt"
  python3 "$root/scripts/random_ckpt.py" "$ckpt" 768 2048 12 12 12 32000 1024 --seed 14
fi
cmake -S "$root" -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DKVCACHE_NATIVE=ON >/dev/null
nice make -C "$build_dir" -j"${KVCACHE_JOBS:-2}" kvcache-generate gguf_q4_0 >/dev/null

for t in f32 f16 bf16 q8_0; do
  out="$gguf_dir/$name.$t.gguf"
  [[ -f "$out" ]] && continue
  [[ -n "$peer" ]] || { log "$out is missing and KVCACHE_PEER is not set to convert it"; exit 1; }
  log "converting to $t"
  python3 "$peer/llama2c_to_gguf.py" "$ckpt" "$models/llama2_tokenizer.bin" "$out" --type "$t"
done

if [[ ! -f "$gguf_dir/$name.q4_0.gguf" ]]; then
  log "converting to q4_0"
  "$build_dir/benchmarks/gguf_q4_0" "$ckpt" "$models/llama2_tokenizer.bin" "$gguf_dir/$name.q4_0.gguf"
fi

peer_args=()
if [[ -n "$peer" ]]; then
  peer_args=(--peer "$peer" --node-llama-cpp-dir "${NODE_LLAMA_CPP_DIR:?NODE_LLAMA_CPP_DIR must name node-llama-cpp\'s folder}")
fi
python3 "$root/scripts/bench_gguf.py" --kvcache "$build_dir/examples/kvcache-generate" --gguf-dir "$gguf_dir" \
  --model "$name" --out "$results/bench_gguf.jsonl" "${peer_args[@]}" "$@"
{
  echo "# GGUF speed (scripts/bench_gguf.sh)"
  echo
  echo "- machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- model: random weights, stories110M shape, files $gguf_dir/$name.{f32,f16,bf16,q8_0,q4_0}.gguf"
  echo
  python3 "$root/scripts/bench_gguf.py" --summarize "$results/bench_gguf.jsonl"
} > "$results/bench_gguf.md"
log "wrote $results/bench_gguf.jsonl and $results/bench_gguf.md"
