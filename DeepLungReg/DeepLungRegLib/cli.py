"""The ``deeplungreg`` command line.

Sub-commands: ``register`` (fixed + moving CT -> transform, warped image, Jacobian,
report), ``train`` (synthetic-deformation training), ``simulate`` (a breathing-like
deformed copy of a CT, used for the bundled demo pair) and ``benchmark``.
Errors in the input end the program with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import InputError
from .methods import method_names
from .refine_levels import DEFAULT_REFINE, REFINE_CHOICES


def _add_register(sub) -> None:
    p = sub.add_parser("register", help="register a moving (exhale) CT to a fixed (inhale) CT")
    p.add_argument("fixed", help="fixed image (NRRD/NIfTI/MHA, DICOM folder or DIR-Lab .img)")
    p.add_argument("moving", help="moving image")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--model", default=None, help="model file or folder (default: the shipped model)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--fixed-series", default=None, metavar="UID",
                   help="DICOM series UID of the fixed image when its folder holds several series")
    p.add_argument("--moving-series", default=None, metavar="UID", help="the same for the moving image")
    p.add_argument("--no-affine", action="store_true", help="skip the affine pre-alignment")
    p.add_argument("--refine", default=DEFAULT_REFINE, choices=REFINE_CHOICES,
                   help="test-time optimisation after the network: off (network only, fastest), fast "
                        "(6 and 3 mm levels) or full (down to 1.5 mm; default: %(default)s)")
    p.add_argument("--fixed-landmarks", default=None)
    p.add_argument("--moving-landmarks", default=None)
    p.add_argument("--landmark-format", default="auto", choices=("auto", "dirlab", "slicer", "lps"))
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast for the network (CPU; or a CUDA GPU with bfloat16 support)")
    p.add_argument("--no-warped", action="store_true", help="do not write warped.nii.gz")
    p.add_argument("--no-qa", action="store_true", help="do not write qa.png (the QA picture)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--progress-lines", action="store_true",
                   help="print 'progress: DONE/TOTAL STAGE' lines on stdout (for the Slicer module)")


def _add_register_batch(sub) -> None:
    p = sub.add_parser("register-batch", help="register every pair of a CSV manifest, loading the model once")
    p.add_argument("pairs", help="CSV manifest: fixed,moving[,fixed_landmarks,moving_landmarks,case] "
                                 "(the evaluate format; landmark columns may be empty)")
    p.add_argument("-o", "--output", required=True, help="output folder: one sub-folder per case")
    p.add_argument("--model", default=None, help="model file or folder (default: the shipped model)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--refine", default=DEFAULT_REFINE, choices=REFINE_CHOICES)
    p.add_argument("--no-affine", action="store_true")
    p.add_argument("--no-warped", action="store_true")
    p.add_argument("--no-qa", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar (one line per pair instead)")


def _run_register_batch(a: argparse.Namespace) -> int:
    from .evaluation import read_manifest
    from .modelfile import default_model_path
    from .pipeline import RegisterOptions, run_register_batch

    pairs = read_manifest(a.pairs, landmarks_required=False)
    names = [c.name for c in pairs]
    if len(set(names)) != len(names):
        raise InputError(f"{a.pairs}: case names must be unique (they name the output folders)")
    template = RegisterOptions(fixed="", moving="", output="", model=Path(a.model) if a.model else default_model_path(),
                               device=a.device, affine=not a.no_affine, refine=a.refine, warped=not a.no_warped,
                               qa=not a.no_qa)
    out = run_register_batch(pairs, a.output, template, progress_bar=not a.quiet)
    print(f"register-batch: {len(out.done)} registered, {len(out.skipped)} already done, {len(out.failed)} failed"
          f"{' (' + ', '.join(out.failed) + ')' if out.failed else ''}; see {a.output}/batch.json")
    return 1 if out.failed else 0


def _run_register(a: argparse.Namespace) -> int:
    from .io import PairReading, check_output_dir

    # the checks that need no image first (so that a mistyped option does not wait for the reading),
    # then the inputs are read (threads, GIL released) while torch and the pipeline are imported
    if bool(a.fixed_landmarks) != bool(a.moving_landmarks):
        raise InputError("give both --fixed-landmarks and --moving-landmarks, or neither")
    check_output_dir(a.output, [a.fixed, a.moving, a.fixed_landmarks, a.moving_landmarks, a.model])
    images = PairReading(a.fixed, a.moving, a.fixed_series, a.moving_series, keep_int16=True)
    from .modelfile import default_model_path
    from .pipeline import RegisterOptions, run_register

    report = run_register(RegisterOptions(
        fixed=a.fixed, moving=a.moving, output=a.output, model=Path(a.model) if a.model else default_model_path(),
        device=a.device, affine=not a.no_affine, refine=a.refine, fixed_landmarks=a.fixed_landmarks,
        moving_landmarks=a.moving_landmarks, landmark_format=a.landmark_format,
        fixed_series=a.fixed_series, moving_series=a.moving_series, bf16=bool(a.bf16),
        warped=not a.no_warped, qa=not a.no_qa, progress_bar=not a.quiet,
        progress_lines=bool(getattr(a, "progress_lines", False))), images=images)
    print(report.summary(a.output))
    return 0


def _grid_arg(text: str) -> int | list[int]:
    """``G`` or ``I,J,K`` (also ``IxJxK``)."""
    parts = text.replace("x", ",").split(",")
    try:
        values = [int(v) for v in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not G or I,J,K (whole numbers)") from None
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"{text!r}: give one size or three (I,J,K)")
    return values[0] if len(values) == 1 else values


def _options_arg(items: list[str]) -> dict[str, str]:
    """``--option KEY=VALUE`` items as a mapping (values stay text; the method's recipe parses them)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--option {item!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a network from synthetic deformations of your scans")
    p.add_argument("--images", nargs="+", required=True, help="training scans (files or folders)")
    p.add_argument("-o", "--output", required=True, help="model folder to write")
    p.add_argument("--validation-image", default=None,
                   help="held-out scan for validation (default: the last image, if there are two or more)")
    p.add_argument("--method", default="eppenhof2018", choices=method_names(),
                   help="registration method to train (its recipe sets the defaults below)")
    p.add_argument("--preset", default=None, help="synthetic deformation preset (default: the method's)")
    p.add_argument("--iterations", type=int, default=None, help="training steps (default: the method's, else 10000)")
    p.add_argument("--grid", type=_grid_arg, default=None,
                   help="network lattice: G (G×G×G) or I,J,K voxels (default: the method's)")
    p.add_argument("--width", type=int, default=None, help="feature maps of the first level (default: the method's)")
    p.add_argument("--depth", type=int, default=None, help="resolution levels of the U-Net (default: the method's)")
    p.add_argument("--norm", default=None, choices=("batch", "instance", "none"),
                   help="normalisation layers of the U-Net (data-parallel workers keep per-worker batch "
                        "statistics: prefer instance for --nproc > 1 on the CPU; default: the method's)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--optimizer", default=None, choices=("adagrad", "sgd", "adam"), help="default: the method's")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's)")
    p.add_argument("--loss", default=None, choices=("l1", "l2"), help="default: the method's")
    p.add_argument("--snapshot-every", type=int, default=None, help="default: the method's")
    p.add_argument("--average-last", type=int, default=None,
                   help="number of last snapshots averaged (default: the last ~10.5%% of the run, as the paper's "
                        "200 of ~1900)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method-specific setting (repeatable; each method documents its own)")
    p.add_argument("--validate-every", type=int, default=500)
    p.add_argument("--validation-pairs", type=int, default=8)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--workers", type=int, default=1, help="data-generation processes (CPU training)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel workers (torchrun; gloo on CPU, nccl with one GPU each); the global "
                        "--batch-size is split between them")
    p.add_argument("--pair-pool", type=int, default=0, help="cycle through N fixed pairs (overfitting checks)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--progress-lines", action="store_true",
                   help="print 'progress: IT/TOTAL loss=L [val_mm=V]' lines on stdout every 10 iterations")


