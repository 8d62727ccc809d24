"""The training child process: JSON progress lines in, clean stop (SIGTERM / CTRL_BREAK) or kill out.

No Qt, no MRML: reader threads collect stdout/stderr lines into a queue that the caller drains
on its own (main) thread.
"""
from __future__ import annotations

import collections
import json
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Sequence
from typing import Any

__all__ = ["parse_progress_line", "TrainingProcess"]


def parse_progress_line(line: str) -> dict | None:
    """The event of one ``--progress-json`` stdout line, or None for anything else (plain log text).

    An event is a JSON object with a string ``"event"``; numeric fields of known events are
    checked so a malformed line never reaches the progress bar.
    """
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        event = json.loads(text)
    except ValueError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        return None
    required = {
        "iteration": ("iteration", "iterations"),
        "validation": ("iteration", "mean_dice"),
        "checkpoint": ("path",),
        "done": ("path",),
        "stopped": ("path",),
        "error": ("message",),
    }.get(event["event"], ())
    for key in required:
        if key not in event:
            return None
    for key in ("iteration", "iterations", "loss", "lr", "eta_s", "mean_dice"):
        if key in event and event[key] is not None and not isinstance(event[key], (int, float)):
            return None
    if event["event"] == "validation" and not isinstance(event.get("dice", {}), dict):
        return None
    return event


class TrainingProcess:
    """A child process whose stdout/stderr lines are collected by reader threads."""

    def __init__(self, command: Sequence[str], env: dict | None = None, cwd: str | os.PathLike | None = None,
                 stderr_tail: int = 60):
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # so CTRL_BREAK reaches only it
        else:
            kwargs["start_new_session"] = True  # own process group: kill() can take its children too
        self.command = list(command)
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace",
                                        bufsize=1, env=env, cwd=cwd, **kwargs)
        self.lines: queue.SimpleQueue = queue.SimpleQueue()
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=stderr_tail)
        self._readers = [threading.Thread(target=self._read, args=(stream, name), daemon=True)
                         for stream, name in ((self.process.stdout, "stdout"), (self.process.stderr, "stderr"))]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, name: str) -> None:
        try:
            for line in stream:
                line = line.rstrip("\r\n")
                if name == "stderr" and line.strip():
                    self.stderr_tail.append(line)
                self.lines.put((name, line))
        finally:
            stream.close()

    def drain(self) -> list[tuple[str, str]]:
        out = []
        while True:
            try:
                out.append(self.lines.get_nowait())
            except queue.Empty:
                return out

    def poll(self) -> int | None:
        return self.process.poll()

    def streams_closed(self, timeout: float = 0.0) -> bool:
        for reader in self._readers:
            reader.join(timeout)
        return not any(reader.is_alive() for reader in self._readers)

    def request_stop(self) -> None:
        """Ask the trainer to stop cleanly (it writes its last good checkpoint and exits 0)."""
        if self.poll() is not None:
            return
        try:
            if os.name == "nt":
                os.kill(self.process.pid, signal.CTRL_BREAK_EVENT)
            else:
                os.kill(self.process.pid, signal.SIGTERM)
        except (ProcessLookupError, OSError):
            pass

    def kill(self) -> None:
        """Kill the process and, on POSIX, its whole process group."""
        try:
            if os.name == "nt":
                self.process.kill()
            else:
                os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
