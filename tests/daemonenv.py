"""A soci daemon run for real in a test: spawn, wait until it serves, stop, and clean up.

:class:`Daemon` holds what soci-store and soci-snapshotter-grpc have in common: the log,
the metrics port, the wait for "serving", a refusal to start, SIGTERM, and a close that
kills what still runs and detaches its mount, also when starting failed halfway. Daemons a
test forgot are closed at exit. The subclasses (storeenv, snapshotterenv) say only how
their daemon is started and how it shows it is ready.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Self

from registryd import free_port

_live: set[Daemon] = set()


def _path(path: str | os.PathLike[str]) -> str:
    """An absolute path without resolving its last component: stat'ing a dead FUSE mount
    fails (ENOTCONN), so only the parent is resolved."""
    p = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))


def is_mounted(path: str | os.PathLike[str]) -> bool:
    target = _path(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f if len(line.split()) > 1)


def unmount(path: str | os.PathLike[str]) -> None:
    """Detach whatever is mounted at ``path`` (lazily: a dead or busy mount goes too)."""
    for command in (["fusermount3", "-u", "-z"], ["umount", "-l"]):
        if not is_mounted(path):
            return
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run([*command, _path(path)], capture_output=True, timeout=30,
                           check=False)


class Daemon:
    """One daemon process logging to ``log`` and mounting under ``mountpoint``."""

    what = "the daemon"           # how messages name it
    ready_timeout = 20.0

    def __init__(self, log: Path, mountpoint: Path,
                 env: dict[str, str] | None = None) -> None:
        self.log, self.mountpoint, self.env = log, mountpoint, env
        self.metrics_address = f"127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen[bytes] | None = None

    # -- what a subclass says -----------------------------------------------------------

    def argv(self) -> list[str]:
        """The command line that starts the daemon."""
        raise NotImplementedError

    def ready(self, output: bytes) -> bool:
        """Whether the output since the start shows the daemon serving."""
        return b"serving" in output

    def before_start(self) -> None:
        """Make what the daemon needs in place before it starts."""

    def before_stop(self) -> None:
        """Let go of what talks to the daemon before it is signalled."""

    # -- shared -------------------------------------------------------------------------

    def _spawn(self) -> int:
        """Start the process; the log offset where its output begins."""
        self.before_start()
        start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env)
        _live.add(self)
        return start

    def start(self) -> Self:
        try:
            start = self._spawn()
            assert self.proc is not None
            deadline = time.monotonic() + self.ready_timeout
            while not self.ready(self.log.read_bytes()[start:]):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.what} did not start: {self.logs()[-3000:]}")
                time.sleep(0.05)
        except BaseException:
            self.close()
            raise
        return self

    def start_refused(self, timeout: float = 60) -> str:
        """Start a daemon that must refuse to run: its exit status is non-zero; returns what
        it printed (the caller checks the reason)."""
        try:
            start = self._spawn()
            assert self.proc is not None
            code = self.proc.wait(timeout=timeout)
            out = self.log.read_bytes()[start:].decode(errors="replace")
            assert code != 0, f"{self.what} ran instead of refusing: {out[-3000:]}"
            return out
        finally:
            self.close(keep_mount=True)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.before_stop()
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)

    def close(self, keep_mount: bool = False) -> None:
        """Kill the process if it still runs and detach its mount (unless ``keep_mount``:
        a refused daemon never mounted, and what is mounted there is someone else's)."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.stop()
        finally:
            if not keep_mount:
                unmount(self.mountpoint)
            _live.discard(self)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_span_jobs(self, timeout: float = 60) -> None:
        """Until the daemon's span workers are idle: disk-cache writes come after the reads
        that caused them return, so a test that looks at the cache directory waits first."""
        deadline = time.monotonic() + timeout
        while True:
            with urllib.request.urlopen(f"http://{self.metrics_address}/metrics") as resp:
                text = resp.read().decode()
            if "\nsoci_span_jobs_pending 0\n" in text:
                return
            assert time.monotonic() < deadline, text
            time.sleep(0.05)


@atexit.register
def _close_forgotten() -> None:
    for daemon in list(_live):
        with contextlib.suppress(Exception):
            daemon.close()
