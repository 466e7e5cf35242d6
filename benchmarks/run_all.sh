#!/usr/bin/env bash
# Run the three benchmarks (about 3 minutes in all on 2 cores); extra arguments go to each, e.g. --threads 2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
for b in bench_extract bench_tcav bench_memory; do
  "$PY" "benchmarks/$b.py" --workdir "$WORK" "$@"
  echo
done
