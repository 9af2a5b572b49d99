"""The shared dependency step of both Slicer modules (issue 12, defect 6), with the Slicer calls
replaced by recorders: one question, torch through the PyTorch extension, the rest through pip,
nothing installed without consent, the requirements file as the only list."""

from __future__ import annotations

from pathlib import Path

import pytest
from DeepLungRegLib.dependencies import (
    ensure_requirements,
    is_satisfied,
    missing_requirements,
    read_requirements,
    requirement_name,
    requirement_specifier,
)

ROOT = Path(__file__).resolve().parents[1]


def fake_versions(installed: dict):
    import importlib.metadata

    def version_of(name):
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    return version_of


def test_read_requirements_of_the_module(tmp_path):
    reqs = read_requirements(ROOT / "DeepLungReg" / "Resources" / "requirements.txt")
    assert reqs[0] == "torch>=2.1" and all(not r.startswith("#") for r in reqs)
    f = tmp_path / "r.txt"
    f.write_text("# c\n\nscikit_image>=0.21  # inline\n-r other.txt\nSciPy\nscikit-image>=9\n")
    assert read_requirements(f) == ["scikit_image>=0.21", "SciPy"]
    assert requirement_name("scikit_image>=0.21") == "scikit-image" and requirement_specifier("torch >= 2.1") == ">=2.1"


def test_satisfied_uses_versions_not_imports():
    v = fake_versions({"torch": "2.13.0+cpu", "scipy": "1.9.3", "tqdm": "4.70.1"})
    assert is_satisfied("torch>=2.1", v) and not is_satisfied("scipy>=1.10", v)
    assert not is_satisfied("safetensors>=0.4", v) and is_satisfied("tqdm", v)
    assert missing_requirements(["torch>=2.1", "scipy>=1.10", "psutil"], v) == ["scipy>=1.10", "psutil"]
    assert is_satisfied("numpy>=1.0")  # the real metadata of this environment


def test_nothing_is_installed_when_the_user_declines():
    installed = {}
    asked, pip = [], []
    ok = ensure_requirements(["torch>=2.1", "scipy>=1.10"], lambda text: asked.append(text) or False,
                             pip.append, lambda req: pytest.fail("torch installed without consent"),
                             fake_versions(installed))
    assert ok is False and pip == [] and len(asked) == 1
    assert "torch>=2.1" in asked[0] and "scipy>=1.10" in asked[0]


def test_torch_through_the_pytorch_extension_and_the_rest_through_pip():
    installed = {"scipy": "1.17.1"}
    calls = []

    def install_torch(req):
        calls.append(("torch", req))
        installed["torch"] = "2.5.0"
        return True

    def pip(reqs):
        calls.append(("pip", list(reqs)))
        installed.update({requirement_name(r): "9.0" for r in reqs})

    asked = []
    ok = ensure_requirements(["torch>=2.1", "scipy>=1.10", "safetensors>=0.4", "psutil>=5.9"],
                             lambda t: asked.append(t) or True, pip, install_torch, fake_versions(installed))
    assert ok and len(asked) == 1
    assert calls == [("torch", "torch>=2.1"), ("pip", ["safetensors>=0.4", "psutil>=5.9"])]
    calls.clear()
    assert ensure_requirements(["torch>=2.1"], lambda t: pytest.fail("asked again"), pip, install_torch,
                               fake_versions(installed))
    assert calls == []


def test_without_the_pytorch_extension_pip_installs_torch_and_failures_are_reported():
    installed = {}
    pip_calls = []
    ok = ensure_requirements(["torch>=2.1", "tqdm"], lambda t: True,
                             lambda reqs: (pip_calls.append(list(reqs)), installed.update(torch="2.2", tqdm="4")),
                             lambda req: False, fake_versions(installed))
    assert ok and pip_calls == [["torch>=2.1", "tqdm"]]
    with pytest.raises(RuntimeError, match="still missing.*psutil"):
        ensure_requirements(["psutil"], lambda t: True, lambda reqs: None, None, fake_versions({}))
