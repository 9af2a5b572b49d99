"""Issue 14, part 3: the ``--device cuda`` path.

What can be checked without a GPU runs everywhere: the float32 setting the network and refinement
run under on a CUDA device (cuDNN's default there is TF32), and the one-line errors for running out
of GPU or host memory. The CPU-vs-GPU agreement tests run only where torch sees a CUDA GPU (never in
this project's CI); their tolerances are the ones the project states in README "GPU" and were chosen,
not yet measured, on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from DeepLungRegLib.cli import main
from DeepLungRegLib.modelfile import default_model_path, ieee_float32, load_model

#: Network prediction (``--refine off``), GPU vs CPU, largest difference in mm: both in IEEE float32,
#: differing only in the order of the convolutions' sums (~1e-6 relative of a few mm).
GPU_NETWORK_TOL_MM = 0.01
#: Default refinement, GPU vs CPU: CUDA's ``grid_sample`` backward adds with atomics (run-to-run
#: different sums), and 300 iterations of Adam carry that on: mean / largest landmark difference in mm.
GPU_REFINE_TOL_MEAN_MM, GPU_REFINE_TOL_MAX_MM = 0.05, 0.5

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU (checked on a GPU machine)")


def _precision() -> str:
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return conv.fp32_precision
    return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"


def test_cuda_inference_runs_without_tf32_and_restores_the_setting():
    before = _precision()
    assert before == "tf32"  # torch's default: what the block must change
    with ieee_float32(torch.device("cuda")):
        assert _precision() == "ieee"
    assert _precision() == before
    with pytest.raises(ValueError), ieee_float32("cuda:0"):
        assert _precision() == "ieee"
        raise ValueError("stop")
    assert _precision() == before  # restored on an exception too
    with ieee_float32("cpu"):
        assert _precision() == before  # nothing changes for the CPU


def test_register_images_runs_the_network_under_ieee_float32(small_ct, tiny_model, monkeypatch):
    """The setting is in force while the method predicts (seen from inside ``predict``), on the
    device the caller names — here a CUDA device object, with the prediction itself sent to the CPU."""
    from DeepLungRegLib import pipeline
    from DeepLungRegLib.methods import get_method

    net, meta = load_model(tiny_model)
    method = get_method(meta["method"])
    seen = []
    real = method.predict

    def predict(net, pair, meta, device, bf16=False):
        seen.append(_precision())
        return real(net, pair, meta, torch.device("cpu"), bf16=bf16)

    monkeypatch.setattr(method, "predict", predict)
    monkeypatch.setattr(pipeline, "warp_image", lambda *a, **k: None)
    real_stats = pipeline.jacobian_stats
    monkeypatch.setattr(pipeline, "jacobian_stats", lambda *a, **k: real_stats(*a, **{**k, "device": "cpu"}))
    pipeline.register_images(small_ct, small_ct, net, meta, torch.device("cuda"), refine="off", warp_moving=False)
    assert seen == ["ieee"] and _precision() == "tf32"


OUT_OF_MEMORY = {
    "gpu": lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 7.79 GiB)"),
    "python": MemoryError,
    "torch-cpu": lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate "
                                      "memory: you tried to allocate 2147483648 bytes."),
    "simpleitk": lambda: RuntimeError("Exception thrown in SimpleITK Resample: Failed to allocate memory for image."),
}


@pytest.mark.parametrize("error", list(OUT_OF_MEMORY))
def test_running_out_of_memory_is_one_line_and_writes_nothing(small_ct_file, tiny_model, tmp_path, capsys,
                                                               monkeypatch, error):
    """Mid-way (the warp) and at the start (the masks): one line, exit 2, no output folder left."""
    from DeepLungRegLib import pipeline

    def fail(*args, **kwargs):
        raise OUT_OF_MEMORY[error]()

    for where in ("warp_image", "_lung_mask_of"):
        with monkeypatch.context() as m:
            m.setattr(pipeline, where, fail)
            out = tmp_path / "out"
            rc = main(["register", str(small_ct_file), str(small_ct_file), "-o", str(out), "--model", str(tiny_model),
                       "--refine", "off", "--quiet"])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert rc == 2 and len(err) == 1 and err[0].startswith("deeplungreg: error: out of"), err
        assert "nothing was written" in err[0]
        if error == "gpu":
            assert "out of GPU memory" in err[0] and "--device cpu" in err[0] and "20.00 GiB" in err[0]
        else:
            assert "out of host memory" in err[0] and "--device cpu" not in err[0]
        assert not out.exists() and list(tmp_path.iterdir()) == []


def test_other_runtime_errors_are_not_taken_for_memory(small_ct_file, tiny_model, tmp_path, monkeypatch):
    from DeepLungRegLib import pipeline

    def fail(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(pipeline, "warp_image", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["register", str(small_ct_file), str(small_ct_file), "-o", str(tmp_path / "out"), "--model",
              str(tiny_model), "--refine", "off", "--quiet"])


@pytest.mark.parametrize("capability, refused", [((7, 0), True), ((8, 0), False), ((9, 0), False)])
def test_bf16_is_refused_on_a_gpu_without_it(monkeypatch, capability, refused):
    """By compute capability (``torch.cuda.is_bf16_supported()`` says yes for emulated bfloat16 too)."""
    from DeepLungRegLib.errors import InputError
    from DeepLungRegLib.modelfile import check_bf16

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    check_bf16("cuda", False)  # without --bf16 nothing is asked
    check_bf16("cpu", True)
    if refused:
        with pytest.raises(InputError, match="--bf16 needs a GPU with bfloat16.*Tesla V100"):
            check_bf16("cuda:0", True)
    else:
        check_bf16("cuda:0", True)


@requires_cuda
@pytest.mark.parametrize("refine", ["off", "full"])
def test_gpu_registration_agrees_with_the_cpu(sample_ct, refine):
    from DeepLungRegLib.pipeline import register_images
    from DeepLungRegLib.resampling import warp_image
    from DeepLungRegLib.simulation import BreathingParams, simulate_pair
    from DeepLungRegLib.transforms import transform_points

    sim = simulate_pair(sample_ct, BreathingParams(n_landmarks=200))
    res = {}
    for dev in ("cpu", "cuda"):
        net, meta = load_model(default_model_path(), torch.device(dev))
        res[dev] = register_images(sim.fixed, sim.moving, net, meta, dev, refine=refine, warp_moving=False)
    pts = {d: transform_points(r.transform, sim.fixed_landmarks) for d, r in res.items()}
    diff = np.linalg.norm(pts["cuda"] - pts["cpu"], axis=1)
    if refine == "off":
        scale = np.asarray(res["cpu"].lattice.spacing).reshape(3, 1, 1, 1)
        du = (np.asarray(res["cuda"].u_vox[0]) - np.asarray(res["cpu"].u_vox[0])) * scale
        assert np.abs(du).max() <= GPU_NETWORK_TOL_MM and diff.max() <= GPU_NETWORK_TOL_MM
    else:
        assert diff.mean() <= GPU_REFINE_TOL_MEAN_MM and diff.max() <= GPU_REFINE_TOL_MAX_MM
    # the warp on the GPU: the CPU's image up to float32 rounding of the sampling coordinates
    warped = {d: sitk.GetArrayFromImage(warp_image(sim.moving, sim.fixed, res["cpu"].affine, res["cpu"].field,
                                                   -1000.0, torch.device(d), output="float32"))
              for d in ("cpu", "cuda")}
    assert np.abs(warped["cuda"] - warped["cpu"]).max() <= 0.5
