"""Render Resources/Screenshots/results.png from a demo run (scripts/run_demo.sh).

Coronal slices of the fixed image, the moving image, the warped moving image with the fixed
lung boundary, and the Jacobian determinant of the transform. This is a figure of real outputs
of the command line, not a screenshot of the Slicer application (which cannot run here).
Usage: .venv/bin/python scripts/make_results_figure.py [DEMO_DIR]
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import SimpleITK as sitk  # noqa: E402

demo = Path(sys.argv[1] if len(sys.argv) > 1 else "demo_output")
root = Path(__file__).resolve().parents[1]
arr = {name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for name, p in {
    "fixed": demo / "pair" / "fixed.nii.gz", "moving": demo / "pair" / "moving.nii.gz",
    "warped": demo / "registration" / "warped.nii.gz", "jacobian": demo / "registration" / "jacobian.nii.gz"}.items()}
report = json.loads((demo / "registration" / "report.json").read_text())
sp = sitk.ReadImage(str(demo / "pair" / "fixed.nii.gz")).GetSpacing()
j = arr["fixed"].shape[1] // 2
aspect = sp[2] / sp[0]
fig, ax = plt.subplots(1, 4, figsize=(14, 4.2))
titles = ["fixed (inhale)", "moving (simulated exhale)", "moving warped to fixed", "det(Jacobian)"]
for a, key, title in zip(ax, ["fixed", "moving", "warped", "jacobian"], titles, strict=True):
    sl = arr[key][:, j, :]
    if key == "jacobian":
        im = a.imshow(sl, origin="lower", cmap="RdBu_r", vmin=0.5, vmax=1.5, aspect=aspect)
        fig.colorbar(im, ax=a, shrink=0.8)
    else:
        a.imshow(sl, origin="lower", cmap="gray", vmin=-1000, vmax=200, aspect=aspect)
        if key == "warped":
            a.contour(arr["fixed"][:, j, :] < -500, [0.5], colors="y", linewidths=0.5)
    a.set_title(title)
    a.axis("off")
tre = report.get("tre_mm", {})
fig.suptitle(f"DeepLungReg: TRE {tre['before']['mean']:.2f} -> {tre['after']['mean']:.2f} mm, "
             f"folding {report['folding_percent']:.3f}%, {report['timings_s']['total']:.1f} s on 2 CPU cores")
fig.tight_layout()
out = root / "Resources" / "Screenshots" / "results.png"
out.parent.mkdir(parents=True, exist_ok=True)
fig.savefig(out, dpi=80)
print(f"wrote {out}")
