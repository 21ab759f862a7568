"""``soci-snapshotter-grpc``: containerd's proxy snapshotter, serving layers lazily.

Data flows one way: ``labels`` (what containerd tells us about a layer) -> ``remote``
(resolve it to a lazily served layer through ``soci.serve``) -> ``snapshots`` (snapshot
metadata and directories, ``metadata`` persists them) -> ``service`` (the gRPC API) ->
``daemon`` (the process: FUSE mount, socket, signals).
"""
