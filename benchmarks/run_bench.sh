#!/usr/bin/env bash
# bsqc bench on a folder (Kodak: ../shared/data/kodak) with every installed preset; results in benchmarks/results/.
set -euo pipefail
dir="${1:?usage: run_bench.sh FOLDER}"
here="$(cd "$(dirname "$0")" && pwd)"
name="$(basename "$dir")"
args=()
for p in $(bsqc presets --json | python -c 'import json,sys; print(" ".join(r["preset"] for r in json.load(sys.stdin)["presets"]))'); do
  args+=(--preset "$p")
done
mkdir -p "$here/results"
bsqc bench "$dir" "${args[@]}" --sweep --json "$here/results/bench-$name.json" --csv "$here/results/bench-$name.csv" \
  --plot "$here/results/bench-$name.png"