def _strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
        elif tok == "--nproc":
            skip = True
        elif not tok.startswith("--nproc="):
            out.append(tok)
    return out


def _run_train(a: argparse.Namespace, argv: list[str]) -> int:
    from DeepLungRegTrainingLib import distributed
    from DeepLungRegTrainingLib.training import TrainConfig, train

    if a.nproc < 1:
        raise InputError("--nproc must be at least 1")
    if a.nproc > 1 and not distributed.context_from_env().active:
        if a.batch_size % a.nproc:
            raise InputError(f"--batch-size {a.batch_size} must be a multiple of --nproc {a.nproc}")
        return distributed.launch(a.nproc, _strip_nproc(argv))

    cfg = TrainConfig.for_method(a.method, preset=a.preset, grid=a.grid, iterations=a.iterations,
                                 batch_size=a.batch_size, optimizer=a.optimizer, lr=a.lr, loss=a.loss,
                                 snapshot_every=a.snapshot_every, average_last=a.average_last,
                                 validate_every=a.validate_every, validation_pairs=a.validation_pairs,
                                 checkpoint_every=a.checkpoint_every, width=a.width, depth=a.depth, norm=a.norm,
                                 seed=a.seed, workers=a.workers, device=a.device, pair_pool=a.pair_pool,
                                 options=_options_arg(a.option))

    def lines(row: dict) -> None:
        if row["iteration"] % 10 == 0 or "epe_lung_mm" in row or row["iteration"] == cfg.iterations:
            val = f" val_mm={row['epe_lung_mm']:.3f}" if "epe_lung_mm" in row else ""
            print(f"progress: {row['iteration']}/{cfg.iterations} loss={row['loss']:.4f}{val}", flush=True)

    res = train(a.images, a.output, cfg, validation_image=a.validation_image, resume=a.resume,
                progress=not a.quiet, callback=lines if a.progress_lines else None)
    if not distributed.context_from_env().is_main:
        return 0
    print(json.dumps({"model": str(res.model_path), "iterations": res.iterations,
                      "validation": res.validation}, indent=1))
    return 0


