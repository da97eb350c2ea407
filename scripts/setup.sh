#!/usr/bin/env bash
# scripts/setup.sh — what the demo and the tests need before they run:
#   1. installs the Debian packages that are missing (apt-get as root, sudo
#      apt-get otherwise; nothing is installed, and apt is not touched, when
#      all of them are present),
#   2. configures kvcache in Release mode into build/,
#   3. builds the targets given as arguments (all targets when none is given).
#
# Environment:
#   KVCACHE_BUILD_DIR   build folder (default: build/ in the project root)
#   KVCACHE_WERROR      ON makes every warning an error (default OFF)
#   KVCACHE_NATIVE      OFF builds portable programs; by default they are built
#                       for this machine's CPU (-march=native) when the compiler
#                       takes it, whatever an earlier configure of the folder chose
#   KVCACHE_CMAKE_ARGS  further arguments for the configure step, split on spaces
#   KVCACHE_JOBS        parallel build jobs (default 2)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="${KVCACHE_BUILD_DIR:-$root/build}"
jobs="${KVCACHE_JOBS:-2}"

log() { printf '[setup] %s\n' "$*" >&2; }

# shellcheck source=scripts/packages.sh
source "$root/scripts/packages.sh"

configure() {
  local args=(-S "$root" -B "$build_dir" -DCMAKE_BUILD_TYPE=Release "-DKVCACHE_WERROR=${KVCACHE_WERROR:-OFF}")
  # -U: forget the folder's cached choice (a build/ configured before
  # KVCACHE_NATIVE defaulted to ON holds OFF), so that CMake decides again.
  if [[ -n "${KVCACHE_NATIVE:-}" ]]; then
    args+=("-DKVCACHE_NATIVE=$KVCACHE_NATIVE")
  else
    args+=(-UKVCACHE_NATIVE)
  fi
  if [[ -n "${KVCACHE_CMAKE_ARGS:-}" ]]; then
    local extra=()
    read -r -a extra <<<"$KVCACHE_CMAKE_ARGS"
    args+=("${extra[@]}")
  fi
  log "configuring into $build_dir"
  cmake "${args[@]}"
}

build() {
  log "building ${*:-all targets} with $jobs jobs"
  if (($# == 0)); then
    cmake --build "$build_dir" -j "$jobs"
  else
    cmake --build "$build_dir" -j "$jobs" --target "$@"
  fi
}

install_missing_packages "CMake >= 3.20, a C++17 compiler, Eigen 3.4, GoogleTest and Google Benchmark" \
  cmake make g++ libeigen3-dev libgtest-dev libbenchmark-dev
configure
build "$@"
