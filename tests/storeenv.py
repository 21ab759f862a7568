"""Running soci-store as a real daemon in tests: mount, wait, stop, and inspect.

What a :class:`StoreDaemon` starts is undone by its ``close`` (the context manager's
exit); the shared mechanics live in :mod:`daemonenv`.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

from daemonenv import Daemon, is_mounted, unmount

__all__ = ["StoreDaemon", "is_mounted", "soci", "unmount"]


def soci(root: Path, *args: str) -> str:
    """Run the ``soci`` CLI on ``root`` (plain HTTP to the test registries); its stdout."""
    proc = subprocess.run([sys.executable, "-m", "soci.cli", "--plain-http", "--root", str(root),
                           *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


class StoreDaemon(Daemon):
    """``soci-store`` on ``mountpoint`` with its own root and config; stopped with SIGTERM."""

    what = "soci-store"

    def __init__(self, root: Path, mountpoint: Path, *, background: bool = False,
                 extra_config: str = "", env: dict[str, str] | None = None,
                 extra_args: tuple[str, ...] = (), log_level: str = "debug") -> None:
        super().__init__(root.parent / f"{root.name}-store.log", mountpoint, env)
        self.root, self.extra_args, self.log_level = root, extra_args, log_level
        self.config = root.parent / f"{root.name}-store.toml"
        silence = "100" if background else "30000"
        self.config.write_text(
            f'root = "{root}"\nplain_http = true\n'
            f"[background_fetch]\ndisable = {'false' if background else 'true'}\n"
            f"silence_period_msec = {silence}\nfetch_period_msec = 10\n" + extra_config)

    def argv(self) -> list[str]:
        return [sys.executable, "-c", "from soci.store.daemon import main; main()",
                "--config", str(self.config), "--log-level", self.log_level,
                "--metrics-address", self.metrics_address, *self.extra_args,
                str(self.mountpoint)]

    def before_start(self) -> None:
        if not is_mounted(self.mountpoint):  # a dead mount cannot be looked at, nor made
            os.makedirs(self.mountpoint, exist_ok=True)

    def ready(self, output: bytes) -> bool:
        return is_mounted(self.mountpoint) and b"serving" in output

    def layer_dir(self, ref: str, digest: str) -> Path:
        return self.mountpoint / base64.b64encode(ref.encode()).decode() / digest
