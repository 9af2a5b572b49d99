#!/usr/bin/env bash
# Regenerate docs/evaluation/ (table + plots): simulated breathing pairs from the shared real scan
# that the shipped model did NOT see in training, evaluated with identity, affine, DeepLungReg,
# elastix and the ground-truth oracle through the same harness.
# Usage: bash scripts/run_evaluation.sh [DATA_DIR]   (default: ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
data=${1:-../shared/data}
held_out="$data/elastix_3DCT_lung_baseline_small.mha"   # validation scan of the shipped model
work=runs/evaluation_pairs
rm -rf "$work"
mkdir -p "$work"
echo "case,fixed,moving,fixed_landmarks,moving_landmarks,ground_truth" > "$work/pairs.csv"
for amp in 10 15 20; do
  name="heldout_amp${amp}mm"
  .venv/bin/deeplungreg simulate "$held_out" -o "$work/$name" --amplitude "$amp" --seed "$amp"
  echo "$name,$name/fixed.nii.gz,$name/moving.nii.gz,$name/fixed_landmarks.txt,$name/moving_landmarks.txt,$name/ground_truth_transform.h5" >> "$work/pairs.csv"
done
rm -rf docs/evaluation
.venv/bin/deeplungreg evaluate --pairs "$work/pairs.csv" --methods identity,affine,deeplungreg,elastix,oracle \
  -o docs/evaluation
