#!/usr/bin/env bash
# The two plots of issue 13, into bench/results (or $KVCACHE_BENCH_RESULTS):
#   prefix_memory.svg   the most KV bytes the pool holds against the number
#                       of concurrent sessions whose prompts share a
#                       150-word prefix (then a 20-word tail each, 70 new
#                       tokens), with and without prefix sharing: the
#                       kv_bytes_peak that kvcache-generate --stats reports
#                       for --prompts-file with --parallel N = N prompts
#   batch_scaling.svg   aggregate decode tokens/s against the batch size,
#                       from a bench_batch JSON (--benchmark_out), 1 and 2
#                       threads
#
# usage: scripts/bench_sharing.sh KVCACHE_GENERATE [BENCH_BATCH_JSON]
# (without the JSON, only the memory plot)
#
# The model and prompts are bench_prefix.sh's (stories15M's shape, random
# weights unless $KVCACHE_MODELS_DIR/stories15M.bin exists). Memory does not
# depend on timing; the batch plot is as good as the run that made the JSON.
set -euo pipefail

[ $# -ge 1 ] && [ $# -le 2 ] || { echo "usage: $0 KVCACHE_GENERATE [BENCH_BATCH_JSON]" >&2; exit 2; }
bin="$1"
batch_json="${2:-}"
here="$(cd "$(dirname "$0")" && pwd)"
results="${KVCACHE_BENCH_RESULTS:-$here/../bench/results}"
command -v gnuplot >/dev/null || { echo "$0: needs gnuplot (apt-get install gnuplot-nox)" >&2; exit 1; }
source "$here/bench_common.sh"
bench_setup

echo "# sessions  kv_bytes_peak(MB) sharing  kv_bytes_peak(MB) no sharing" >"$work/memory.dat"
for n in 1 2 4 8 16; do
  shared_prefix_prompts "$n" "$work/prompts.txt"
  row="$n"
  for flag in "" "--no-prefix-sharing"; do
    peak=$("$bin" "$model" -z "$tok" -n 240 -t 0 --ignore-eos --ids --stats --threads 1 --prompts-file "$work/prompts.txt" \
      --parallel "$n" $flag 2>&1 >/dev/null | sed -n 's/.*kv_bytes_peak=\([0-9]*\).*/\1/p')
    row="$row $(awk -v b="$peak" 'BEGIN {printf "%.2f", b / 1e6}')"
  done
  echo "$row" >>"$work/memory.dat"
done
cp "$work/memory.dat" "$results/prefix_memory.dat"

plot_batch=""
if [ -n "$batch_json" ]; then
python3 - "$batch_json" "$work/batch.dat" <<'EOF'
import json, re, sys
rows = {}
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    m = re.match(r"BM_BatchedDecode/B:(\d+)/threads:(\d+)", b["name"])
    if not m or b.get("aggregate_name", "median") != "median":
        continue
    rows.setdefault(int(m.group(1)), {})[int(m.group(2))] = b["tokens_per_second"]
with open(sys.argv[2], "w") as f:
    f.write("# sessions  tok/s 1 thread  tok/s 2 threads\n")
    for n in sorted(rows):
        f.write(f"{n} {rows[n].get(1, 'NaN')} {rows[n].get(2, 'NaN')}\n")
EOF
cp "$work/batch.dat" "$results/batch_scaling.dat"
plot_batch="
set logscale x 2
set output \"$results/batch_scaling.svg\"
set title \"Batched decode: aggregate tokens/s against sessions stepped together (bench_batch, stories15M shape)\"
set xlabel \"sessions in the batch\"
set ylabel \"tokens/s\"
plot \"$results/batch_scaling.dat\" using 1:2 with linespoints lw 2 pt 7 lc rgb \"#1f77b4\" title \"1 thread\", \
     \"\"                          using 1:3 with linespoints lw 2 pt 5 lc rgb \"#2ca02c\" title \"2 threads\""
fi

gnuplot <<EOF
set terminal svg size 760,480 dynamic noenhanced font "sans,12" background rgb "white"
set grid lc rgb "#dddddd"
set key top left box opaque
set format x "%g"
set output "$results/prefix_memory.svg"
set title "KV memory held at the peak: sessions sharing a 150-token prompt prefix (stories15M shape)"
set xlabel "concurrent sessions (each: 150 shared + 20 own prompt tokens, 70 generated)"
set ylabel "kv_bytes_peak (MB)"
plot "$results/prefix_memory.dat" using 1:3 with linespoints lw 2 pt 5 lc rgb "#d62728" title "no prefix sharing", \
     ""                         using 1:2 with linespoints lw 2 pt 7 lc rgb "#1f77b4" title "prefix sharing (blocks of 16)"
$plot_batch
EOF
cat "$results/prefix_memory.dat"
echo "wrote $results/prefix_memory.svg${batch_json:+ and $results/batch_scaling.svg}"
