"""Reading images: manifests and blobs by descriptor, each verified against its digest."""

from __future__ import annotations

import os
import tarfile
from typing import BinaryIO, Protocol

from soci.errors import NotFoundError, SociError
from soci.image.names import ImageName
from soci.oci import mediatypes as mt
from soci.oci.descriptor import Descriptor, Index, media_type_of
from soci.oci.layout import OciLayout
from soci.oci.verify import VerifyingReader, verify
from soci.registry import RegistryClient


class ImageSource(Protocol):
    """One image's content, wherever it lives."""

    name: ImageName

    def top(self) -> tuple[Descriptor, bytes]:
        """The named object (a manifest or an index) and its bytes."""
        ...

    def manifest(self, desc: Descriptor) -> bytes:
        """A child manifest's bytes, verified against ``desc``."""
        ...

    def open_blob(self, desc: Descriptor, verify: bool = True) -> BinaryIO:
        """A stream over a blob; its final read raises if the bytes were wrong.

        ``verify=False`` leaves the digest check to a consumer that hashes every byte itself
        (the zTOC builder); the length is still checked where the source knows it.
        """
        ...

    def close(self) -> None: ...


class RegistrySource:
    def __init__(self, name: ImageName, client: RegistryClient) -> None:
        assert name.ref is not None
        self.name = name
        self.ref = name.ref
        self.client = client

    def top(self) -> tuple[Descriptor, bytes]:
        got = self.client.get_manifest(self.ref)
        media_type = media_type_of(got.data, got.media_type)
        return Descriptor(media_type, got.digest, len(got.data)), got.data

    def manifest(self, desc: Descriptor) -> bytes:
        # Bounded by the descriptor: a registry sending more is refused after size + 1 bytes.
        return self.client.get_manifest(self.ref.with_digest(desc.digest), size=desc.size).data

    def open_blob(self, desc: Descriptor, verify: bool = True) -> BinaryIO:
        return self.client.open_blob(self.ref, desc.digest,  # type: ignore[return-value]
                                     size=desc.size, verify=verify)

    def close(self) -> None:
        pass


class LayoutSource:
    def __init__(self, name: ImageName) -> None:
        self.name = name
        self.layout = OciLayout(name.path)

    def top(self) -> tuple[Descriptor, bytes]:
        desc = self.layout.find(self.name.tag)
        return desc, self.layout.read_blob(desc.digest)

    def manifest(self, desc: Descriptor) -> bytes:
        return self.layout.read_blob(desc.digest)

    def open_blob(self, desc: Descriptor, verify: bool = True) -> BinaryIO:
        return self.layout.open_blob(desc.digest, desc.size)  # type: ignore[return-value]

    def close(self) -> None:
        pass


class ArchiveSource:
    """An ``oci-archive`` tar, read in place (tar members are seekable sections)."""

    def __init__(self, name: ImageName) -> None:
        self.name = name
        try:
            self.tar = tarfile.open(name.path, "r:")  # noqa: SIM115 (closed by close())
        except (OSError, tarfile.TarError) as e:
            raise SociError(f"{name.path}: not a readable OCI archive ({e})") from None
        self.members = {os.path.normpath(m.name): m for m in self.tar.getmembers() if m.isfile()}

    def _read(self, path: str) -> bytes:
        member = self.members.get(path)
        if member is None:
            raise NotFoundError(f"{self.name.path}: no {path} in the archive")
        f = self.tar.extractfile(member)
        assert f is not None
        return f.read()

    def top(self) -> tuple[Descriptor, bytes]:
        index = Index.parse(self._read("index.json"), mt.OCI_INDEX)
        if self.name.tag is None:
            if len(index.manifests) != 1:
                raise NotFoundError(f"{self.name.path} holds {len(index.manifests)} images: "
                                    "name one with oci-archive:FILE:TAG")
            desc = index.manifests[0]
        else:
            found = [m for m in index.manifests
                     if (m.annotations or {}).get(mt.ANN_REF_NAME) == self.name.tag]
            if not found:
                raise NotFoundError(f"{self.name.path}: no image tagged {self.name.tag!r}")
            desc = found[-1]
        return desc, self.manifest(desc)

    def manifest(self, desc: Descriptor) -> bytes:
        return verify(self._read(f"blobs/sha256/{desc.digest[7:]}"), desc.digest,
                      f"blob {desc.digest} in {self.name.path}")

    def open_blob(self, desc: Descriptor, verify: bool = True) -> BinaryIO:
        member = self.members.get(f"blobs/sha256/{desc.digest[7:]}")
        if member is None:
            raise NotFoundError(f"{self.name.path}: blob {desc.digest} is missing")
        raw = self.tar.extractfile(member)
        assert raw is not None
        return VerifyingReader(raw, desc.digest, desc.size,  # type: ignore[return-value]
                               f"blob {desc.digest} in {self.name.path}")

    def close(self) -> None:
        self.tar.close()


def open_source(name: ImageName, client: RegistryClient) -> ImageSource:
    if name.transport == "oci":
        return LayoutSource(name)
    if name.transport == "oci-archive":
        return ArchiveSource(name)
    return RegistrySource(name, client)
