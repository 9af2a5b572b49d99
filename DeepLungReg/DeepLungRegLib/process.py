"""Watching a child process's output without blocking a GUI (no Qt here: the widgets poll).

The Slicer modules start the command line with ``slicer.util.launchConsoleProcess`` and call
:meth:`ProcessWatcher.poll` from a ``QTimer``; a reader thread moves stdout lines into a queue.
Progress lines look like ``progress: DONE/TOTAL rest...`` (see ``--progress-lines``).
"""

from __future__ import annotations

import queue
import subprocess
import threading
from dataclasses import dataclass


@dataclass
class Progress:
    done: int
    total: int
    text: str

    @property
    def percent(self) -> int:
        return int(100 * self.done / max(self.total, 1))


def parse_progress(line: str) -> Progress | None:
    """``'progress: 3/6 network'`` -> Progress(3, 6, 'network'); other lines -> None."""
    if not line.startswith("progress: "):
        return None
    fields = line.split()
    try:
        done, total = (int(v) for v in fields[1].split("/"))
    except (IndexError, ValueError):
        return None
    return Progress(done, total, " ".join(fields[2:]))


class ProcessWatcher:
    """Collects a child's stdout lines in a background thread; ``poll`` never blocks."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.messages: list[str] = []
        self.last_progress: Progress | None = None
        self._lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in iter(self.process.stdout.readline, ""):
            self._lines.put(line.rstrip())
        self.process.stdout.close()

    def poll(self) -> tuple[list[Progress], list[str], int | None]:
        """New progress records and other lines since the last call, and the exit code (None while running).
        After the child exits, waits for the reader to deliver the last lines."""
        rc = self.process.poll()
        if rc is not None:
            self._thread.join(timeout=5)
        progress, other = [], []
        while not self._lines.empty():
            line = self._lines.get()
            p = parse_progress(line)
            if p is not None:
                progress.append(p)
                self.last_progress = p
            elif line:
                other.append(line)
        self.messages.extend(other)
        return progress, other, rc

    def errors(self) -> list[str]:
        return [m for m in self.messages if "error" in m.lower()]

    def kill(self) -> None:
        """Stop the child and everything it started: ``PythonSlicer`` is a launcher, so killing
        only the launched process would leave the real Python (and DataLoader workers) running."""
        if self.process.poll() is not None:
            return
        try:
            import psutil  # shipped with Slicer; optional elsewhere

            for child in psutil.Process(self.process.pid).children(recursive=True):
                child.kill()
        except (ImportError, Exception):  # noqa: BLE001 - the child may have exited meanwhile
            pass
        self.process.kill()
        self.process.wait(timeout=10)
