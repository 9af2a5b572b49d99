"""RegNet (Sokooti et al., MICCAI 2017) in small scale: capture range and multi- against single-scale.

Two experiments of the paper, one subcommand each:

``capture``
    Evaluates given ``sokooti2017`` models (default: the shipped ``Resources/Models/sokooti2017``)
    on held-out synthetic pairs of held-out scans (default ``lidc_idri_0001``, which no shipped
    model trained on) made by the recipe's own generator with θ multiplied by 0.5, 1, 2, 3 (so the
    true displacements reach well beyond the θ the model was trained with), and reports the
    end-point error (mm) of the network's field at the lung voxels, binned by the magnitude of the
    TRUE displacement, next to the identity (zero field) error of each bin. The paper's
    observation (Sect. 3 and 4): registration is accurate up to θ = 8 mm and deteriorates beyond.

``scales``
    Trains the multi-scale RegNet (``--option scales=2``) and the paper's single-scale variant
    (``scales=1``, the 29³ original-resolution pipeline alone) with the project's training loop
    (``DeepLungRegTrainingLib.training.train`` with ``TrainConfig.for_method``): the same training
    scans, seed (hence the same patch pairs in the same order), iterations and learning-rate
    schedule, and the same initial weights for every layer the two networks share, then evaluates
    both as ``capture`` does. The paper's Table 1: late-fusion multi-scale beats single-scale.

Evaluation path (the numbers are what ``deeplungreg register`` gives before refinement): a test
scan is prepared as ``register`` prepares images (lung box, the model's ``grid_size`` lattice — 192³
for the shipped model —, HU window); each pair is made on that pipeline lattice by
:func:`DeepLungRegTrainingLib.synthesis_sokooti2017.make_pair` (the fixed image is the moving one
resampled through the random field with cubic B-splines; σ, P, noise as trained; θ of the
fixed image's field scaled, the moving image's own pre-deformation kept at the model's θ) and
handed to ``METHOD.predict`` — the call ``register`` makes: resampling onto the network lattice
(``lattice_spacing_mm``, 2 mm for the shipped model), the fully convolutional dense inference at
every ``output_stride``-th node (2: a 4 mm output lattice) and the trilinear resampling back onto
the pipeline lattice, where the error against the generator's exact field is measured at the
voxels of the fixed image's lung mask. Bins: ``lo <= |u_true| < hi`` mm; the last one is open.

θ bounds each component of the training fields (|u| <= √3 θ), but the smoothed fields are mostly
far smaller: with θ = 8 mm about 99 % of the lung voxels move less than 8 mm. The table therefore
also gives the share of the θ × 1 pairs' lung voxels in each bin (what the network saw in training).

Usage (prints Markdown; ``--out`` writes it with the command line; ``OMP_NUM_THREADS=1`` gives the
one-thread timings quoted in the docs):

    OMP_NUM_THREADS=1 python Testing/benchmarks/bench_sokooti2017_ablation.py capture \\
        --out docs/evaluation/ablations/sokooti2017_capture_range.md
    OMP_NUM_THREADS=1 python Testing/benchmarks/bench_sokooti2017_ablation.py scales   # defaults: ~13 min

A comparison worth reading needs far more training (the shipped model's 400 iterations left its field
within 2-4 % of the identity), e.g. the seven training scans of the shipped model and 3000 iterations:

    D=../shared/data
    OMP_NUM_THREADS=1 python Testing/benchmarks/bench_sokooti2017_ablation.py scales \\
        --images $D/cptac_lscc_C3N-00247_chest_ct.nii.gz $D/lidc_idri_0002.nii.gz $D/lidc_idri_0314.nii.gz \\
          $D/lungpetctdx_A0001_5mm.nii.gz $D/lungpetctdx_A0002_8mm_B40f.nii.gz \\
          $D/totalsegmentator_aorta_ct_cropped_1p5mm.nii.gz $D/totalsegmentator_example_ct_3mm.nii.gz \\
        --iterations 3000 --option epoch=200 --validation-pairs 4 --pairs-per-multiplier 3 \\
        --runs runs/sokooti2017_scales --out docs/evaluation/ablations/sokooti2017_scales.md

Measured on one CPU thread (2-core machine with another training beside it, ``--workers 0``): about
4.8 s per iteration for scales=2 and 3.7 s for scales=1 (2.4 s of each is the pair generation, the
rest the step), and about 21 s of inference per model and test pair at 192³.

``scales`` resumes interrupted runs from ``--runs`` (``train(..., resume=True)``); a finished
variant is not retrained (delete its folder to retrain).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
SHIPPED = ROOT / "Resources" / "Models" / "sokooti2017"
HELD_OUT = "lidc_idri_0001.nii.gz"
#: Default training scans of ``scales`` (a small subset of the shared data, not the held-out scan).
TRAIN = ["lidc_idri_0002.nii.gz", "lungpetctdx_A0001_5mm.nii.gz", "totalsegmentator_example_ct_3mm.nii.gz"]
VARIANTS = (("multi-scale (scales=2)", 2), ("single-scale (scales=1)", 1))
#: Layers of the multi-scale RegNet that the single-scale one lacks, or has with another shape.
NOT_SHARED = ("fixed_low.", "moving_low.", "low.", "fused.0.")


# --------------------------------------------------------------------------- binned errors
@dataclasses.dataclass
class BinnedErrors:
    """Sums per bin of true displacement magnitude (and per θ multiplier) over lung voxels of many pairs."""

    edges: list[float]
    models: list[str]
    thetas: list[float]

    def __post_init__(self) -> None:
        nb, nm, nt = len(self.edges), len(self.models), len(self.thetas)
        self.count = torch.zeros(nb, dtype=torch.float64)
        self.true_sum = torch.zeros(nb, dtype=torch.float64)
        self.err_sum = torch.zeros((nm, nb), dtype=torch.float64)
        self.theta_count = torch.zeros(nt, dtype=torch.float64)
        self.theta_true = torch.zeros(nt, dtype=torch.float64)
        self.theta_err = torch.zeros((nm, nt), dtype=torch.float64)
        self.theta_bins = torch.zeros((nt, nb), dtype=torch.float64)   # voxels per θ multiplier and bin

    def bin_of(self, magnitude: torch.Tensor) -> torch.Tensor:
        """Bin index of each magnitude: ``edges[b] <= m < edges[b + 1]``, the last bin open."""
        bounds = torch.tensor(self.edges[1:], dtype=magnitude.dtype)
        return torch.bucketize(magnitude, bounds, right=True)

    def add_truth(self, t: int, magnitude: torch.Tensor) -> torch.Tensor:
        b = self.bin_of(magnitude)
        n = len(self.edges)
        counts = torch.bincount(b, minlength=n).double()
        self.count += counts
        self.true_sum += torch.bincount(b, weights=magnitude.double(), minlength=n)
        self.theta_count[t] += magnitude.numel()
        self.theta_true[t] += magnitude.double().sum()
        self.theta_bins[t] += counts
        return b

    def add_error(self, m: int, t: int, b: torch.Tensor, error: torch.Tensor) -> None:
        self.err_sum[m] += torch.bincount(b, weights=error.double(), minlength=len(self.edges))
        self.theta_err[m, t] += error.double().sum()

    def labels(self) -> list[str]:
        e = self.edges
        return [f"{lo:g}–{hi:g}" for lo, hi in zip(e, e[1:], strict=False)] + [f"≥ {e[-1]:g}"]


def _mean(s: torch.Tensor, n: torch.Tensor) -> list[float]:
    return [float(a / c) if c > 0 else float("nan") for a, c in zip(s.tolist(), n.tolist(), strict=True)]


def theta_of(meta: dict) -> float:
    """The largest θ (mm) of a model's training fields (its metadata's ``synthesis``)."""
    syn = meta.get("synthesis", {})
    return max(float(f["theta_mm"]) for f in syn.get("frequencies", [{"theta_mm": float("nan")}]))


def test_preset(meta: dict, multiplier: float):
    """The model's generator with the θ of the fixed image's fields multiplied (moving pre-deformation kept)."""
    from DeepLungRegTrainingLib.synthesis_sokooti2017 import PRESETS, RandomDVF, SokootiPreset

    syn = meta.get("synthesis")
    if syn:
        base = SokootiPreset(name=syn["name"], frequencies=tuple(RandomDVF(**f) for f in syn["frequencies"]),
                             moving=RandomDVF(**syn["moving"]),
                             deformed_moving_fraction=syn.get("deformed_moving_fraction", 0.5),
                             moving_noise_hu=syn.get("moving_noise_hu", 5.0))
    else:
        base = PRESETS["sokooti2017"]
    freqs = tuple(dataclasses.replace(f, theta_mm=f.theta_mm * multiplier) for f in base.frequencies)
    return dataclasses.replace(base, frequencies=freqs)


def evaluate(models: dict[str, tuple[torch.nn.Module, dict]], test_images: list[Path], multipliers: list[float],
             per_multiplier: int, edges: list[float], seed: int, log=print) -> tuple[BinnedErrors, dict]:
    """Every model on the same pairs (made once each, pairs outer, models inner; the generator's σ, P, noise
    and θ are the first model's); returns the sums and facts."""
    from DeepLungRegLib.io import read_volume
    from DeepLungRegLib.methods.base import PreparedPair
    from DeepLungRegLib.methods.sokooti2017 import METHOD, every_second_node, network_lattice
    from DeepLungRegLib.preprocessing import prepare_scan
    from DeepLungRegTrainingLib.recipes.base import pair_generator
    from DeepLungRegTrainingLib.synthesis_sokooti2017 import make_pair

    metas = [meta for _, meta in models.values()]
    grids = {METHOD.grid_size(m) for m in metas}
    if len(grids) != 1:
        raise SystemExit(f"the models use different pipeline lattices {sorted(grids)}; evaluate them separately")
    first = metas[0]
    acc = BinnedErrors(edges, list(models), multipliers)
    facts = {"pairs": 0, "seconds_generate": 0.0, "seconds_predict": {k: 0.0 for k in models}, "lattices": []}
    device = torch.device("cpu")
    for path in test_images:
        scan = prepare_scan(read_volume(path), METHOD.grid_size(first)[0])
        image = torch.from_numpy(scan.image)
        mask = torch.from_numpy(scan.mask)
        spacing = torch.tensor(scan.grid.spacing, dtype=torch.float32).view(3, 1, 1, 1)
        net_lat = network_lattice(scan.grid, METHOD.lattice_spacing(first))
        out_lat = net_lat if METHOD.output_stride(first) == 1 else every_second_node(net_lat)
        facts["lattices"].append({"scan": path.name, "pipeline": (scan.grid.size, scan.grid.spacing),
                                  "network": (net_lat.size, net_lat.spacing), "output": (out_lat.size, out_lat.spacing)})
        for t, mult in enumerate(multipliers):
            for n in range(per_multiplier):
                t0 = time.perf_counter()
                pair = make_pair(image, mask, scan.grid.spacing, test_preset(first, mult),
                                 pair_generator(seed + 1000 * t, n))
                facts["seconds_generate"] += time.perf_counter() - t0
                lung = pair.fixed_mask
                truth = pair.dvf_mm[:, lung]                                   # (3, N) mm along the lattice axes
                b = acc.add_truth(t, truth.norm(dim=0))
                prepared = PreparedPair(pair.fixed.numpy(), pair.moving.numpy(), scan.grid)
                this = []
                for m, (name, (net, meta)) in enumerate(models.items()):
                    t0 = time.perf_counter()
                    field = METHOD.predict(net, prepared, meta, device)          # what register computes
                    facts["seconds_predict"][name] += time.perf_counter() - t0
                    u_mm = (field.u_vox[0] * spacing)[:, lung]
                    error = (u_mm - truth).norm(dim=0)
                    acc.add_error(m, t, b, error)
                    this.append(f"{name} {float(error.mean()):.2f}")
                facts["pairs"] += 1
                log(f"  {path.name} θ×{mult:g} pair {n}: {pair.kind}, lung voxels {int(lung.sum())}, mean EPE (mm): "
                    f"identity {float(truth.norm(dim=0).mean()):.2f}, " + ", ".join(this), flush=True)
    return acc, facts


def tables(acc: BinnedErrors, theta: float, base_theta_index: int | None) -> list[str]:
    """Markdown: EPE per true-displacement bin (θ marked), then per θ multiplier."""
    labels = acc.labels()
    marks = [(" *" if lo >= theta else "") for lo in acc.edges]
    ident = _mean(acc.true_sum, acc.count)
    lines = ["| lung voxels binned by true \\|u\\| (mm) | " + " | ".join(f"{lab}{mk}" for lab, mk in
                                                                         zip(labels, marks, strict=True)) + " | all |",
             "|---" * (len(labels) + 2) + "|",
             "| voxels | " + " | ".join(f"{int(c)}" for c in acc.count.tolist()) + f" | {int(acc.count.sum())} |"]
    if base_theta_index is not None:
        share = acc.theta_bins[base_theta_index] / acc.theta_bins[base_theta_index].sum().clamp(min=1)
        lines.append("| share of the θ×1 pairs' voxels (%) | " + " | ".join(f"{100 * float(s):.1f}" for s in share)
                     + " | 100 |")
    lines.append("| identity (mean true \\|u\\|) | " + " | ".join(f"{v:.2f}" for v in ident)
                 + f" | {float(acc.true_sum.sum() / acc.count.sum()):.2f} |")
    for m, name in enumerate(acc.models):
        epe = _mean(acc.err_sum[m], acc.count)
        lines.append(f"| **{name}** EPE | " + " | ".join(f"**{v:.2f}**" for v in epe)
                     + f" | **{float(acc.err_sum[m].sum() / acc.count.sum()):.2f}** |")
    for m, name in enumerate(acc.models):
        ratio = [e / i if i > 0 else float("nan") for e, i in zip(_mean(acc.err_sum[m], acc.count), ident, strict=True)]
        lines.append(f"| {name} EPE / identity | " + " | ".join(f"{v:.2f}" for v in ratio)
                     + f" | {float(acc.err_sum[m].sum() / acc.true_sum.sum()):.2f} |")
    lines += ["", f"\\* bins at or beyond θ = {theta:g} mm (the largest displacement component of the training "
              "fields).", "",
              "| θ multiplier (θ of the test fields) | lung voxels | identity | "
              + " | ".join(f"{n} EPE" for n in acc.models) + " |",
              "|---" * (3 + len(acc.models)) + "|"]
    for t, mult in enumerate(acc.thetas):
        c = float(acc.theta_count[t])
        lines.append(f"| ×{mult:g} ({mult * theta:g} mm) | {int(c)} | {float(acc.theta_true[t]) / c:.2f} | "
                     + " | ".join(f"{float(acc.theta_err[m, t]) / c:.2f}" for m in range(len(acc.models))) + " |")
    return lines


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(Path.cwd())
    except ValueError:
        pass
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return env + shlex.join(["python", str(script), *sys.argv[1:]])


def provenance() -> str:
    return (f"{datetime.date.today().isoformat()}, {platform.machine()} CPU, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch thread(s), load average at the end {os.getloadavg()[0]:.1f} "
            f"on {os.cpu_count()} cores")


def lattice_text(facts: dict) -> str:
    parts = []
    for lat in facts["lattices"]:
        fmt = lambda s: "×".join(str(v) for v in s[0]) + " nodes at " + "×".join(f"{v:.2f}" for v in s[1]) + " mm"  # noqa: E731
        parts.append(f"{lat['scan']}: pipeline lattice {fmt(lat['pipeline'])}; network lattice {fmt(lat['network'])}; "
                     f"network output lattice {fmt(lat['output'])}")
    return "; ".join(parts)


def write(out: Path | None, title: str, text: str) -> None:
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"# {title}\n\n" + text + "\n")
        print(f"written to {out}")


