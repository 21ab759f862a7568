"""The zTOC: upstream SOCI's per-layer table of contents and gzip (or zstd) checkpoints."""

from soci.ztoc.builder import BuildResult, UnservableLayerError, build_ztoc
from soci.ztoc.codec import decode, encode
from soci.ztoc.extract import FileBlob, LayerReader, find_file
from soci.ztoc.model import DEFAULT_SPAN_SIZE, Compression, FileMetadata, Ztoc
from soci.ztoc.zinfo import MAX_SPAN_SIZE, GzipZinfo, TarZinfo, ZstdZinfo, zinfo_of

__all__ = [
    "DEFAULT_SPAN_SIZE",
    "MAX_SPAN_SIZE",
    "BuildResult",
    "Compression",
    "FileBlob",
    "FileMetadata",
    "GzipZinfo",
    "LayerReader",
    "TarZinfo",
    "UnservableLayerError",
    "ZstdZinfo",
    "Ztoc",
    "build_ztoc",
    "decode",
    "encode",
    "find_file",
    "zinfo_of",
]
