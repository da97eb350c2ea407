#!/usr/bin/env bash
# tests/cli_bad_inputs.sh — kvcache-generate against everything a user (or an
# attacker) can hand it: missing, empty, truncated, oversized and random
# checkpoints, tokenizers and prompts files, and bad flags. Every case must
# end with
#   - exit code 1 (not a signal: no crash, no core dump, no hang),
#   - exactly one line on stderr, starting with "kvcache-generate: ",
#   - nothing on stdout,
#   - no sanitizer report (ASan, UBSan, LSan) anywhere in the output.
# Damaged session files (truncated, changed, another model's) given to
# --prompt-cache are instead reported on one line and ignored: exit 0 and the
# very output of a run without the cache. A --prompt-cache file that is not a
# session file at all (no magic: empty, random, a checkpoint) is refused as a
# bad file, and left as it was.
#
#   tests/cli_bad_inputs.sh KVCACHE_GENERATE [WORK_DIR]
#
# The real files come from $KVCACHE_MODELS_DIR (default ../shared/models
# beside the project). Without them the test is skipped (exit 77), or fails
# when KVCACHE_REQUIRE_MODELS=1; so do the cases that need llama2_tokenizer.bin
# or stories260K.bin (the others still run). Every run the script makes has
# its exit status checked. Registered in ctest by examples/CMakeLists.txt.
set -uo pipefail

exe="${1:?usage: $0 KVCACHE_GENERATE [WORK_DIR]}"
exe="$(cd "$(dirname "$exe")" && pwd)/$(basename "$exe")"  # the cases run in WORK_DIR
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
models="${KVCACHE_MODELS_DIR:-$here/../../shared/models}"
work="${2:-$(mktemp -d "${TMPDIR:-/tmp}/kvcache-cli-bad.XXXXXX")}"
mkdir -p "$work"
model="$models/aidreams260K.bin"
tok="$models/tok512.bin"
if [[ ! -f "$model" || ! -f "$tok" ]]; then
  if [[ "${KVCACHE_REQUIRE_MODELS:-}" == 1 ]]; then
    echo "FAIL: aidreams260K.bin / tok512.bin not found in $models and KVCACHE_REQUIRE_MODELS=1" >&2
    exit 1
  fi
  echo "SKIP: aidreams260K.bin / tok512.bin not found in $models (set KVCACHE_MODELS_DIR)"
  exit 77
fi

cases=0
failures=0

