"""The trainer's ``--progress-json`` output: events parsed, the run's state followed, its failure explained."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProgressCallback", "parse_progress_line", "RunProgress"]

ProgressCallback = Callable[[dict], None]


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
        "warning": ("message",),
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


@dataclass
class RunProgress:
    """What the trainer has reported so far in one run."""

    last_checkpoint: Path | None = None
    last_iteration: int | None = None
    done_path: Path | None = None
    stopped_path: Path | None = None
    error_message: str | None = None

    @property
    def finished(self) -> bool:
        """The trainer reported its end (done, stopped or error)."""
        return bool(self.done_path or self.stopped_path or self.error_message)

    def read(self, stream: str, line: str, report: ProgressCallback) -> None:
        """Follow one output line and pass it on: an event as it is, other text as a ``log`` event."""
        event = parse_progress_line(line) if stream == "stdout" else None
        if event is None:
            if line.strip():
                report({"event": "log", "stream": stream, "message": line})
            return
        kind = event["event"]
        if isinstance(event.get("iteration"), (int, float)):
            self.last_iteration = int(event["iteration"])
        if kind == "checkpoint":
            self.last_checkpoint = Path(event["path"])
        elif kind == "done":
            self.done_path = Path(event["path"])
        elif kind == "stopped":
            self.stopped_path = Path(event["path"])
        elif kind == "error":
            self.error_message = str(event["message"])
        report(event)

    def failure_message(self, stderr_tail: Iterable[str], returncode: int | None) -> str:
        """The trainer's own error message, else the last stderr line, else what the exit code says."""
        if self.error_message:
            return self.error_message
        tail = [line.strip() for line in stderr_tail if line.strip()]
        if tail:
            last = tail[-1]
            for prefix in ("samed: error: ", "samed train: error: "):  # the CLI's own (argparse) error format
                if last.startswith(prefix):
                    return last[len(prefix):]
            return last
        if returncode is not None and returncode < 0:
            return (f"the training process was killed by signal {-returncode} "
                    "(out of memory? try a smaller batch size or the CPU)")
        return f"the training process exited with code {returncode} without an error message"
