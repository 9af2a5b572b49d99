#!/usr/bin/env bash
# Main job on the embedded default: register the bundled sample CT against a breathing-like
# deformed copy of itself with the shipped model, and print the landmark errors.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
out=${1:-demo_output}
.venv/bin/deeplungreg simulate Resources/SampleData/chest_ct_cptac_C3N-00247_2mm.nii.gz -o "$out/pair"
.venv/bin/deeplungreg register "$out/pair/fixed.nii.gz" "$out/pair/moving.nii.gz" -o "$out/registration" \
  --fixed-landmarks "$out/pair/fixed_landmarks.txt" --moving-landmarks "$out/pair/moving_landmarks.txt"
echo "outputs: $out/registration/{transform.h5,warped.nii.gz,jacobian.nii.gz,report.json}"
