#!/usr/bin/env bash
# scripts/bench.sh — every benchmark, one command:
#   1. installs the Debian packages that are missing (as scripts/setup.sh
#      does, plus gnuplot-nox and python3 for the plots and the summary),
#   2. configures a Release build in build-bench/ with -march=native (the
#      figures of llama2.c's run in issue 4 are for -Ofast -march=native, so
#      the comparison gets the same instruction set; kvcache keeps IEEE math,
#      no -ffast-math) and builds the benchmark programs and kvcache-generate,
#   3. runs bench_generate, bench_kv_cache, bench_decode, bench_rss and
#      bench_batch, each writing Google Benchmark JSON to
#      bench/results/NAME.json,
#   4. writes bench/results/summary.md (scripts/bench_report.py) and draws
#      bench/results/*.svg (scripts/bench_plots.gp).
# It takes about 6 minutes on a quiet 2-core machine, build included; most of
# the run is the uncached generation of 1024 positions.
#
# Environment:
#   KVCACHE_BENCH_BUILD_DIR  build folder (default: build-bench/ in the project root)
#   KVCACHE_BENCH_RESULTS    results folder (default: bench/results/ in the project root)
#   KVCACHE_JOBS             parallel build jobs (default 2)
#   OMP_WAIT_POLICY          default PASSIVE: threads waiting at a barrier
#                            sleep. On this shared 2-core machine, spinning
#                            threads (ACTIVE, or libgomp's default spin-then-
#                            sleep) turn a 2-thread step into tens of
#                            milliseconds whenever another process holds a
#                            core. On a quiet machine, OMP_WAIT_POLICY=ACTIVE
#                            scripts/bench.sh saves the wake-up of each
#                            parallel region.
# Arguments are passed to every benchmark program, e.g.
#   scripts/bench.sh --benchmark_min_time=0.05
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="${KVCACHE_BENCH_BUILD_DIR:-$root/build-bench}"
results="${KVCACHE_BENCH_RESULTS:-$root/bench/results}"
jobs="${KVCACHE_JOBS:-2}"

log() { printf '[bench] %s\n' "$*" >&2; }

# shellcheck source=scripts/packages.sh
source "$root/scripts/packages.sh"

# -Wno-maybe-uninitialized: with AVX-512 enabled, g++ 12 reports false
# positives inside its own avx512fintrin.h, inlined into Eigen's GEMM packing.
flags="-march=native"
if "${CXX:-c++}" --version 2>/dev/null | grep -q 'Free Software Foundation'; then
  flags+=" -Wno-maybe-uninitialized"
fi

install_missing_packages "CMake >= 3.20, a C++17 compiler, Eigen 3.4, Google Benchmark, gnuplot and python3" \
  cmake make g++ libeigen3-dev libbenchmark-dev gnuplot-nox python3
log "configuring into $build_dir (CMAKE_CXX_FLAGS='$flags')"
cmake -S "$root" -B "$build_dir" -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CXX_FLAGS=$flags" \
  -DKVCACHE_BUILD_TESTS=OFF -DKVCACHE_BUILD_BENCHMARKS=ON -DKVCACHE_BUILD_EXAMPLES=ON >/dev/null
programs=(bench_generate bench_kv_cache bench_decode bench_rss bench_batch)
log "building ${programs[*]} kvcache-generate with $jobs jobs"
cmake --build "$build_dir" -j "$jobs" --target "${programs[@]}" kvcache-generate

mkdir -p "$results"
data="$build_dir/bench-data"
mkdir -p "$data"
# The checkpoints bench_decode writes, read again by kvcache-generate in bench_rss.
export KVCACHE_BENCH_CHECKPOINTS="$build_dir/checkpoints"
# The sessions set their thread counts (1 or 2); this is only OpenMP's default.
export OMP_NUM_THREADS=2
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
omp="OMP_NUM_THREADS=$OMP_NUM_THREADS, OMP_WAIT_POLICY=$OMP_WAIT_POLICY"
log "running with $omp"

start=$SECONDS
for program in "${programs[@]}"; do
  log "running $program"
  "$build_dir/benchmarks/$program" --benchmark_out="$results/$program.json" --benchmark_out_format=json "$@"
done
wall=$((SECONDS - start))
rm -rf "$KVCACHE_BENCH_CHECKPOINTS"

machine="$(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1)"
BENCH_MACHINE="${machine:-unknown}" \
BENCH_CORES="$(nproc) ($(lscpu 2>/dev/null | sed -n 's/^Thread(s) per core:[[:space:]]*//p' | head -n 1) thread(s) per core)" \
BENCH_COMMAND="${OMP_WAIT_POLICY:+OMP_WAIT_POLICY=$OMP_WAIT_POLICY }scripts/bench.sh${*:+ $*}" \
BENCH_FLAGS="-O3 -DNDEBUG $flags ($("${CXX:-c++}" --version | head -n 1))" \
BENCH_OMP="$omp" \
BENCH_WALL_SECONDS="$wall" \
  python3 "$root/scripts/bench_report.py" "$results" "$data"
gnuplot -e "data='$data'; out='$results'" "$root/scripts/bench_plots.gp"
log "benchmarks ran in ${wall}s; results, plots and summary.md in $results"
