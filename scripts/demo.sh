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
echo "-- comprehension sources (upstream splits kept)"
vlhealth build omnimedvqa     "$RAW/omnimedvqa"     --out "$SHARDS/omnimedvqa" --image-format jpg
vlhealth build vqa-rad        "$RAW/vqa_rad"        --out "$SHARDS/vqa_rad" --forms both
vlhealth build slake          "$RAW/slake"          --out "$SHARDS/slake"
vlhealth build pathvqa        "$RAW/pathvqa"        --out "$SHARDS/pathvqa"
vlhealth build mimic-cxr-vqa  "$RAW/mimic_cxr_vqa"  --out "$SHARDS/mimic_cxr_vqa"
vlhealth build llava-med      "$RAW/llava_med"      --out "$SHARDS/llava_med"
vlhealth build llava-instruct "$RAW/llava_instruct" --out "$SHARDS/llava_instruct"
vlhealth build llava-instruct "$RAW/llava_instruct" --text-only only --out "$SHARDS/llava_instruct_text"

echo "-- leakage guard: the demo plants a test image (recompressed, resized) in PubMedVision train"
vlhealth build pubmedvision   "$RAW/pubmedvision"   --out "$DEMO_DIR/leaky/pubmedvision"
vlhealth check-leaks "$SHARDS"/*/ "$DEMO_DIR/leaky/pubmedvision" --json "$DEMO_DIR/leaks.json"
drop=(); for d in omnimedvqa vqa_rad slake pathvqa mimic_cxr_vqa; do drop+=(--drop-leaks "$SHARDS/$d"); done
vlhealth build pubmedvision   "$RAW/pubmedvision"   --out "$SHARDS/pubmedvision" "${drop[@]}"
vlhealth check-leaks "$SHARDS"/*/ --fail

echo "== 3. statistics"
shopt -s nullglob
built=("$SHARDS"/*/)
if ((${#built[@]})); then
  vlhealth stats "${built[@]}" --plot "$DEMO_DIR/stats.png"
  vlhealth stats "${built[@]}" --json > "$DEMO_DIR/stats.json"
fi
echo "demo finished: outputs under $DEMO_DIR/"
