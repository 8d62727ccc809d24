"""What a person reads in a terminal or a log file: progress and one line per training milestone.

On a terminal, progress is a tqdm bar (rate, ETA); in a log file or pipe, tqdm's ``disable=None`` turns
the bar off and a plain line is printed every tenth of the way instead, so logs get no ``\\r`` floods.
Training events become sentences (``iteration 50: mean Dice 0.712 (spleen 0.801, ...)``); the machine
format is ``samed train --progress-json``, which does not go through this module.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress", "TrainingDisplay", "format_dice", "format_training_event", "segment_progress"]

# Plain (non-terminal) progress lines per task: one every tenth of the way.
PLAIN_STEPS = 10


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Progress of ``total`` steps on ``stream`` (default stderr): a tqdm bar when the stream is a terminal,
    else a plain line every tenth of the way (and at the end) with the elapsed time and an ETA.

    ``total`` may be 1.0 with fractional updates (the inference ``progress(fraction, message)`` callback).
    """

    def __init__(self, description: str, total: float, stream: TextIO | None = None, initial: float = 0):
        from tqdm import tqdm

        self.description, self.total, self.stream = description, total, stream or sys.stderr
        self.bar = tqdm(total=total, initial=initial, desc=description, file=self.stream, disable=None,
                        dynamic_ncols=True,  # the status goes where tqdm's own layout has it (", " comes with it)
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")
        self.plain = self.bar.disable  # tqdm decided: not a terminal
        self.start, self.n, self.closed = time.perf_counter(), initial, False
        self._first: tuple[float, float] | None = None  # (time, n) of the first update: the ETA's baseline
        self._next_line = 1

    def update_to(self, n: float, status: str = "") -> None:
        """Progress is now ``n`` of ``total``; ``status`` is a short description of where it stands."""
        if not self.plain:
            self.bar.set_postfix_str(status, refresh=False)
            self.bar.update(n - self.bar.n)
            self.n = n
            return
        self.n, now = n, time.perf_counter()
        # Callers often report only after their first step: rate from the steps seen since the first report.
        self._first = self._first or (now, n)
        fraction = n / self.total if self.total else 1.0
        if fraction * PLAIN_STEPS + 1e-9 < self._next_line and n < self.total:
            return
        self._next_line = int(fraction * PLAIN_STEPS + 1e-9) + 1
        elapsed = now - self.start
        since, steps = now - self._first[0], n - self._first[1]
        eta = since / steps * (self.total - n) if steps > 0 else None
        timing = f"{_format_seconds(elapsed)} elapsed"
        if eta is not None and n < self.total:
            timing += f", ETA {_format_seconds(eta)}"
        print(f"{self.description}: {100 * fraction:3.0f}% {status}".rstrip() + f" ({timing})",
              file=self.stream, flush=True)

    def write(self, line: str) -> None:
        """A line of its own that does not break the bar."""
        if self.plain:
            print(line, file=self.stream, flush=True)
        else:
            self.bar.write(line, file=self.stream)

    def close(self) -> None:
        self.bar.close()
        self.closed = True


def segment_progress(stream: TextIO | None = None):
    """A ``progress(fraction, message)`` callback (``SAMedLib.inference``) that shows a bar or plain lines."""
    state: dict[str, Progress] = {}

    def report(fraction: float, message: str) -> None:
        if "bar" not in state:
            state["bar"] = Progress("segment", 1.0, stream)
            state["bar"].write(message)  # the first message says what is being done (slices, device)
            if fraction <= 0:
                return
        bar = state["bar"]
        bar.update_to(fraction, message)
        if fraction >= 1:
            bar.close()

    return report


def format_dice(dice: dict[str, float | None]) -> str:
    """``spleen 0.801, liver 0.934, pancreas n/a`` (n/a: the class is in neither prediction nor reference)."""
    return ", ".join(f"{name} {'n/a' if value is None else f'{value:.3f}'}" for name, value in dice.items())


def format_training_event(event: dict) -> str | None:
    """One sentence for a validation, checkpoint, warning, done or stopped event of ``SAMedLib.trainer.train``;
    None for the events a progress bar shows (iteration, encoding)."""
    kind = event.get("event")
    if kind == "validation":
        best = ", best so far" if event.get("best") else ""
        return (f"iteration {event['iteration']}: mean Dice {event['mean_dice']:.3f} "
                f"({format_dice(event['dice'])}){best}")
    if kind == "checkpoint":
        return f"checkpoint saved: {event['path']} (iteration {event['iteration']})"
    if kind in ("done", "stopped"):
        best = event.get("best_mean_dice")
        score = f"best validation mean Dice {best:.3f}" if best is not None and best >= 0 else "no validation slices"
        verb = "training finished" if kind == "done" else "training stopped"
        return (f"{verb} after {event['iteration']} iterations in {_format_seconds(event['seconds'])}, "
                f"{score}: {event['path']}")
    if kind == "refinement":
        chosen = ", ".join(f"{name} {choice}" for name, choice in event["chosen"].items())
        return f"self-prompted refinement chosen on the validation slices: {chosen}"
    if kind == "warning":
        return f"warning: {event['message']}"
    if kind == "probe_start":
        return event["message"]
    if kind in ("iteration", "encoding"):
        return None
    return f"{kind}: " + ", ".join(f"{k} {v}" for k, v in event.items() if k != "event")


class TrainingDisplay:
    """Shows ``SAMedLib.trainer`` progress events to a person: a bar for encoding the views, a bar for the
    iterations (loss, ETA), and one line per validation, checkpoint and at the end."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream
        self.bars: dict[str, Progress] = {}

    def _bar(self, name: str, total: int, initial: int = 0) -> Progress:
        if name not in self.bars:
            self.bars[name] = Progress(name, total, self.stream, initial=initial)
        return self.bars[name]

    def __call__(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "encoding":
            bar = self._bar("encoding views", event["total"])
            bar.update_to(event["done"], f"{event['done']}/{event['total']}")
            if event["done"] >= event["total"]:
                bar.close()
        elif kind == "iteration":
            # A resumed run starts part-way: its rate and ETA count only this run's iterations.
            bar = self._bar("training", event["iterations"], initial=event["iteration"] - 1)
            bar.update_to(event["iteration"], f"{event['iteration']}/{event['iterations']}, loss {event['loss']:.4f}")
        else:
            line = format_training_event(event)
            if kind in ("done", "stopped"):
                self.close()
            if line:
                self._write(line)

    def _write(self, line: str) -> None:
        open_bars = [bar for bar in self.bars.values() if not bar.closed]
        if open_bars:  # tqdm clears the bar, writes the line and draws the bar again below it
            open_bars[-1].write(line)
        else:
            print(line, file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
