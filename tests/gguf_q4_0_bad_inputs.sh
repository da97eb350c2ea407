#!/usr/bin/env bash
# tests/gguf_q4_0_bad_inputs.sh — benchmarks/gguf_q4_0 (the q4_0 file
# scripts/bench_gguf.sh times) against bad arguments: each ends with exit
# code 1 and one line on stderr naming the problem, and an existing output
# file is left byte for byte as it was. With the shared models
# ($KVCACHE_MODELS_DIR), it also writes stories260K as q4_0 once and checks
# the file starts with GGUF; without them that case is skipped, or fails
# under KVCACHE_REQUIRE_MODELS=1. Registered by benchmarks/CMakeLists.txt.
#
#   tests/gguf_q4_0_bad_inputs.sh GGUF_Q4_0 WORK_DIR
set -uo pipefail

exe="${1:?usage: $0 GGUF_Q4_0 WORK_DIR}"
work="${2:?usage: $0 GGUF_Q4_0 WORK_DIR}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
models="${KVCACHE_MODELS_DIR:-$here/../../shared/models}"
rm -rf "$work" && mkdir -p "$work" || exit 1
failures=0

# expect_error WHAT NEEDLE ARGS...: exit 1, one stderr line containing NEEDLE.
expect_error() {
  local what="$1" needle="$2"
  shift 2
  "$exe" "$@" >"$work/out" 2>"$work/err"
  local rc=$?
  if [[ $rc -ne 1 || $(wc -l <"$work/err") -ne 1 ]] || ! grep -qF -- "$needle" "$work/err"; then
    echo "FAIL: $what: exit $rc, stderr: $(cat "$work/err")"
    failures=$((failures + 1))
  fi
}

printf 'not a model' >"$work/junk.bin"
printf 'a file of the user' >"$work/mine.gguf"
cp "$work/mine.gguf" "$work/mine.before"

expect_error "no arguments" "usage: gguf_q4_0"
expect_error "too many arguments" "usage: gguf_q4_0" a b c d
expect_error "missing checkpoint" "no such file" "$work/none.bin" "$work/junk.bin" "$work/new.gguf"
expect_error "not a checkpoint" "junk.bin" "$work/junk.bin" "$work/junk.bin" "$work/new.gguf"
expect_error "existing output" "exists" "$work/junk.bin" "$work/junk.bin" "$work/mine.gguf"
cmp -s "$work/mine.gguf" "$work/mine.before" || { echo "FAIL: the existing output file was changed"; failures=$((failures + 1)); }
[[ ! -e "$work/new.gguf" ]] || { echo "FAIL: a failed run left $work/new.gguf"; failures=$((failures + 1)); }

if [[ -f "$models/stories260K.bin" && -f "$models/tok512.bin" ]]; then
  if ! "$exe" "$models/stories260K.bin" "$models/tok512.bin" "$work/s.gguf" 2>"$work/err"; then
    echo "FAIL: writing stories260K as q4_0: $(cat "$work/err")"
    failures=$((failures + 1))
  elif [[ "$(head -c 4 "$work/s.gguf")" != GGUF ]]; then
    echo "FAIL: $work/s.gguf does not start with GGUF"
    failures=$((failures + 1))
  fi
  expect_error "existing output it wrote itself" "exists" "$models/stories260K.bin" "$models/tok512.bin" "$work/s.gguf"
elif [[ "${KVCACHE_REQUIRE_MODELS:-}" == 1 ]]; then
  echo "FAIL: stories260K.bin / tok512.bin not found in $models and KVCACHE_REQUIRE_MODELS=1"
  failures=$((failures + 1))
fi

[[ $failures -eq 0 ]] && echo "gguf_q4_0: every bad input refused" || exit 1
