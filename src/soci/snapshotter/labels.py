"""The snapshot labels containerd and its clients use to describe a layer being pulled.

containerd passes every label under ``containerd.io/snapshot/`` (and the target
name) from a layer descriptor's annotations to the snapshotter's Prepare; the CRI
plugin (``disable_snapshot_annotations = false``) and ``soci pull`` add these.
"""

from __future__ import annotations

#: The name the client will commit the layer's snapshot as (its chain ID).
TARGET = "containerd.io/snapshot.ref"
IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"
#: A client naming the SOCI index to use (upstream's label).
INDEX_DIGEST = "containerd.io/snapshot/remote/soci.index.digest"
#: Set by us on a snapshot whose layer is served lazily.
REMOTE = "containerd.io/snapshot/remote"
REMOTE_VALUE = "soci"

#: containerd's own limit on one label (key and value together).
MAX_LABEL_BYTES = 4096