# --------------------------------------------------------------------------- subcommands
def run_capture(a) -> None:
    from DeepLungRegLib.modelfile import load_model

    models = {}
    for path in a.model:
        net, meta = load_model(path)
        if meta.get("method") != "sokooti2017":
            raise SystemExit(f"{path}: not a sokooti2017 model ({meta.get('method')})")
        name = Path(path).name if Path(path).is_dir() else Path(path).parent.name
        models[name] = (net, meta)
    theta = theta_of(next(iter(models.values()))[1])
    t0 = time.time()
    acc, facts = evaluate(models, a.test_images, a.theta_multipliers, a.pairs_per_multiplier, a.bins, a.seed)
    base = a.theta_multipliers.index(1.0) if 1.0 in a.theta_multipliers else None
    desc = []
    for name, (_net, meta) in models.items():
        tr = meta.get("training", {})
        cfg = tr.get("config", {})
        desc.append(f"`{name}`: width {meta['network']['width']}, scales {meta['network'].get('scales', 2)}, "
                    f"θ {theta_of(meta):g} mm, {tr.get('iterations', '?')} iterations of {cfg.get('options', {})} on "
                    f"{len(tr.get('scans', []))} scans (validation scan {(tr.get('validation_scan') or {}).get('file')})")
    lines = [
        f"Models: {'; '.join(desc)}.", "",
        f"Test pairs: {', '.join(p.name for p in a.test_images)} × θ multipliers {a.theta_multipliers} × "
        f"{a.pairs_per_multiplier} pairs ({facts['pairs']} pairs, seed {a.seed}), the model's own generator "
        "(`synthesis_sokooti2017.make_pair`) on the pipeline lattice. Lattices: " + lattice_text(facts) + ".", "",
        "End-point error (mm) of `METHOD.predict` (the field `register` computes before refinement) against the "
        "generator's exact field, mean over the fixed image's lung voxels of all pairs, per bin of true "
        "displacement magnitude:", "",
        *tables(acc, theta, base), "",
        f"Command: `{command_line()}`", "",
        f"Run: {provenance()}; {time.time() - t0:.0f} s in all, pair generation {facts['seconds_generate']:.0f} s, "
        + ", ".join(f"`{k}` inference {v / facts['pairs']:.1f} s per pair" for k, v in facts["seconds_predict"].items())
        + ".",
    ]
    write(a.out, "sokooti2017: capture range (error against true displacement)", "\n".join(lines))


