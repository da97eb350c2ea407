#!/usr/bin/env bash
# Aggregate tokens/s of kvcache-generate --prompts-file with --parallel 8
# against --parallel 1 (issue 13's target: >= 3x, with 1 thread and with 2).
#
# usage: scripts/bench_parallel.sh KVCACHE_GENERATE [OTHER_KVCACHE_GENERATE ...]
#
# The workload: 32 prompts of 5 to 120 tokens (BOS included; the same file on
# every run: words drawn by a fixed LCG), -n 128, greedy, --ignore-eos (every
# prompt runs to its 128 positions), on a model of stories15M's shape:
# $KVCACHE_MODELS_DIR/stories15M.bin when there, else random weights written
# by scripts/random_ckpt.py (dim 288, hidden 768, 6 layers, 6 heads, vocab
# 32000, seq_len 256), with the Llama 2 tokenizer (llama2_tokenizer.bin).
# Each binary given is run interleaved with the others, REPS times (default
# 3) per thread count in THREADS (default "1 2"); the table gives medians of
# the tok_s that --stats reports, and the ratio parallel 8 / parallel 1.
# Also checks that --parallel 8 prints exactly what --parallel 1 prints.
set -euo pipefail

[ $# -ge 1 ] || { echo "usage: $0 KVCACHE_GENERATE [OTHER_KVCACHE_GENERATE ...]" >&2; exit 2; }
here="$(cd "$(dirname "$0")" && pwd)"
reps="${REPS:-3}"
threads_list="${THREADS:-1 2}"
extra=(${EXTRA_ARGS:-})  # e.g. EXTRA_ARGS="--step-tokens 32"
source "$here/bench_common.sh"
bench_setup

# 32 prompts; prompt k has about 4 + (k * 23 mod 32) * 115 / 31 words (most
# of these words are one token each, after BOS).
python3 - "$work/prompts.txt" <<'EOF'
import sys
words = ("the a cat dog sat ran on in big small red blue tree house and then one day little girl boy "
         "saw found happy sad sun moon play ball went home with her his friend").split()
state = 12345
lines = []
for k in range(32):
    n = 4 + (k * 23 % 32) * 115 // 31
    out = []
    for _ in range(n):
        state = (state * 1103515245 + 12345) % 2**31
        out.append(words[state % len(words)])
    lines.append(" ".join(out).capitalize())
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
EOF

# Runs binary $1 with --parallel $2 and --threads $3; output in $work/out.$4.
# Prints the tok_s --stats reports (tokens per second of wall time) and the
# generated tokens per second of CPU time (user + system): on a shared
# machine the first follows the other processes' load, the second much less
# (with one thread; with more, it counts time spent waiting at barriers).
run() {
  local bin="$1" parallel="$2" threads="$3" tag="$4"
  /usr/bin/time -f "cpu %U %S" -o "$work/time.$tag" \
    "$bin" "$model" -z "$tok" -n 128 -t 0 -s 1 --ignore-eos --threads "$threads" --stats \
    --prompts-file "$work/prompts.txt" --parallel "$parallel" "${extra[@]}" \
    >"$work/out.$tag" 2>"$work/err.$tag"
  local wall generated
  wall=$(sed -n 's/.*tok_s=\([0-9.]*\).*/\1/p' "$work/err.$tag")
  generated=$(sed -n 's/.*generated_tokens=\([0-9]*\).*/\1/p' "$work/err.$tag")
  awk -v w="$wall" -v g="$generated" '/^cpu/ {printf "%s %.2f\n", w, g / ($2 + $3)}' "$work/time.$tag"
}

median() { sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }

echo "model: $model"
"$1" "$model" -z "$tok" -n 128 -t 0 --ignore-eos --stats --prompts-file "$work/prompts.txt" --parallel 8 \
  "${extra[@]}" 2>&1 >/dev/null | sed -n 's/^stats: \(prompts=[0-9]* prompt_tokens=[0-9]* generated_tokens=[0-9]*\).*/workload: \1/p'
for threads in $threads_list; do
  for rep in $(seq "$reps"); do
    b=0
    for bin in "$@"; do
      for parallel in 1 8; do
        run "$bin" "$parallel" "$threads" "$b.$parallel" >>"$work/tok_s.$b.$parallel.$threads"
      done
      cmp -s "$work/out.$b.1" "$work/out.$b.8" || echo "warning: $bin prints differently with --parallel 8" >&2
      b=$((b + 1))
    done
  done
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
printf '%-40s %7s | %9s %9s %6s | %9s %9s %6s\n' binary threads "p1 tok/s" "p8 tok/s" "p8/p1" "p1 /cpu-s" "p8 /cpu-s" "p8/p1"
for threads in $threads_list; do
  b=0
  for bin in "$@"; do
    p1=$(cut -d' ' -f1 "$work/tok_s.$b.1.$threads" | median)
    p8=$(cut -d' ' -f1 "$work/tok_s.$b.8.$threads" | median)
    c1=$(cut -d' ' -f2 "$work/tok_s.$b.1.$threads" | median)
    c8=$(cut -d' ' -f2 "$work/tok_s.$b.8.$threads" | median)
    printf '%-40s %7s | %9s %9s %6s | %9s %9s %6s\n' "$bin" "$threads" "$p1" "$p8" "$(ratio "$p8" "$p1")" \
      "$c1" "$c8" "$(ratio "$c8" "$c1")"
    b=$((b + 1))
  done
done
echo "(medians of $reps interleaved runs each; tok/s: generated tokens per second of wall time; /cpu-s: per second of CPU time)"
