"""Prefetch artifacts (upstream SOCI v0.13+): spans of a layer to fetch as soon as it is
mounted, named by the files that need them."""

from soci.prefetch.compute import (
    MergedLayers,
    clean_path,
    entrypoint_path,
    file_spans,
    prefetch_spans,
)
from soci.prefetch.model import (
    MAX_ARTIFACT_BYTES,
    VERSION,
    EmptyPrefetchError,
    PrefetchArtifact,
    PrefetchFormatError,
    PrefetchSpan,
    merge_spans,
    parse_artifact,
)

__all__ = [
    "MAX_ARTIFACT_BYTES", "VERSION", "EmptyPrefetchError", "MergedLayers", "PrefetchArtifact",
    "PrefetchFormatError", "PrefetchSpan", "clean_path", "entrypoint_path", "file_spans",
    "merge_spans", "parse_artifact", "prefetch_spans",
]
