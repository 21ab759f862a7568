"""soci.unpack: safe, verified layer extraction in overlay format and the parallel scheduler.

Ordinary layers are compared with what GNU ``tar -x`` makes of the same tar (contents,
modes, owners, mtimes, links, devices, xattrs); whiteouts are checked through a real
overlayfs mount; hostile layers must fail with one SociError and leave nothing behind;
the scheduler runs against a real registry on loopback.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from registryd import Registry
from soci.errors import SociError
from soci.registry import Reference, RegistriesConf, RegistryClient
from soci.unpack import (
    CorruptLayerError,
    LayerDigestError,
    LayerSpec,
    ParallelPullConfig,
    ParallelUnpacker,
    UnpackCancelledError,
    UnpackError,
    UnsafeLayerError,
    UnsupportedLayerError,
    parse_size,
    unpack_file,
    unpack_stream,
)

GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_GZ = "application/vnd.docker.image.rootfs.diff.tar.gzip"
TAR = "application/vnd.oci.image.layer.v1.tar"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="extraction tests run as root")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Blob:
    """A layer blob with its descriptor digest and diff ID."""

    def __init__(self, tar: bytes, compress: bool = True) -> None:
        self.tar = tar
        self.data = gzip.compress(tar, 6, mtime=0) if compress else tar
        self.digest = sha(self.data)
        self.diff_id = sha(tar)
        self.media_type = GZ if compress else TAR


def unpack(blob: Blob, dest: Path, **kw: object) -> object:
    args: dict[str, object] = {"media_type": blob.media_type, "digest": blob.digest,
                               "diff_id": blob.diff_id, "size": len(blob.data)}
    args.update(kw)
    return unpack_stream(io.BytesIO(blob.data), str(dest), **args)  # type: ignore[arg-type]


def make_tar(entries: list[tuple[tarfile.TarInfo, bytes | None]],
             fmt: int = tarfile.PAX_FORMAT, pax: dict[str, str] | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt, pax_headers=pax) as tf:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def ti(name: str, kind: bytes = tarfile.REGTYPE, **kw: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = 1_600_000_000
    for key, value in kw.items():
        setattr(info, key, value)
    return info


def assert_clean(dest: Path) -> None:
    """Nothing at the destination and no staging or spool sibling left."""
    assert not dest.exists() or not any(dest.iterdir())
    leftovers = [p.name for p in dest.parent.iterdir() if p.name.startswith(dest.name + ".tmp-")]
    assert leftovers == []


def snapshot(root: Path) -> tuple[dict[bytes, tuple[object, ...]], set[tuple[bytes, ...]]]:
    """Everything tar -x restores, per path, and the hardlink groups."""
    tree: dict[bytes, tuple[object, ...]] = {}
    inodes: dict[int, list[bytes]] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in [b"", *dirnames, *filenames] if dirpath == base else [*dirnames, *filenames]:
            path = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(path, base)
            st = os.lstat(path)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
                inodes.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            xattrs = sorted((k, os.getxattr(path, k, follow_symlinks=False))
                            for k in os.listxattr(path, follow_symlinks=False))
            rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0
            tree[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                         content, rdev, tuple(xattrs))
    groups = {tuple(sorted(paths)) for paths in inodes.values() if len(paths) > 1}
    return tree, groups


def rich_tree(src: Path) -> None:
    """A directory with every kind of entry layers carry."""
    (src / "etc" / "deep" / ("d" * 120) / "x").mkdir(parents=True)
    (src / "bin").mkdir()
    (src / "empty").write_bytes(b"")
    (src / "bin" / "big").write_bytes(os.urandom(3 << 20) + b"tail")
    (src / "bin" / "small").write_bytes(b"#!/bin/sh\necho hi\n")
    (src / "etc" / "deep" / ("d" * 120) / "x" / ("long-name-" * 15)).write_bytes(b"long\n")
    os.chmod(src / "bin" / "small", 0o4755)
    (src / "tmp").mkdir()
    os.chmod(src / "tmp", 0o1777)
    (src / "ro").mkdir()
    (src / "ro" / "inside").write_bytes(b"read-only dir content")
    os.chmod(src / "ro", 0o555)
    os.link(src / "bin" / "small", src / "bin" / "small-hl1")
    os.link(src / "bin" / "small", src / "etc" / "small-hl2")
    os.symlink("../bin/small", src / "etc" / "rel-link")
    os.symlink("/etc/passwd", src / "abs-link")
    os.symlink("nowhere", src / "dangling")
    os.mkfifo(src / "fifo", 0o640)
    os.mknod(src / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(src / "loop9", 0o660 | stat.S_IFBLK, os.makedev(7, 9))
    os.chown(src / "etc", 1000, 1001)
    os.chown(src / "bin" / "big", 33, 44)
    os.chown(src / "dangling", 55, 66, follow_symlinks=False)
    os.setxattr(src / "bin" / "big", "user.note", b"hello")
    os.setxattr(src / "bin" / "small", "trusted.soci-test", b"\x00\x01binary")
    os.setxattr(src / "etc", "user.dir-attr", b"d")
    (src / os.fsdecode(b"caf\xe9-latin1")).write_bytes(b"non-utf8 name")
    for i, path in enumerate(sorted(src.rglob("*"), reverse=True)):
        os.utime(path, ns=(1_500_000_000_000_000_000 + i, 1_500_000_000_123_456_789 + i),
                 follow_symlinks=False)
    os.utime(src, ns=(1_400_000_000_000_000_000, 1_400_000_000_000_000_000))


@pytest.mark.parametrize("fmt", ["posix", "gnu", "gnu-uncompressed"])
def test_matches_gnu_tar(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rich_tree(src)
    tar_format = "posix" if fmt == "posix" else "gnu"
    tar = subprocess.run(
        ["tar", f"--format={tar_format}", "--xattrs", "--xattrs-include=*", "-C", str(src),
         "-cf", "-", "."], check=True, capture_output=True).stdout
    blob = Blob(tar, compress=not fmt.endswith("uncompressed"))
    ours = tmp_path / "ours"
    result = unpack(blob, ours)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "-C", str(theirs), "-xpf", "-"],
                   input=tar, check=True)
    ours_tree, ours_links = snapshot(ours)
    theirs_tree, theirs_links = snapshot(theirs)
    assert ours_tree == theirs_tree
    assert ours_links == theirs_links and len(ours_links) == 1
    assert result.uncompressed_bytes == len(tar)  # type: ignore[attr-defined]
    assert result.compressed_bytes == len(blob.data)  # type: ignore[attr-defined]
    assert_clean(tmp_path / "nothing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "src", "theirs"]


def test_docker_media_type_and_existing_empty_dest(tmp_path: Path) -> None:
    blob = Blob(make_tar([(ti("f"), b"data")]))
    dest = tmp_path / "fs"
    dest.mkdir()
    os.chown(dest, 0, 5)
    os.chmod(dest, 0o2711)  # setgid: what is created inside inherits group 5 ...
    unpack(blob, dest, media_type=DOCKER_GZ)
    assert (dest / "f").read_bytes() == b"data"
    assert (dest / "f").stat().st_gid == 0  # ... unless set back to the tar's owner
    st = dest.stat()  # the staging root took the place of the empty dir, like it
    assert stat.S_IMODE(st.st_mode) == 0o2711 and st.st_gid == 5


def overlay_view(tmp_path: Path, lowers: list[Path]) -> Iterator[Path]:
    merged = tmp_path / "merged"
    merged.mkdir()
    lowerdir = ":".join(str(p) for p in reversed(lowers))  # topmost first
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lowerdir}",
                    str(merged)], check=True)
    try:
        yield merged
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def test_whiteouts_and_opaque_dirs(tmp_path: Path) -> None:
    base = Blob(make_tar([
        (ti("a", tarfile.DIRTYPE), None), (ti("a/gone"), b"1"), (ti("a/stays"), b"2"),
        (ti("b", tarfile.DIRTYPE), None), (ti("b/old"), b"3"),
    ]))
    upper = Blob(make_tar([
        (ti("a/.wh.gone", uid=7, gid=8), b""),
        (ti("b", tarfile.DIRTYPE), None),
        (ti("b/.wh..wh..opq"), b""),
        (ti("b/new"), b"4"),
        (ti(".wh..wh.plnk", tarfile.DIRTYPE), None),
        (ti(".wh..wh.plnk/123.456"), b"aufs bookkeeping"),
    ]))
    l1, l2 = tmp_path / "l1", tmp_path / "l2"
    unpack(base, l1)
    unpack(upper, l2)
    wh = os.lstat(l2 / "a" / "gone")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0 and (wh.st_uid, wh.st_gid) == (7, 8)
    assert os.getxattr(l2 / "b", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(l2)) == ["a", "b"]
    assert sorted(os.listdir(l2 / "b")) == ["new"]
    for merged in overlay_view(tmp_path, [l1, l2]):
        assert sorted(os.listdir(merged / "a")) == ["stays"]
        assert sorted(os.listdir(merged / "b")) == ["new"]


def test_duplicate_entries_replace_earlier_ones(tmp_path: Path) -> None:
    blob = Blob(make_tar([
        (ti("x"), b"file first"),
        (ti("x", tarfile.DIRTYPE), None),
        (ti("x/in"), b"inside"),
        (ti("d", tarfile.DIRTYPE), None),
        (ti("d/sub", tarfile.DIRTYPE), None),
        (ti("d/sub/f"), b"deep"),
        (ti("d"), b"dir replaced by a file"),
        (ti("l"), b"target"),
        (ti("h", tarfile.LNKTYPE, linkname="l"), None),
        (ti("h"), b"h replaced, l untouched"),
        (ti("s"), b"regular"),
        (ti("s", tarfile.SYMTYPE, linkname="l"), None),
        (ti("x", tarfile.DIRTYPE, mode=0o700), None),
    ]))
    dest = tmp_path / "fs"
    unpack(blob, dest)
    assert (dest / "x" / "in").read_bytes() == b"inside"
    assert stat.S_IMODE((dest / "x").stat().st_mode) == 0o700
    assert (dest / "d").read_bytes() == b"dir replaced by a file"
    assert (dest / "l").read_bytes() == b"target"
    assert (dest / "h").read_bytes() == b"h replaced, l untouched"
    assert os.readlink(dest / "s") == "l"


def test_pax_global_header_is_ignored(tmp_path: Path) -> None:
    blob = Blob(make_tar([(ti("f"), b"x")], pax={"comment": "git archive", "path": "evil"}))
    assert b"evil" in blob.tar
    dest = tmp_path / "fs"
    unpack(blob, dest)
    assert os.listdir(dest) == ["f"]


def test_gnu_long_names_and_base256(tmp_path: Path) -> None:
    name = "/".join(["component" * 10] * 3) + "/file"
    blob = Blob(make_tar([(ti(name, uid=9_000_000, gid=8_000_000), b"long")],
                         fmt=tarfile.GNU_FORMAT))
    dest = tmp_path / "fs"
    unpack(blob, dest)
    st = (dest / name).stat()
    assert (dest / name).read_bytes() == b"long" and (st.st_uid, st.st_gid) == (
        9_000_000, 8_000_000)


def _raw_pax_tar(path: bytes) -> bytes:
    """A pax header whose path holds bytes tarfile would not write (NUL)."""
    record = b" path=" + path + b"\n"
    n = len(record) + 1
    while len(str(n)) + len(record) != n:
        n += 1
    record = str(n).encode() + record
    header = ti("PaxHeaders/x", b"x")
    header.size = len(record)
    out = header.tobuf(tarfile.USTAR_FORMAT) + record + b"\0" * (-len(record) % 512)
    return out + ti("x").tobuf(tarfile.USTAR_FORMAT) + b"\0" * 1024


HOSTILE = {
    "dotdot": ([(ti("../victim"), b"owned")], UnsafeLayerError),
    "inner-dotdot": ([(ti("a/../../victim"), b"owned")], UnsafeLayerError),
    "absolute": ([(ti("VICTIM"), b"owned")], UnsafeLayerError),
    "symlink-parent-abs": ([(ti("l", tarfile.SYMTYPE, linkname="TMP"), None),
                            (ti("l/victim"), b"owned")], UnsafeLayerError),
    "symlink-parent-rel": ([(ti("l", tarfile.SYMTYPE, linkname=".."), None),
                            (ti("l/victim"), b"owned")], UnsafeLayerError),
    "symlink-dir-then-dir": ([(ti("l", tarfile.SYMTYPE, linkname="TMP"), None),
                              (ti("l/sub", tarfile.DIRTYPE), None)], UnsafeLayerError),
    "hardlink-outside": ([(ti("h", tarfile.LNKTYPE, linkname="../victim"), None)],
                         UnsafeLayerError),
    "hardlink-absolute": ([(ti("h", tarfile.LNKTYPE, linkname="VICTIM"), None)],
                          UnsafeLayerError),
    "hardlink-through-symlink": ([(ti("l", tarfile.SYMTYPE, linkname="TMP"), None),
                                  (ti("h", tarfile.LNKTYPE, linkname="l/victim"), None)],
                                 UnsafeLayerError),
    "hardlink-missing": ([(ti("h", tarfile.LNKTYPE, linkname="nope"), None)], UnsafeLayerError),
    "hardlink-to-dir": ([(ti("d", tarfile.DIRTYPE), None),
                         (ti("h", tarfile.LNKTYPE, linkname="d"), None)], UnsafeLayerError),
    "overlay-xattr": ([(ti("f", pax_headers={"SCHILY.xattr.trusted.overlay.opaque": "y"}),
                        b"x")], UnsafeLayerError),
    "overlay-redirect": ([(ti("d", tarfile.DIRTYPE,
                              pax_headers={"SCHILY.xattr.trusted.overlay.redirect": "/x"}),
                           None)], UnsafeLayerError),
    "long-name": ([(ti("a/" * 2100 + "f"), b"x")], UnsafeLayerError),
    "long-component": ([(ti("c" * 256), b"x")], UnsafeLayerError),
    "whiteout-dotdot": ([(ti(".wh..."), b"")], UnsafeLayerError),
    "root-as-file": ([(ti("./"), b"x")], UnsafeLayerError),
    "sparse": ([(ti("s", tarfile.GNUTYPE_SPARSE), b"")], UnsupportedLayerError),
    "pax-sparse": ([(ti("s", pax_headers={"GNU.sparse.major": "1"}), b"")],
                   UnsupportedLayerError),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layers_are_refused(tmp_path: Path, case: str) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"original")
    entries, error = HOSTILE[case]
    fixed = []
    for info, data in entries:
        info.name = info.name.replace("VICTIM", str(victim))
        info.linkname = info.linkname.replace("VICTIM", str(victim)).replace("TMP",
                                                                            str(tmp_path))
        fixed.append((info, data))
    blob = Blob(make_tar(fixed))
    dest = tmp_path / "work" / "fs"
    dest.parent.mkdir()
    with pytest.raises(error) as raised:
        unpack(blob, dest)
    assert isinstance(raised.value, SociError) and "\n" not in str(raised.value)
    assert_clean(dest)
    assert victim.read_bytes() == b"original"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim", "work"]


def test_nul_in_pax_name_is_refused(tmp_path: Path) -> None:
    dest = tmp_path / "fs"
    with pytest.raises(UnsafeLayerError, match="NUL"):
        unpack(Blob(_raw_pax_tar(b"a\0b")), dest)
    assert_clean(dest)


@pytest.mark.parametrize("kind", [b"x", b"L", b"g"])
def test_oversized_records_are_refused_unread(tmp_path: Path, kind: bytes) -> None:
    """A pax or long-name record claiming 1 GiB is refused before anything is buffered."""
    header = ti("huge", kind)
    header.size = 1 << 30
    tar = header.tobuf(tarfile.USTAR_FORMAT) + b"k" * 4096
    dest = tmp_path / "fs"
    with pytest.raises(CorruptLayerError, match="1073741824 bytes"):
        unpack(Blob(tar), dest)
    assert_clean(dest)


def test_corrupt_header_checksum(tmp_path: Path) -> None:
    tar = bytearray(make_tar([(ti("f"), b"x")]))
    tar[0] ^= 1
    dest = tmp_path / "fs"
    with pytest.raises(CorruptLayerError, match="checksum"):
        unpack(Blob(bytes(tar)), dest)
    assert_clean(dest)


def test_stream_and_digest_failures(tmp_path: Path) -> None:
    files = [(ti(f"f{i}"), os.urandom(100_000)) for i in range(20)]
    blob = Blob(make_tar(files))
    other = Blob(make_tar(files[:3]))
    dest = tmp_path / "fs"
    cases: list[tuple[type[Exception], dict[str, object], bytes]] = [
        (CorruptLayerError, {}, blob.data[: len(blob.data) // 2]),  # truncated gzip
        (CorruptLayerError, {}, blob.data[:-6]),  # no gzip trailer
        (LayerDigestError, {"digest": other.digest}, blob.data),
        (LayerDigestError, {"diff_id": other.diff_id}, blob.data),
        (LayerDigestError, {"size": len(blob.data) - 1}, blob.data),
        (LayerDigestError, {"size": len(blob.data) + 1}, blob.data),
        (CorruptLayerError, {}, blob.data + b"trailing garbage"),
        (UnsupportedLayerError, {"media_type": ZSTD}, blob.data),
        (UnpackError, {"digest": "sha256:xyz"}, blob.data),
    ]
    for error, overrides, data in cases:
        args: dict[str, object] = {"media_type": GZ, "digest": sha(data),
                                   "diff_id": blob.diff_id, "size": len(data)}
        if "size" in overrides or "digest" in overrides:
            args["digest"] = blob.digest
        args.update(overrides)
        with pytest.raises(error):
            unpack_stream(io.BytesIO(data), str(dest), **args)  # type: ignore[arg-type]
        assert_clean(dest)
    with pytest.raises(LayerDigestError):  # an uncompressed layer whose digest is wrong
        unpack(Blob(blob.tar, compress=False), dest, digest=other.diff_id)
    assert_clean(dest)


def test_non_empty_destination_is_refused(tmp_path: Path) -> None:
    dest = tmp_path / "fs"
    dest.mkdir()
    (dest / "keep").write_bytes(b"k")
    with pytest.raises(UnpackError, match="not empty"):
        unpack(Blob(make_tar([(ti("f"), b"x")])), dest)
    assert os.listdir(dest) == ["keep"]
    with pytest.raises(UnpackError, match="Not a directory"):
        unpack(Blob(make_tar([(ti("f"), b"x")])), dest / "keep" / "fs")
    with pytest.raises(UnpackError, match="No such file"):
        unpack(Blob(make_tar([(ti("f"), b"x")])), tmp_path / "missing" / "fs")
    assert sorted(os.listdir(tmp_path)) == ["fs"] and os.listdir(dest) == ["keep"]


def test_unpack_file_from_local_blob(tmp_path: Path) -> None:
    blob = Blob(make_tar([(ti("f"), b"x" * 5000)]))
    path = tmp_path / "blob"
    path.write_bytes(blob.data)
    result = unpack_file(str(path), str(tmp_path / "fs"), media_type=GZ, digest=blob.digest,
                         diff_id=blob.diff_id, size=len(blob.data), inflater="isal")
    assert result.entries == 1 and (tmp_path / "fs" / "f").read_bytes() == b"x" * 5000


# -- the scheduler ---------------------------------------------------------------------


def layer_blob(seed: int, files: int = 30, noise: int = 0) -> Blob:
    """A layer of ``files`` compressible files, plus an incompressible one of ``noise``
    bytes (so that a trickled download of it takes minutes, not seconds)."""
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = [(ti(f"l{seed}", tarfile.DIRTYPE),
                                                            None)]
    for i in range(files):
        data = hashlib.sha256(f"{seed}-{i}".encode()).digest() * (50 * (i + 1))
        entries.append((ti(f"l{seed}/f{i}"), data))
    if noise:
        entries.append((ti(f"l{seed}/noise"), os.urandom(noise)))
    return Blob(make_tar(entries))


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    with Registry() as reg:
        yield reg


@pytest.mark.parametrize("limits", [(-1, -1, 3, 2), (1, 1, 1, 1)])
def test_parallel_unpacker_from_registry(tmp_path: Path, registry: Registry,
                                         limits: tuple[int, int, int, int]) -> None:
    blobs = [layer_blob(i) for i in range(5)]
    ref = Reference.parse(f"{registry.host}/unpack/test:v1")
    with RegistryClient(plain_http=True, registries_conf=RegistriesConf()) as client:
        for b in blobs:
            client.push_blob(ref, b.digest, b.data)
        specs = []
        for i, b in enumerate(blobs):
            diff_id = blobs[0].diff_id if i == 2 else b.diff_id  # layer 2 is broken

            def opener(b: Blob = b) -> object:
                return client.open_blob(ref, b.digest, size=len(b.data))

            specs.append(LayerSpec(b.digest, len(b.data), GZ, diff_id,
                                   str(tmp_path / f"snap{i}" / "fs"), opener,  # type: ignore
                                   image="img"))
            (tmp_path / f"snap{i}").mkdir()
        dl, up, dl_img, up_img = limits
        with ParallelUnpacker(dl, up, max_concurrent_downloads_per_image=dl_img,
                              max_concurrent_unpacks_per_image=up_img) as unpacker:
            unpacker.submit_all(specs)
            unpacker.submit(specs[0])  # again: a no-op
            for i, spec in enumerate(specs):
                if i == 2:
                    with pytest.raises(LayerDigestError, match="diff ID"):
                        unpacker.wait(spec.digest)
                    continue
                result = unpacker.wait(spec.digest)
                assert result.diff_id == spec.diff_id and result.entries == 31
                assert (Path(spec.dest) / f"l{i}" / "f29").read_bytes() == (
                    hashlib.sha256(f"{i}-29".encode()).digest() * 1500)
    for i in range(5):
        names = os.listdir(tmp_path / f"snap{i}")
        assert names == ([] if i == 2 else ["fs"])


def test_chunked_downloads_from_registry(tmp_path: Path, registry: Registry) -> None:
    """concurrent_download_chunk_size: ranged requests in parallel into the spool; a
    corrupted or short chunk fails that layer only, by digest, leaving nothing."""
    blobs = [layer_blob(10 + i, files=60) for i in range(4)]
    ref = Reference.parse(f"{registry.host}/unpack/chunked:v1")
    calls: list[tuple[int, int]] = []
    with RegistryClient(plain_http=True, registries_conf=RegistriesConf()) as client:
        for b in blobs:
            client.push_blob(ref, b.digest, b.data)

        def ranged(b: Blob, damage: str) -> object:
            def fetch(start: int, end: int) -> bytes:
                calls.append((start, end))
                data = client.get_blob_range(ref, b.digest, start, end)
                if damage == "flip" and start > 0:
                    return bytes([data[0] ^ 1]) + data[1:]
                if damage == "short" and end == len(b.data):
                    return data[:-1]
                return data
            return fetch

        damages = ["", "flip", "", "short"]
        specs = [LayerSpec(b.digest, len(b.data), GZ, b.diff_id, str(tmp_path / f"fs{i}"),
                           lambda: pytest.fail("chunked layers must not open a stream"),
                           image="img", fetch_range=ranged(b, damages[i]))  # type: ignore
                 for i, b in enumerate(blobs)]
        config = ParallelPullConfig.from_toml({"concurrent_download_chunk_size": "4kb",
                                               "max_concurrent_downloads_per_image": 3})
        with ParallelUnpacker.from_config(config) as unpacker:
            unpacker.submit_all(specs)
            for i, spec in enumerate(specs):
                if damages[i]:
                    with pytest.raises(LayerDigestError):
                        unpacker.wait(spec.digest)
                else:
                    assert unpacker.wait(spec.digest).entries == 61
    assert all(end - start <= 4096 for start, end in calls)
    assert len(calls) >= sum(len(b.data) // 4096 for b in blobs)
    assert sorted(os.listdir(tmp_path)) == ["fs0", "fs2"]
    assert (tmp_path / "fs2" / "l12" / "f59").read_bytes() == (
        hashlib.sha256(b"12-59").digest() * 3000)


def test_parallel_unpacker_local_files_and_errors(tmp_path: Path) -> None:
    blobs = [layer_blob(i, files=5) for i in range(3)]
    specs = []
    for i, b in enumerate(blobs):
        path = tmp_path / f"blob{i}"
        path.write_bytes(b.data)
        media = ZSTD if i == 1 else GZ
        specs.append(LayerSpec(b.digest, len(b.data), media, b.diff_id,
                               str(tmp_path / f"fs{i}"), lambda p=path: open(p, "rb")))  # noqa: SIM115
    with ParallelUnpacker() as unpacker:
        unpacker.submit_all(specs)
        assert unpacker.wait(specs[0].digest).entries == 6
        with pytest.raises(UnsupportedLayerError):
            unpacker.wait(specs[1].digest)
        assert unpacker.wait(specs[2].digest).entries == 6
        with pytest.raises(SociError, match="not submitted"):
            unpacker.wait(blobs[0].diff_id)
        with pytest.raises(UnpackError, match="already"):
            unpacker.submit(LayerSpec(blobs[0].digest, None, GZ, blobs[0].diff_id,
                                      str(tmp_path / "elsewhere"), specs[0].open))
    assert sorted(os.listdir(tmp_path)) == ["blob0", "blob1", "blob2", "fs0", "fs2"]


class SlowStream:
    """A remote-like stream (no fileno) that trickles its bytes until released."""

    def __init__(self, data: bytes, release: threading.Event) -> None:
        self._data = io.BytesIO(data)
        self._release = release
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        if not self._release.is_set():
            time.sleep(0.005)
            return self._data.read(min(n, 16))
        return self._data.read(n)

    def close(self) -> None:
        self.closed = True


def test_close_cancels_and_cleans(tmp_path: Path) -> None:
    blob = layer_blob(7, files=20, noise=256 << 10)
    release = threading.Event()
    streams: list[SlowStream] = []

    def opener() -> SlowStream:
        streams.append(SlowStream(blob.data, release))
        return streams[-1]

    unpacker = ParallelUnpacker()
    spec = LayerSpec(blob.digest, len(blob.data), GZ, blob.diff_id, str(tmp_path / "fs"),
                     opener)  # type: ignore[arg-type]
    unpacker.submit(spec)
    deadline = time.monotonic() + 30
    while not streams and time.monotonic() < deadline:
        time.sleep(0.01)
    unpacker.close()
    with pytest.raises(UnpackCancelledError):
        unpacker.wait(spec.digest)
    assert streams and streams[0].closed
    assert os.listdir(tmp_path) == []
    with pytest.raises(UnpackError, match="closed"):
        unpacker.submit(spec)


class RemoteLike:
    """A stream without fileno, read at full speed (a fast network)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        return self._data.read(n)

    def close(self) -> None:
        self.closed = True


