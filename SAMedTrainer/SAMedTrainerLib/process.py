"""The training process tree: output lines in, clean stop (stop file, then SIGTERM / CTRL_BREAK) or kill out.

No Qt, no MRML: reader threads collect stdout/stderr lines into a queue that the caller drains
on its own (main) thread.
"""
from __future__ import annotations

import collections
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

__all__ = ["process_group_options", "TrainingProcess"]


# Windows process creation flags (the subprocess module defines them only on Windows).
CREATE_NEW_PROCESS_GROUP, CREATE_NO_WINDOW = 0x00000200, 0x08000000


def process_group_options(os_name: str = os.name) -> dict[str, Any]:
    """``Popen`` options that put the trainer's tree in a group of its own, so one signal reaches all of it."""
    if os_name == "nt":
        # CTRL_BREAK goes to a process group; no console window, as slicer.util.launchConsoleProcess hides it.
        return {"creationflags": CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW}
    return {"start_new_session": True}  # own session and process group


class TrainingProcess:
    """The trainer's process tree, whose stdout/stderr lines are collected by reader threads.

    Inside Slicer the command starts with ``PythonSlicer``, the CTK AppLauncher: it runs the real
    interpreter (``python-real``) as a *child* and forwards no signals, so signalling or waiting
    for the started process alone would stop or watch only the launcher. Hence signals go to the
    whole tree (POSIX: its own session and process group; psutil's walk for members that left the
    group, and on Windows), and the run has ended when the output streams are closed and no process
    of the tree is left, not when the launcher exits.
    """

    def __init__(self, command: Sequence[str], env: dict | None = None, cwd: str | os.PathLike | None = None,
                 stderr_tail: int = 60, stop_file: str | os.PathLike | None = None):
        self.command = list(command)
        self.stop_file = stop_file  # the command's --stop-file: created by request_stop
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace",
                                        bufsize=1, env=env, cwd=cwd, **process_group_options())
        self.lines: queue.SimpleQueue = queue.SimpleQueue()
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=stderr_tail)
        self._readers = [threading.Thread(target=self._read, args=(stream, name), daemon=True)
                         for stream, name in ((self.process.stdout, "stdout"), (self.process.stderr, "stderr"))]
        for reader in self._readers:
            reader.start()
        self._tree: dict[int, psutil.Process] = {}
        self._tree_refreshed_at = 0.0
        try:
            self._tree[self.process.pid] = psutil.Process(self.process.pid)
        except psutil.Error:  # already gone
            pass
        self.refresh_tree()

    @property
    def pid(self) -> int:
        return self.process.pid

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
        """The started process's (the launcher's) exit code, or None while it runs."""
        return self.process.poll()

    def streams_closed(self, timeout: float = 0.0) -> bool:
        for reader in self._readers:
            reader.join(timeout)
        return not any(reader.is_alive() for reader in self._readers)

    def refresh_tree(self, max_age: float = 0.0) -> None:
        """Remember every descendant seen so far: once the launcher is gone its children cannot be found from it.

        ``max_age``: do nothing if the last walk is younger than this (seconds), for periodic calls.
        """
        now = time.monotonic()
        if now - self._tree_refreshed_at < max_age:
            return
        self._tree_refreshed_at = now
        for parent in list(self._tree.values()):
            try:
                children = parent.children(recursive=True)
            except psutil.Error:
                continue
            for child in children:
                self._tree.setdefault(child.pid, child)

    def alive(self) -> list[psutil.Process]:
        """The processes of this run still running: the tree, and on POSIX anything left in its process group."""
        self.poll()  # reap the launcher: a zombie is not running
        members = dict(self._tree)
        if os.name != "nt":
            for candidate in psutil.process_iter():
                try:
                    if os.getpgid(candidate.pid) == self.pid:
                        members.setdefault(candidate.pid, candidate)
                except OSError:
                    continue
        return [p for p in members.values() if _running(p)]

    def finished(self) -> bool:
        """The trainer's output has ended and no process of the tree is left."""
        return self.streams_closed(0.0) and not self.alive()

    def request_stop(self) -> None:
        """Ask the trainer to stop cleanly (it writes its last checkpoint and exits 0): create the stop file,
        then, as a backup, SIGTERM to the process group (CTRL_BREAK on Windows, raised as SIGBREAK).

        The file comes first because it needs no signal: on Windows CTRL_BREAK reaches only processes that
        share the sender's console, and neither Slicer's GUI nor the trainer (CREATE_NO_WINDOW) has one.
        """
        if self.stop_file is not None:
            try:
                Path(self.stop_file).touch()
            except OSError:  # the signals below still ask, and the caller's kill after its timeout remains
                pass
        self.send_stop_signals()

    def send_stop_signals(self) -> None:
        """SIGTERM to the process group and to members that left it; CTRL_BREAK to the process group on Windows."""
        self.refresh_tree()
        if os.name == "nt":
            _ignore_gone(os.kill, self.pid, signal.CTRL_BREAK_EVENT)
            return
        _ignore_gone(os.killpg, self.pid, signal.SIGTERM)
        for member in self.alive():  # members that left the group (a setsid grandchild)
            if _ignore_gone(os.getpgid, member.pid) not in (None, self.pid):
                _ignore_gone(member.terminate)

    def kill(self, timeout: float = 10.0) -> None:
        """Kill every process of the tree and wait (up to ``timeout`` s) until they are gone."""
        self.refresh_tree()
        victims = self.alive()
        if os.name != "nt":
            _ignore_gone(os.killpg, self.pid, signal.SIGKILL)
        for victim in victims:
            _ignore_gone(victim.kill)
        # The launcher is reaped by Popen (psutil would reap it first and lose its exit status).
        psutil.wait_procs([v for v in victims if v.pid != self.pid], timeout=timeout)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _ignore_gone(function, *args):
    """Call ``function``; a process that has already gone (or cannot be reached) is not an error here."""
    try:
        return function(*args)
    except (OSError, psutil.Error):
        return None
