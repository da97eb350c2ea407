#!/usr/bin/env bash
# scripts/test.sh — sets up and builds everything (see setup.sh), then runs the
# whole test suite. Arguments go to ctest, e.g.: scripts/test.sh -R KVCache
#
# Tests that read the real models find them in $KVCACHE_MODELS_DIR or in
# ../shared/models beside the project; without them they are skipped, and with
# KVCACHE_REQUIRE_MODELS=1 they fail instead.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
build_dir="${KVCACHE_BUILD_DIR:-$here/../build}"

bash "$here/setup.sh"
ctest --test-dir "$build_dir" --output-on-failure -j "${KVCACHE_JOBS:-2}" "$@"
