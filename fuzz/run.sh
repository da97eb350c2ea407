#!/usr/bin/env bash
# fuzz/run.sh — runs every libFuzzer harness of a fuzz build for a bounded
# time and fails on any finding (crash, sanitizer report, leak, timeout,
# out-of-memory, broken invariant).
#
#   fuzz/run.sh BUILD_DIR [WORK_DIR]
#
# BUILD_DIR was configured with -DKVCACHE_BUILD_FUZZERS=ON (see
# fuzz/CMakeLists.txt); the harnesses are those listed in
# BUILD_DIR/fuzz/fuzzers.txt. WORK_DIR (default: a new temporary folder, kept
# when something is found) receives:
#   seeds/<harness>/     the seed corpus: small valid files written by
#                        kvcache_fuzz_seeds, plus copies of the real model
#                        files (never committed to the project)
#   corpus/<harness>/    what the fuzzer found interesting (reused when
#                        WORK_DIR is given again)
#   findings/<harness>/  the inputs of crashes, leaks, timeouts, OOMs
#   logs/<harness>.log   libFuzzer's output
#
# Environment:
#   KVCACHE_FUZZ_SECONDS  seconds per harness (default 60)
#   KVCACHE_FUZZ_ONLY     run only the harnesses named here (space-separated)
#   KVCACHE_MODELS_DIR    the real model files (default ../shared/models)
#   KVCACHE_FUZZ_ARGS     further libFuzzer flags, split on spaces
set -euo pipefail

if (($# < 1 || $# > 2)); then
  echo "usage: $0 BUILD_DIR [WORK_DIR]" >&2
  exit 2
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$(cd "$1" && pwd)"
work="${2:-$(mktemp -d "${TMPDIR:-/tmp}/kvcache-fuzz.XXXXXX")}"
mkdir -p "$work"
work="$(cd "$work" && pwd)"
seconds="${KVCACHE_FUZZ_SECONDS:-60}"
models="${KVCACHE_MODELS_DIR:-$root/../shared/models}"
list="$build/fuzz/fuzzers.txt"
[[ -f "$list" ]] || { echo "$list not found: configure $build with -DKVCACHE_BUILD_FUZZERS=ON" >&2; exit 2; }
mapfile -t harnesses < <(grep -v '^$' "$list")
if [[ -n "${KVCACHE_FUZZ_ONLY:-}" ]]; then
  read -r -a harnesses <<<"$KVCACHE_FUZZ_ONLY"
fi

# ---- seeds ----------------------------------------------------------------
rm -rf "$work/seeds"
"$build/fuzz/kvcache_fuzz_seeds" "$work/seeds"
if [[ -d "$models" ]]; then
  mkdir -p "$work/seeds/fuzz_llama2c" "$work/seeds/fuzz_tokenizer_load" "$work/seeds/fuzz_tokenizer_encode"
  mkdir -p "$work/seeds/fuzz_gguf"
  for f in "$models"/*.gguf; do  # real GGUF files, if the folder has some
    [[ -e "$f" ]] && cp "$f" "$work/seeds/fuzz_gguf/"
  done
  for f in "$models"/*.bin; do
    [[ -e "$f" ]] || continue
    case "$(basename "$f")" in
      *tok*) cp "$f" "$work/seeds/fuzz_tokenizer_load/" ;;
      *) cp "$f" "$work/seeds/fuzz_llama2c/" ;;
    esac
  done
  # Real text with real UTF-8 for the encoder.
  [[ -f "$models/README.md" ]] && cp "$models/README.md" "$work/seeds/fuzz_tokenizer_encode/models-readme.md"
else
  echo "fuzz: no models folder at $models: seeds are the small files only" >&2
fi

# ---- the runs -------------------------------------------------------------
extra=()
[[ -n "${KVCACHE_FUZZ_ARGS:-}" ]] && read -r -a extra <<<"$KVCACHE_FUZZ_ARGS"
failed=()
summary=()
for h in "${harnesses[@]}"; do
  exe="$build/fuzz/$h"
  [[ -x "$exe" ]] || { echo "fuzz: $exe not built" >&2; failed+=("$h (not built)"); continue; }
  mkdir -p "$work/corpus/$h" "$work/seeds/$h" "$work/findings/$h" "$work/logs"
  flags=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=256
         -print_final_stats=1 -artifact_prefix="$work/findings/$h/")
  [[ -f "$root/fuzz/$h.dict" ]] && flags+=(-dict="$root/fuzz/$h.dict")
  log="$work/logs/$h.log"
  echo "fuzz: $h for ${seconds}s ($(ls "$work/seeds/$h" | wc -l) seeds)"
  start=$SECONDS
  status=0
  # Leaks count as findings (LeakSanitizer runs at exit and on each input).
  ASAN_OPTIONS="detect_leaks=1:${ASAN_OPTIONS:-}" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
    "$exe" "${flags[@]}" "${extra[@]}" "$work/corpus/$h" "$work/seeds/$h" >"$log" 2>&1 || status=$?
  took=$((SECONDS - start))
  runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')"
  found="$(find "$work/findings/$h" -type f | wc -l)"
  summary+=("$(printf '%-24s %4ds %10s runs  %5s corpus  status %d  findings %d' "$h" "$took" "$runs" \
    "$(ls "$work/corpus/$h" | wc -l)" "$status" "$found")")
  if ((status != 0 || found != 0)); then
    failed+=("$h")
    echo "fuzz: $h FAILED (exit status $status), the end of $log:" >&2
    tail -n 60 "$log" >&2
    find "$work/findings/$h" -type f -exec echo "  finding: {}" \; >&2
  fi
done

echo
echo "fuzz summary (${seconds}s per harness, work folder $work):"
printf '  %s\n' "${summary[@]}"
if ((${#failed[@]} > 0)); then
  echo "fuzz: findings in: ${failed[*]} (inputs kept in $work/findings)" >&2
  exit 1
fi
[[ $# -eq 2 ]] || rm -rf "$work"
