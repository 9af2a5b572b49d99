"""Registration and training jobs on MRML nodes, shared by the Slicer modules, their self-tests and pytest.

The Slicer GUI runs the library's command line in a child process (``PythonSlicer -m
DeepLungRegLib.cli register ...``) on temporary files written by :meth:`RegistrationLogic.prepare_job`,
then calls :meth:`RegistrationLogic.finish_job`; :meth:`RegistrationLogic.run` does the same
in-process (tests, scripting). Needs Slicer's MRML classes (Slicer or the ``slicer-core`` wheel),
numpy and SimpleITK (bundled with Slicer) and nothing else: torch and the other registration
dependencies are needed only in the child process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import SimpleITK as sitk

from . import slicer_io
from .io import write_lps_landmarks
from .model_catalog import (  # noqa: F401 - re-exported for the modules and scripts
    MODEL_FILENAME,
    default_model_path,
    model_folders,
    model_label,
    model_summary,
    resource_path,
)
from .options import MODULE_DEFAULT_REFINE

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


@dataclass
class RegistrationJob:
    """Everything a running registration needs when it ends: the nodes and options it was
    *started* with (the user may change the selectors meanwhile), and its files."""

    folder: Path
    command: list[str]
    environment: dict[str, str]
    fixed: object
    moving: object
    fixed_markups: object | None = None
    moving_markups: object | None = None
    load_warped: bool = True
    show_jacobian: bool = True

    @property
    def out_dir(self) -> Path:
        return self.folder / "out"


def transform_points(tx: sitk.Transform, points: np.ndarray) -> np.ndarray:
    """Map (N, 3) LPS points with a SimpleITK transform."""
    return np.asarray([tx.TransformPoint(tuple(float(c) for c in p)) for p in np.asarray(points, float)]).reshape(-1, 3)


def displacement_lattice(tx: sitk.Transform):
    """Origin/spacing/direction/size of the displacement field inside a transform file's
    ``[affine, displacement]`` composite (or of a bare displacement field), else None."""
    transforms = [tx]
    if tx.GetTransformEnum() == sitk.sitkComposite:
        comp = sitk.CompositeTransform(tx)
        transforms = [comp.GetNthTransform(i) for i in range(comp.GetNumberOfTransforms())]
    for t in transforms:
        if t.GetTransformEnum() == sitk.sitkDisplacementField:
            f = sitk.DisplacementFieldTransform(t).GetDisplacementField()
            return SimpleNamespace(origin=f.GetOrigin(), spacing=f.GetSpacing(), direction=f.GetDirection(),
                                   size=f.GetSize())
    return None


class RegistrationLogic:
    """Moves data between MRML nodes and the registration command line."""

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
                     affine: bool = True, refine: str | None = MODULE_DEFAULT_REFINE, warped: bool = True) -> list[str]:
        """Arguments of ``deeplungreg`` for these inputs (landmarks in LPS text).
        ``refine=None`` leaves ``--refine`` out (the command line's own default)."""
        args = ["register", str(inputs["fixed"]), str(inputs["moving"]), "-o", str(out_dir), "--device", device,
                "--quiet", "--progress-lines", "--no-qa"]  # Slicer shows the volumes themselves
        if model:
            args += ["--model", str(model)]
        if not affine:
            args.append("--no-affine")
        if refine is not None:
            args += ["--refine", str(refine)]
        if not warped:
            args.append("--no-warped")
        if "fixed_landmarks" in inputs:
            args += ["--fixed-landmarks", str(inputs["fixed_landmarks"]), "--moving-landmarks",
                     str(inputs["moving_landmarks"]), "--landmark-format", "lps"]
        return args

    @staticmethod
    def child_command(python_executable: str, args: list[str], base_env: dict | None = None,
                      module: str = "DeepLungRegLib.cli") -> tuple[list[str], dict]:
        """Command line and full environment for running ``module`` (the CLI) in a child Python
        (PythonSlicer). ``base_env``: the environment to start from (Slicer: its startup
        environment), default this process's."""
        env = dict(os.environ if base_env is None else base_env)
        # source tree: the two module folders; installed extension: both libraries sit in LIB_PARENT
        paths = [str(LIB_PARENT)]
        if (EXTENSION_ROOT / "DeepLungRegTraining" / "DeepLungRegTrainingLib").is_dir():
            paths.append(str(EXTENSION_ROOT / "DeepLungRegTraining"))
        env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        return [python_executable, "-m", module, *args], env

    def prepare_job(self, parent_folder: str | os.PathLike, fixed_node, moving_node, model: str | os.PathLike | None,
                    device: str = "auto", affine: bool = True, refine: str | None = MODULE_DEFAULT_REFINE,
                    load_warped: bool = True, show_jacobian: bool = True, fixed_markups=None, moving_markups=None,
                    python_executable: str | None = None, base_env: dict | None = None) -> RegistrationJob:
        """Write the inputs to a new temporary folder and build the child's command line."""
        if fixed_node is None or moving_node is None:
            raise ValueError("choose a fixed and a moving volume")
        if fixed_node is moving_node or fixed_node.GetID() == moving_node.GetID():
            raise ValueError("the fixed and moving volumes must be two different volumes")
        if (fixed_markups is None) != (moving_markups is None):
            fixed_markups = moving_markups = None
        folder = Path(tempfile.mkdtemp(prefix="DeepLungReg-", dir=str(parent_folder)))
        try:
            inputs = self.write_inputs(folder, fixed_node, moving_node, fixed_markups, moving_markups)
            args = self.command_args(inputs, folder / "out", model, device, affine, refine, load_warped)
            command, env = self.child_command(python_executable or python_for_child(), args, base_env)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return RegistrationJob(folder, command, env, fixed_node, moving_node, fixed_markups, moving_markups,
                               load_warped, show_jacobian)

    def finish_job(self, job: RegistrationJob) -> RegistrationOutputs:
        """Load a finished job's results onto the nodes the job was started with and place its
        moving volume under the transform (so it is shown aligned with its fixed volume)."""
        for role, node in (("fixed", job.fixed), ("moving", job.moving)):
            if node is None or not self.scene.IsNodePresent(node):
                raise ValueError(f"the {role} volume of this registration was removed from the scene meanwhile")
        outputs = self.load_results(job.out_dir, job.fixed, job.moving, job.fixed_markups, job.moving_markups,
                                    job.load_warped)
        job.moving.SetAndObserveTransformNodeID(outputs.transform_node.GetID())
        return outputs

    # ------------------------------------------------------------------ results
    def transform_node_from_file(self, transform_file: str | os.PathLike, fixed_node, moving_node,
                                 name: str) -> tuple[sitk.Transform, object]:
        """The file's transform and a linear-interpolation grid transform node that maps like
        SimpleITK does with the file (fixed -> moving as FromParent)."""
        tx = sitk.ReadTransform(str(transform_file))
        fixed_img = slicer_io.volume_node_to_image(fixed_node)
        # sample the whole mapping on the file's own displacement lattice (extended over the fixed
        # volume): the composite A(x + d(x)) is trilinear per lattice cell there, so a linear grid reproduces it
        field_img = slicer_io.transform_to_grid(tx, fixed_img, displacement_lattice(tx))
        tnode = slicer_io.displacement_to_grid_transform_node(field_img, self.scene, name)
        slicer_io.set_registration_references(tnode, fixed_node, moving_node)
        return tx, tnode

    def load_results(self, out_dir: Path, fixed_node, moving_node, fixed_markups=None, moving_markups=None,
                     load_warped: bool = True, prefix: str = "DeepLungReg") -> RegistrationOutputs:
        out_dir = Path(out_dir)
        report = json.loads((out_dir / "report.json").read_text())
        name = f"{prefix} {moving_node.GetName()} to {fixed_node.GetName()}"
        tx, tnode = self.transform_node_from_file(out_dir / "transform.h5", fixed_node, moving_node, name)
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
            affine: bool = True, fixed_markups=None, moving_markups=None, load_warped: bool = True,
            refine: str | None = MODULE_DEFAULT_REFINE) -> RegistrationOutputs:
        """Write inputs, run the command line in this process, load the results (the moving
        volume is placed under the transform)."""
        from .cli import main

        with tempfile.TemporaryDirectory(prefix="DeepLungReg-") as tmp:
            job = self.prepare_job(tmp, fixed_node, moving_node, model, device, affine, refine, load_warped,
                                   True, fixed_markups, moving_markups, python_executable=sys.executable)
            rc = main(job.command[3:])
            if rc != 0:
                raise RuntimeError(f"registration failed (exit code {rc}); see the messages above")
            return self.finish_job(job)