def _add_simulate(sub) -> None:
    p = sub.add_parser("simulate", help="make a breathing-like (exhale) moving image from an inhale CT")
    p.add_argument("image", help="real inhale CT")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--amplitude", type=float, default=15.0, help="cranio-caudal motion at the lung bases (mm)")
    p.add_argument("--landmarks", type=int, default=300, help="number of landmark pairs")
    p.add_argument("--seed", type=int, default=0)


def _run_simulate(a: argparse.Namespace) -> int:
    import math

    import numpy as np
    import SimpleITK as sitk

    from .io import atomic_directory, check_output_dir, read_volume, write_image, write_lps_landmarks
    from .simulation import BreathingParams, simulate_pair

    if not math.isfinite(a.amplitude) or not 0.0 <= a.amplitude <= 60.0:
        raise InputError(f"--amplitude must be a number of mm in [0, 60], got {a.amplitude}")
    if a.landmarks < 1:
        raise InputError(f"--landmarks must be at least 1, got {a.landmarks}")
    check_output_dir(a.output, [a.image])
    params = BreathingParams(amplitude_base=a.amplitude, n_landmarks=a.landmarks, seed=a.seed)
    sim = simulate_pair(read_volume(a.image), params)
    with atomic_directory(a.output) as tmp:
        write_image(sim.fixed, tmp / "fixed.nii.gz")
        write_image(sim.moving, tmp / "moving.nii.gz")
        write_image(sim.lung_mask, tmp / "lung_mask.nii.gz")
        write_image(sim.u, tmp / "ground_truth_displacement.nii.gz")
        sitk.WriteTransform(sitk.DisplacementFieldTransform(sitk.Image(sim.u)), str(tmp / "ground_truth_transform.h5"))
        write_lps_landmarks(tmp / "fixed_landmarks.txt", sim.fixed_landmarks)
        write_lps_landmarks(tmp / "moving_landmarks.txt", sim.moving_landmarks)
        d = np.linalg.norm(sim.fixed_landmarks - sim.moving_landmarks, axis=1)
        info = {"source": str(a.image), "params": params.__dict__, "min_jacobian_of_v": sim.min_jacobian,
                "landmarks": int(len(d)), "initial_tre_mm": {"mean": float(d.mean()), "max": float(d.max())},
                "ground_truth_direction": "fixed physical point -> moving physical point (LPS mm)"}
        (tmp / "simulation.json").write_text(json.dumps(info, indent=1))
    print(f"wrote {a.output}: {len(d)} landmark pairs, initial TRE {d.mean():.2f} mm (max {d.max():.2f})")
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="TRE, folding and time of several methods on DIR-Lab cases or listed pairs")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dirlab", help="DIR-Lab 4DCT (or, with --copd, COPDGene) folder as distributed")
    src.add_argument("--pairs", help="CSV manifest: fixed,moving,fixed_landmarks,moving_landmarks[,case,ground_truth]")
    p.add_argument("--copd", action="store_true", help="the --dirlab folder holds COPDGene cases")
    p.add_argument("--cases", default=None, help="comma-separated case numbers (default: all found)")
    p.add_argument("--methods", default="identity,affine,deeplungreg,elastix",
                   help="comma-separated: identity, affine, deeplungreg, elastix, demons, oracle or a registered "
                        "method (its shipped model); DeepLungReg ones may name a refine level, e.g. deeplungreg:off")
    p.add_argument("--model", default=None, help="model for the deeplungreg method (default: shipped)")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--qa", default="all",
                   help="QA pictures: all (every method but identity), none, or a comma-separated list of methods")
    p.add_argument("--view", default="auto",
                   help="method whose per-case result is kept for 'deeplungreg view OUTPUT --case NAME' (transform, "
                        "Jacobian, report): auto (the first DeepLungReg method, else the first non-identity one) or none")
    p.add_argument("--elastix-iterations", type=int, default=500, help="iterations per resolution")
    p.add_argument("--elastix-resolutions", type=int, default=4)
    p.add_argument("-o", "--output", required=True)


