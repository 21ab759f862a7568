"""The soci ztoc commands, run as a user runs them."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from layers import Node, tar_with_tarfile
from soci.ztoc import decode

FILES = {f"usr/lib/f{i}": hashlib.shake_256(b"%d" % i).digest(70_000) * 3 for i in range(12)}


def soci(
    *args: str, stdin: bytes | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "soci.cli", *args], input=stdin,
                          capture_output=True, cwd=cwd)


@pytest.fixture
def layer(tmp_path: Path) -> Path:
    nodes = [Node("usr", "dir"), Node("usr/lib", "dir")]
    nodes += [Node(name, data=data) for name, data in FILES.items()]
    nodes += [Node("usr/lib/hard", "hardlink", target="usr/lib/f3"),
              Node("usr/lib/soft", "symlink", target="f4"),
              Node("usr/lib/loop", "symlink", target="loop")]
    path = tmp_path / "layer.tar.gz"
    path.write_bytes(gzip.compress(tar_with_tarfile(nodes, tarfile.PAX_FORMAT), mtime=0))
    return path


def test_build_info_get_file(layer: Path, tmp_path: Path) -> None:
    out = tmp_path / "l.ztoc"
    proc = soci("ztoc", "build", str(layer), "--span-size", "65536", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert proc.stdout.decode().splitlines()[0] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert "entries        17" in proc.stdout.decode()

    info = json.loads(soci("ztoc", "info", str(out)).stdout)
    assert info["version"] == "0.9"
    assert info["size"] == len(data)
    assert info["span_size"] == 65536
    assert info["num_spans"] == decode(data).span_count > 10
    assert info["num_files"] == 17
    assert info["num_multi_span_files"] > 0
    f0 = next(f for f in info["files"] if f["filename"] == "usr/lib/f0")
    assert f0["type"] == "reg" and f0["size"] == 210_000 and f0["end_span"] > f0["start_span"]

    for path, expect in [("usr/lib/f7", FILES["usr/lib/f7"]), ("/usr/lib/f7", FILES["usr/lib/f7"]),
                         ("./usr/lib/hard", FILES["usr/lib/f3"]),
                         ("usr/lib/soft", FILES["usr/lib/f4"])]:
        proc = soci("ztoc", "get-file", str(out), path, "--layer", str(layer))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == expect
    target = tmp_path / "f9"
    assert soci("ztoc", "get-file", str(out), "usr/lib/f9", "--layer", str(layer), "-o",
                str(target)).returncode == 0
    assert target.read_bytes() == FILES["usr/lib/f9"]


def test_build_from_stdin_matches_build_from_file(layer: Path, tmp_path: Path) -> None:
    a = soci("ztoc", "build", str(layer), "-q", cwd=tmp_path)
    b = soci("ztoc", "build", "-", "-q", "-o", "stdin.ztoc", stdin=layer.read_bytes(), cwd=tmp_path)
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout
    assert (tmp_path / "layer.tar.gz.ztoc").read_bytes() == (tmp_path / "stdin.ztoc").read_bytes()


@pytest.mark.parametrize(
    ("path", "message"),
    [("usr/lib/nope", "no such file"), ("usr/lib", "is a dir"), ("usr/lib/loop", "too many")],
)
def test_get_file_errors(layer: Path, tmp_path: Path, path: str, message: str) -> None:
    out = tmp_path / "l.ztoc"
    assert soci("ztoc", "build", str(layer), "-o", str(out)).returncode == 0
    proc = soci("ztoc", "get-file", str(out), path, "--layer", str(layer))
    assert proc.returncode == 1
    assert message in proc.stderr.decode() and proc.stderr.count(b"\n") == 1


def test_wrong_layer_and_junk_ztoc_are_refused(layer: Path, tmp_path: Path) -> None:
    out = tmp_path / "l.ztoc"
    assert soci("ztoc", "build", str(layer), "-o", str(out)).returncode == 0
    other = tmp_path / "other.gz"
    other.write_bytes(layer.read_bytes()[:-10])
    proc = soci("ztoc", "get-file", str(out), "usr/lib/f1", "--layer", str(other))
    assert proc.returncode == 1 and b"describes a" in proc.stderr
    data = out.read_bytes()
    for junk in (b"", b"\0" * 7, data[: len(data) // 2], b"\xff" * 100, layer.read_bytes()[:4096]):
        (tmp_path / "junk.ztoc").write_bytes(junk)
        proc = soci("ztoc", "info", str(tmp_path / "junk.ztoc"))
        assert proc.returncode == 1, junk[:20]
        assert proc.stderr.count(b"\n") == 1 and b"Traceback" not in proc.stderr
