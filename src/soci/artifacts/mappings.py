"""Image manifest digest -> SOCI index digest, one small file each (the fork's layout).

``<root>/indexes/<manifest hex>`` holds ``sha256:<index hex>``. Executors that
cannot write to registries drop these files (with the artifacts in
``<root>/content``) and the store finds them before asking any registry. They are
the local operator's choice (``soci create``, ``soci convert``, a file dropped by
hand), so they hold for that manifest whatever repository it is pulled from.

Indexes fetched from a registry are recorded apart, per repository
(:class:`FetchedIndexes`): never here.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from urllib.parse import quote, unquote

from soci.fsutil import PRIVATE_DIR, PRIVATE_FILE, atomic_writer, make_dirs
from soci.oci.descriptor import ManifestError, check_digest


class IndexMappings:
    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def _path(self, manifest_digest: str) -> Path:
        return self.directory / check_digest(manifest_digest, "manifest digest")[7:]

    def get(self, manifest_digest: str) -> str | None:
        """The index digest recorded for a manifest, or None (also for a junk file)."""
        try:
            text = self._path(manifest_digest).read_text().strip()
        except (FileNotFoundError, UnicodeDecodeError):
            return None
        try:
            return check_digest(text, "index digest")
        except ManifestError:
            return None

    def put(self, manifest_digest: str, index_digest: str) -> None:
        check_digest(index_digest, "index digest")
        make_dirs(self.directory, PRIVATE_DIR)
        with atomic_writer(self._path(manifest_digest), PRIVATE_FILE) as f:
            f.write(index_digest.encode())

    def remove(self, manifest_digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(manifest_digest).unlink()

    def items(self) -> list[tuple[str, str]]:
        """All (manifest digest, index digest) pairs that parse."""
        if not self.directory.is_dir():
            return []
        out = []
        for entry in sorted(self.directory.iterdir()):
            if len(entry.name) == 64:
                index = self.get("sha256:" + entry.name)
                if index is not None:
                    out.append(("sha256:" + entry.name, index))
        return out


class FetchedIndexes:
    """(repository, image manifest digest) -> the SOCI index fetched from that repository.

    ``<root>/fetched/<quoted "registry/repository">/<manifest hex>`` holds
    ``sha256:<index hex>``. An index a registry listed as a referrer of an image is the
    choice of whoever controls that repository, so it is trusted for that repository's
    image only: the same manifest pushed elsewhere (a copy with a hostile index beside
    it) must not make this repository's containers be served through that index. These
    files are also the provenance ``rebuild-db`` reads, so a fetched index never becomes
    a local one (trusted for every repository) by rebuilding the database.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    @staticmethod
    def source_of(registry: str, repository: str) -> str:
        """The repository an index is trusted for, as these files name it."""
        return f"{registry}/{repository}"

    def _dir(self, source: str) -> Path:
        if "/" not in source:
            raise ValueError(f"not a registry/repository: {source!r}")
        # One path component, whatever the name holds: '/' and ':' are quoted.
        return self.directory / quote(source, safe="")

    def get(self, source: str, manifest_digest: str) -> str | None:
        """The index fetched for the manifest from ``source``, or None (also for junk)."""
        name = check_digest(manifest_digest, "manifest digest")[7:]
        try:
            text = (self._dir(source) / name).read_text().strip()
        except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
            return None
        try:
            return check_digest(text, "index digest")
        except ManifestError:
            return None

    def put(self, source: str, manifest_digest: str, index_digest: str) -> None:
        check_digest(index_digest, "index digest")
        name = check_digest(manifest_digest, "manifest digest")[7:]
        directory = self._dir(source)
        make_dirs(directory, PRIVATE_DIR)
        with atomic_writer(directory / name, PRIVATE_FILE) as f:
            f.write(index_digest.encode())

    def remove_index(self, index_digest: str) -> None:
        """Forget every record naming ``index_digest`` (it is being removed)."""
        for source, manifest_digest, index in self.items():
            if index == index_digest:
                with contextlib.suppress(FileNotFoundError):
                    (self._dir(source) / manifest_digest[7:]).unlink()

    def items(self) -> list[tuple[str, str, str]]:
        """All (source, manifest digest, index digest) records that parse."""
        if not self.directory.is_dir():
            return []
        out = []
        for sub in sorted(self.directory.iterdir()):
            source = unquote(sub.name)
            if "/" not in source or not sub.is_dir():
                continue
            for entry in sorted(sub.iterdir()):
                if len(entry.name) == 64:
                    index = self.get(source, "sha256:" + entry.name)
                    if index is not None:
                        out.append((source, "sha256:" + entry.name, index))
        return out