def python_for_child(executable: str | None = None, inside_slicer: bool | None = None) -> str:
    """The Python to run the command line with: ``PythonSlicer`` next to Slicer's executable (or
    on PATH). Inside the Slicer application there is no other choice (its own executable is the
    GUI), so a missing PythonSlicer is an error naming what was searched; elsewhere (tests,
    scripts) this interpreter is used."""
    exe = Path(executable or sys.executable)
    if inside_slicer is None:
        import importlib

        try:
            inside_slicer = getattr(importlib.import_module("slicer"), "app", None) is not None
        except ImportError:
            inside_slicer = False
    if exe.stem == "PythonSlicer":
        return str(exe)
    searched = []
    for folder in dict.fromkeys((exe.parent, exe.parent.parent / "bin")):
        for name in ("PythonSlicer", "PythonSlicer.exe"):
            candidate = folder / name
            searched.append(str(candidate))
            if candidate.is_file():
                return str(candidate)
    on_path = shutil.which("PythonSlicer")
    if on_path:
        return on_path
    if inside_slicer:
        raise RuntimeError("PythonSlicer, the Python interpreter Slicer uses for background work, was not found "
                           f"(looked for {', '.join(searched)} and on PATH). Reinstall Slicer, or start it from "
                           "its installation folder.")
    return str(exe)


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


