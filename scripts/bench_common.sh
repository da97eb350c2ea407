# scripts/bench_common.sh — sourced by the issue 13 benchmark scripts
# (bench_parallel.sh, bench_prefix.sh, bench_sharing.sh): their set-up,
# model and shared-prefix prompts. Needs $here (the scripts folder).

# Sets $models ($KVCACHE_MODELS_DIR or ../shared/models), $tok (the Llama 2
# tokenizer; exits 1 without it), $work (a temporary folder, removed on
# exit) and $model (bench_model).
bench_setup() {
  models="${KVCACHE_MODELS_DIR:-$here/../../shared/models}"
  tok="$models/llama2_tokenizer.bin"
  [ -f "$tok" ] || { echo "$0: no tokenizer at $tok (set KVCACHE_MODELS_DIR)" >&2; exit 1; }
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  bench_model
}

# Sets $model: $models/stories15M.bin when there, else random weights of its
# shape (dim 288, hidden 768, 6 layers, 6 heads, vocab 32000, seq_len 256).
bench_model() {
  model="$models/stories15M.bin"
  if [ ! -f "$model" ]; then
    model="$work/stories15M_shape.bin"
    python3 "$here/random_ckpt.py" "$model" 288 768 6 6 6 32000 256 --seed 15 >/dev/null
  fi
}

# Writes N prompts to FILE, one per line: the same 150 words, then 20 of
# their own, all words the Llama 2 tokenizer keeps whole (BOS + 170 tokens).
shared_prefix_prompts() {
  python3 - "$1" "$2" <<'PY'
import sys
words = ("the a cat dog sat ran on in big small red blue tree house and then one day little girl boy "
         "saw found happy sad sun moon play ball went home with her his friend").split()
state = 4242
def draw(k):
    global state
    out = []
    for _ in range(k):
        state = (state * 1103515245 + 12345) % 2**31
        out.append(words[state % len(words)])
    return out
prefix = draw(150)
lines = [" ".join(prefix + draw(20)) for _ in range(int(sys.argv[1]))]
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
PY
}
