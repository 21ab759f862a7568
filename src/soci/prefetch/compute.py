"""Which spans of which layer hold a set of files: what ``soci create --prefetch-file`` writes.

A path names the file a container sees: the one in the topmost layer that has it, unless a
layer above whites it out (``.wh.NAME``), hides its directory (``.wh..wh..opq``) or puts
something other than a directory over one of its parents. Like upstream, only layers with a
zTOC are looked at (a layer left out of the index can be neither seen into nor prefetched).
A file's spans are those holding its first byte up to the byte just past its end, mapped
from uncompressed offsets exactly as upstream maps them, so the same files give upstream's
artifact bytes.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass

from soci.oci.whiteout import Kind, whiteout_kind
from soci.prefetch.model import PrefetchSpan, merge_spans
from soci.ztoc import Ztoc
from soci.ztoc.model import FileMetadata
from soci.ztoc.zinfo import zinfo_of

#: Symbolic links followed while resolving one path (Linux's MAXSYMLINKS).
MAX_LINKS = 40
#: The PATH an image without one in its config runs with (Docker's and containerd's).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def clean_path(path: str) -> str:
    """A path as layer entries name it: absolute made relative, ``.``/``..`` resolved
    (upstream's cleanEntryPath), no trailing slash. ``""`` is the root."""
    cleaned = posixpath.normpath("/" + path.lstrip("/"))
    return cleaned.lstrip("/")


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


@dataclass(slots=True)
class _Layer:
    digest: str
    ztoc: Ztoc
    names: dict[str, FileMetadata]
    whiteouts: set[str]
    opaque: set[str]


def _index(digest: str, ztoc: Ztoc) -> _Layer:
    names: dict[str, FileMetadata] = {}
    whiteouts: set[str] = set()
    opaque: set[str] = set()
    for e in ztoc.entries:
        name = clean_path(e.name)
        if not name:
            continue
        kind, target = whiteout_kind(name)
        if kind is Kind.OPAQUE:
            opaque.add(target)
        elif kind is not Kind.PLAIN:  # AUFS bookkeeping too, as the lazy tree reads it
            whiteouts.add(target)
        else:
            names[name] = e  # a name written twice: the later entry is what tar extracts
    return _Layer(digest, ztoc, names, whiteouts, opaque)


class MergedLayers:
    """The layers of one image (bottom first) as a container's root sees them."""

    def __init__(self, layers: list[tuple[str, Ztoc]]) -> None:
        self.layers = [_index(digest, ztoc) for digest, ztoc in layers]

    def find(self, path: str) -> tuple[int, FileMetadata] | None:
        """(layer position, entry) of what ``path`` is in the merged view, or None."""
        path = clean_path(path)
        if not path:
            return None
        parents = _parents(path)
        for pos in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[pos]
            entry = layer.names.get(path)
            if entry is not None:
                return pos, entry
            if path in layer.whiteouts:
                return None
            for parent in parents:
                if parent in layer.whiteouts or parent in layer.opaque:
                    return None
                above = layer.names.get(parent)
                if above is not None and above.type != "dir":
                    return None
        return None

    def resolve(self, path: str) -> tuple[int, FileMetadata, str] | None:
        """The regular file ``path`` leads to, following symbolic links (in any component)
        and hard links: (layer position, entry, its path); None if it leads nowhere or to
        something else."""
        todo = clean_path(path).split("/")
        done: list[str] = []
        hops = 0
        while todo:
            part = todo.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if done:
                    done.pop()
                continue
            current = "/".join([*done, part])
            found = self.find(current)
            if found is None:
                return None
            entry = found[1]
            if entry.type == "symlink" or (entry.type == "hardlink" and not todo):
                hops += 1
                if hops > MAX_LINKS:
                    return None
                target = entry.linkname
                if entry.type == "hardlink" or target.startswith("/"):
                    done = []  # hard link names are from the layer's root, like absolute links
                todo = [p for p in target.split("/") if p] + todo
                continue
            if todo and entry.type != "dir":
                return None
            done.append(part)
        if not done:
            return None
        found = self.find("/".join(done))
        if found is None or found[1].type != "reg":
            return None
        return found[0], found[1], "/".join(done)


def file_spans(ztoc: Ztoc, entry: FileMetadata) -> PrefetchSpan:
    """The spans holding ``entry``'s data, upstream's way: the span of its first byte to
    the span of the byte just past its end."""
    zinfo = zinfo_of(ztoc)
    start = zinfo.span_of(entry.offset)
    end = max(zinfo.span_of(entry.offset + entry.size), start)
    return PrefetchSpan(start, min(end, ztoc.max_span_id))


def prefetch_spans(merged: MergedLayers, paths: list[str],
                   warn: Callable[[str], None] | None = None,
                   resolved: set[str] | None = None) -> dict[str, tuple[PrefetchSpan, ...]]:
    """Each layer's merged span ranges for ``paths`` (upstream's ``--prefetch-file``: the
    entry of that exact name in the topmost layer). Paths in ``resolved`` are looked up
    following links instead (they came from the image's entrypoint). Paths found nowhere
    are reported to ``warn`` and left out."""
    by_layer: dict[str, list[PrefetchSpan]] = {}
    for path in paths:
        if resolved is not None and path in resolved:
            hit = merged.resolve(path)
            found = None if hit is None else hit[:2]
        else:
            found = merged.find(path)
        if found is None:
            if warn is not None:
                warn(f"prefetch file {clean_path(path)} not found in any indexed layer")
            continue
        layer = merged.layers[found[0]]
        by_layer.setdefault(layer.digest, []).append(file_spans(layer.ztoc, found[1]))
    return {digest: merge_spans(spans) for digest, spans in by_layer.items()}


def entrypoint_path(config: dict[str, object], merged: MergedLayers) -> str | None:
    """The file an image runs first: the first word of its Entrypoint (else Cmd), looked up
    like execvp does, in the config's PATH (relative names: against WorkingDir). None if
    the config names no command or the command is in no indexed layer."""
    inner = config.get("config")
    if not isinstance(inner, dict):
        return None
    argv = inner.get("Entrypoint") or inner.get("Cmd")
    if not isinstance(argv, list) or not argv or not isinstance(argv[0], str) or not argv[0]:
        return None
    command = argv[0]
    if "/" in command:
        workdir = inner.get("WorkingDir") if isinstance(inner.get("WorkingDir"), str) else ""
        candidates = [posixpath.join("/", str(workdir or ""), command)]
    else:
        path = DEFAULT_PATH
        env = inner.get("Env")
        if isinstance(env, list):
            for item in env:
                if isinstance(item, str) and item.startswith("PATH="):
                    path = item[5:]
        candidates = [posixpath.join("/", d or ".", command) for d in path.split(":")]
    for candidate in candidates:
        hit = merged.resolve(candidate)
        if hit is not None:
            return "/" + hit[2]
    return None
