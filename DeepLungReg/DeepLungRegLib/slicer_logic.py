"""Registration on MRML nodes, shared by the Slicer module's Logic, its self-test and pytest.

The Slicer GUI runs the library's command line in a child process (``PythonSlicer -m
DeepLungRegLib.cli register ...``) on temporary files written by :meth:`write_inputs`, then
calls :meth:`load_results`; :meth:`run` does the same in-process (tests, scripting).
Needs Slicer's MRML classes (Slicer or the ``slicer-core`` wheel).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import slicer_io
from .io import write_lps_landmarks
from .modelfile import MODEL_FILENAME, default_model_path, read_metadata, resource_path
from .preprocessing import NetworkGrid
from .transforms import transform_points

LIB_PARENT = Path(__file__).resolve().parents[1]            # folder holding DeepLungRegLib
EXTENSION_ROOT = LIB_PARENT.parent
SAMPLE_CT = "SampleData/chest_ct_cptac_C3N-00247_2mm.nii.gz"


@dataclass
class RegistrationOutputs:
    transform_node: object
    jacobian_node: object
    warped_node: object | None
    report: dict
    table_node: object | None = None
    plot_node: object | None = None
    mapped_markups: object | None = None
    tre: dict = field(default_factory=dict)


def model_folders(extra: list[str | os.PathLike] | None = None) -> list[Path]:
    """The shipped model plus every folder holding a ``model.safetensors`` below ``extra`` (one level)."""
    default = default_model_path()
    found = [default] if (default / MODEL_FILENAME).exists() else []
    for base in map(Path, extra or []):
        if (base / MODEL_FILENAME).exists():
            found.append(base)
        elif base.is_dir():
            found.extend(sorted(p.parent for p in base.glob(f"*/{MODEL_FILENAME}")))
    return found


def model_summary(path: str | os.PathLike) -> str:
    """One paragraph from the model's metadata (method, grid, training data, validation error)."""
    meta = read_metadata(path)
    tr = meta.get("training", {})
    val = tr.get("validation", {})
    parts = [f"{meta.get('method')} U-Net, grid {meta.get('grid_size')}³"]
    if meta.get("untrained"):
        parts.append("UNTRAINED (random weights)")
    if tr.get("iterations"):
        parts.append(f"{tr['iterations']} iterations on {len(tr.get('scans', []))} scan(s)")
    if val.get("final_averaged"):
        parts.append(f"validation end-point error {val['final_averaged']['epe_lung_mm']:.2f} mm "
                     f"(identity {val['identity']['epe_lung_mm']:.2f} mm)")
    return "; ".join(parts)


