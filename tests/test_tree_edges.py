"""Edge cases of the layer tree: names no directory can hold, deep paths, device numbers.

A zTOC the kernel could not present faithfully is refused when its tree is built (the
store then answers ENOENT and podman pulls the layer itself); legal extremes are served.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterator

import pytest

from images import write_image
from layers import Node, tar_with_tarfile
from registryd import Registry, push_layout
from soci.errors import ZtocFormatError
from soci.fs.tree import ROOT, LayerTree
from soci.ztoc.model import Compression, FileMetadata, Ztoc
from storeenv import StoreDaemon, soci

DEPTH = 1100  # components of 1 byte: a 2,201-byte path, legal (PATH_MAX is 4,096)
DEEP = "/".join(["a"] * DEPTH) + "/f"
DEEP_DATA = b"at the bottom\n"


def _ztoc(*entries: FileMetadata) -> Ztoc:
    return Ztoc("0.9", "test", 1000, 1000, list(entries), Compression.GZIP, 0, [], b"")


def _reg(name: str, **kw: object) -> FileMetadata:
    return FileMetadata(name, "reg", 0, 0, mode=0o644, **kw)  # type: ignore[arg-type]


def _walk(tree: LayerTree, path: str) -> int:
    ino = ROOT
    for part in path.split("/"):
        found = tree.lookup(ino, part.encode())
        assert found is not None, part
        ino = found
    return ino


@pytest.mark.parametrize("name", [".wh.", ".wh..", ".wh...", "d/.wh.", "d/.wh..", "d/.wh..."])
def test_whiteouts_of_no_name_are_refused(name: str) -> None:
    with pytest.raises(ZtocFormatError, match="whites out"):
        LayerTree(_ztoc(_reg("d/keep"), _reg(name)))


def test_ordinary_whiteouts_still_work() -> None:
    tree = LayerTree(_ztoc(_reg("d/.wh.gone"), _reg("d/.wh..hidden"), _reg("d/.wh....x")))
    for name in ("d/gone", "d/.hidden", "d/...x"):
        node = tree.node(_walk(tree, name))
        assert stat.S_ISCHR(node.mode) and node.rdev == 0


@pytest.mark.parametrize("entry", [
    FileMetadata("dev/x", "char", 0, 0, devmajor=(1 << 63) - 1, devminor=3),
    FileMetadata("dev/x", "block", 0, 0, devmajor=8, devminor=(1 << 63) - 1),
    FileMetadata("dev/x", "char", 0, 0, devmajor=4096, devminor=0),
    FileMetadata("dev/x", "char", 0, 0, devmajor=0, devminor=1 << 20),
    FileMetadata("dev/x", "char", 0, 0, devmajor=-1, devminor=0),
], ids=["major-2^63", "minor-2^63", "major-2^12", "minor-2^20", "negative"])
def test_device_numbers_linux_cannot_hold_are_refused(entry: FileMetadata) -> None:
    with pytest.raises(ZtocFormatError, match="device number"):
        LayerTree(_ztoc(entry))


def test_largest_device_numbers_are_served_exactly() -> None:
    tree = LayerTree(_ztoc(FileMetadata("dev/big", "block", 0, 0, mode=0o600, devmajor=4095,
                                        devminor=(1 << 20) - 1),
                           FileMetadata("dev/null", "char", 0, 0, devmajor=1, devminor=3)))
    big = tree.node(_walk(tree, "dev/big"))
    assert stat.S_ISBLK(big.mode) and big.rdev < 1 << 32  # what FUSE hands the kernel
    assert (os.major(big.rdev), os.minor(big.rdev)) == (4095, (1 << 20) - 1)
    assert tree.node(_walk(tree, "dev/null")).rdev == os.makedev(1, 3)


@pytest.mark.parametrize("entry,why", [
    (_reg("d/" + "n" * 256), "name longer than 255"),
    (_reg("/".join(["abc"] * 1024) + "/x"), "path longer than 4095"),
    (FileMetadata("l", "symlink", 0, 0, linkname="t" * 4096), "symlink"),
    (FileMetadata("l", "symlink", 0, 0, linkname="a\0b"), "symlink"),
    (_reg("f", uid=1 << 32), "owner"),
    (_reg("f", gid=-1), "owner"),
    (FileMetadata("", "dir", 0, 0, uid=1 << 40), "owner"),
], ids=["name-256", "path-4096", "symlink-4096", "symlink-nul", "uid-2^32", "gid-negative",
        "root-uid"])
def test_entries_no_linux_directory_can_hold_are_refused(entry: FileMetadata, why: str) -> None:
    with pytest.raises(ZtocFormatError, match=why) as e:
        LayerTree(_ztoc(entry))
    assert "\n" not in str(e.value)


def test_longest_legal_names_are_served() -> None:
    name, path = "n" * 255, "/".join(["abc"] * 1024)  # 255 bytes; 4,095 bytes
    tree = LayerTree(_ztoc(_reg("d/" + name), _reg(path),
                           FileMetadata("l", "symlink", 0, 0, linkname="t" * 4095)))
    assert tree.node(_walk(tree, "d/" + name))
    assert tree.node(_walk(tree, path))
    assert tree.node(_walk(tree, "l")).target == b"t" * 4095


def test_deep_paths_are_built_without_recursion() -> None:
    """1,100 levels is past Python's recursion limit; the tree must not care."""
    middle = "/".join(["a"] * (DEPTH // 2))
    tree = LayerTree(_ztoc(FileMetadata(middle, "dir", 0, 0, mode=0o700, uid=7),
                           _reg(DEEP), FileMetadata("h", "hardlink", 0, 0, linkname=DEEP)))
    assert tree.node(_walk(tree, middle)).mode == stat.S_IFDIR | 0o700
    deep = _walk(tree, DEEP)
    assert _walk(tree, "h") == deep and tree.node(deep).nlink == 2
    assert len(tree) == 1 + DEPTH + 1  # the root, every directory once, the file


def test_a_directory_replaced_by_a_file_loses_its_contents() -> None:
    """Later entries win, as in tar extraction; a hard link to a replaced path is dropped."""
    tree = LayerTree(_ztoc(_reg("a/b"), _reg("a"), FileMetadata("h", "hardlink", 0, 0,
                                                                linkname="a/b")))
    assert stat.S_ISREG(tree.node(_walk(tree, "a")).mode)
    assert tree.lookup(ROOT, b"h") is None


# -- through a real soci-store ------------------------------------------------------------

REFUSED = {  # layer position -> what is wrong with it
    1: "d/.wh.", 2: "d/.wh..", 3: "d/.wh...", 4: "n/" + "x" * 300, 5: "huge device",
}


def _layers() -> list[bytes]:
    pax = tarfile.PAX_FORMAT
    return [
        tar_with_tarfile([Node("ok", "dir"), Node("ok/file", data=b"served\n" * 100)], pax),
        *(tar_with_tarfile([Node("d", "dir"), Node("d/keep", data=b"k" * 700),
                            Node(name, data=b"")], pax) for name in (REFUSED[1], REFUSED[2],
                                                                      REFUSED[3])),
        tar_with_tarfile([Node("n", "dir"), Node(REFUSED[4], data=b"long name" * 80)], pax),
        tar_with_tarfile([Node("dev", "dir"), Node("dev/null", "char"),
                          Node("dev/pad", data=b"p" * 700)], pax),
        tar_with_tarfile([Node(DEEP, data=DEEP_DATA)], pax),
    ]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """An image whose layers 1-5 have zTOCs the tree refuses, and layers 0 and 6 good ones."""
    from soci.artifacts import LocalStore
    from soci.index.model import SociIndex, ztoc_layer
    from soci.oci.descriptor import Descriptor
    from soci.ztoc import decode, encode

    tmp = tmp_path_factory.mktemp("edges")
    with Registry() as reg:
        write_image(tmp / "img", "v1", _layers())
        push_layout(tmp / "img", reg.host, "edges:v1", tag="v1")
        ref = f"{reg.host}/edges:v1"
        root = tmp / "root"
        soci(root, "create", "--min-layer-size", "0", ref)
        layers = [la["digest"] for la in json.loads(subprocess.run(
            ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
            capture_output=True, check=True).stdout)["layers"]]
        # Only the device numbers cannot be written by tar (8 octal digits): set them in the
        # zTOC, as a hostile index would, and point the image at the rewritten index.
        with LocalStore(root) as store:
            ((manifest_digest, index_digest),) = store.mappings.items()
            index = SociIndex.parse(store.content.read_blob(index_digest))
            blobs = []
            for desc in index.blobs:
                if ztoc_layer(desc)[0] == layers[5]:
                    z = decode(store.content.read_blob(desc.digest))
                    dev = next(e for e in z.entries if e.name == "dev/null")
                    dev.devmajor, dev.devminor = (1 << 63) - 1, (1 << 63) - 1
                    data = encode(z)
                    desc = Descriptor(desc.media_type, store.content.write_blob(data), len(data),
                                      desc.annotations)
                blobs.append(desc)
            index.blobs = blobs
            store.mappings.put(manifest_digest, store.content.write_blob(index.encode()))
        with StoreDaemon(root, tmp / "mnt") as daemon:
            yield {"ref": ref, "layers": layers, "daemon": daemon}


def test_refused_ztocs_answer_enoent_and_are_logged(served: dict) -> None:
    daemon: StoreDaemon = served["daemon"]
    for position in REFUSED:
        digest = served["layers"][position]
        for name in ("diff", "info", "blob"):
            with pytest.raises(FileNotFoundError):
                os.stat(daemon.layer_dir(served["ref"], digest) / name)
        refusals = [line for line in daemon.logs().splitlines()
                    if "refused" in line and digest in line and served["ref"] in line]
        assert refusals, (position, daemon.logs()[-3000:])
    logs = daemon.logs()
    assert "whites out ''" in logs and "whites out '.'" in logs and "whites out '..'" in logs
    assert "longer than 255 bytes" in logs and "device number" in logs
    assert "Traceback" not in logs
    # the good layers of the same image are served, and the daemon lives on
    ok = daemon.layer_dir(served["ref"], served["layers"][0]) / "diff"
    assert (ok / "ok" / "file").read_bytes() == b"served\n" * 100
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_a_1100_component_path_is_served(served: dict) -> None:
    daemon: StoreDaemon = served["daemon"]
    diff = daemon.layer_dir(served["ref"], served["layers"][6]) / "diff"
    deep = diff.joinpath(*DEEP.split("/"))
    assert len(os.fsencode(deep)) < 4096
    assert deep.read_bytes() == DEEP_DATA
    st = os.stat(deep)
    assert stat.S_ISREG(st.st_mode) and st.st_size == len(DEEP_DATA)
    assert os.listdir(deep.parent) == ["f"]


def test_layer_names_that_are_no_digest_answer_enoent(served: dict) -> None:
    daemon: StoreDaemon = served["daemon"]
    refdir = daemon.layer_dir(served["ref"], served["layers"][0]).parent
    for name in (b"sha256:" + b"\xff" * 64, b"sha256:" + b"A" * 64, b"sha256:" + b"g" * 64):
        with pytest.raises(OSError) as e:
            os.stat(os.path.join(os.fsencode(refdir), name, b"diff"))
        assert e.value.errno == errno.ENOENT
    assert daemon.proc is not None and daemon.proc.poll() is None


@pytest.mark.parametrize("records,why", [
    ({"SCHILY.xattr." + "u" * 256: "v"}, "attribute name"),
    ({"SCHILY.xattr.user.big": "v" * 65537}, "limit 65536"),
    ({"SCHILY.xattr.trusted.overlay.redirect": "/etc"}, "overlayfs"),
    ({"SCHILY.xattr.trusted.overlay.opaque": "y"}, "overlayfs"),
    ({"SCHILY.xattr.user.overlay.metacopy": ""}, "overlayfs"),
], ids=["long-name", "big-value", "redirect", "opaque", "userxattr"])
def test_xattrs_linux_or_overlayfs_would_misread_are_refused(records: dict, why: str) -> None:
    with pytest.raises(ZtocFormatError, match=why):
        LayerTree(_ztoc(_reg("etc/f", pax_records=records)))


def test_ordinary_xattrs_are_served() -> None:
    records = {"SCHILY.xattr.user.color": "blue", "SCHILY.xattr." + "u" * 255: "x" * 65536,
               "SCHILY.xattr.security.capability": "\x01"}
    tree = LayerTree(_ztoc(_reg("etc/f", pax_records=records), _reg("d/.wh..wh..opq")))
    xattrs = tree.node(_walk(tree, "etc/f")).xattrs or {}
    assert xattrs[b"user.color"] == b"blue"
    assert xattrs[b"u" * 255] == b"x" * 65536
    assert (tree.node(_walk(tree, "d")).xattrs or {})[b"trusted.overlay.opaque"] == b"y"
