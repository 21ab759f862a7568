"""Image manifest digest -> SOCI index digest, one small file each (the fork's layout).

``<root>/indexes/<manifest hex>`` holds ``sha256:<index hex>``. Executors that
cannot write to registries drop these files (with the artifacts in
``<root>/content``) and the store finds them before asking any registry.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

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
