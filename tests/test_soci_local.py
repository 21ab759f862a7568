"""soci create / convert / index / ztoc / rebuild-db on OCI layouts and archives (no registry)."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from images import big_file, files_layer, write_image, write_multiarch

BIG = {f"usr/lib/big{i}.bin": big_file(f"b{i}", 3_000_000) for i in range(5)}
SMALL = {"etc/os-release": b"NAME=test\n", "etc/hostname": b"box\n"}
EMPTY_JSON = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"


def soci(root: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "soci.cli", "--root", str(root), *args],
                          capture_output=True, text=True)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, str]:
    layout = tmp_path / "img"
    digest = write_image(layout, "v1", [files_layer(SMALL), files_layer(BIG)]).manifest_digest
    return layout, digest


def blob(root: Path, digest: str) -> bytes:
    return (root / "content" / "blobs" / "sha256" / digest[7:]).read_bytes()


def test_create_writes_index_ztocs_mapping_and_db(tmp_path: Path, image) -> None:
    layout, manifest_digest = image
    root = tmp_path / "root"
    out = soci(root, "create", f"oci:{layout}:v1").stdout
    assert "ztoc skipped - layer" in out and "less than min-layer-size" in out
    index_digest = out.strip().splitlines()[-1].split()[0]
    assert (root / "indexes" / manifest_digest[7:]).read_text() == index_digest
    raw = blob(root, index_digest)
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == index_digest
    doc = json.loads(raw)
    # Upstream's serialization: Go field order, no artifactType field, the empty config.
    assert list(doc) == ["schemaVersion", "mediaType", "config", "layers", "subject",
                         "annotations"]
    assert doc["config"] == {"mediaType": "application/vnd.amazon.soci.index.v1+json",
                             "digest": EMPTY_JSON, "size": 2}
    assert blob(root, EMPTY_JSON) == b"{}"
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest[7:]).read_bytes())
    assert doc["subject"]["digest"] == manifest_digest
    assert len(doc["layers"]) == 1
    ztoc = doc["layers"][0]
    assert ztoc["mediaType"] == "application/octet-stream"
    assert ztoc["annotations"] == {
        "com.amazon.soci.image-layer-digest": manifest["layers"][1]["digest"],
        "com.amazon.soci.image-layer-mediaType": manifest["layers"][1]["mediaType"],
        "com.amazon.soci.span-size": "4194304",
    }
    assert doc["annotations"] == {"com.amazon.soci.build-tool-identifier": "soci-py v0.1.0"}
    assert raw == json.dumps(doc, separators=(",", ":")).encode()

    listing = json.loads(soci(root, "index", "list", "--json").stdout)
    assert [(i["digest"], i["manifest_digest"], i["platform"]) for i in listing] == [
        (index_digest, manifest_digest, "linux/amd64")]
    assert soci(root, "index", "ls", "-q", "--ref", f"oci:{layout}:v1").stdout.split() == [
        index_digest]
    assert soci(root, "index", "ls", "-q", "--platform", "linux/arm64").stdout.split() == []
    ztocs = json.loads(soci(root, "ztoc", "list", "--json").stdout)
    assert [z["digest"] for z in ztocs] == [ztoc["digest"]]
    assert soci(root, "ztoc", "ls", "-q", "--image-ref", f"oci:{layout}:v1").stdout.split() == [
        ztoc["digest"]]
    info = json.loads(soci(root, "ztoc", "info", ztoc["digest"]).stdout)
    assert {f["filename"] for f in info["files"]} >= set(BIG)

    layer_file = layout / "blobs" / "sha256" / manifest["layers"][1]["digest"][7:]
    got = subprocess.run([sys.executable, "-m", "soci.cli", "--root", str(root), "ztoc",
                          "get-file", ztoc["digest"], "usr/lib/big3.bin", "--layer",
                          str(layer_file)], capture_output=True, check=True).stdout
    assert got == BIG["usr/lib/big3.bin"]
    assert json.loads(soci(root, "index", "info", index_digest).stdout) == doc


def test_existing_ztocs_are_reused_unless_forced(tmp_path: Path, image) -> None:
    layout, _ = image
    root = tmp_path / "root"
    first = soci(root, "create", f"oci:{layout}:v1").stdout
    again = soci(root, "create", f"oci:{layout}:v1").stdout
    assert "(already exists)" in again
    assert first.splitlines()[-1] == again.splitlines()[-1]
    forced = soci(root, "create", "--force", f"oci:{layout}:v1").stdout
    assert "(already exists)" not in forced
    smaller = soci(root, "create", "--span-size", "1000000", f"oci:{layout}:v1").stdout
    assert "(already exists)" not in smaller
    assert len(json.loads(soci(root, "ztoc", "list", "--json").stdout)) == 2
    everything = soci(root, "create", "--min-layer-size", "0", "--optimizations", "xattr",
                      f"oci:{layout}:v1").stdout
    assert "skipped" not in everything
    index = json.loads(blob(root, everything.strip().splitlines()[-1].split()[0]))
    assert len(index["layers"]) == 2
    assert all(z["annotations"]["com.amazon.soci.disable-xattrs"] == "true"
               for z in index["layers"])


def test_index_rm_and_rebuild_db(tmp_path: Path, image) -> None:
    layout, manifest_digest = image
    root = tmp_path / "root"
    soci(root, "create", f"oci:{layout}:v1")
    index_digest = soci(root, "index", "ls", "-q").stdout.split()[0]
    before = soci(root, "index", "ls", "--json").stdout
    ztocs_before = soci(root, "ztoc", "ls", "--json").stdout
    os.unlink(root / "artifacts.sqlite3")
    for extra in ("-wal", "-shm"):
        if (root / f"artifacts.sqlite3{extra}").exists():
            os.unlink(root / f"artifacts.sqlite3{extra}")
    assert soci(root, "index", "ls", "-q").stdout == ""
    assert "found 1 SOCI indexes and 1 zTOCs" in soci(root, "rebuild-db").stdout
    after = json.loads(soci(root, "index", "ls", "--json").stdout)
    assert [(i["digest"], i["manifest_digest"], i["platform"]) for i in after] == [
        (i["digest"], i["manifest_digest"], i["platform"]) for i in json.loads(before)]
    assert [z["digest"] for z in json.loads(soci(root, "ztoc", "ls", "--json").stdout)] == [
        z["digest"] for z in json.loads(ztocs_before)]

    out = soci(root, "index", "rm", index_digest).stdout
    assert "and 1 zTOCs" in out
    assert soci(root, "index", "ls", "-q").stdout == ""
    assert not (root / "indexes" / manifest_digest[7:]).exists()
    assert not (root / "content" / "blobs" / "sha256" / index_digest[7:]).exists()
    proc = soci(root, "index", "rm", index_digest, ok=False)
    assert proc.returncode == 1 and "no SOCI index" in proc.stderr


def test_executor_dropped_artifacts_are_found_by_rebuild(tmp_path: Path, image) -> None:
    """An executor copies content/ and indexes/ into a fresh root by hand."""
    layout, manifest_digest = image
    built = tmp_path / "built"
    soci(built, "create", f"oci:{layout}:v1")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    subprocess.run(["cp", "-r", str(built / "content"), str(built / "indexes"), str(fresh)],
                   check=True)
    soci(fresh, "rebuild-db")
    rows = json.loads(soci(fresh, "index", "ls", "--json").stdout)
    assert rows[0]["manifest_digest"] == manifest_digest
    assert rows[0]["platform"] == "linux/amd64"


def test_platforms(tmp_path: Path) -> None:
    layout = tmp_path / "multi"
    layer = files_layer(BIG)
    write_multiarch(layout, "m", {"linux/amd64": [layer], "linux/arm64/v8": [layer],
                                  "linux/arm/v7": [files_layer({"x/y": big_file("arm", 16 << 20)})],
                                  })
    root = tmp_path / "root"
    out = soci(root, "create", "--platform", "linux/arm64", f"oci:{layout}:m").stdout
    assert "(linux/arm64/v8)" in out
    out = soci(root, "create", "--all-platforms", f"oci:{layout}:m").stdout
    assert out.count("SOCI index for") == 3 and "(already exists)" in out
    proc = soci(root, "create", "--platform", "linux/s390x", f"oci:{layout}:m", ok=False)
    assert proc.returncode == 1 and "no manifest for platform linux/s390x" in proc.stderr


def test_convert_layout_to_layout_and_archive(tmp_path: Path, image) -> None:
    layout, manifest_digest = image
    root = tmp_path / "root"
    dst = tmp_path / "converted"
    out = soci(root, "convert", f"oci:{layout}:v1", f"oci:{dst}:soci").stdout
    top = out.strip().splitlines()[-1].split()[0]
    index = json.loads((dst / "blobs" / "sha256" / top[7:]).read_bytes())
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    image_entry, soci_entry = index["manifests"]
    assert image_entry["platform"] == {"architecture": "amd64", "os": "linux"}
    new_manifest = json.loads((dst / "blobs" / "sha256" / image_entry["digest"][7:]).read_bytes())
    assert new_manifest["annotations"]["com.amazon.soci.index-digest"] == soci_entry["digest"]
    assert image_entry["annotations"] == new_manifest["annotations"]
    assert soci_entry["artifactType"] == "application/vnd.amazon.soci.index.v2+json"
    assert soci_entry["annotations"] == {
        "com.amazon.soci.image-manifest-digest": image_entry["digest"]}
    assert soci_entry["platform"] == {"architecture": "amd64", "os": "linux"}
    old_manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest[7:]).read_bytes())
    # The layers are the same blobs; the indexed one names its zTOC for newer
    # containers/storage, which looks layers up by TOC digest.
    strip = [{k: v for k, v in layer.items() if k != "annotations"}
             for layer in new_manifest["layers"]]
    assert strip == old_manifest["layers"]
    soci_index_doc = json.loads((dst / "blobs" / "sha256" / soci_entry["digest"][7:]).read_bytes())
    assert "annotations" not in new_manifest["layers"][0]
    assert new_manifest["layers"][1]["annotations"] == {
        "containerd.io/snapshot/stargz/toc.digest": soci_index_doc["layers"][0]["digest"]}
    soci_index = json.loads((dst / "blobs" / "sha256" / soci_entry["digest"][7:]).read_bytes())
    assert "subject" not in soci_index
    assert soci_index["config"]["mediaType"] == "application/vnd.amazon.soci.index.v2+json"
    for desc in [new_manifest["config"], *new_manifest["layers"], soci_index["config"],
                 *soci_index["layers"]]:
        assert (dst / "blobs" / "sha256" / desc["digest"][7:]).stat().st_size == desc["size"]
    # The converted manifest is mapped for local-first lookup.
    assert (root / "indexes" / image_entry["digest"][7:]).read_text() == soci_entry["digest"]
    # skopeo reads the result as an ordinary image.
    raw = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{dst}:soci"], capture_output=True,
                         check=True).stdout
    assert json.loads(raw) == index

    archive = tmp_path / "converted.tar"
    out = soci(root, "convert", f"oci:{layout}:v1", f"oci-archive:{archive}:soci").stdout
    assert out.strip().splitlines()[-1].split()[0] == top
    with tarfile.open(archive) as tf:
        names = set(tf.getnames())
    assert {"oci-layout", "index.json", f"blobs/sha256/{top[7:]}"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".soci-archive-")]
    # ... and an archive works as a source too.
    again = soci(tmp_path / "root2", "create", f"oci-archive:{archive}:soci").stdout
    assert "SOCI index for " + image_entry["digest"] in again


def test_bad_input(tmp_path: Path, image) -> None:
    layout, manifest_digest = image
    root = tmp_path / "root"
    for args, message in [
        (["create", "Bad//Ref"], "invalid image reference"),
        (["create", f"oci:{tmp_path}/nope:v1"], "not an OCI image layout"),
        (["create", f"oci:{layout}:nosuchtag"], "no image tagged"),
        (["index", "info", "sha256:" + "0" * 64], "not in"),
        (["index", "info", "junk"], "invalid digest"),
        (["create", "--platform", "linux", f"oci:{layout}:v1"], "invalid platform"),
    ]:
        proc = soci(root, *args, ok=False)
        assert proc.returncode == 1, args
        assert message in proc.stderr and proc.stderr.count("\n") == 1, (args, proc.stderr)

    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest[7:]).read_bytes())
    big = layout / "blobs" / "sha256" / manifest["layers"][1]["digest"][7:]
    data = bytearray(big.read_bytes())
    data[len(data) // 2] ^= 0xFF
    big.write_bytes(bytes(data))
    proc = soci(root, "create", f"oci:{layout}:v1", ok=False)
    assert proc.returncode == 1
    assert ("expected sha256" in proc.stderr or "corrupt gzip" in proc.stderr), proc.stderr
    assert soci(root, "ztoc", "ls", "-q").stdout == ""
    assert soci(root, "index", "ls", "-q").stdout == ""


def test_rebuild_db_is_all_or_nothing(tmp_path: Path, image, monkeypatch) -> None:
    """A rebuild that fails partway (here: the disk refusing the last write) leaves the
    records as they were, not an emptied or half-filled database."""
    from soci.artifacts import LocalStore
    from soci.artifacts.rebuild import rebuild_db

    layout, _ = image
    root = tmp_path / "root"
    soci(root, "create", f"oci:{layout}:v1")
    before = soci(root, "index", "ls", "--json").stdout
    store = LocalStore(root)
    try:
        def full_disk(*args: object) -> None:
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(store.db, "put_index", full_disk)
        with pytest.raises(sqlite3.OperationalError):
            rebuild_db(store)
    finally:
        store.close()
    assert soci(root, "index", "ls", "--json").stdout == before
