#!/usr/bin/env bash
# bsqc bench on a folder (Kodak: ../shared/data/kodak) with the installed quality ladder (q1 ... q9),
# plus any extra presets named as arguments; results in benchmarks/results/.
set -euo pipefail
dir="${1:?usage: run_bench.sh FOLDER [PRESET ...]}"
shift
here="$(cd "$(dirname "$0")" && pwd)"
name="$(basename "$dir")"
args=()
ladder="$(python -c 'from bsqcodec.model import weights; from bsqcodec.config import RUNG_NAMES; print(*[n for n in RUNG_NAMES if n in weights.installed()])')"
for p in $ladder "$@"; do
  args+=(--preset "$p")
done
mkdir -p "$here/results"
bsqc bench "$dir" "${args[@]}" --sweep --json "$here/results/bench-$name.json" --csv "$here/results/bench-$name.csv" \
  --plot "$here/results/bench-$name.png" --force
