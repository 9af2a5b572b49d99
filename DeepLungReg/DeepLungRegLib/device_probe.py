"""Which devices torch sees, asked in a child process so that the Slicer GUI never imports
torch nor initialises CUDA: ``PythonSlicer -m DeepLungRegLib.device_probe`` prints one line
``devices: {json}``; :func:`parse_probe_output` reads it and :func:`describe` words it."""

from __future__ import annotations

import json
import sys

PREFIX = "devices: "


def probe() -> dict:
    """``{"torch": version or None, "cuda": bool, "gpus": [names], "error": text or None}``."""
    info = {"torch": None, "cuda": False, "gpus": [], "error": None}
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - a broken install is reported, not raised
        info["error"] = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ModuleNotFoundError) else None
        return info
    info["torch"] = torch.__version__
    try:
        if torch.cuda.is_available():
            info["cuda"] = True
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as exc:  # noqa: BLE001
        info["error"] = f"CUDA: {exc}"
    return info


def parse_probe_output(lines: list[str]) -> dict | None:
    for line in lines:
        if line.startswith(PREFIX):
            try:
                return json.loads(line[len(PREFIX):])
            except ValueError:
                return None
    return None


def describe(info: dict | None) -> str:
    if info is None:
        return "Device: unknown (the check did not finish)"
    if info.get("torch") is None:
        return "PyTorch not installed yet (installed on first Register)" if not info.get("error") else \
            f"PyTorch cannot be imported: {info['error']}"
    if info.get("cuda") and info.get("gpus"):
        return f"GPU: {', '.join(info['gpus'])} (PyTorch {info['torch']})"
    return f"No CUDA GPU: CPU (PyTorch {info['torch']})"


def main() -> int:
    print(PREFIX + json.dumps(probe()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
