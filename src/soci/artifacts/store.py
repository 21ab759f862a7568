"""The local store under a root directory, laid out as the fork lays it out.

    <root>/content/            an OCI image layout: SOCI indexes, zTOCs, image manifests
    <root>/indexes/<hex>       image manifest digest -> SOCI index digest
    <root>/artifacts.sqlite3   the artifacts database (rebuildable from content/)
"""

from __future__ import annotations

import os
from pathlib import Path

from soci.artifacts.db import ArtifactsDb
from soci.artifacts.mappings import IndexMappings
from soci.oci.layout import OciLayout

#: The same default as upstream's soci-snapshotter-grpc, so CLI and store agree.
DEFAULT_ROOT = "/var/lib/soci-snapshotter-grpc"


class LocalStore:
    def __init__(self, root: str | os.PathLike[str] = DEFAULT_ROOT) -> None:
        self.root = Path(root)
        self.content = OciLayout(self.root / "content", create=True)
        self.mappings = IndexMappings(self.root / "indexes")
        self.db = ArtifactsDb(self.root / "artifacts.sqlite3")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
