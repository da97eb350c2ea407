#!/usr/bin/env bash
# Prefix sharing (issue 13): kvcache-generate --prompts-file on 16 prompts
# that share a 150-word prefix and differ in a 20-word tail, 70 new tokens
# each, all 16 at once (--parallel 16), with prefix sharing (the default)
# and with --no-prefix-sharing, interleaved. Reports the medians of wall
# time and the pool's --stats (prefix_hit_tokens, kv_bytes_peak,
# kv_bytes_needed_peak), and checks that both print the same ids as
# --parallel 1.
#
# usage: scripts/bench_prefix.sh KVCACHE_GENERATE
#
# The model: $KVCACHE_MODELS_DIR/stories15M.bin when there, else random
# weights of its shape (scripts/random_ckpt.py, dim 288, hidden 768, 6
# layers, 6 heads, vocab 32000, seq_len 256), with the Llama 2 tokenizer.
# The words are ones the tokenizer keeps whole, so a prompt is BOS + 170
# tokens (the stats line's prompt_tokens says so). REPS (default 3),
# THREADS (default 1), EXTRA_ARGS (e.g. "--block-size 32").
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 KVCACHE_GENERATE" >&2; exit 2; }
bin="$1"
here="$(cd "$(dirname "$0")" && pwd)"
reps="${REPS:-3}"
threads="${THREADS:-1}"
extra=(${EXTRA_ARGS:-})
source "$here/bench_common.sh"
bench_setup

shared_prefix_prompts 16 "$work/prompts.txt"

# 171 prompt positions (BOS + 170) and 70 new tokens.
run() {
  local tag="$1"
  shift
  "$bin" "$model" -z "$tok" -n 240 -t 0 --ignore-eos --ids --stats --threads "$threads" \
    --prompts-file "$work/prompts.txt" "$@" "${extra[@]}" >"$work/out.$tag" 2>"$work/err.$tag"
  sed -n 's/^stats: //p' "$work/err.$tag" | tail -1
}
field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p"; }
median() { sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }

run single --parallel 1 >/dev/null
for rep in $(seq "$reps"); do
  for mode in on off; do
    flags=(--parallel 16)
    [ "$mode" = off ] && flags+=(--no-prefix-sharing)
    start=$(date +%s.%N)
    stats=$(run "$mode" "${flags[@]}")
    end=$(date +%s.%N)
    echo "$stats wall_s=$(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.3f", b - a}')" >>"$work/stats.$mode"
    cmp -s "$work/out.$mode" "$work/out.single" || echo "warning: --parallel 16 ($mode) prints differently from --parallel 1" >&2
  done
done

echo "model: $model, threads: $threads, $(head -1 "$work/stats.on" | sed 's/.*\(prompts=[0-9]* prompt_tokens=[0-9]* generated_tokens=[0-9]*\).*/\1/')"
printf '%-8s %10s %18s %14s %22s\n' sharing wall_s prefix_hit_tokens kv_bytes_peak kv_bytes_needed_peak
for mode in on off; do
  printf '%-8s %10s %18s %14s %22s\n' "$mode" "$(field wall_s <"$work/stats.$mode" | median)" \
    "$(field prefix_hit_tokens <"$work/stats.$mode" | median)" "$(field kv_bytes_peak <"$work/stats.$mode" | median)" \
    "$(field kv_bytes_needed_peak <"$work/stats.$mode" | median)"
done
on_peak=$(field kv_bytes_peak <"$work/stats.on" | median)
off_peak=$(field kv_bytes_peak <"$work/stats.off" | median)
on_wall=$(field wall_s <"$work/stats.on" | median)
off_wall=$(field wall_s <"$work/stats.off" | median)
awk -v a="$on_peak" -v b="$off_peak" -v c="$on_wall" -v d="$off_wall" \
  'BEGIN {printf "with / without sharing: kv_bytes_peak %.2fx, wall time %.2fx\n", a / b, c / d}'
echo "(medians of $reps interleaved runs; wall_s: the whole run, loading included)"
