#!/usr/bin/env bash
# The main job end to end on embedded demo data: synthetic replicas of the upstream layouts ->
# shards -> statistics (-> training and evaluation as those stages land).
# Called by `make demo` with the project's virtualenv on PATH; DEMO_DIR picks the output folder.
set -euo pipefail
DEMO_DIR="${DEMO_DIR:-demo}"
RAW="$DEMO_DIR/raw"
SHARDS="$DEMO_DIR/shards"
rm -rf "$DEMO_DIR"
mkdir -p "$SHARDS"

echo "== 1. demo data (synthetic replicas of the upstream layouts) -> $RAW"
vlhealth demo-data "$RAW"

echo "== 2. build shards"
# (builders are added here as they land)

echo "== 3. statistics"
shopt -s nullglob
built=("$SHARDS"/*/)
if ((${#built[@]})); then
  vlhealth stats "${built[@]}" --plot "$DEMO_DIR/stats.png"
  vlhealth stats "${built[@]}" --json > "$DEMO_DIR/stats.json"
fi
echo "demo finished: outputs under $DEMO_DIR/"
