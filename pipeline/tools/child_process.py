"""A tool's child process run to its end, and stopped with every process it started however the tool leaves: SIGTERM
unwinds the tool as an exception (so its `with` blocks clean up), Ctrl-C too."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from contextlib import contextmanager, suppress
from pathlib import Path


class Terminated(SystemExit):
    """SIGTERM, raised in the main thread so that each `with` and `finally` on the way out runs (exit code 143)."""


class SigtermUnwinds:
    """While entered (in the main thread, SIGTERM at its default): SIGTERM raises Terminated, once, so that a child is
    stopped and a scratch folder removed instead of the process dying where it stands. `deferred()` holds a SIGTERM
    over a step that must not be cut in two (starting a child, whose handle is needed to stop it)."""

    def __init__(self):
        self.previous = None
        self.deferring = self.pending = self.raised = False

    def __enter__(self) -> SigtermUnwinds:
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self.previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def _on_sigterm(self, signum, frame) -> None:
        if self.deferring:
            self.pending = True
        else:
            self._raise()

    def _raise(self) -> None:
        if not self.raised:  # a second SIGTERM while the first unwinds does not cut the cleanup short
            self.raised = True
            raise Terminated(128 + signal.SIGTERM)

    @contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending:
            self._raise()


def run_to_end(cmd: list[str], cwd: Path, sigterm: SigtermUnwinds) -> subprocess.CompletedProcess:
    """cmd run to its end in its own session, its output captured; however this process leaves meanwhile (SIGTERM
    under `sigterm`, Ctrl-C), the child and every process it started are stopped first."""
    child = None
    try:
        with sigterm.deferred():
            child = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        out, err = child.communicate()
    except BaseException:
        if child is not None and child.poll() is None:
            stop_session(child)
        raise
    return subprocess.CompletedProcess(cmd, child.returncode, out, err)


def stop_session(child: subprocess.Popen) -> None:
    """SIGTERM to the child's session (the deepspeed launcher's ranks too), SIGKILL after 30 s."""
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        with suppress(ProcessLookupError):
            os.killpg(child.pid, sig)
        with suppress(subprocess.TimeoutExpired):
            child.wait(grace)
            return
