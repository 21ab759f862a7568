"""Running soci-store as a real daemon in tests: mount, wait, stop, and inspect."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from registryd import free_port


def is_mounted(path: str | os.PathLike[str]) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f if len(line.split()) > 1)


class StoreDaemon:
    """``soci-store`` on ``mountpoint`` with its own root and config; stopped with SIGTERM."""

    def __init__(self, root: Path, mountpoint: Path, *, background: bool = False,
                 extra_config: str = "", env: dict[str, str] | None = None) -> None:
        self.env = env
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

    def start(self) -> StoreDaemon:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from soci.store.daemon import main; main()",
                 "--config", str(self.config), "--log-level", "debug",
                 "--metrics-address", self.metrics_address, str(self.mountpoint)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env)
        deadline = time.monotonic() + 20
        while not (is_mounted(self.mountpoint) and b"serving" in self.log.read_bytes()[start:]):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"soci-store did not mount: {self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=10)
        return code

    def __enter__(self) -> StoreDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False)

    def layer_dir(self, ref: str, digest: str) -> Path:
        return self.mountpoint / base64.b64encode(ref.encode()).decode() / digest

    def logs(self) -> str:
        return self.log.read_text(errors="replace")
