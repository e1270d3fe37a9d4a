#!/usr/bin/env bash
# Regenerate every figure in examples/figures/ (PNG + JSON of the measured numbers) at full size.
#
#   examples/make_figures.sh            # all examples/*.py (the paper reproductions, CDAT, LightningCLI);
#                                       # about 30 min of one CPU thread at full size
#   examples/make_figures.sh --fast     # reduced size, as in the tests (a quick smoke run)
#   PYTHON=/path/to/python examples/make_figures.sh
#
# One thread per run (torch is much slower with oversubscribed threads on small models); runs are sequential.
# Each script prints a one-paragraph summary of what it measured; they are collected in figures/SUMMARY.txt.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/figures"
python="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}" MPLBACKEND=Agg
mkdir -p "$out"
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
summary="$out/SUMMARY.txt"
: > "$summary"
for script in "$here"/*.py; do
    name="$(basename "$script" .py)"
    case "$name" in _*) continue ;; esac  # shared helpers (_digits.py, _training.py), not examples
    extra=()
    if [ "$name" = "lightning_cli" ]; then
        extra=(--logs "$logs/lightning_cli_logs" --trainer.enable_progress_bar=false)
    fi
    echo "== $name"
    start=$(date +%s)
    "$python" "$script" --out "$out" "${extra[@]}" "$@" | tee -a "$summary"
    echo "   ($name: $(( $(date +%s) - start )) s)"
    echo >> "$summary"
done
echo "Figures in $out; summaries in $summary (total: $SECONDS s)"