# --------------------------------------------------------------------------- training module
def safe_file_stem(name: str, max_length: int = 60) -> str:
    """A file-name stem from a node name: letters, digits, ``-``, ``_`` and ``.`` only."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    return stem[:max_length] or "volume"


def write_training_inputs(nodes: list, folder: str | os.PathLike) -> list[Path]:
    """Write volume nodes to ``folder`` as NRRD, one file per node (two nodes with one name get
    two files), always from the node's current content (never a file left by an earlier run),
    each written atomically. Returns the paths in the order of ``nodes``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths, used = [], set()
    for node in nodes:
        stem = safe_file_stem(node.GetName())
        candidate, n = stem, 1
        while candidate.lower() in used:
            n += 1
            candidate = f"{stem}_{n}"
        used.add(candidate.lower())
        path = folder / f"{candidate}.nrrd"
        tmp = folder / f".{candidate}.writing.nrrd"
        sitk.WriteImage(slicer_io.volume_node_to_image(node), str(tmp))
        os.replace(tmp, path)
        paths.append(path)
    return paths


def training_command_args(images: list, out_dir: str | os.PathLike, method: str, grid: int, iterations: int,
                          device: str = "auto", resume: bool = False, validation_image=None) -> list[str]:
    args = ["train", "--images", *map(str, images), "-o", str(out_dir), "--method", method, "--grid", str(grid),
            "--iterations", str(iterations), "--device", device, "--quiet", "--progress-lines"]
    if validation_image is not None:
        args += ["--validation-image", str(validation_image)]
    if resume:
        args.append("--resume")
    return args


def training_outcome(rc: int, out_dir: str | os.PathLike, started_at: float) -> str:
    """``"done"``; ``"model-written"`` when the child failed after writing a new model (e.g. the
    training curves could not be plotted): the model is usable; else ``"failed"``."""
    if rc == 0:
        return "done"
    model = Path(out_dir) / MODEL_FILENAME
    try:
        if model.stat().st_mtime >= started_at - 1.0:
            return "model-written"
    except OSError:
        pass
    return "failed"
