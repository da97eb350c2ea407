# bench_plots.gp — the SVG plots of scripts/bench.sh, from the columns that
# bench_report.py writes. Run as:
#   gnuplot -e "data='DATA_DIR'; out='RESULTS_DIR'" scripts/bench_plots.gp
# A plot whose data file is missing (its benchmark did not run) is skipped.

file_exists(f) = system("[ -f '" . f . "' ] && echo 1 || echo 0") eq "1"

set terminal svg size 760,480 dynamic noenhanced font "sans,12" background rgb "white"
set grid lc rgb "#dddddd"
set key top left box opaque
set logscale x 2
set format x "%g"

# ---- per-step latency against position ---------------------------------------
if (file_exists(data . "/steps.dat")) {
  set output out . "/step_latency.svg"
  set title "One generation step to n positions (stories15M shape, 1 thread)"
  set xlabel "n (positions in the sequence after the step)"
  set ylabel "time per step (ms)"
  set logscale y 10
  set format y "%g"
  plot data . "/steps.dat" using 1:($2*1e3) with linespoints lw 2 pt 7 lc rgb "#1f77b4" title "cached: 1 token over n-1 cached", \
       ""                  using 1:($3*1e3) with lines lw 1 dt 2 lc rgb "#1f77b4" title "cached, predicted", \
       ""                  using 1:($4*1e3) with linespoints lw 2 pt 5 lc rgb "#d62728" title "uncached: all n tokens again", \
       ""                  using 1:($5*1e3) with lines lw 1 dt 2 lc rgb "#d62728" title "uncached, predicted"
  unset logscale y
}

# ---- speedup against length ---------------------------------------------------
if (file_exists(data . "/speedup.dat")) {
  set output out . "/speedup.svg"
  set title "Speedup of cached over uncached generation (stories15M shape, 1 thread)"
  set xlabel "N positions generated (one-token prompt)"
  set ylabel "uncached time / cached time"
  set logscale y 2
  set format y "%g"
  plot data . "/speedup.dat" using 1:4 with linespoints lw 2 pt 7 lc rgb "#2ca02c" title "measured", \
       ""                    using 1:5 with linespoints lw 2 pt 4 dt 2 lc rgb "#555555" title "predicted from FLOPs and bytes"
  unset logscale y
}

# ---- append cost against length ----------------------------------------------
if (file_exists(data . "/append.dat")) {
  set output out . "/append.svg"
  set title "Cost per appended token (one layer, 4 kv heads × d_k 16)"
  set xlabel "tokens appended one at a time"
  set ylabel "time per token (ns)"
  set logscale y 10
  set format y "%g"
  plot data . "/append.dat" using 1:($2*1e9) with linespoints lw 2 pt 7 lc rgb "#1f77b4" title "KVCache::append, new cache", \
       ""                   using 1:($3*1e9) with linespoints lw 2 pt 6 lc rgb "#17becf" title "KVCache::append, reused cache", \
       ""                   using 1:($4*1e9) with linespoints lw 2 pt 5 lc rgb "#d62728" title "naive concat (reallocate + copy)"
  unset logscale y
}

# ---- attention over the cache ------------------------------------------------
if (file_exists(data . "/attention.dat")) {
  set output out . "/attention.svg"
  set terminal svg size 1000,440 dynamic noenhanced font "sans,12" background rgb "white"
  set multiplot layout 1,2 title "One attention decode step over n cached tokens (stories15M layer: d_model 288, 6 heads)"
  set title "time per step"
  set xlabel "n cached tokens"
  set ylabel "µs"
  set logscale y 10
  set format y "%g"
  plot data . "/attention.dat" using 1:($2*1e6) with linespoints lw 2 pt 7 lc rgb "#1f77b4" title "1 thread", \
       ""                      using 1:($4*1e6) with linespoints lw 2 pt 5 lc rgb "#ff7f0e" title "2 threads"
  unset logscale y
  set title "K and V read per step / step time"
  set ylabel "GB/s"
  set yrange [0:*]
  plot data . "/attention.dat" using 1:3 with linespoints lw 2 pt 7 lc rgb "#1f77b4" title "1 thread", \
       ""                      using 1:5 with linespoints lw 2 pt 5 lc rgb "#ff7f0e" title "2 threads"
  unset multiplot
  set yrange [*:*]
}
