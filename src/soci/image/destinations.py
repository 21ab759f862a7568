"""Writing images: blobs and manifests by digest, then the name pointed at the top object.

A destination is written bottom-up (blobs, then manifests, then the tag), so
a failure at any point leaves the name untouched; for an OCI archive the whole
layout is assembled beside the target and renamed into place at the end.
"""

from __future__ import annotations

import errno
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import replace
from typing import BinaryIO, Protocol

from soci.fsutil import atomic_writer
from soci.image.names import ImageName
from soci.oci.descriptor import Descriptor
from soci.oci.layout import OciLayout
from soci.registry import RegistryClient

#: Opens the bytes of a blob when (and only when) the destination needs them.
Opener = Callable[[], BinaryIO]


class ImageDestination(Protocol):
    name: ImageName

    def has_blob(self, desc: Descriptor) -> bool: ...

    def put_blob(self, desc: Descriptor, open_blob: Opener) -> None: ...

    def put_manifest(self, desc: Descriptor, data: bytes) -> None: ...

    def commit(self, top: Descriptor, data: bytes) -> None:
        """Store the top object and point the destination's name at it."""
        ...

    def abort(self) -> None: ...


class RegistryDestination:
    def __init__(self, name: ImageName, client: RegistryClient) -> None:
        assert name.ref is not None
        self.name = name
        self.ref = name.ref
        self.client = client

    def has_blob(self, desc: Descriptor) -> bool:
        return self.client.blob_exists(self.ref, desc.digest)

    def put_blob(self, desc: Descriptor, open_blob: Opener) -> None:
        if self.has_blob(desc):
            return
        stream = open_blob()
        try:
            self.client.push_blob(self.ref, desc.digest, stream, desc.size)
        finally:
            stream.close()

    def put_manifest(self, desc: Descriptor, data: bytes) -> None:
        self.client.put_manifest(replace(self.ref, tag=None, digest=desc.digest), data,
                                 desc.media_type)

    def commit(self, top: Descriptor, data: bytes) -> None:
        target = replace(self.ref, digest=None) if self.ref.tag else replace(
            self.ref, digest=top.digest)
        self.client.put_manifest(target, data, top.media_type)

    def abort(self) -> None:
        pass


class LayoutDestination:
    def __init__(self, name: ImageName, directory: str | None = None) -> None:
        self.name = name
        self.layout = OciLayout(directory or name.path, create=True)

    def has_blob(self, desc: Descriptor) -> bool:
        return self.layout.has_blob(desc.digest)

    def put_blob(self, desc: Descriptor, open_blob: Opener) -> None:
        if self.has_blob(desc):
            return
        stream = open_blob()
        try:
            self.layout.ingest(stream, desc.digest, desc.size)
        finally:
            stream.close()

    def put_manifest(self, desc: Descriptor, data: bytes) -> None:
        self.layout.write_blob(data, desc.digest)

    def commit(self, top: Descriptor, data: bytes) -> None:
        self.layout.write_blob(data, top.digest)
        self.layout.tag(top, self.name.tag)

    def abort(self) -> None:
        pass


class ArchiveDestination(LayoutDestination):
    """An ``oci-archive`` tar: a layout built in a scratch directory, tarred on commit."""

    def __init__(self, name: ImageName) -> None:
        parent = os.path.dirname(os.path.abspath(name.path))
        if not os.path.isdir(parent):  # name the archive, not the scratch directory
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name.path)
        self.scratch = tempfile.mkdtemp(prefix=".soci-archive-", dir=parent)
        super().__init__(name, self.scratch)

    def commit(self, top: Descriptor, data: bytes) -> None:
        super().commit(top, data)
        try:
            with atomic_writer(self.name.path) as f, tarfile.open(fileobj=f, mode="w",
                                                                  format=tarfile.PAX_FORMAT) as tf:
                for entry in ("oci-layout", "index.json", "blobs"):
                    tf.add(os.path.join(self.scratch, entry), entry, filter=_plain)
        finally:
            self.abort()

    def abort(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def _plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def open_destination(name: ImageName, client: RegistryClient) -> ImageDestination:
    if name.transport == "oci":
        return LayoutDestination(name)
    if name.transport == "oci-archive":
        return ArchiveDestination(name)
    return RegistryDestination(name, client)
