#!/usr/bin/env bash
# Regenerate docs/evaluation/ (table + plots): simulated breathing pairs from shared real scans that
# the shipped model did NOT see in training, evaluated with identity, affine, DeepLungReg at each
# refine level, elastix and the ground-truth oracle through the same harness.
# Usage: bash scripts/run_evaluation.sh [DATA_DIR]   (default: ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
data=${1:-../shared/data}
work=runs/evaluation_pairs
rm -rf "$work"
mkdir -p "$work"
echo "case,fixed,moving,fixed_landmarks,moving_landmarks,ground_truth" > "$work/pairs.csv"
add_pair() {  # scan short-name amplitude
  local name="$2_amp$3mm"
  .venv/bin/deeplungreg simulate "$data/$1" -o "$work/$name" --amplitude "$3" --seed "$3"
  echo "$name,$name/fixed.nii.gz,$name/moving.nii.gz,$name/fixed_landmarks.txt,$name/moving_landmarks.txt,$name/ground_truth_transform.h5" >> "$work/pairs.csv"
}
# the shipped models' held-out scans: the elastix 3DCT (low resolution; the first eppenhof2018 model's validation
# scan) and a full-size scan no shipped model trained on (the others validated on it)
for amp in 10 15 20 30; do add_pair elastix_3DCT_lung_baseline_small.mha heldout3dct "$amp"; done
for amp in 15 30; do add_pair lidc_idri_0001.nii.gz lidc0001 "$amp"; done
# regenerate everything but the ablation studies (docs/evaluation/ablations/, written by the benchmarks)
mkdir -p docs/evaluation
find docs/evaluation -mindepth 1 -maxdepth 1 ! -name ablations -exec rm -rf {} +
.venv/bin/deeplungreg evaluate --pairs "$work/pairs.csv" \
  --methods identity,affine,deeplungreg:off,deeplungreg:fast,deeplungreg:full,eppenhof2018:off,eppenhof2018:full,eppenhof2018tps:off,eppenhof2018tps:full,eppenhof2019:off,eppenhof2019:full,sokooti2017:off,sokooti2017:full,elastix,oracle \
  --qa deeplungreg:full,elastix --view none -o docs/evaluation
