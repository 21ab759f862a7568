"""Ctrl-C: ``soci ztoc build`` and ``soci create`` stop in the middle of a layer, exit 130 with
one line, and leave nothing half-written (no output file, no temporary file, no new zTOC or
index in the store).

SIGINT goes to the real CLI in a child process (SIGINT reset to its default there: a
background shell may have started this one with SIGINT ignored, which children inherit).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tarfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from images import big_file, files_layer, write_image
from registryd import Registry, push_layout

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from throttle import ThrottledProxy

SOCI = [sys.executable, "-m", "soci.cli"]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(condition: Callable[[], bool], what: str, proc: subprocess.Popen,
              limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert proc.poll() is None, f"soci ended before {what}: {proc.returncode}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _interrupt(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err.decode(errors="replace")


def endless_gzip_tar(out: object, written: list[int], stop: threading.Event) -> None:
    """Write a gzip'd tar whose one member claims 1 TiB, with fresh data until stopped."""
    comp = zlib.compressobj(6, zlib.DEFLATED, 31)
    info = tarfile.TarInfo("endless.bin")
    info.size = 1 << 40
    block = big_file("endless", 1 << 20)
    try:
        out.write(comp.compress(info.tobuf(tarfile.GNU_FORMAT)))  # type: ignore[attr-defined]
        n = 0
        while not stop.is_set():
            n += 1
            data = comp.compress(n.to_bytes(8, "little") + block)
            out.write(data)  # type: ignore[attr-defined]
            written[0] += len(data)
    except (BrokenPipeError, ValueError, OSError):
        pass


def test_ztoc_build_from_an_endless_pipe_stops_on_sigint(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen([*SOCI, "ztoc", "build", "-", "-o", str(out_dir / "z.ztoc")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=_default_sigint, cwd=tmp_path)
    written = [0]
    stop = threading.Event()
    feeder = threading.Thread(target=endless_gzip_tar, args=(proc.stdin, written, stop),
                              daemon=True)
    feeder.start()
    try:
        # Well past what the pipe and the reader's queue hold: it is inflating.
        _wait_for(lambda: written[0] > 32 << 20, "soci consumed 32 MiB", proc)
        code, err = _interrupt(proc)
    finally:
        stop.set()
        feeder.join(10)
    assert code == 130, err
    assert err.strip() == "soci: interrupted", err
    assert list(out_dir.iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.fixture(scope="module")
def slow_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ThrottledProxy]]:
    """An image with a 48 MiB layer (gzip barely shrinks it) in a registry reached through
    a 4 MB/s proxy, so ``soci create`` spends seconds inside that one layer."""
    layout = tmp_path_factory.mktemp("slow")
    write_image(layout, "v1", [files_layer({"etc/small": b"small\n"}),
                               files_layer({"opt/big.bin": big_file("slow", 48 << 20)})])
    with Registry() as registry:
        push_layout(layout, registry.host, "slow:v1", tag="v1")
        with ThrottledProxy(registry.host, 4e6) as proxy:
            yield f"{proxy.host}/slow:v1", proxy


def _store_state(root: Path) -> tuple[list[str], str, str]:
    """The content store's files and what the database lists (zTOCs, indexes)."""
    files = sorted(str(p.relative_to(root)) for p in (root / "content").rglob("*")
                   if p.is_file())
    ztocs = subprocess.run([*SOCI, "--root", str(root), "ztoc", "ls", "-q"], check=True,
                           capture_output=True, text=True).stdout
    indexes = subprocess.run([*SOCI, "--root", str(root), "index", "ls", "-q"], check=True,
                             capture_output=True, text=True).stdout
    return files, ztocs, indexes


def test_create_interrupted_mid_layer_stores_nothing(
        tmp_path: Path, slow_image: tuple[str, ThrottledProxy]) -> None:
    ref, proxy = slow_image
    root = tmp_path / "root"
    subprocess.run([*SOCI, "--root", str(root), "rebuild-db"], check=True, capture_output=True)
    before = _store_state(root)

    sent = [0]
    take = proxy.bucket.take

    def counting_take(n: int) -> None:
        sent[0] += n
        take(n)

    proxy.bucket.take = counting_take  # type: ignore[method-assign]
    try:
        proc = subprocess.Popen([*SOCI, "--plain-http", "--root", str(root), "create", ref],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=_default_sigint)
        # Some MiB of the big layer are in: soci is in the middle of it.
        _wait_for(lambda: sent[0] > 8 << 20, "8 MiB of the layer served", proc)
        code, err = _interrupt(proc)
    finally:
        proxy.bucket.take = take  # type: ignore[method-assign]
    assert code == 130, err
    assert err.strip() == "soci: interrupted", err
    assert _store_state(root) == before
    assert not [p for p in root.rglob("*") if p.name.startswith(".tmp-")]
    assert sent[0] < 40 << 20  # it did stop reading the layer
