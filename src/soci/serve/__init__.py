"""Serving layers lazily: the core both front ends share (soci-store for podman, and the
containerd snapshotter), kept apart from either so that each stays a thin adapter.

``layers`` resolves (image, layer or TOC digest) to a mounted layer through the image's SOCI
index, with its tree and span manager, and counts its users and evicts it when idle;
``metrics`` counts what the front ends serve and renders it (Prometheus, JSON status) over
HTTP. It sits above ``fs`` (tree, spans, caches) and ``index`` (discovery), below the front
ends, and imports only downwards: ``metrics`` reads ``layers``, never the other way (the core
reports registry errors through the small :class:`~soci.serve.layers.ErrorCounter` protocol).
``fusefs`` is the FUSE filesystem both mount (podman reads it as an Additional Layer Store; the
snapshotter links its lazy snapshots into its private mount), ``config`` their shared settings;
``mounts``, ``process`` and ``background`` hold what both daemons do alike: clean up a stale
FUSE mount, log and notify systemd, fetch the rest of quiet layers.
"""
