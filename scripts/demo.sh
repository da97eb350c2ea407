#!/usr/bin/env bash
# scripts/demo.sh — sets up and builds (see setup.sh), then runs toy-gpt: a
# small GPT with random weights generating text with and without the KV cache.
# Arguments go to toy-gpt, e.g.: scripts/demo.sh --tokens 500 --d-model 256
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
build_dir="${KVCACHE_BUILD_DIR:-$here/../build}"

bash "$here/setup.sh" toy-gpt
exec "$build_dir/examples/toy-gpt" "$@"
