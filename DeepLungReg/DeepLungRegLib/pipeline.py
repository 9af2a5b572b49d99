"""The registration pipeline: files -> masks -> affine -> network -> refine -> transform -> outputs.

Every geometric quantity is in LPS millimetres. The result transform maps fixed-image
points to moving-image points (see :mod:`DeepLungRegLib.transforms`).
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .affine import affine_prealign, identity_affine
from .errors import InputError
from .geometry import Lattice
from .io import PairReading, atomic_write_bytes, check_landmark_pair, check_output_dir, read_landmarks
from .methods import get_method
from .methods.base import PreparedPair
from .metrics import summarize, target_registration_error
from .modelfile import check_bf16, ieee_float32, load_model, resolve_device
from .preprocessing import (
    lung_mask,
    network_grid,
    normalise_hu,
    resample_mask_to_grid,
    resample_to_grid,
)
from .refine import DEFAULT_REFINE, RefineConfig, refine_config
from .refine import refine as refine_field
from .report import ModelInfo, RegistrationReport, write_outputs
from .resampling import jacobian_image, jacobian_stats, lattice_jacobian, warp_image
from .transforms import OutputField, full_transform, mapping_error, output_field, transform_points

#: ``--bf16`` changes the shipped model's prediction by less than this (mm) against float32; checked by
#: Testing/test_pipeline.py (the pipeline does not run both precisions: that would cost the saving).
BF16_TOLERANCE_MM = 0.5
#: Dice of the fixed and the aligned moving lung masks below which the result gets a warning.
MIN_LUNG_OVERLAP = 0.5
#: Stages of :func:`register_images`, in order (progress reports count them).
STAGES = ("mask", "affine", "network", "refine", "transform", "jacobian", "warp")


@dataclass
class RegistrationResult:
    transform: sitk.CompositeTransform      # fixed -> moving, LPS mm
    affine: sitk.Transform
    field: OutputField                      # the stored displacement lattice (LPS mm)
    grid: Lattice                           # the network lattice
    u_vox: torch.Tensor                     # (1, 3, D, H, W) final displacement in voxels of ``lattice``
    lattice: Lattice                        # network grid (refine off) or the refine lattice
    jacobian: sitk.Image                    # det over the fixed box at the lattice's resolution (resampling.py)
    fixed_lung: sitk.Image                  # fixed lung mask (uint8) on its ~3 mm grid
    warped: sitk.Image | np.ndarray | None  # int16 HU on the fixed grid (a (k, j, i) array: warped_as_array)
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


class _Stages:
    """Times named stages and reports them to an optional progress callback."""

    def __init__(self, callback: Callable[[str, int, int], None] | None, names: tuple[str, ...]) -> None:
        self.callback, self.total, self.done, self.timings = callback, len(names), 0, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.callback:
            self.callback(name, self.done, self.total)
        t = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t, 4)
        self.done += 1
        if self.callback:
            self.callback(name, self.done, self.total)


def _sample_lung_points(mask: np.ndarray, lattice: Lattice, n: int = 2000) -> np.ndarray:
    """Up to ``n`` lattice nodes inside ``mask`` (D, H, W), as LPS points (fixed seed)."""
    idx = np.argwhere(mask)
    if len(idx):
        idx = idx[np.random.default_rng(0).choice(len(idx), size=min(n, len(idx)), replace=False)]
    return lattice.index_to_lps(idx[:, ::-1].astype(float)) if len(idx) else np.zeros((0, 3))


#: Peak resident memory of ``register`` beyond the two images as held (int16 for integer files, float32
#: otherwise; ``read_volume(keep_int16=True)``): this many bytes per fixed voxel plus a fixed part (torch,
#: the model, refine lattices on the lung box, the ~3 mm copies, the QA figure drawn beside the warp).
#: Fitted on the peak RSS of int16 pairs with the default refine (2026-11-24 evening, `register` from a
#: shell): 512×512×141 1.43 GB, 512×512×1000 2.57 GB, i.e. ~1.25 GB + 1.0 byte per voxel beyond the
#: images; rounded up here to an upper bound with 13-15 % margin at both sizes. Every other
#: full-resolution quantity is computed slab by slab (DeepLungRegLib.resampling). See
#: docs/benchmarks/wholejob.md.
BYTES_PER_VOXEL = 1.5
FIXED_BYTES = 1.45e9


def peak_bytes(fixed_voxels: int, moving_voxels: int, fixed_pixel_bytes: int = 2, moving_pixel_bytes: int = 2) -> float:
    """Rough peak memory of a registration of images of these sizes and pixel widths (bytes)."""
    return (FIXED_BYTES + fixed_voxels * fixed_pixel_bytes + moving_voxels * moving_pixel_bytes
            + BYTES_PER_VOXEL * max(fixed_voxels, moving_voxels))


def estimated_peak_bytes(fixed: sitk.Image, moving: sitk.Image) -> float:
    """:func:`peak_bytes` of these two images as they are held (see :data:`BYTES_PER_VOXEL`)."""
    return peak_bytes(fixed.GetNumberOfPixels(), moving.GetNumberOfPixels(),
                      fixed.GetSizeOfPixelComponent(), moving.GetSizeOfPixelComponent())


def available_memory_bytes() -> float | None:
    """``MemAvailable`` of /proc/meminfo (None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024.0
    except OSError:
        return None
    return None


def check_memory(fixed: sitk.Image, moving: sitk.Image) -> None:
    """Refuse, before the work, a pair whose registration would not fit in the available memory."""
    need, have = estimated_peak_bytes(fixed, moving), available_memory_bytes()
    if have is not None and need > have:
        raise InputError(f"registering these images needs about {need / 1e9:.1f} GB of memory, "
                         f"{have / 1e9:.1f} GB is available; close other programs or crop the images")


def _lung_mask_of(name: str, img: sitk.Image):
    """:func:`lung_mask`, its refusal naming which image has no plausible lung. An int16 image gives
    the same mask and ~3 mm copy as its float32 cast (the copy is made as float32, unrounded)."""
    try:
        return lung_mask(img)
    except InputError as exc:
        raise InputError(f"{name} image: {exc}") from None


def _copy(img: sitk.Image) -> sitk.Image:
    """A deep copy (its own voxel buffer) of a small image, for another thread: a second handle
    to the same voxels, made unique (SimpleITK copies the buffer when it is shared)."""
    out = sitk.Image(img)
    out.MakeUnique()
    return out


def lung_overlap(fixed_mask: sitk.Image, moving_mask_in_fixed: sitk.Image) -> float:
    """Dice coefficient of two masks on the same grid (0 when both are empty)."""
    a = sitk.GetArrayViewFromImage(fixed_mask) > 0
    b = sitk.GetArrayViewFromImage(moving_mask_in_fixed) > 0
    total = int(a.sum()) + int(b.sum())
    return 2.0 * float(np.logical_and(a, b).sum()) / total if total else 0.0


def register_images(fixed: sitk.Image, moving: sitk.Image, net: torch.nn.Module, meta: dict,
                    device: torch.device | str = "cpu", affine: bool = True, bf16: bool = False,
                    warp_moving: bool = True, transform_stride: int | None = None,
                    refine: str | RefineConfig = DEFAULT_REFINE,
                    progress: Callable[[str, int, int], None] | None = None,
                    warped_as_array: bool = False,
                    transform_ready: Callable[[RegistrationResult], None] | None = None) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` (float32 or int16 HU images, same results) with the model ``(net, meta)``.

    Stages (:data:`STAGES`): lung masks, affine pre-alignment, the method's network on the lung
    lattice, test-time refinement (``refine``: ``off``, ``fast``, ``full`` or a
    :class:`~DeepLungRegLib.refine.RefineConfig`), the composite transform, the warped moving
    image and the Jacobian determinant map. ``transform_ready(result)`` is called before the warp
    with everything but the warped image (``warped`` None, the timings so far): the command line
    draws the QA picture meanwhile.
    """
    device = torch.device(device)
    check_bf16(device, bf16)
    method = get_method(meta["method"])
    refine_cfg = refine_config(refine)
    stage = _Stages(progress, STAGES)
    with stage("mask"):
        if fixed is moving:  # (one image object: not read by two pipelines at once)
            lm_f = lm_m = _lung_mask_of("fixed", fixed)
        else:
            with ThreadPoolExecutor(max_workers=2) as pool:  # ITK and NumPy release the GIL for most of it
                jobs = [pool.submit(_lung_mask_of, name, img) for name, img in (("fixed", fixed), ("moving", moving))]
                lm_f, lm_m = (job.result() for job in jobs)
    with stage("affine"):
        A = affine_prealign(lm_f.image, lm_m.image, lm_f.mask, lm_m.mask) if affine else identity_affine()
        moving_mask_in_fixed = sitk.Resample(lm_m.mask, lm_f.mask, A, sitk.sitkNearestNeighbor, 0)
        overlap = lung_overlap(lm_f.mask, moving_mask_in_fixed)
        warnings = []
        if overlap < MIN_LUNG_OVERLAP:
            warnings.append(f"the lungs overlap only {100 * overlap:.0f} % (Dice) after the "
                            f"{'affine pre-alignment' if affine else 'initial placement (--no-affine)'}: the images may "
                            "not show the same lungs or lie far apart; check the result before using it")
    refine_stats = {"level": "off"}
    with ieee_float32(device):  # no TF32 convolutions on a GPU: predictions as the CPU's, to float32 rounding
        with stage("network"):
            grid = network_grid(fixed, [lm_f.mask, moving_mask_in_fixed], method.grid_size(meta))
            pair = PreparedPair(normalise_hu(resample_to_grid(fixed, grid), meta["normalisation"]),
                                normalise_hu(resample_to_grid(moving, grid, A), meta["normalisation"]), grid)
            pred = method.predict(net, pair, meta, device, bf16=bf16)
        with stage("refine"):
            u, lattice = pred.u_vox, pred.lattice
            if refine_cfg is not None:
                def iterations(done: int, total: int) -> None:
                    if progress is not None and (done % 10 == 0 or done == total):
                        progress(f"refine {done}/{total}", stage.done, stage.total)

                r = refine_field(fixed, moving, A, lm_f.mask, pred.lattice, pred.u_vox, refine_cfg, device,
                                 iterations)
                u, lattice, refine_stats = r.u_vox, r.lattice, r.stats
    with stage("transform"):
        stride = transform_stride or (1 if max(lattice.size) <= 96 or refine_cfg is not None else 2)
        fld = output_field(u, lattice, stride=stride)
        T = full_transform(A, fld)
        pts = _sample_lung_points(resample_mask_to_grid(lm_f.mask, lattice), lattice)
        map_err = mapping_error(T, pts, u, lattice, A)
    with stage("jacobian"):
        if not np.isfinite(fld.displacement_mm).all():
            raise InputError("the registration produced a non-finite displacement (NaN/Inf); nothing was written")
        det_lattice, det_affine = lattice_jacobian(fld, A)
        jac = jacobian_image(det_lattice, det_affine, fixed)
        stats = {
            "lung_overlap_dice": overlap,
            "warnings": warnings,
            **jacobian_stats(det_lattice, det_affine, fixed, lm_f.mask, device=device),
            "jacobian_map": {"size": list(jac.GetSize()), "spacing_mm": list(jac.GetSpacing())},
            "affine_determinant": det_affine,
            "lung_volume_ml": {"fixed": lm_f.volume_ml, "moving": lm_m.volume_ml},
            "lung_mask_fallback": {"fixed": lm_f.fallback, "moving": lm_m.fallback},
            "transform_mapping_error_mm": map_err,
            "transform_lattice": {**fld.lattice.to_dict(), "spacing_mm": list(fld.lattice.spacing),
                                  "stride": stride},
            "network_grid": grid.to_dict(),
            "refine": refine_stats,
        }
    # the warp's view of the moving voxels before any other thread may read ``moving`` (taking it may copy
    # an image that is being read); the QA thread gets private copies of the small images it draws
    moving_voxels = sitk.GetArrayViewFromImage(moving) if warp_moving else None
    if transform_ready is not None:
        transform_ready(RegistrationResult(T, A, fld, grid, u, lattice, _copy(jac), _copy(lm_f.mask), None,
                                           dict(stage.timings), stats))
    warped = None
    with stage("warp"):
        if warp_moving:  # int16 HU, slab by slab (DeepLungRegLib.resampling)
            warped = warp_image(moving, fixed, A, fld, -1000.0, device, as_array=warped_as_array,
                                moving_voxels=moving_voxels)
    return RegistrationResult(T, A, fld, grid, u, lattice, jac, lm_f.mask, warped, stage.timings, stats)


def landmark_errors(tx: sitk.Transform, fixed_pts: np.ndarray, moving_pts: np.ndarray,
                    affine: sitk.Transform | None = None) -> dict:
    """TRE before (identity), after the affine alone (if given) and after ``tx``."""
    check_landmark_pair(fixed_pts, moving_pts)
    out = {"before": summarize(target_registration_error(fixed_pts, moving_pts)),
           "after": summarize(target_registration_error(transform_points(tx, fixed_pts), moving_pts))}
    if affine is not None:
        out["affine"] = summarize(target_registration_error(transform_points(affine, fixed_pts), moving_pts))
    return out


@dataclass
class RegisterOptions:
    """What ``deeplungreg register`` was asked to do."""

    fixed: str
    moving: str
    output: str
    model: Path
    device: str = "auto"
    affine: bool = True
    refine: str = DEFAULT_REFINE
    fixed_series: str | None = None      # DICOM series UID when FIXED is a folder holding several
    moving_series: str | None = None
    fixed_landmarks: str | None = None
    moving_landmarks: str | None = None
    landmark_format: str = "auto"
    bf16: bool = False
    warped: bool = True
    qa: bool = True                 # write qa.png (see DeepLungRegLib.qa)
    progress_bar: bool = True
    progress_lines: bool = False


@contextlib.contextmanager
def _older_objects_frozen() -> Iterator[None]:
    """Inside the block the garbage collector skips the objects that existed before it (``gc.freeze``):
    after importing torch there are ~200 000 and each full collection over them costs ~0.1 s, several of
    which a job triggered (most while the QA picture was drawn beside the warp: ~0.2–0.3 s of a 3 s job).
    Unfrozen afterwards, so that a long-lived process (``register-batch``, ``evaluate``) collects them
    as before; left alone when the caller has frozen objects itself."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect(1)  # young garbage (e.g. the previous job's cycles) collected now, not frozen with the rest
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_register(o: RegisterOptions, loaded: tuple[torch.nn.Module, dict] | None = None,
                 images: PairReading | None = None) -> RegistrationReport:
    """The whole ``register`` job: read and check inputs, register, measure, write atomically.

    ``loaded`` is the model already loaded on ``o.device`` (``register-batch`` loads it once);
    ``images`` the reading of ``o.fixed``/``o.moving`` already under way (the command line starts it
    before importing torch); the ``load`` time is then what the job still waited for it."""
    with _older_objects_frozen():
        return _register_job(o, loaded, images)


def _register_job(o: RegisterOptions, loaded: tuple[torch.nn.Module, dict] | None,
                  images: PairReading | None) -> RegistrationReport:
    t_start = time.perf_counter()
    if bool(o.fixed_landmarks) != bool(o.moving_landmarks):
        raise InputError("give both --fixed-landmarks and --moving-landmarks, or neither")
    refine_config(o.refine)  # unknown level -> clear error before any work
    check_output_dir(o.output, [o.fixed, o.moving, o.fixed_landmarks, o.moving_landmarks, o.model])
    t = time.perf_counter()
    if images is None:  # int16 where the files hold integers
        images = PairReading(o.fixed, o.moving, o.fixed_series, o.moving_series, keep_int16=True)
    fixed, moving = images.result()
    check_memory(fixed, moving)
    fixed_pts = moving_pts = None
    if o.fixed_landmarks:
        fixed_pts = read_landmarks(o.fixed_landmarks, o.landmark_format, fixed)
        moving_pts = read_landmarks(o.moving_landmarks, o.landmark_format, moving)
        check_landmark_pair(fixed_pts, moving_pts)
    t_load = time.perf_counter() - t
    device = resolve_device(o.device)
    net, meta = loaded if loaded is not None else load_model(o.model, device)

    bar = None
    if o.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=len(STAGES), desc="register", unit="stage", dynamic_ncols=True)

    def progress(name: str, done: int, total: int) -> None:
        if o.progress_lines:
            print(f"progress: {done}/{total} {name}", flush=True)
        if bar is not None:
            bar.set_postfix_str(name)
            bar.n = done
            bar.refresh()

    # the QA picture is drawn while the moving image is warped (it needs the transform, not the warped image)
    qa_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qa") if o.qa else None
    qa_job = None

    def draw_qa(part: RegistrationResult) -> None:
        nonlocal qa_job

        def render() -> tuple[bytes, float]:
            from .qa import QAInput, render_png  # matplotlib is imported here, beside the warp

            t_qa = time.perf_counter()
            png = render_png(QAInput(
                fixed, moving, part.transform, part.fixed_lung, part.jacobian, before=part.affine,
                before_label="affine only" if o.affine else "identity, --no-affine", fixed_points=fixed_pts,
                moving_points=moving_pts, fixed_name=Path(o.fixed).name, moving_name=Path(o.moving).name,
                method=f"{meta.get('method')} (model {Path(o.model).name})", refine=o.refine,
                folding_percent=part.stats["folding_percent"], folding_percent_lung=part.stats["folding_percent_lung"],
                seconds=sum(part.timings.values()), seconds_label="transform in"))
            return png, time.perf_counter() - t_qa

        qa_job = qa_pool.submit(render)

    try:
        res = register_images(fixed, moving, net, meta, device, affine=o.affine, bf16=o.bf16, warp_moving=o.warped,
                              refine=o.refine, progress=progress, warped_as_array=True,
                              transform_ready=draw_qa if o.qa else None)
    finally:
        if bar is not None:  # before any error line, so that it does not land on the bar
            bar.close()
        if qa_pool is not None:
            qa_pool.shutdown(wait=False)
    for warning in res.stats["warnings"]:
        print(f"deeplungreg: warning: {warning}", file=sys.stderr)
    report = RegistrationReport(
        fixed=str(Path(o.fixed).resolve()), moving=str(Path(o.moving).resolve()), affine_prealignment=o.affine,
        affine_matrix=list(res.affine.GetMatrix()), affine_translation_mm=list(res.affine.GetTranslation()),
        affine_center_mm=list(res.affine.GetCenter()), device=str(device), bf16=o.bf16, refine_level=o.refine,
        model=ModelInfo(str(o.model), meta.get("method"), meta.get("grid_size"), bool(meta.get("untrained", False)),
                        {k: v for k, v in meta.get("training", {}).items() if k != "config"}),
        stats=res.stats, timings_s={"load": round(t_load, 4), **res.timings})
    if fixed_pts is not None:
        t = time.perf_counter()
        report.tre_mm = landmark_errors(res.transform, fixed_pts, moving_pts, res.affine)
        report.landmark_files = {"fixed": str(Path(o.fixed_landmarks).resolve()),
                                 "moving": str(Path(o.moving_landmarks).resolve()), "format": o.landmark_format}
        report.timings_s["landmarks"] = round(time.perf_counter() - t, 4)
    qa_figure = None
    if o.qa:
        def qa_figure(path: Path) -> float:
            png, seconds = qa_job.result()  # re-raises a failure of the drawing
            path.write_bytes(png)
            return seconds
    else:
        report.qa = {"written": False, "skipped": "--no-qa"}
    write_outputs(o.output, report, res.transform, res.jacobian, res.warped, t_start, qa=qa_figure, reference=fixed)
    return report


@dataclass
class BatchOutcome:
    done: list[str] = field(default_factory=list)       # registered now
    skipped: list[str] = field(default_factory=list)    # finished by an earlier run (resume)
    failed: dict[str, str] = field(default_factory=dict)  # case -> one-line reason


def run_register_batch(pairs: list, output: str | Path, template: RegisterOptions,
                       progress_bar: bool = True) -> BatchOutcome:
    """Register every pair of an ``evaluate``-style manifest into ``output/<case>/``.

    The model is loaded once; a pair whose ``report.json`` exists is skipped (so an interrupted
    batch resumes); a failing pair is reported and the batch goes on. ``template`` carries the
    options shared by all pairs. ``output/batch.json`` lists what happened.
    """
    import dataclasses
    import json

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    loaded = load_model(template.model, resolve_device(template.device))
    outcome = BatchOutcome()
    bar = None
    if progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=len(pairs), desc="register-batch", unit="pair", dynamic_ncols=True)
    for case in pairs:
        target = output / case.name
        if (target / "report.json").is_file():
            outcome.skipped.append(case.name)
        else:
            o = dataclasses.replace(template, fixed=str(case.fixed), moving=str(case.moving), output=str(target),
                                    fixed_landmarks=str(case.fixed_landmarks) if case.fixed_landmarks else None,
                                    moving_landmarks=str(case.moving_landmarks) if case.moving_landmarks else None,
                                    landmark_format=case.landmark_format, progress_bar=False)
            try:
                report = run_register(o, loaded)
                outcome.done.append(case.name)
                if bar is None:
                    print(f"{case.name}: {report.summary(target)}", flush=True)
            except (InputError, RuntimeError, OSError, ValueError) as exc:
                outcome.failed[case.name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                print(f"deeplungreg: error: {case.name}: {outcome.failed[case.name]}", file=sys.stderr, flush=True)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(failed=len(outcome.failed))
        atomic_write_bytes(output / "batch.json", json.dumps(dataclasses.asdict(outcome), indent=1).encode())
    if bar is not None:
        bar.close()
    return outcome
