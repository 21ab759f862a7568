"""Progress on a terminal: ``soci create``, ``convert``, ``push`` and ``ztoc build`` draw
per-layer bars on stderr when it is a terminal (a real pseudo-terminal here), say nothing of
it with ``-q`` or when stderr is a pipe, and never touch stdout (``--json`` stays JSON)."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from images import big_file, files_layer, write_image
from registryd import Registry, push_layout

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from throttle import ThrottledProxy

SOCI = [sys.executable, "-m", "soci.cli"]


def run_on_tty(args: list[str], *, stderr_tty: bool = True) -> tuple[int, str, str]:
    """Run soci with stderr on a pseudo-terminal (or a pipe); (status, stdout, what the
    terminal or pipe received)."""
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "160"}
    env.pop("NO_COLOR", None)
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([*SOCI, *args], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE,
                                stderr=slave if stderr_tty else subprocess.PIPE, env=env)
        os.close(slave)
        slave = -1
        seen = bytearray()
        if stderr_tty:
            out = bytearray()
            assert proc.stdout is not None
            streams = {master: seen, proc.stdout.fileno(): out}
            while streams:
                ready, _, _ = select.select(list(streams), [], [], 300)
                assert ready, "soci went silent for 300 s"
                for fd in ready:
                    try:
                        data = os.read(fd, 65536)
                    except OSError:  # EIO: the terminal's other side is closed
                        data = b""
                    if data:
                        streams[fd] += data
                    else:
                        del streams[fd]
            proc.wait(60)
            stdout = bytes(out)
        else:
            stdout, err = proc.communicate(timeout=300)
            seen += err
        return proc.returncode, stdout.decode(), seen.decode(errors="replace")
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    with Registry() as r:
        yield r


@pytest.fixture(scope="module")
def image(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Two 16 MiB layers (gzip barely shrinks them) behind a 8 MB/s proxy, so each layer
    takes a few refreshes of the bars."""
    layout = tmp_path_factory.mktemp("img")
    write_image(layout, "v1", [files_layer({"a.bin": big_file("pa", 16 << 20)}),
                               files_layer({"b.bin": big_file("pb", 16 << 20)})])
    push_layout(layout, registry.host, "prog:v1", tag="v1")
    with ThrottledProxy(registry.host, 8e6) as proxy:
        yield f"{proxy.host}/prog:v1"


def test_create_and_push_show_layer_progress_on_a_terminal(tmp_path: Path, image: str) -> None:
    root = str(tmp_path / "root")
    code, out, tty = run_on_tty(["--plain-http", "--root", root, "create", image])
    assert code == 0, tty
    assert "indexed" in tty and "read" in tty and "MiB" in tty, tty
    assert "layer sha256:" in tty  # each bar names its layer
    assert "/2 layers done" in tty
    # stdout has the result lines only, no escape sequences
    assert "\x1b" not in out
    assert out.count(" -> ztoc ") == 2 and "SOCI index for" in out

    code, out, tty = run_on_tty(["--plain-http", "--root", root, "push", image])
    assert code == 0, tty
    assert "blobs done" in tty, tty
    assert "\x1b" not in out and "pushed for" in out


def test_convert_shows_progress_and_quiet_or_a_pipe_shows_none(
        tmp_path: Path, image: str, registry: Registry) -> None:
    root = str(tmp_path / "root")
    code, out, tty = run_on_tty(["--plain-http", "--root", root, "convert", image,
                                 f"{registry.host}/progcopy:soci"])
    assert code == 0, tty
    assert "indexed" in tty and "layers done" in tty, tty
    assert "copied" in tty, tty  # the image's blobs, on their way to the destination
    assert "\x1b" not in out

    code, out, tty = run_on_tty(["--plain-http", "--root", root, "create", "-q", "--force",
                                 image])
    assert code == 0, tty
    assert "indexed" not in tty and "\x1b[" not in tty, tty
    assert "SOCI index for" in out

    code, out, err = run_on_tty(["--plain-http", "--root", root, "create", "--force", image],
                                stderr_tty=False)
    assert code == 0, err
    # Notes may go to a piped stderr (an earlier index kept); bars never do.
    assert "indexed" not in err and "\x1b" not in err and "\r" not in err, err


def test_ztoc_build_progress_never_reaches_json_stdout(tmp_path: Path) -> None:
    layer = tmp_path / "layer.tar"
    layer.write_bytes(files_layer({"big.bin": big_file("z", 24 << 20)}))
    code, out, tty = run_on_tty(["ztoc", "build", "--json", str(layer),
                                 "-o", str(tmp_path / "z.ztoc")])
    assert code == 0, tty
    assert "zTOC of layer.tar" in tty and "indexed" in tty, tty
    result = json.loads(out)
    assert result["entries"] == 1 and result["compression"] == "uncompressed"

    code, out, err = run_on_tty(["ztoc", "build", "--json", str(layer),
                                 "-o", str(tmp_path / "z2.ztoc")], stderr_tty=False)
    assert code == 0 and err == "", err
    assert json.loads(out)["digest"] == result["digest"]