def _option_pairs(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--option {item!r}: use KEY=VALUE")
        if key == "scales":
            raise SystemExit("--option scales is what this benchmark varies")
        out[key] = value
    return out


def share_initial_weights(recipe, seed_cfg) -> dict:
    """Make the recipe's network builder give the single-scale network the multi-scale one's initial values
    for every tensor both have with the same name and shape, except the first fused convolution (its input
    has the low-resolution features too, so its weights differ in shape and in their default scale).
    Returns the multi-scale network's initial state (as the loop builds it: ``manual_seed(seed)`` first)."""
    from DeepLungRegTrainingLib.recipes.sokooti2017 import options

    build = type(recipe).build_network
    torch.manual_seed(seed_cfg.seed)
    reference = {k: v.clone() for k, v in build(recipe, seed_cfg).state_dict().items()}

    def build_shared(cfg):
        net = build(recipe, cfg)
        if options(cfg)["scales"] == 1:
            state = net.state_dict()
            for k, v in state.items():
                if not k.startswith(NOT_SHARED) and k in reference and reference[k].shape == v.shape:
                    v.copy_(reference[k])
        return net

    recipe.build_network = build_shared          # the training loop calls recipe.build_network(cfg)
    return reference


def run_scales(a) -> None:
    from DeepLungRegLib.modelfile import load_model
    from DeepLungRegTrainingLib.recipes import get_recipe
    from DeepLungRegTrainingLib.training import TrainConfig, train

    held = {p.resolve() for p in a.test_images} | {a.validation_image.resolve()}
    overlap = [p.name for p in a.images if p.resolve() in held]
    if overlap:
        raise SystemExit(f"training scans {overlap} are held out (test or validation scans)")
    extra = _option_pairs(a.option)
    recipe = get_recipe("sokooti2017")
    configs = {name: TrainConfig.for_method("sokooti2017", iterations=a.iterations, seed=a.seed, device=a.device,
                                            workers=a.workers, validate_every=a.iterations,
                                            validation_pairs=a.validation_pairs,
                                            checkpoint_every=max(1, min(50, a.iterations)),
                                            options={**extra, "scales": str(scales)})
               for name, scales in VARIANTS}
    multi_cfg, single_cfg = configs.values()
    reference = share_initial_weights(recipe, multi_cfg)
    torch.manual_seed(single_cfg.seed)
    single_init = recipe.build_network(single_cfg).state_dict()
    shared = [k for k, v in single_init.items() if k in reference and torch.equal(v, reference[k])]
    not_shared = [k for k in single_init if k not in shared]
    torch.manual_seed(multi_cfg.seed)
    multi_again = recipe.build_network(multi_cfg).state_dict()
    assert all(torch.equal(multi_again[k], reference[k]) for k in reference), "multi-scale init not reproducible"
    n_shared = sum(single_init[k].numel() for k in shared)
    print(f"initial weights: {len(shared)} of {len(single_init)} single-scale tensors ({n_shared} of "
          f"{sum(v.numel() for v in single_init.values())} values) equal the multi-scale network's; "
          f"not shared: {sorted({k.rsplit('.', 1)[0] for k in not_shared})}", flush=True)

    trained = {}
    for (name, scales), cfg in zip(VARIANTS, configs.values(), strict=True):
        t0 = time.time()
        res = train(a.images, a.runs / f"scales{scales}", cfg, validation_image=a.validation_image, resume=True,
                    progress=False)
        wall = time.time() - t0
        log = res.log or []
        loop_s = float(log[-1]["seconds"]) if log else float("nan")
        net, meta = load_model(res.model_path)
        trained[name] = {"model": (net, meta), "wall_s": wall, "loop_s": loop_s,
                         "s_per_it": loop_s / max(1, res.iterations),
                         "val": res.validation["final_averaged"]["epe_lung_mm"],
                         "val_identity": res.validation["identity"]["epe_lung_mm"],
                         "params": sum(p.numel() for p in net.parameters())}
        print(f"{name}: {res.iterations} iterations, loop {loop_s:.0f} s ({trained[name]['s_per_it']:.2f} s/it), "
              f"wall {wall:.0f} s, validation EPE {trained[name]['val']:.2f} mm", flush=True)

    t0 = time.time()
    models = {name: r["model"] for name, r in trained.items()}
    acc, facts = evaluate(models, a.test_images, a.theta_multipliers, a.pairs_per_multiplier, a.bins, a.seed_test)
    theta = theta_of(next(iter(models.values()))[1])
    base = a.theta_multipliers.index(1.0) if 1.0 in a.theta_multipliers else None
    o = recipe_options(multi_cfg)
    lines = [
        f"Both variants: {a.iterations} iterations, seed {a.seed} (the same synthetic pairs and patches in the "
        f"same order), Adam 1e-3 / 1.25 every {o['epoch']} iterations, {o['patches']} patch pairs per iteration, "
        f"lattice {o['spacing_mm']:g} mm, θ {theta:g} mm, width {multi_cfg.width}, options {extra or '{}'}; "
        f"{len(a.images)} training scans ({', '.join(p.name for p in a.images)}); validation scan "
        f"{a.validation_image.name} ({a.validation_pairs} pairs, at the end).", "",
        f"Initial weights: {len(shared)} of {len(single_init)} tensors of the single-scale network ({n_shared} "
        "values: the three convolutions of each original-resolution input, the two original-resolution "
        "convolutions, fused convolutions 2–4 and the fully connected layers) are the multi-scale network's "
        "initial values; not shared: the low-resolution pipeline (multi-scale only) and the first fused "
        "convolution (its input has the low-resolution features too: other shape, other default scale).", "",
        "| variant | parameters | validation EPE (mm; identity) | loop s/iteration | training wall s |",
        "|---|---|---|---|---|",
        *[f"| {n} | {r['params']} | {r['val']:.2f} ({r['val_identity']:.2f}) | {r['s_per_it']:.2f} | "
          f"{r['wall_s']:.0f} |" for n, r in trained.items()], "",
        f"Test pairs: {', '.join(p.name for p in a.test_images)} × θ multipliers {a.theta_multipliers} × "
        f"{a.pairs_per_multiplier} pairs ({facts['pairs']} pairs, seed {a.seed_test}). Lattices: "
        + lattice_text(facts) + ".", "",
        "End-point error (mm) of `METHOD.predict` against the generator's exact field, mean over the fixed "
        "image's lung voxels, per bin of true displacement magnitude:", "",
        *tables(acc, theta, base), "",
        f"Command: `{command_line()}`", "",
        f"Run: {provenance()}; evaluation {time.time() - t0:.0f} s. s/iteration = the training loop's own clock "
        "(log.csv) over the iterations; wall = the whole `train` call (scan preparation, validation, saving).",
    ]
    write(a.out, "sokooti2017: multi-scale against single-scale RegNet (small scale)", "\n".join(lines))


def recipe_options(cfg) -> dict:
    from DeepLungRegTrainingLib.recipes.sokooti2017 import options

    return options(cfg)


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p, pairs: int) -> None:
        p.add_argument("--test-images", nargs="+", type=Path, default=[DATA / HELD_OUT], help="held-out scans")
        p.add_argument("--theta-multipliers", type=floats, default=[0.5, 1.0, 2.0, 3.0],
                       help="θ of the test fields = model θ × these (comma-separated)")
        p.add_argument("--pairs-per-multiplier", type=int, default=pairs)
        p.add_argument("--bins", type=floats, default=[0, 2, 4, 8, 12, 16, 24],
                       help="bin edges of the true displacement magnitude (mm); the last bin is open")
        p.add_argument("--threads", type=int, default=0, help="torch threads (0: as OMP_NUM_THREADS gives)")
        p.add_argument("--out", type=Path, default=None, help="also write the Markdown here")

    cap = sub.add_parser("capture", help="binned error of given models on held-out pairs")
    cap.add_argument("--model", nargs="+", default=[str(SHIPPED)], help="sokooti2017 model folders or files")
    cap.add_argument("--seed", type=int, default=2024, help="seed of the test pairs")
    common(cap, 3)

    sc = sub.add_parser("scales", help="train scales=2 and scales=1 alike, then evaluate both")
    sc.add_argument("--images", nargs="+", type=Path, default=[DATA / f for f in TRAIN], help="training scans")
    sc.add_argument("--validation-image", type=Path, default=DATA / HELD_OUT)
    sc.add_argument("--validation-pairs", type=int, default=2)
    sc.add_argument("--iterations", type=int, default=60)
    sc.add_argument("--seed", type=int, default=0, help="training seed (data stream and initial weights)")
    sc.add_argument("--seed-test", type=int, default=2024, help="seed of the test pairs")
    sc.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe option for both variants (patches, epoch, spacing_mm, theta_mm, output_stride)")
    sc.add_argument("--workers", type=int, default=0, help="data-loader processes (0: in the training thread)")
    sc.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    sc.add_argument("--runs", type=Path, default=Path("runs/sokooti2017_ablation"))
    common(sc, 1)

    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    a.bins = sorted(a.bins)
    if a.bins[0] != 0:
        a.bins = [0.0, *a.bins]
    (run_capture if a.cmd == "capture" else run_scales)(a)


if __name__ == "__main__":
    main()
