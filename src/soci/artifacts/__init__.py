"""soci's local artifact store: content, image-to-index mappings and the artifacts database."""

from soci.artifacts.db import ArtifactsDb, IndexRecord, ZtocRecord
from soci.artifacts.mappings import FetchedIndexes, IndexMappings
from soci.artifacts.store import DEFAULT_ROOT, LocalStore

__all__ = ["DEFAULT_ROOT", "ArtifactsDb", "FetchedIndexes", "IndexMappings", "IndexRecord",
           "LocalStore", "ZtocRecord"]
