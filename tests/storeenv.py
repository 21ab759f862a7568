"""Running soci-store as a real daemon in tests: mount, wait, stop, and inspect.

Whatever a :class:`StoreDaemon` starts is undone by :meth:`StoreDaemon.close` (the
context manager's exit): the process is killed if it still runs and its mount is
detached, also when starting failed halfway; daemons a test forgot are closed at exit.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

from registryd import free_port

_live: weakref.WeakSet[StoreDaemon] = weakref.WeakSet()


def _path(path: str | os.PathLike[str]) -> str:
    """An absolute path without resolving its last component: stat'ing a dead FUSE mount
    fails (ENOTCONN), so only the parent is resolved."""
    p = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))


def soci(root: Path, *args: str) -> str:
    """Run the ``soci`` CLI on ``root`` (plain HTTP to the test registries); its stdout."""
    proc = subprocess.run([sys.executable, "-m", "soci.cli", "--plain-http", "--root", str(root),
                           *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


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


class StoreDaemon:
    """``soci-store`` on ``mountpoint`` with its own root and config; stopped with SIGTERM."""

    def __init__(self, root: Path, mountpoint: Path, *, background: bool = False,
                 extra_config: str = "", env: dict[str, str] | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.env, self.extra_args = env, extra_args
        self.root, self.mountpoint = root, mountpoint
        self.config = root.parent / f"{root.name}-store.toml"
        silence = "100" if background else "30000"
        self.config.write_text(
            f'root = "{root}"\nplain_http = true\n'
            f"[background_fetch]\ndisable = {'false' if background else 'true'}\n"
            f"silence_period_msec = {silence}\nfetch_period_msec = 10\n" + extra_config)
        self.log = root.parent / f"{root.name}-store.log"
        self.metrics_address = f"127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self) -> int:
        """Start the process; the log offset where its output begins."""
        if not is_mounted(self.mountpoint):  # a dead mount cannot be looked at, nor made
            self.mountpoint.mkdir(parents=True, exist_ok=True)
        start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from soci.store.daemon import main; main()",
                 "--config", str(self.config), "--log-level", "debug",
                 "--metrics-address", self.metrics_address, *self.extra_args,
                 str(self.mountpoint)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env)
        _live.add(self)
        return start

    def start(self) -> StoreDaemon:
        try:
            start = self._spawn()
            assert self.proc is not None
            deadline = time.monotonic() + 20
            while not (is_mounted(self.mountpoint)
                       and b"serving" in self.log.read_bytes()[start:]):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"soci-store did not mount: {self.logs()[-3000:]}")
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
            assert code != 0, f"soci-store ran instead of refusing: {out[-3000:]}"
            return out
        finally:
            self.close(keep_mount=True)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=10)
        return code

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

    def __enter__(self) -> StoreDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def layer_dir(self, ref: str, digest: str) -> Path:
        return self.mountpoint / base64.b64encode(ref.encode()).decode() / digest

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


@atexit.register
def _close_forgotten() -> None:
    for daemon in list(_live):
        with contextlib.suppress(Exception):
            daemon.close()