def _run_evaluate(a: argparse.Namespace) -> int:
    from .evaluation import evaluate, find_dirlab_cases, make_methods, read_manifest
    from .io import atomic_directory, check_output_dir

    if a.dirlab:
        numbers = [int(c) for c in a.cases.split(",")] if a.cases else None
        cases = find_dirlab_cases(a.dirlab, a.copd, numbers)
    else:
        cases = read_manifest(a.pairs)
    check_output_dir(a.output, [p for c in cases for p in (c.fixed, c.moving, c.fixed_landmarks, c.moving_landmarks)])
    methods = make_methods([m.strip() for m in a.methods.split(",") if m.strip()], a.model, a.device,
                           a.elastix_iterations, a.elastix_resolutions)
    qa = None if a.qa == "all" else [m.strip() for m in a.qa.split(",") if m.strip() and a.qa != "none"]
    unknown = [m for m in qa or [] if m not in methods]
    if unknown:
        raise InputError(f"--qa names methods not evaluated: {', '.join(unknown)}")
    view = None if a.view == "none" else a.view
    if view == "auto":
        names = [m for m in methods if m not in ("identity", "oracle")]
        ours = [m for m in names if m.split(":")[0] not in ("affine", "elastix", "demons")]
        view = (ours or names or [None])[0]
    elif view is not None and view not in methods:
        raise InputError(f"--view names a method not evaluated: {view}")
    with atomic_directory(a.output) as tmp:
        evaluate(cases, methods, tmp, qa_methods=qa, view_method=view)
        print((tmp / "results.md").read_text())
    print(f"wrote {a.output}/results.csv, results.md, tre_scatter.png, tre_boxplots.png, jacobian_*.png"
          + (f"; per case, {view} for 'deeplungreg view {a.output} --case NAME'" if view else ""))
    return 0


