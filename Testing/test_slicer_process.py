"""Child processes of the Slicer modules (issue 12, defects 3 and 11): cancelling kills the whole
tree behind a launcher without psutil, the output reader survives bytes that are not UTF-8, and
devices are described by asking a child Python."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import drain
from DeepLungRegLib.process import ProcessWatcher, launch

ROOT = Path(__file__).resolve().parents[1]

# a stand-in for PythonSlicer: a launcher that starts the real Python as its child and waits for it
LAUNCHER = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import os, sys, time\\nprint(os.getpid(), flush=True)\\ntime.sleep(120)"],
                         stdout=sys.stdout)
sys.exit(child.wait())
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for_line(watcher: ProcessWatcher, timeout: float = 30) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        _, lines, _ = watcher.poll()
        if lines:
            return lines[0]
        time.sleep(0.05)
    raise AssertionError("no output from the child")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="checks pids through /proc")
@pytest.mark.parametrize("psutil_available", [False, True])
def test_cancel_kills_the_python_behind_the_launcher(monkeypatch, psutil_available):
    if not psutil_available:
        monkeypatch.setitem(sys.modules, "psutil", None)  # Slicer does not ship psutil
    else:
        pytest.importorskip("psutil")
    watcher = ProcessWatcher(launch([sys.executable, "-c", LAUNCHER]))
    grandchild = int(wait_for_line(watcher))
    assert alive(grandchild)
    watcher.kill()
    assert watcher.process.poll() is not None
    deadline = time.time() + 10
    while alive(grandchild) and time.time() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild), "the real Python behind the launcher survived Cancel"


def test_kill_also_works_for_a_child_started_elsewhere(monkeypatch):
    """A Popen not made by launch() (not its own process group): the tree is found through /proc or ps."""
    monkeypatch.setitem(sys.modules, "psutil", None)
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    watcher = ProcessWatcher(proc)
    grandchild = int(wait_for_line(watcher))
    watcher.kill()
    deadline = time.time() + 10
    while alive(grandchild) and time.time() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild)
    assert os.getpgid(os.getpid()) != grandchild


@pytest.mark.parametrize("text_mode", [True, False])
def test_watcher_survives_output_that_is_not_utf8(text_mode):
    """Defect 11: one undecodable line killed the reader thread; later lines (and a full pipe) were lost."""
    code = ("import sys\nout = sys.stdout.buffer\nout.write(b'caf\\xe9 \\xff\\xfe broken\\n'); out.flush()\n"
            "for i in range(1, 4):\n    out.write(f'progress: {i}/3 step{i}\\n'.encode()); out.flush()\n"
            "out.write(b'x' * 200000 + b'\\n'); out.write(b'deeplungreg: error: boom\\n'); out.flush()\nsys.exit(2)")
    kwargs = {"text": True, "encoding": "utf-8"} if text_mode else {}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)
    watcher = ProcessWatcher(proc)
    seen, rc = drain(watcher)
    assert rc == 2
    assert [p.done for p in seen] == [1, 2, 3]
    assert watcher.messages[0].startswith("caf\ufffd \ufffd\ufffd broken")
    assert watcher.errors() == ["deeplungreg: error: boom"]


def test_device_probe_runs_in_a_child_and_is_described():
    from DeepLungRegLib.device_probe import describe, parse_probe_output
    from DeepLungRegLib.slicer_logic import RegistrationLogic

    cmd, env = RegistrationLogic.child_command(sys.executable, [], module="DeepLungRegLib.device_probe")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    info = parse_probe_output(proc.stdout.splitlines())
    assert info is not None and info["torch"]
    assert describe(info).startswith(("GPU:", "No CUDA GPU"))
    assert describe({"torch": None, "cuda": False, "gpus": [], "error": None}).startswith("PyTorch not installed")
    assert describe(None).startswith("Device: unknown")
    assert parse_probe_output(["noise", "devices: " + json.dumps({"torch": "2.0"})]) == {"torch": "2.0"}