class RegistrationLogic:
    """Moves data between MRML nodes and the registration library."""

    def __init__(self, scene) -> None:
        self.scene = scene

    # ------------------------------------------------------------------ child-process path
    def write_inputs(self, folder: Path, fixed_node, moving_node, fixed_markups=None, moving_markups=None) -> dict:
        folder = Path(folder)
        paths = {"fixed": folder / "fixed.nrrd", "moving": folder / "moving.nrrd"}
        sitk.WriteImage(slicer_io.volume_node_to_image(fixed_node), str(paths["fixed"]))
        sitk.WriteImage(slicer_io.volume_node_to_image(moving_node), str(paths["moving"]))
        if fixed_markups is not None and moving_markups is not None:
            paths["fixed_landmarks"] = folder / "fixed_landmarks.txt"
            paths["moving_landmarks"] = folder / "moving_landmarks.txt"
            write_lps_landmarks(paths["fixed_landmarks"], slicer_io.markups_to_lps(fixed_markups))
            write_lps_landmarks(paths["moving_landmarks"], slicer_io.markups_to_lps(moving_markups))
        return paths

    @staticmethod
    def command_args(inputs: dict, out_dir: Path, model: str | os.PathLike | None, device: str = "auto",
                     affine: bool = True) -> list[str]:
        """Arguments of ``deeplungreg`` for these inputs (landmarks in LPS text)."""
        args = ["register", str(inputs["fixed"]), str(inputs["moving"]), "-o", str(out_dir), "--device", device,
                "--quiet", "--progress-lines"]
        if model:
            args += ["--model", str(model)]
        if not affine:
            args.append("--no-affine")
        if "fixed_landmarks" in inputs:
            args += ["--fixed-landmarks", str(inputs["fixed_landmarks"]), "--moving-landmarks",
                     str(inputs["moving_landmarks"]), "--landmark-format", "lps"]
        return args

    @staticmethod
    def child_command(python_executable: str, args: list[str]) -> tuple[list[str], dict]:
        """Command line and environment for running the CLI in a child Python (PythonSlicer)."""
        env = dict(os.environ)
        # source tree: the two module folders; installed extension: both libraries sit in LIB_PARENT
        paths = [str(LIB_PARENT)]
        if (EXTENSION_ROOT / "DeepLungRegTraining" / "DeepLungRegTrainingLib").is_dir():
            paths.append(str(EXTENSION_ROOT / "DeepLungRegTraining"))
        env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["PYTHONUNBUFFERED"] = "1"
        return [python_executable, "-m", "DeepLungRegLib.cli", *args], env

    # ------------------------------------------------------------------ results
    def load_results(self, out_dir: Path, fixed_node, moving_node, fixed_markups=None, moving_markups=None,
                     load_warped: bool = True, prefix: str = "DeepLungReg") -> RegistrationOutputs:
        out_dir = Path(out_dir)
        report = json.loads((out_dir / "report.json").read_text())
        tx = sitk.ReadTransform(str(out_dir / "transform.h5"))
        fixed_img = slicer_io.volume_node_to_image(fixed_node)
        lattice = NetworkGrid(**{k: tuple(v) for k, v in report["network_grid"].items()})
        field_img = slicer_io.transform_to_grid(tx, fixed_img, lattice)
        name = f"{prefix} {moving_node.GetName()} to {fixed_node.GetName()}"
        tnode = slicer_io.displacement_to_grid_transform_node(field_img, self.scene, name)
        slicer_io.set_registration_references(tnode, fixed_node, moving_node)
        jac = slicer_io.image_to_volume_node(sitk.ReadImage(str(out_dir / "jacobian.nii.gz")), self.scene,
                                             f"{prefix} Jacobian")
        slicer_io.show_jacobian(jac, self.scene)
        warped = None
        if load_warped and (out_dir / "warped.nii.gz").exists():
            warped = slicer_io.image_to_volume_node(sitk.ReadImage(str(out_dir / "warped.nii.gz")), self.scene,
                                                    f"{prefix} warped {moving_node.GetName()}")
        outputs = RegistrationOutputs(tnode, jac, warped, report)
        if fixed_markups is not None and moving_markups is not None:
            f = slicer_io.markups_to_lps(fixed_markups)
            m = slicer_io.markups_to_lps(moving_markups)
            mapped = transform_points(tx, f)
            affine = sitk.CompositeTransform(tx).GetNthTransform(0)  # transform.h5 is [affine, displacement]
            table, before, after = slicer_io.tre_table(self.scene, f, m, mapped, transform_points(affine, f),
                                                       name=f"{prefix} TRE")
            outputs.table_node = table
            outputs.plot_node = slicer_io.tre_plot(self.scene, table, name=f"{prefix} TRE plot")
            labels = [f"{i + 1}: {e:.1f} mm" for i, e in enumerate(after)]
            outputs.mapped_markups = slicer_io.lps_to_markups(mapped, self.scene, f"{prefix} mapped landmarks", labels)
            outputs.tre = {"before": before, "after": after}
        return outputs

    # ------------------------------------------------------------------ in-process
    def run(self, fixed_node, moving_node, model: str | os.PathLike | None = None, device: str = "cpu",
            affine: bool = True, fixed_markups=None, moving_markups=None, load_warped: bool = True) -> RegistrationOutputs:
        """Write inputs, run the command line in this process, load the results."""
        from .cli import main

        with tempfile.TemporaryDirectory(prefix="DeepLungReg-") as tmp:
            tmp = Path(tmp)
            inputs = self.write_inputs(tmp, fixed_node, moving_node, fixed_markups, moving_markups)
            args = self.command_args(inputs, tmp / "out", model, device, affine)
            rc = main(args)
            if rc != 0:
                raise RuntimeError(f"registration failed (exit code {rc}); see the messages above")
            return self.load_results(tmp / "out", fixed_node, moving_node, fixed_markups, moving_markups, load_warped)


def python_for_child() -> str:
    """PythonSlicer inside Slicer (its interpreter is sys.executable's sibling), else this Python."""
    exe = Path(sys.executable)
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        candidate = exe.with_name(name)
        if candidate.exists():
            return str(candidate)
    return sys.executable


def sample_ct_path() -> Path:
    """The bundled sample chest CT (source tree or installed extension)."""
    return resource_path(SAMPLE_CT)


def summary_lines(outputs: RegistrationOutputs) -> list[str]:
    r = outputs.report
    lines = [f"Folding: {r['folding_percent']:.4f}% of voxels ({r['folding_percent_lung']:.4f}% in lung)",
             f"Jacobian determinant: min {r['jacobian_min']:.3f}, max {r['jacobian_max']:.3f}",
             f"Time: {r['timings_s']['total']:.1f} s"]
    if outputs.tre:
        b, a = outputs.tre["before"], outputs.tre["after"]
        lines.append(f"TRE before: {b.mean():.2f} ± {b.std():.2f} mm; after: {a.mean():.2f} ± {a.std():.2f} mm "
                     f"(p95 {np.percentile(a, 95):.2f} mm)")
    return lines
