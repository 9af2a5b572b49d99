"""The one dependency step of both Slicer modules, and the minimum Slicer version.

Both modules call :func:`ensure_in_slicer` with their ``Resources/requirements.txt`` when the
user presses Register / Start training (never at import): it lists what is missing, asks
once, installs torch through the PyTorch extension's ``PyTorchUtils`` (the right CUDA/CPU
build; plain pip when that extension is absent) and the rest with
``slicer.packaging.pip_ensure`` (Slicer >= 5.11) or ``slicer.util.pip_install``.

Standard library only, and written for any Python Slicer ships (the module files import it
first, to tell users of an older Slicer what they need instead of failing with a traceback).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional

#: Oldest Slicer the extension supports; it ships Python 3.12 (Slicer 5.8 ships 3.9).
MINIMUM_SLICER_VERSION = (5, 10)
#: The Python of that Slicer release.
MINIMUM_SLICER_PYTHON = (3, 12)
#: The oldest Python the libraries' syntax accepts (``zip(strict=...)``, ``X | Y`` at runtime).
MINIMUM_PYTHON = (3, 10)
TORCH = "torch"

_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*?)\s*$")


def version_text(version: Iterable[int]) -> str:
    return ".".join(str(v) for v in version)


def version_problem(python_version: Optional[tuple] = None, slicer_version: Optional[tuple] = None) -> Optional[str]:
    """A message for the user when this Python/Slicer is too old, else None.

    ``slicer_version`` is ``(major, minor)`` of the running Slicer, or None when unknown
    (outside the application)."""
    python_version = tuple(sys.version_info[:2] if python_version is None else python_version[:2])
    if slicer_version is not None and tuple(slicer_version[:2]) < MINIMUM_SLICER_VERSION:
        return (f"DeepLungReg needs 3D Slicer {version_text(MINIMUM_SLICER_VERSION)} or newer "
                f"(Python {version_text(MINIMUM_SLICER_PYTHON)}); this is Slicer {version_text(slicer_version[:2])} "
                f"with Python {version_text(python_version)}. Please install a newer Slicer from "
                f"https://download.slicer.org.")
    if python_version < MINIMUM_PYTHON:
        return (f"DeepLungReg needs Python {version_text(MINIMUM_PYTHON)} or newer (3D Slicer "
                f"{version_text(MINIMUM_SLICER_VERSION)} or newer); this is Python {version_text(python_version)}.")
    return None


def slicer_version_problem() -> Optional[str]:
    """:func:`version_problem` for the running Slicer application."""
    try:
        import slicer

        app = getattr(slicer, "app", None)
        version = (int(app.majorVersion), int(app.minorVersion)) if app is not None else None
    except (ImportError, AttributeError, TypeError, ValueError):
        version = None
    return version_problem(None, version)


# --------------------------------------------------------------------------- requirements
def read_requirements(*paths: "str | Path") -> list:
    """Requirement strings of requirements files, in order, one per package (first mention wins).
    Comments, blank lines and pip options (``-r``, ``--index-url``) are skipped."""
    seen, reqs = set(), []
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if not line or line.startswith("-"):
                continue
            name = requirement_name(line)
            if name not in seen:
                seen.add(name)
                reqs.append(line)
    return reqs


def requirement_name(req: str) -> str:
    """Normalised distribution name of a requirement (``scikit_image>=1`` -> ``scikit-image``)."""
    m = _REQ.match(req.split(";", 1)[0])
    if not m:
        raise ValueError(f"malformed requirement {req!r}")
    return re.sub(r"[-_.]+", "-", m.group(1)).lower()


def requirement_specifier(req: str) -> str:
    """The version part of a requirement (``torch>=2.1`` -> ``>=2.1``)."""
    m = _REQ.match(req.split(";", 1)[0])
    return m.group(3).replace(" ", "") if m else ""


def _version_tuple(text: str) -> tuple:
    parts = []
    for piece in re.split(r"[.+]", text):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def _specifier_ok(version: str, specifier: str) -> bool:
    if not specifier:
        return True
    try:  # the real thing when available (Slicer >= 5.11 ships packaging; pip vendors it)
        try:
            from packaging.specifiers import SpecifierSet
        except ImportError:
            from pip._vendor.packaging.specifiers import SpecifierSet
        return SpecifierSet(specifier).contains(version, prereleases=True)
    except Exception:  # noqa: BLE001 - fall back to comparing release numbers
        pass
    have = _version_tuple(version)
    for clause in specifier.split(","):
        m = re.match(r"(>=|<=|==|!=|~=|>|<)\s*(.+)", clause.strip())
        if not m:
            continue
        op, want = m.group(1), _version_tuple(m.group(2))
        n = max(len(have), len(want))
        a, b = have + (0,) * (n - len(have)), want + (0,) * (n - len(want))
        ok = {">=": a >= b, "<=": a <= b, "==": a == b, "!=": a != b, ">": a > b, "<": a < b,
              "~=": a >= b}[op]
        if not ok:
            return False
    return True


def is_satisfied(req: str, version_of: Optional[Callable[[str], str]] = None) -> bool:
    """Installed (per the package metadata; nothing is imported) at an acceptable version."""
    version_of = version_of or importlib.metadata.version
    try:
        version = version_of(requirement_name(req))
    except importlib.metadata.PackageNotFoundError:
        return False
    return _specifier_ok(str(version), requirement_specifier(req))


def missing_requirements(reqs: Iterable[str], version_of: Optional[Callable[[str], str]] = None) -> list:
    return [r for r in reqs if not is_satisfied(r, version_of)]


def install_message(missing: list, requester: str = "DeepLungReg") -> str:
    return (f"{requester} needs these Python packages, not installed in Slicer yet:\n\n"
            + "\n".join(f"  - {r}" for r in missing)
            + "\n\nInstall them now? This downloads several hundred megabytes (PyTorch) and can take a few "
              "minutes; it needs an internet connection. Slicer may ask to restart afterwards.")


def ensure_requirements(reqs: list, confirm: Callable[[str], bool], pip_install: Callable[[list], object],
                        install_torch: Optional[Callable[[str], bool]] = None,
                        version_of: Optional[Callable[[str], str]] = None, requester: str = "DeepLungReg") -> bool:
    """Install what ``reqs`` lacks after one confirmation. Returns False when the user declines,
    True when everything is satisfied afterwards; raises RuntimeError naming what is still missing.

    ``install_torch(requirement)`` installs torch and returns True, or returns False to let
    ``pip_install`` do it; ``pip_install(list_of_requirements)`` installs the others."""
    missing = missing_requirements(reqs, version_of)
    if not missing:
        return True
    if not confirm(install_message(missing, requester)):
        return False
    torch_reqs = [r for r in missing if requirement_name(r) == TORCH]
    others = [r for r in missing if requirement_name(r) != TORCH]
    if torch_reqs and install_torch is not None and install_torch(torch_reqs[0]):
        torch_reqs = []
    if torch_reqs + others:
        pip_install(torch_reqs + others)
    importlib.invalidate_caches()
    still = missing_requirements(reqs, version_of)
    if still:
        raise RuntimeError(f"{requester}: these Python packages are still missing after the installation: "
                           f"{', '.join(still)}. Install them from Slicer's Python console with "
                           f"slicer.util.pip_install(...) and restart Slicer.")
    return True


def ensure_in_slicer(requirement_files: list, requester: str = "DeepLungReg") -> bool:
    """:func:`ensure_requirements` wired to the Slicer application (call it from a button handler)."""
    import slicer

    reqs = read_requirements(*requirement_files)

    def confirm(text: str) -> bool:
        return bool(slicer.util.confirmOkCancelDisplay(text, requester))

    def pip_install(missing: list) -> None:
        try:
            import slicer.packaging as packaging  # Slicer >= 5.11: progress dialog, restart prompt

            packaging.pip_ensure(missing, prompt_install=False, requester=requester, skip_in_testing=False)
        except ImportError:
            slicer.util.pip_install(missing)

    def install_torch(req: str) -> bool:
        try:
            import PyTorchUtils  # the PyTorch extension picks the CUDA/CPU build matching this computer
        except ImportError:
            return False
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=requirement_specifier(req) or None)
        if torch is None:
            raise RuntimeError("PyTorch was not installed (see the PyTorch Utils module)")
        return True

    return ensure_requirements(reqs, confirm, pip_install, install_torch, requester=requester)