def _wait_for(predicate: object, what: str) -> None:
    deadline = time.monotonic() + 60
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.mark.parametrize("finish", ["release", "close"])
def test_downloads_spool_while_unpack_slots_are_busy(tmp_path: Path, finish: str) -> None:
    """With the only unpack slot taken by a slow layer, the next layer is downloaded into
    a spool file (digest checked) and unpacked from it once the slot frees up; closing
    the unpacker instead removes the spool and staging files."""
    slow_blob, fast_blob = layer_blob(1, files=100, noise=256 << 10), layer_blob(2, files=10)
    release = threading.Event()
    slow: list[SlowStream] = []
    fast: list[RemoteLike] = []
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()

    def open_slow() -> SlowStream:
        slow.append(SlowStream(slow_blob.data, release))
        return slow[-1]

    def open_fast() -> RemoteLike:
        fast.append(RemoteLike(fast_blob.data))
        return fast[-1]

    slow_spec = LayerSpec(slow_blob.digest, len(slow_blob.data), GZ, slow_blob.diff_id,
                          str(a / "fs"), open_slow)  # type: ignore[arg-type]
    fast_spec = LayerSpec(fast_blob.digest, len(fast_blob.data), GZ, fast_blob.diff_id,
                          str(b / "fs"), open_fast)  # type: ignore[arg-type]
    unpacker = ParallelUnpacker(max_concurrent_unpacks=1)
    try:
        unpacker.submit(slow_spec)
        _wait_for(lambda: slow, "the slow layer to start")
        _wait_for(lambda: any(n.startswith("fs.tmp-") for n in os.listdir(a)), "its staging")
        unpacker.submit(fast_spec)
        _wait_for(lambda: fast and fast[0].closed, "the fast layer's download")
        spooled = [n for n in os.listdir(b) if n.endswith(".blob")]
        assert len(spooled) == 1 and not unpacker.done(fast_spec.digest)
        if finish == "release":
            release.set()
            assert unpacker.wait(slow_spec.digest).entries == 102
            assert unpacker.wait(fast_spec.digest).entries == 11
            assert os.listdir(a) == ["fs"] and os.listdir(b) == ["fs"]
        else:
            unpacker.close()
            for spec in (slow_spec, fast_spec):
                with pytest.raises(UnpackCancelledError):
                    unpacker.wait(spec.digest)
            assert os.listdir(a) == [] and os.listdir(b) == []
    finally:
        release.set()
        unpacker.close()


def test_config_from_toml() -> None:
    cfg = ParallelPullConfig.from_toml({
        "enable": True, "max_concurrent_downloads": -1,
        "max_concurrent_downloads_per_image": 20, "concurrent_download_chunk_size": "16mb",
        "max_concurrent_unpacks": 4, "max_concurrent_unpacks_per_image": 3,
        "discard_unpacked_layers": True, "decompress_streams": {},
    })
    assert cfg == ParallelPullConfig(True, -1, 20, 16 << 20, 4, 3, True)
    assert ParallelPullConfig.from_toml({}) == ParallelPullConfig()
    assert parse_size("1.5GB") == 3 << 29 and parse_size("") == -1 and parse_size(4096) == 4096
    for bad in ({"enable": "yes"}, {"max_concurrent_unpacks": 0},
                {"concurrent_download_chunk_size": "12 parsecs"}):
        with pytest.raises(SociError):
            ParallelPullConfig.from_toml(bad)
    unpacker = ParallelUnpacker.from_config(cfg)
    unpacker.close()
