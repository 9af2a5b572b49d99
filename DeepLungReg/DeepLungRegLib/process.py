"""Running a child process under a GUI without blocking it (no Qt here: the widgets poll).

The Slicer modules start the command line with :func:`launch` and call
:meth:`ProcessWatcher.poll` from a ``QTimer``; a reader thread moves stdout lines into a queue.
Progress lines look like ``progress: DONE/TOTAL rest...`` (see ``--progress-lines``).

``PythonSlicer`` is a launcher that starts the real Python as its own child, so the child is
started in a new process group (POSIX session / Windows process group) and cancelling kills
that whole tree, with psutil when installed and without it otherwise.
"""

from __future__ import annotations

import os
import queue
import signal
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


def launch(command: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> subprocess.Popen:
    """Start ``command`` with stdout+stderr piped (bytes), in its own process group, no console window."""
    kwargs: dict = {}
    if os.name == "nt":
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
    else:
        kwargs["start_new_session"] = True
    return subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, **kwargs)


def _descendants(pid: int) -> list[int]:
    """Child pids, recursively (psutil, else /proc on Linux, else ``ps``)."""
    try:
        import psutil

        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - the process may be gone already
        return []
    parents: dict[int, list[int]] = {}
    try:
        if os.path.isdir("/proc"):
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    try:
                        with open(f"/proc/{entry}/stat", "rb") as fh:
                            stat = fh.read().decode("ascii", "replace")
                        ppid = int(stat.rsplit(")", 1)[1].split()[1])
                    except (OSError, ValueError, IndexError):
                        continue
                    parents.setdefault(ppid, []).append(int(entry))
        else:
            out = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True, timeout=10).stdout
            for line in out.splitlines():
                child, parent = (int(v) for v in line.split())
                parents.setdefault(parent, []).append(child)
    except (OSError, ValueError, subprocess.SubprocessError):
        return []
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Kill ``process`` and everything it started (the Python behind a launcher, DataLoader workers)."""
    if process.poll() is not None:
        return
    if os.name == "nt":
        # taskkill walks the tree itself (psutil is not needed)
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
    else:
        pids = _descendants(process.pid)
        try:  # started by launch(): its own session and process group
            if os.getpgid(process.pid) == process.pid:
                os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in pids:  # children that left the group
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    try:
        process.kill()
    except OSError:
        pass
    process.wait(timeout=timeout)


def _decode(line) -> str:
    if isinstance(line, bytes):
        return line.decode("utf-8", errors="replace")
    return line


class ProcessWatcher:
    """Collects a child's stdout lines in a background thread; ``poll`` never blocks.

    Reads bytes and decodes them leniently (``errors='replace'``): a byte sequence that is not
    UTF-8 must not kill the reader, or the pipe fills up and the child hangs."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.messages: list[str] = []
        self.last_progress: Progress | None = None
        self._lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        stream = self.process.stdout
        raw = getattr(stream, "buffer", stream)  # text-mode pipes: read their bytes underneath
        try:
            while True:
                try:
                    line = raw.readline()
                except (UnicodeDecodeError, ValueError):
                    continue
                except OSError:
                    break
                if not line:
                    break
                self._lines.put(_decode(line).rstrip("\r\n").rstrip())
        finally:
            try:
                stream.close()
            except OSError:
                pass

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
        """Stop the child and everything it started (see :func:`kill_tree`)."""
        kill_tree(self.process)