# expect_error NAME ARGS...: runs the program and checks the rules above.
expect_error() {
  local name="$1"
  shift
  cases=$((cases + 1))
  local out="$work/stdout" err="$work/stderr" status
  (cd "$work" && timeout 120 "$exe" "$@" >"$out" 2>"$err" </dev/null)
  status=$?
  local problems=()
  ((status == 1)) || problems+=("exit status $status (want 1$( ((status > 128)) && echo ", killed by signal $((status - 128))"))")
  [[ ! -s "$out" ]] || problems+=("stdout is not empty")
  local lines
  lines=$(wc -l <"$err")
  ((lines == 1)) || problems+=("$lines lines on stderr (want 1)")
  [[ "$(head -c 18 "$err")" == "kvcache-generate: " ]] || problems+=("stderr does not start with 'kvcache-generate: '")
  if grep -qE 'Sanitizer|runtime error:|==[0-9]+==' "$err" "$out"; then problems+=("a sanitizer report"); fi
  if ((${#problems[@]} > 0)); then
    failures=$((failures + 1))
    echo "FAIL: $name: ${problems[*]}"
    echo "  command: $exe $*"
    echo "  stderr (first lines):"
    head -n 20 "$err" | sed 's/^/    /'
  else
    echo "ok: $name: $(cat "$err")"
  fi
}

# optional_model FILE PURPOSE: true when $models/FILE exists. A case that
# needs a model file beyond aidreams260K and tok512 runs only with it; when
# it is absent that case fails under KVCACHE_REQUIRE_MODELS=1 and is
# otherwise reported as skipped.
optional_model() {
  local file="$1" purpose="$2"
  [[ -f "$models/$file" ]] && return 0
  if [[ "${KVCACHE_REQUIRE_MODELS:-}" == 1 ]]; then
    cases=$((cases + 1))
    failures=$((failures + 1))
    echo "FAIL: $purpose: $file not found in $models and KVCACHE_REQUIRE_MODELS=1"
  else
    echo "SKIP: $purpose: $file not found in $models (set KVCACHE_MODELS_DIR)"
  fi
  return 1
}

# run_ok NAME OUT ARGS...: a run that prepares a case (or is its reference)
# must succeed: exit 0, stdout into OUT, stderr into $work/stderr.
run_ok() {
  local name="$1" out="$2" status
  shift 2
  (cd "$work" && timeout 120 "$exe" "$@" >"$out" 2>"$work/stderr" </dev/null)
  status=$?
  if ((status != 0)); then
    cases=$((cases + 1))
    failures=$((failures + 1))
    echo "FAIL: $name: exit status $status (want 0)"
    echo "  command: $exe $*"
    head -n 20 "$work/stderr" | sed 's/^/    /'
    return 1
  fi
  return 0
}

# Deterministic pseudo-random bytes (bash's RANDOM, seeded): N bytes into FILE.
random_file() {
  local file="$1" n="$2" seed="$3" i chunk=""
  RANDOM=$seed
  : >"$file"
  for ((i = 0; i < n; i++)); do
    chunk+="\\$(printf '%03o' $((RANDOM % 256)))"
    if (((i + 1) % 512 == 0)); then printf "$chunk" >>"$file"; chunk=""; fi
  done
  printf "$chunk" >>"$file"
}

# A little-endian int32 as printf escapes.
int32() {
  local v=$(($1 & 0xFFFFFFFF))
  printf '\\%03o\\%03o\\%03o\\%03o' $((v & 255)) $(((v >> 8) & 255)) $(((v >> 16) & 255)) $(((v >> 24) & 255))
}

# header FILE dim hidden layers heads kv_heads vocab seq_len [body bytes]
header_file() {
  local file="$1" body="${9:-0}"
  printf "$(int32 "$2")$(int32 "$3")$(int32 "$4")$(int32 "$5")$(int32 "$6")$(int32 "$7")$(int32 "$8")" >"$file"
  head -c "$body" /dev/zero >>"$file"
}

model_size=$(stat -c %s "$model")
tok_size=$(stat -c %s "$tok")
run=(-z "$tok" -t 0 -n 8)  # a valid tokenizer and a short run

# ---- checkpoints --------------------------------------------------------
expect_error "missing checkpoint" /nonexistent/model.bin "${run[@]}"
mkdir -p "$work/a-directory"
expect_error "directory as checkpoint" "$work/a-directory" "${run[@]}"
: >"$work/empty.bin"
expect_error "empty checkpoint" "$work/empty.bin" "${run[@]}"
expect_error "/dev/null as checkpoint" /dev/null "${run[@]}"
expect_error "/dev/zero as checkpoint" /dev/zero "${run[@]}"
for cut in 3 27 28 1000 $((model_size / 2)) $((model_size - 1)); do
  head -c "$cut" "$model" >"$work/truncated.bin"
  expect_error "checkpoint truncated to $cut bytes" "$work/truncated.bin" "${run[@]}"
done
# ---- GGUF files (told by their first bytes, "GGUF") ----------------------
gguf=(--prompt-ids 1 --ids -t 0 -n 8)
printf 'GGUF' >"$work/magic.gguf"
expect_error "GGUF magic only" "$work/magic.gguf" "${gguf[@]}"
{ printf "GGUF$(int32 1)"; head -c 16 /dev/zero; } >"$work/v1.gguf"
expect_error "GGUF version 1" "$work/v1.gguf" "${gguf[@]}"
{ printf "GGUF$(int32 3)"; printf '\xff\xff\xff\xff\xff\xff\xff\x7f'; head -c 72 /dev/zero; } >"$work/huge.gguf"
expect_error "GGUF claiming 2^63 tensors" "$work/huge.gguf" "${gguf[@]}"
{ printf "GGUF$(int32 3)"; head -c 16 /dev/zero; } >"$work/empty.gguf"
expect_error "GGUF without a model" "$work/empty.gguf" "${gguf[@]}"
expect_error "GGUF without a model, text prompt" "$work/empty.gguf" -i "hello"
{ cat "$model"; printf 'x'; } >"$work/padded.bin"
expect_error "checkpoint with a trailing byte" "$work/padded.bin" "${run[@]}"
{ cat "$model"; cat "$model"; } >"$work/doubled.bin"
expect_error "checkpoint twice over" "$work/doubled.bin" "${run[@]}"
header_file "$work/huge-dim.bin" $((1 << 30)) 12 2 2 1 10 4 64
expect_error "header claiming dim 2^30" "$work/huge-dim.bin" "${run[@]}"
header_file "$work/max.bin" 2147483644 2147483647 2147483647 2 1 -2147483647 2147483647
expect_error "header of int32 maxima" "$work/max.bin" "${run[@]}"
header_file "$work/context.bin" 2 1 13000 1 1 3 167000 64
expect_error "header claiming a 34 GB KV cache" "$work/context.bin" -n 0 --prompt-ids 1 --ids
header_file "$work/negative.bin" 8 12 -2 2 1 10 4 4096
expect_error "header with a negative field" "$work/negative.bin" "${run[@]}"
header_file "$work/zero-heads.bin" 8 12 2 0 1 10 4 4096
expect_error "header with zero heads" "$work/zero-heads.bin" "${run[@]}"
# The real header with a body of the right length but random bytes: NaNs.
{ head -c 28 "$model"; head -c $((model_size - 28)) /dev/urandom; } >"$work/random-body.bin"
expect_error "real header, random body" "$work/random-body.bin" "${run[@]}"
for seed in 1 2 3 4 5; do
  random_file "$work/random.bin" $((seed * 700)) "$seed"
  expect_error "random checkpoint (seed $seed)" "$work/random.bin" "${run[@]}"
done
expect_error "tokenizer passed as checkpoint" "$tok" "${run[@]}"

# ---- tokenizers -----------------------------------------------------------
m=("$model" -t 0 -n 8)
expect_error "missing tokenizer" "${m[@]}" -z /nonexistent/tok.bin
expect_error "directory as tokenizer" "${m[@]}" -z "$work/a-directory"
expect_error "empty tokenizer" "${m[@]}" -z "$work/empty.bin"
expect_error "/dev/null as tokenizer" "${m[@]}" -z /dev/null
expect_error "/dev/zero as tokenizer (bounded read)" "${m[@]}" -z /dev/zero
expect_error "no ./tokenizer.bin" "${m[@]}"
for cut in 3 4 11 100 $((tok_size / 2)) $((tok_size - 1)); do
  head -c "$cut" "$tok" >"$work/truncated-tok.bin"
  expect_error "tokenizer truncated to $cut bytes" "${m[@]}" -z "$work/truncated-tok.bin"
done
{ cat "$tok"; printf 'xyz'; } >"$work/padded-tok.bin"
expect_error "tokenizer with trailing bytes" "${m[@]}" -z "$work/padded-tok.bin"
{ cat "$tok"; cat "$tok"; } >"$work/doubled-tok.bin"
expect_error "tokenizer twice over" "${m[@]}" -z "$work/doubled-tok.bin"
if optional_model llama2_tokenizer.bin "tokenizer of another vocabulary"; then
  expect_error "tokenizer of another vocabulary" "${m[@]}" -z "$models/llama2_tokenizer.bin"
fi
expect_error "checkpoint passed as tokenizer" "${m[@]}" -z "$model"
printf "$(int32 2147483647)$(int32 0)$(int32 2147483647)abc" >"$work/huge-length.bin"
expect_error "tokenizer claiming a 2 GB token" "${m[@]}" -z "$work/huge-length.bin"
printf "$(int32 -1)" >"$work/negative-max.bin"
expect_error "tokenizer with a negative max_token_length" "${m[@]}" -z "$work/negative-max.bin"
for seed in 11 12 13 14 15; do
  random_file "$work/random-tok.bin" $((seed * 300)) "$seed"
  expect_error "random tokenizer (seed $seed)" "${m[@]}" -z "$work/random-tok.bin"
done

# ---- prompts files ----------------------------------------------------------
expect_error "missing prompts file" "${m[@]}" -z "$tok" --prompts-file /nonexistent/prompts.txt
expect_error "directory as prompts file" "${m[@]}" -z "$tok" --prompts-file "$work/a-directory"
expect_error "empty prompts file" "${m[@]}" -z "$tok" --prompts-file "$work/empty.bin"
printf 'The cat\n\nA dog\n' >"$work/blank-line.txt"
expect_error "prompts file with an empty line" "${m[@]}" -z "$tok" --prompts-file "$work/blank-line.txt"
expect_error "/dev/zero as prompts file (bounded read)" "${m[@]}" -z "$tok" --prompts-file /dev/zero
printf 'The cat\nThe cat and the dog and the bird\n' >"$work/long-line.txt"
expect_error "prompts file line longer than -n" "$model" -z "$tok" -t 0 -n 4 --prompts-file "$work/long-line.txt"

# ---- flags ----------------------------------------------------------------
expect_error "no arguments"
expect_error "empty model name" ""
expect_error "unknown option" "$model" --bogus
expect_error "option with a newline" "$model" $'--bogus\nsecond line'
expect_error "file name with a newline" $'/nonexistent/two\nlines.bin' "${run[@]}"
expect_error "missing value" "$model" -n
expect_error "-n not a number" "$model" -n abc
expect_error "-n negative" "$model" -n -1
expect_error "-n too large" "$model" -n 99999999999999999999
expect_error "-t NaN" "$model" -t nan
expect_error "-t negative" "$model" -t -1
expect_error "-p above 1" "$model" -p 2
expect_error "-s negative" "$model" -s -5
expect_error "--threads 0" "$model" --threads 0
expect_error "--threads too many" "$model" --threads 100000
expect_error "--prompt-ids not ids" "$model" --prompt-ids 1,x
expect_error "--prompt-ids outside the vocabulary" "$model" --prompt-ids 1,512 --ids
expect_error "--prompt-ids past int" "$model" --prompt-ids 1,99999999999
expect_error "two model files" "$model" "$model"
expect_error "prompt longer than -n" "$model" -z "$tok" -n 2 -i "The cat and the dog"
expect_error "--kv-type unknown" "$model" --kv-type f16
expect_error "--window 0" "$model" --window 0
expect_error "--sinks without --window" "$model" --sinks 2
expect_error "--sinks as large as --window" "$model" --window 4 --sinks 4
expect_error "--parallel without --prompts-file" "$model" --parallel 2
expect_error "--parallel 0" "$model" --prompts-file x --parallel 0
expect_error "--step-tokens 0" "$model" --prompts-file x --step-tokens 0
expect_error "--step-tokens without --prompts-file" "$model" --step-tokens 8
expect_error "--block-size 0" "$model" --prompts-file x --block-size 0
expect_error "--no-prefix-sharing without --prompts-file" "$model" --no-prefix-sharing
expect_error "--no-cache with --window" "$model" --no-cache --window 8
expect_error "--no-cache with --prompt-cache" "$model" --no-cache --prompt-cache x.kvs
expect_error "--prompts-file with -i" "$model" --prompts-file x -i "The cat"
expect_error "empty --prompt-cache name" "$model" --prompt-cache ""

# ---- prompt caches --------------------------------------------------------
# A prompt cache that does not fit is reported on one line and ignored: the
# run goes on (exit 0) and prints what it prints without a cache.
expect_ignored_cache() {
  local name="$1" cache="$2"
  cases=$((cases + 1))
  local out="$work/stdout" err="$work/stderr" status problems=()
  (cd "$work" && timeout 120 "$exe" "${cached_run[@]}" --prompt-cache "$cache" >"$out" 2>"$err" </dev/null)
  status=$?
  ((status == 0)) || problems+=("exit status $status (want 0)")
  cmp -s "$out" "$work/reference.txt" || problems+=("stdout differs from the run without a cache")
  local lines
  lines=$(wc -l <"$err")
  ((lines == 1)) || problems+=("$lines lines on stderr (want 1)")
  grep -q "rejected: .*; ignoring it" "$err" || problems+=("no 'rejected ... ignoring it' on stderr")
  if grep -qE 'Sanitizer|runtime error:|==[0-9]+==' "$err" "$out"; then problems+=("a sanitizer report"); fi
  if ((${#problems[@]} > 0)); then
    failures=$((failures + 1))
    echo "FAIL: $name: ${problems[*]}"
    head -n 20 "$err" | sed 's/^/    /'
  else
    echo "ok: $name: $(cat "$err")"
  fi
}
cached_run=("$model" -z "$tok" -t 0 -n 32 -i "The cat")
run_ok "the run without a cache" "$work/reference.txt" "${cached_run[@]}"
rm -f "$work/good.kvs"
run_ok "the first --prompt-cache run" "$work/first.txt" "${cached_run[@]}" --prompt-cache "$work/good.kvs"
cases=$((cases + 1))
if ! cmp -s "$work/first.txt" "$work/reference.txt"; then
  failures=$((failures + 1))
  echo "FAIL: the first --prompt-cache run printed other output than the run without a cache"
fi
if [[ ! -s "$work/good.kvs" ]]; then
  echo "FAIL: the first --prompt-cache run wrote no cache"
  failures=$((failures + 1))
else
  cache_size=$(stat -c %s "$work/good.kvs")
  # Not a session file: refused (exit 1) and never replaced.
  expect_refused_cache() {
    local before
    before=$(sha256sum <"$2")
    expect_error "$1" "${cached_run[@]}" --prompt-cache "$2"
    [[ "$(sha256sum <"$2")" == "$before" ]] || { failures=$((failures + 1)); echo "FAIL: $1: the file was changed"; }
  }
  : >"$work/bad.kvs"
  expect_refused_cache "empty prompt cache" "$work/bad.kvs"
  for cut in 100 216 $((cache_size / 2)) $((cache_size - 1)); do
    head -c "$cut" "$work/good.kvs" >"$work/bad.kvs"
    expect_ignored_cache "prompt cache truncated to $cut bytes" "$work/bad.kvs"
  done
  for at in 0 9 100 250 $((cache_size - 20)); do
    cp "$work/good.kvs" "$work/bad.kvs"
    printf '\377' | dd of="$work/bad.kvs" bs=1 seek="$at" conv=notrunc status=none
    if ((at < 8)); then
      expect_refused_cache "prompt cache with byte $at (of the magic) changed" "$work/bad.kvs"
    else
      expect_ignored_cache "prompt cache with byte $at changed" "$work/bad.kvs"
    fi
  done
  { cat "$work/good.kvs"; printf 'x'; } >"$work/bad.kvs"
  expect_ignored_cache "prompt cache with a trailing byte" "$work/bad.kvs"
  random_file "$work/bad.kvs" 3000 21
  expect_refused_cache "random prompt cache" "$work/bad.kvs"
  cp "$model" "$work/bad.kvs"
  expect_refused_cache "checkpoint as prompt cache" "$work/bad.kvs"
  if optional_model stories260K.bin "prompt cache of another model"; then
    rm -f "$work/other.kvs"
    if run_ok "the stories260K --prompt-cache run" /dev/null "$models/stories260K.bin" -z "$tok" -t 0 -n 32 \
      -i "The cat" --prompt-cache "$work/other.kvs"; then
      expect_ignored_cache "prompt cache of another model" "$work/other.kvs"
    fi
  fi
  cp "$work/good.kvs" "$work/bad.kvs"
  if run_ok "the int8 run without a cache" "$work/int8.txt" "${cached_run[@]}" --kv-type int8; then
    cases=$((cases + 1))
    (cd "$work" && timeout 120 "$exe" "${cached_run[@]}" --kv-type int8 --prompt-cache "$work/bad.kvs" \
      >"$work/stdout" 2>"$work/stderr" </dev/null)
    status=$?
    problems=()
    ((status == 0)) || problems+=("exit status $status (want 0)")
    cmp -s "$work/stdout" "$work/int8.txt" || problems+=("stdout differs from the int8 run without a cache")
    grep -q "rejected: it was saved with --kv-type f32" "$work/stderr" || problems+=("not rejected as such")
    if ((${#problems[@]} > 0)); then
      failures=$((failures + 1))
      echo "FAIL: prompt cache of another --kv-type: ${problems[*]}: $(cat "$work/stderr")"
    else
      echo "ok: prompt cache of another --kv-type: $(cat "$work/stderr")"
    fi
  fi
fi

echo
echo "$cases cases, $failures failures"
((failures == 0)) || exit 1
[[ $# -ge 2 ]] || rm -rf "$work"
