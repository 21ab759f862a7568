"""OCI image layouts on disk: blobs by digest plus index.json.

Used both for ``oci:DIR`` images and for soci's own content store. Every blob
is written to a temporary file and renamed into place only once its digest has
been verified, so a crash or a bad source never leaves a wrong blob behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from soci.errors import DigestMismatchError, NotFoundError
from soci.fsutil import PRIVATE_DIR, PRIVATE_FILE, atomic_writer, make_dirs, masked
from soci.oci import gojson
from soci.oci import mediatypes as mt
from soci.oci.descriptor import Descriptor, Index, check_digest
from soci.oci.verify import VerifyingReader, verify

_COPY_CHUNK = 1 << 20


class OciLayout:
    def __init__(self, path: str | os.PathLike[str], *, create: bool = False,
                 private: bool = False) -> None:
        """``private``: files 0600 and directories 0700 (the store root's content), rather
        than the umask's say (a layout the user writes to share)."""
        self.path = Path(path)
        self._file_mode = PRIVATE_FILE if private else 0o644
        self._dir_mode = PRIVATE_DIR if private else 0o777
        if create:
            make_dirs(self.path / "blobs" / "sha256", self._dir_mode)
            marker = self.path / "oci-layout"
            if not marker.exists():
                with atomic_writer(marker, self._file_mode) as f:
                    f.write(b'{"imageLayoutVersion":"1.0.0"}')
        elif not (self.path / "oci-layout").exists() and not (self.path / "index.json").exists():
            raise NotFoundError(f"{self.path}: not an OCI image layout")

    # -- blobs -------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        check_digest(digest)
        return self.path / "blobs" / "sha256" / digest[7:]

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).exists()

    def read_blob(self, digest: str) -> bytes:
        try:
            data = self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is not in {self.path}") from None
        return verify(data, digest, f"blob {digest} in {self.path}")

    def open_blob(self, digest: str, size: int | None = None) -> VerifyingReader:
        try:
            raw: BinaryIO = open(self.blob_path(digest), "rb")  # noqa: SIM115 (returned)
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is not in {self.path}") from None
        return VerifyingReader(raw, digest, size, f"blob {digest} in {self.path}")

    def write_blob(self, data: bytes, digest: str | None = None) -> str:
        """Store bytes; return their digest (checked against ``digest`` when given)."""
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest is not None and digest != actual:
            raise DigestMismatchError(f"refusing to store blob: expected {digest}, got {actual}")
        target = self.blob_path(actual)
        if not target.exists():
            make_dirs(target.parent, self._dir_mode)
            with atomic_writer(target, self._file_mode) as f:
                f.write(data)
        return actual

    def ingest(self, stream: BinaryIO, digest: str, size: int | None = None) -> None:
        """Copy a stream in as blob ``digest``, verifying it before it becomes visible."""
        target = self.blob_path(digest)
        if target.exists():
            return
        make_dirs(target.parent, self._dir_mode)
        fd, tmp = tempfile.mkstemp(prefix=".ingest-", dir=target.parent)
        try:
            h = hashlib.sha256()
            seen = 0
            with os.fdopen(fd, "wb") as f:
                while chunk := stream.read(_COPY_CHUNK):
                    h.update(chunk)
                    seen += len(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            actual = "sha256:" + h.hexdigest()
            if actual != digest or (size is not None and seen != size):
                raise DigestMismatchError(f"blob {digest}: got {seen} bytes hashing to {actual}")
            os.chmod(tmp, masked(self._file_mode))
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def delete_blob(self, digest: str) -> bool:
        try:
            self.blob_path(digest).unlink()
        except FileNotFoundError:
            return False
        return True

    def blobs(self) -> list[str]:
        directory = self.path / "blobs" / "sha256"
        if not directory.is_dir():
            return []
        return sorted("sha256:" + p.name for p in directory.iterdir()
                      if len(p.name) == 64 and not p.name.startswith("."))

    # -- index.json --------------------------------------------------------------

    def read_index(self) -> Index:
        try:
            data = (self.path / "index.json").read_bytes()
        except FileNotFoundError:
            return Index(mt.OCI_INDEX, [])
        return Index.parse(data, mt.OCI_INDEX)

    def write_index(self, index: Index) -> None:
        with atomic_writer(self.path / "index.json", self._file_mode) as f:
            f.write(gojson.dumps(index.to_json()))

    def find(self, tag: str | None) -> Descriptor:
        """The image tagged ``tag`` (the only image when ``tag`` is None)."""
        entries = self.read_index().manifests
        if tag is None:
            if len(entries) == 1:
                return entries[0]
            raise NotFoundError(
                f"{self.path} holds {len(entries)} images: name one with oci:DIR:TAG"
            )
        for entry in entries:
            if (entry.annotations or {}).get(mt.ANN_REF_NAME) == tag:
                return entry
        raise NotFoundError(f"{self.path}: no image tagged {tag!r}")

    def tag(self, desc: Descriptor, tag: str | None) -> None:
        """Point ``tag`` at ``desc`` in index.json, replacing what held that tag before."""
        index = self.read_index()
        annotations = dict(desc.annotations or {})
        if tag is not None:
            annotations[mt.ANN_REF_NAME] = tag
        entry = Descriptor(desc.media_type, desc.digest, desc.size, annotations or None,
                           desc.platform, desc.artifact_type)
        kept = [m for m in index.manifests
                if tag is None or (m.annotations or {}).get(mt.ANN_REF_NAME) != tag]
        index.manifests = [*kept, entry]
        self.write_index(index)