def _add_benchmark(sub) -> None:
    p = sub.add_parser("benchmark", help="time DeepLungReg against elastix on a simulated breathing pair")
    p.add_argument("--image", default=None, help="inhale CT (default: the bundled sample)")
    p.add_argument("--model", default=None)
    p.add_argument("--elastix-iterations", type=int, default=500)
    p.add_argument("--no-elastix", action="store_true")


def _run_benchmark(a: argparse.Namespace) -> int:
    from .benchmark import run_benchmark

    return run_benchmark(a.image, a.model, None if a.no_elastix else a.elastix_iterations)


def _add_view(sub) -> None:
    p = sub.add_parser("view", help="review a registration in the browser with Slicer's slice views (trame-slicer)")
    p.add_argument("outdir", help="output folder of 'register' (or of 'register-batch', with --case)")
    p.add_argument("--case", default=None, help="case sub-folder of a register-batch output")
    p.add_argument("--port", type=int, default=8080, help="port to serve on (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--fixed-landmarks", default=None, help="other landmarks than the run's (report.json names the files register was given)")
    p.add_argument("--moving-landmarks", default=None)
    p.add_argument("--landmark-format", default="auto", choices=("auto", "dirlab", "slicer", "lps"))


def _run_view(a: argparse.Namespace) -> int:
    from .viewer import main_args

    return main_args(a)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeplungreg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_register(sub)
    _add_register_batch(sub)
    _add_train(sub)
    _add_simulate(sub)
    _add_evaluate(sub)
    _add_benchmark(sub)
    _add_view(sub)
    return parser


#: What an out-of-memory failure leaves behind, per command (outputs go through an atomic folder or
#: atomic files; training keeps its last checkpoint).
_OOM_AFTERMATH = {"register": "; nothing was written", "simulate": "; nothing was written",
                  "evaluate": "; nothing was written", "train": "; the last checkpoint is kept (continue with --resume)",
                  "register-batch": "; finished pairs are kept (run again to continue)"}


def _out_of_memory(exc: BaseException) -> str | None:
    """``"GPU"`` or ``"host"`` when ``exc`` is running out of memory, else None: ``torch.OutOfMemoryError``
    (by name: torch is not imported here), Python's ``MemoryError``, and the ``RuntimeError``s torch's CPU
    allocator and SimpleITK raise for a failed allocation."""
    if type(exc).__name__ == "OutOfMemoryError":
        return "GPU"
    if isinstance(exc, MemoryError) or any(m in str(exc) for m in ("DefaultCPUAllocator: can't allocate memory",
                                                                    "Failed to allocate memory for image")):
        return "host"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    os.environ.setdefault("KMP_WARNINGS", "0")
    try:
        if a.command == "train":
            return _run_train(a, list(sys.argv[1:] if argv is None else argv))
        if a.command == "simulate":
            return _run_simulate(a)
        if a.command == "evaluate":
            return _run_evaluate(a)
        if a.command == "benchmark":
            return _run_benchmark(a)
        if a.command == "register-batch":
            return _run_register_batch(a)
        if a.command == "register":
            return _run_register(a)
        if a.command == "view":
            return _run_view(a)
    except InputError as exc:
        print(f"deeplungreg: error: {exc}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        kind = _out_of_memory(exc)
        if kind is None:
            raise
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else "no detail"
        print(f"deeplungreg: error: out of {kind} memory ({first}){_OOM_AFTERMATH.get(a.command, '')}"
              + ("; run with --device cpu" if kind == "GPU" else "; close other programs or use smaller images"),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deeplungreg: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
